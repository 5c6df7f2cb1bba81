"""The compact console (trainers/console.py, trainers/search/progress.py): what reaches the terminal, what
goes to the log file, and the epoch lines with their ETA."""

import subprocess
import sys
import textwrap
from types import SimpleNamespace

import mlflow

from tests.helpers import REPO
from trainers import console
from trainers.search.progress import TrialLines


def test_quiet_sends_python_c_and_child_output_to_the_log_and_says_to_the_terminal(tmp_path):
    log = tmp_path / "run" / "console.log"
    script = textwrap.dedent(
        f"""
        import os, subprocess, sys
        from trainers import console
        print("before")
        with console.quiet({str(log)!r}):
            print("python stdout")
            print("python stderr", file=sys.stderr)
            os.write(2, b"fd two\\n")  # what Ray's C++ core does
            subprocess.run(["echo", "child process"])
            console.say("epoch 1/2  segm_AP 0.5000")
        print("after")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "before",
        f"full log (Ray, workers, warnings): {log}  (--verbose shows it here)",
        "epoch 1/2  segm_AP 0.5000",
        "after",
    ]
    assert out.stderr == ""
    assert log.read_text().splitlines() == ["python stdout", "python stderr", "fd two", "child process"]


def test_quiet_with_verbose_changes_nothing(tmp_path, capsys):
    with console.quiet(tmp_path / "x.log", verbose=True):
        print("shown")
        console.say("said")
    assert capsys.readouterr().out == "shown\nsaid\n"
    assert not (tmp_path / "x.log").exists()


def test_eta_and_durations():
    assert console.duration(12.4) == "12s"
    assert console.duration(185) == "3m05s"
    assert console.duration(3720) == "1h02m"
    # 3 units in 60 s, 5 to go: 100 s more
    assert console.eta(60, 3, 5) == "1m00s elapsed, ETA 1m40s"
    assert console.eta(60, 3, 5, bound=True) == "1m00s elapsed, ETA <= 1m40s"
    assert console.eta(60, 0, 5) == "1m00s elapsed"


def _trial(trial_id: str, last: dict | None = None):
    return SimpleNamespace(trial_id=trial_id, last_result=last or {})


def test_trial_lines_count_trials_keep_the_best_and_drop_stopped_epochs_from_the_eta(capsys):
    lines = TrialLines(total=2, epochs=4, metric="segm_AP", mode="max")
    lines.started -= 100  # as if 100 s had passed since the search started
    a, b = _trial("aaaa"), _trial("bbbb")
    lines.on_trial_result(0, [], a, {"epoch": 1, "segm_AP": 0.1, "train_loss": 1.5})
    lines.on_trial_result(0, [], a, {"epoch": 2, "segm_AP": 0.3})
    b.last_result = {"epoch": 2, "segm_AP": 0.2}
    lines.on_trial_result(0, [], b, b.last_result)
    lines.on_trial_complete(0, [], b)  # stopped by the scheduler after 2 of 4 epochs
    a.last_result = {"epoch": 4, "segm_AP": 0.25}
    lines.on_trial_result(0, [], a, a.last_result)
    lines.on_trial_complete(0, [], a)
    said = capsys.readouterr().out.splitlines()
    assert said[0].startswith(
        "trial 1/2 aaaa  epoch 1/4  segm_AP 0.1000  loss 1.500  best 0.1000 (aaaa)  1m4"
    )
    # budget 2 x 4 = 8 epochs, 4 trained in 100 s, 4 to go: ETA <= 100 s
    assert said[2].startswith("trial 2/2 bbbb  epoch 2/4  segm_AP 0.2000  best 0.3000 (aaaa)")
    assert said[2].endswith("1m40s elapsed, ETA <= 1m40s")
    assert said[3] == "trial 2/2 bbbb stopped early at epoch 2/4  segm_AP 0.2000"
    # b's 2 unrun epochs left the budget: 6 trained of 6, nothing left
    assert said[4].startswith("trial 1/2 aaaa  epoch 4/4  segm_AP 0.2500  best 0.3000 (aaaa)")
    assert "ETA" not in said[4]
    assert said[5] == "trial 1/2 aaaa finished  segm_AP 0.2500"


def test_run_watcher_says_each_new_epoch_of_the_mlflow_run_once(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("watch")).info.run_id
    watcher = console.RunWatcher(uri, run_id, epochs=3, metric="segm_AP")
    watcher._started -= 30  # as if the run had trained for 30 s
    watcher.poll()  # nothing logged yet
    for epoch, value in ((1, 0.2), (2, 0.1)):
        client.log_batch(
            run_id,
            metrics=[
                mlflow.entities.Metric(k, v, 0, epoch)
                for k, v in {"epoch": epoch, "segm_AP": value, "loss": 1.0 / epoch}.items()
            ],
        )
        watcher.poll()
        watcher.poll()  # the same epoch again: said once
    said = capsys.readouterr().out.splitlines()
    assert len(said) == 2
    assert said[0].startswith("epoch 1/3  segm_AP 0.2000  loss 1.000  best 0.2000 (epoch 1)")
    assert said[1].startswith("epoch 2/3  segm_AP 0.1000  loss 0.500  best 0.2000 (epoch 1)")
    assert "ETA" in said[1]
