"""The search's compact console (trainers/console.py): a Tune callback in the driver that says one line per
trial epoch (trial i/N, epoch, metric, best trial so far, elapsed, ETA) and one when a trial ends."""

import time

from ray import tune

from trainers.console import epoch_line, eta, say


class TrialLines(tune.Callback):
    """One console line per reported epoch and per finished trial. The ETA assumes every trial runs all
    `epochs` (an upper bound under ASHA, which stops some early); a predictions space's trials have no
    epochs and get a line when they finish."""

    def __init__(self, total: int, epochs: int, metric: str, mode: str):
        self.total, self.epochs, self.metric, self.mode = total, epochs, metric, mode
        self.started = time.monotonic()
        self.numbers: dict[str, int] = {}  # trial id -> its number in order of first report
        self.trained: dict[str, int] = {}  # trial id -> epochs it ran
        self.cut: dict[str, int] = {}  # trial id -> epochs the scheduler saved by stopping it
        self.best: tuple[float, str] | None = None

    def setup(self, **info):
        # Also on a resumed search, whose callbacks come back from the stopped driver's pickle.
        self.started = time.monotonic()

    def _number(self, trial) -> str:
        number = self.numbers.setdefault(trial.trial_id, len(self.numbers) + 1)
        return f"trial {number}/{self.total} {trial.trial_id}"

    def _keep_best(self, trial, result: dict) -> None:
        value = result.get(self.metric)
        if not isinstance(value, int | float):
            return
        if self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0]):
            self.best = (float(value), trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._keep_best(trial, result)
        if "epoch" not in result:
            return
        self.trained[trial.trial_id] = int(result["epoch"])
        done = sum(self.trained.values())
        remaining = self.total * self.epochs - done - sum(self.cut.values())
        line = epoch_line(result, self.epochs, self.metric, self.best)
        say(f"{self._number(trial)}  {line}  {eta(time.monotonic() - self.started, done, remaining, True)}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        self._keep_best(trial, result)
        ran = int(result.get("epoch", 0))
        if "epoch" in result and ran < self.epochs:
            self.cut[trial.trial_id] = self.epochs - ran  # never run: out of the ETA's budget
            how = f"stopped early at epoch {ran}/{self.epochs}"
        else:
            how = "finished"
        value = result.get(self.metric)
        shown = f"  {self.metric} {value:.4f}" if isinstance(value, int | float) else ""
        say(f"{self._number(trial)} {how}{shown}")

    def on_trial_error(self, iteration, trials, trial, **info):
        say(f"{self._number(trial)} failed: see the log file")
