"""The one progress report of long loops (conversions, slicing, prediction, caching, tiled inference):
count, rate and ETA, as a tqdm bar on a terminal and as a plain log line every few seconds elsewhere (Ray
job logs, CI, a redirected CLI), where a redrawn bar would be noise.

    with Progress(len(records), "predicted", "images", log.info) as bar:
        for record in records:
            ...
            bar.update()
"""

import sys
import time
from collections.abc import Callable

from tqdm import tqdm


class Progress:
    """`total` units of work; `update(n)` after each piece. Plain lines read
    "<desc> <done>/<total> <unit>, <rate> <unit>/s, ETA <s> s[, <status>]", one every `every_s` seconds and
    one at the end (`final`); `status` adds counters the caller keeps (written, dropped, ...)."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str,
        log: Callable[[str], None],
        *,
        every_s: float = 5.0,
        final: bool = True,
        terminal: bool | None = None,
    ):
        self.total, self.desc, self.unit, self.log = total, desc, unit, log
        self.every_s, self.final = every_s, final
        self.done = 0
        self.started = self._last = time.perf_counter()
        terminal = sys.stderr.isatty() if terminal is None else terminal
        self._bar = tqdm(total=total, desc=desc, unit=f" {unit}", file=sys.stderr) if terminal else None

    def update(self, n: int = 1, status: str = "") -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            if status:
                self._bar.set_postfix_str(status, refresh=False)
            return
        now = time.perf_counter()
        finished = self.done >= self.total
        if (now - self._last >= self.every_s and not finished) or (finished and self.final):
            self._last = now
            self.log(self.line(now, status))

    def line(self, now: float, status: str = "") -> str:
        rate = self.done / max(now - self.started, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        text = f"{self.desc} {self.done}/{self.total} {self.unit}, {rate:.2f} {self.unit}/s, ETA {eta:.0f} s"
        return f"{text}, {status}" if status else text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
