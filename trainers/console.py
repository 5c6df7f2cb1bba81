"""The compact console of the CLIs that start Ray (platform.tune, platform.train): while `quiet` is on,
everything this process and Ray write to stdout and stderr (Tune's status tables, every worker's log lines
that Ray forwards, warnings, C++ messages) goes to a log file, and only the lines passed to `say` reach the
terminal: one line per epoch with the metric, the best so far and an ETA, then the CLI's final table.
`--verbose` leaves the console as it was.

The redirection is of the file descriptors, not of `sys.stdout`: Ray prints forwarded worker lines from a
thread of its own and its C++ core writes to fd 2 directly, so only a dup2 catches all of them."""

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

_terminal_fd: int | None = None  # the terminal's stdout while `quiet` sends fds 1 and 2 to the log file


def say(line: str) -> None:
    """One line on the user's terminal, also while `quiet` sends everything else to the log file."""
    if _terminal_fd is None:
        print(line, flush=True)
    else:
        os.write(_terminal_fd, (line + "\n").encode())


@contextlib.contextmanager
def quiet(log_file: Path, verbose: bool = False) -> Iterator[None]:
    """Send this process's stdout and stderr (and so Ray's forwarded worker logs) to `log_file` (appended)
    until the block ends; `say` still reaches the terminal. Does nothing with `verbose` or inside another
    `quiet`."""
    global _terminal_fd
    if verbose or _terminal_fd is not None:
        yield
        return
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    say(f"full log (Ray, workers, warnings): {log_file}  (--verbose shows it here)")
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_file, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    _terminal_fd = saved[0]
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        _terminal_fd = None


def duration(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def epoch_line(values: dict, epochs: int, metric: str, best: tuple[float, str] | None) -> str:
    """ "epoch 5/16  segm_AP 0.2130  loss 0.812  best 0.2830 (<where>)" from one epoch's reported values."""
    parts = [f"epoch {int(values.get('epoch', 0))}/{epochs}"]
    if isinstance(values.get(metric), int | float):
        parts.append(f"{metric} {values[metric]:.4f}")
    loss = values.get("train_loss", values.get("loss"))  # what the detector and classifier loops report
    if isinstance(loss, int | float):
        parts.append(f"loss {loss:.3f}")
    if best is not None:
        parts.append(f"best {best[0]:.4f} ({best[1]})")
    return "  ".join(parts)


class RunWatcher:
    """Prints `epoch_line` for every epoch a Ray Train run logs to its MLflow run (trainers.tracking's
    EpochLogger logs them from Ray Train's controller, another process), from a thread of the driver that
    polls the run every `every_s` seconds while the run trains:

        with RunWatcher(tracking_uri, run_id, cfg.epochs, task.metric):
            trainer.fit()
    """

    def __init__(self, tracking_uri: str, run_id: str, epochs: int, metric: str, every_s: float = 5.0):
        self.tracking_uri, self.run_id, self.epochs, self.metric = tracking_uri, run_id, epochs, metric
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="epoch-lines", daemon=True)
        self._shown = 0
        self._first = 0
        self._started = time.monotonic()
        self._best: tuple[float, int] | None = None

    def __enter__(self):
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=2 * self.every_s)
        self.poll()  # the last epoch, logged just before fit() returned

    def _watch(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.poll()
            except Exception as e:  # a tracking server hiccup must not end the run; the next poll retries
                say(f"(progress: cannot read run {self.run_id}: {str(e).splitlines()[0]})")

    def poll(self) -> None:
        """Say the epochs logged since the last poll (their latest values: one line per poll)."""
        import mlflow

        metrics = mlflow.MlflowClient(self.tracking_uri).get_run(self.run_id).data.metrics
        epoch = int(metrics.get("epoch", 0))
        if epoch <= self._shown:
            return
        if self._shown == 0:  # a resumed run starts counting where its checkpoint ended
            self._first = int(metrics.get("resumed_at_epoch", 0))
        self._shown = epoch
        value = metrics.get(self.metric)
        if isinstance(value, float) and (self._best is None or value > self._best[0]):
            self._best = (value, epoch)
        best = (self._best[0], f"epoch {self._best[1]}") if self._best else None
        line = epoch_line(metrics, self.epochs, self.metric, best)
        say(f"{line}  {eta(time.monotonic() - self._started, epoch - self._first, self.epochs - epoch)}")


def eta(elapsed: float, done: float, remaining: float, bound: bool = False) -> str:
    """ "3m12s elapsed, ETA 6m40s" from `done` units in `elapsed` seconds and `remaining` units to go;
    `bound`: the remaining units are an upper bound (trials an early-stopping scheduler may cut short)."""
    text = f"{duration(elapsed)} elapsed"
    if done > 0 and remaining > 0:
        text += f", ETA {'<= ' if bound else ''}{duration(remaining * elapsed / done)}"
    return text
