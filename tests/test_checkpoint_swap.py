"""An epoch checkpoint is swapped in so that a crash at any step leaves a whole checkpoint to resume from
(trainers/checkpoints.py swap_in, LocalSeam): the crash is simulated by making each rename fail once."""

import os

import pytest
import torch

from trainers import checkpoints
from trainers.checkpoints import read_tensors
from trainers.ray_seam import LocalSeam


def writer(epoch: int):
    def write(folder):
        torch.save({"w": torch.full((2,), float(epoch))}, folder / "model.pt")
        torch.save({"epoch": epoch}, folder / "train_state.pt")

    return write


def resumed_epoch(folder) -> int | None:
    """The epoch a new process would resume at (what the trainers' _resume reads)."""
    found = LocalSeam(checkpoint_dir=folder).latest_checkpoint()
    return None if found is None else read_tensors(found / "train_state.pt")["epoch"]


@pytest.mark.parametrize("failing_rename", [0, 1])  # 0: current -> aside, 1: new -> current
def test_a_crash_during_the_swap_resumes_from_a_whole_checkpoint(tmp_path, monkeypatch, failing_rename):
    folder = tmp_path / "ckpt"
    seam = LocalSeam(checkpoint_dir=folder)
    seam.report({"epoch": 1}, writer(1))
    assert resumed_epoch(folder) == 1

    renames, real_replace = [], os.replace

    def crashing_replace(src, dst):
        renames.append((src, dst))
        if len(renames) - 1 == failing_rename:
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoints.os, "replace", crashing_replace)
    with pytest.raises(OSError, match="simulated crash"):
        seam.report({"epoch": 2}, writer(2))
    monkeypatch.setattr(checkpoints.os, "replace", real_replace)
    # Before this change the old checkpoint was deleted before the new one was renamed in: nothing to
    # resume from, and the run restarted at epoch 0.
    assert resumed_epoch(folder) == 1
    assert folder.exists() == (failing_rename == 0)

    seam = LocalSeam(checkpoint_dir=folder)  # the restarted run goes on and swaps in its next epoch
    seam.report({"epoch": 2}, writer(2))
    assert resumed_epoch(folder) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "nothing left aside or half-written"


def test_a_crash_while_writing_keeps_the_last_checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    seam = LocalSeam(checkpoint_dir=folder)
    seam.report({"epoch": 1}, writer(1))

    def dies_halfway(tmp):
        (tmp / "model.pt").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        seam.report({"epoch": 2}, dies_halfway)
    assert resumed_epoch(folder) == 1
    seam.report({"epoch": 2}, writer(2))
    assert resumed_epoch(folder) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_no_checkpoint_yet(tmp_path):
    assert resumed_epoch(tmp_path / "ckpt") is None
    assert LocalSeam().latest_checkpoint() is None
