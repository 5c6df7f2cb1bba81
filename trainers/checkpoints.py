"""Checkpoint files, the one place they are read and swapped: tensors files (model.pt, train_state.pt, a
`weights=` file) load with torch.load(weights_only=True), which builds tensors and plain containers and
refuses every other object a pickle names, so a registered model or a shared checkpoint can carry no code;
and a run's epoch checkpoint folder is replaced in steps that keep one whole checkpoint on disk whenever
the process dies (`swap_in`, `finished_checkpoint`)."""

import os
import re
import shutil
from pathlib import Path

import torch

from datasets.errors import UserError


def _named(path: Path, where: str) -> str:
    return f"{where}: {path}" if where else str(path)


def read_tensors(path: Path, device="cpu", where: str = "") -> object:
    """A tensors file's content (a state_dict, or a training state of tensors and numbers), loaded with
    weights_only=True; a UserError naming the file (after `where`, e.g. a config field) for a missing
    file, one that is no torch file, or one whose pickle names anything but tensors and plain containers."""
    named = _named(path, where)
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{where}: file not found: {path}" if where else f"{path}: file not found") from None
    except Exception as e:  # torch raises several types for a file that is not a plain tensors file
        # A pickle naming other objects: torch's advice (weights_only=False) is what must not happen here
        refused = re.search(r"WeightsUnpickler error: ([^.]*)", str(e))
        if refused:
            detail = f"it holds Python objects besides tensors, refused unread: {refused.group(1)}"
        else:
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UserError(f"{named} is not a readable torch state_dict ({detail})") from None


def read_state_dict(path: Path, device="cpu", where: str = "") -> dict[str, torch.Tensor]:
    """read_tensors, for a state_dict: a UserError unless it maps names to tensors."""
    state = read_tensors(path, device, where)
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        kind = type(state).__name__
        raise UserError(f"{_named(path, where)} holds a {kind}, expected a state_dict of named tensors")
    return state


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """model.load_state_dict(state), a UserError naming `where` when the tensors do not fit the model its
    config builds (names or shapes)."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:300]
        raise UserError(f"{where}: the weights do not fit the model its config builds ({first})") from None


def _aside(folder: Path) -> Path:
    return folder.with_name(folder.name + ".old")


def swap_in(new: Path, folder: Path) -> None:
    """Replace `folder` by the finished folder `new` (same parent): the current checkpoint is renamed
    aside, `new` renamed in, and only then the old one deleted, so a crash at any step leaves a whole
    checkpoint at `folder` or beside it (finished_checkpoint finds it)."""
    old = _aside(folder)
    if folder.exists():  # whole: any copy still aside is older, from a crash after its swap
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(new, folder)
    shutil.rmtree(old, ignore_errors=True)


def finished_checkpoint(folder: Path) -> Path | None:
    """The checkpoint a run resumes from: `folder`, or the previous one that swap_in had set aside when
    the process died before the new one was renamed in; None when there is neither."""
    for candidate in (folder, _aside(folder)):
        if (candidate / "model.pt").is_file():
            return candidate
    return None


def member_folder(folder: Path, name, where: Path) -> Path:
    """The folder of an ensemble member that the ensemble file `where` names: a folder directly inside
    `folder` (no path, no link out of it), so a forged ensemble file reads nothing else on the machine."""
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise UserError(f"{where}: member {name!r:.100} is not the name of a folder beside it")
    member = Path(folder) / name
    if member.resolve().parent != Path(folder).resolve():
        raise UserError(f"{where}: member {name!r} leads out of its ensemble folder")
    return member
