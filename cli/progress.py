"""Progress on standard error with an honest ETA, for the long commands (``simulate``, ``normalize``, ``pretrain``).

Click's progress bar extrapolates from the start of the command, so a job that spends its first seconds loading a
model or warming up shows an ETA many times too long. Here the rate is measured from the first completed item
only, and smoothed exponentially over update intervals (``alpha`` per second of work), so the ETA follows the
current throughput without jumping at every batch.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Callable, Optional, TextIO


def format_seconds(seconds: float) -> str:
    """``'42 s'``, ``'3 min 05 s'`` or ``'2 h 07 min'``."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


class Progress:
    """``done / total`` with items per second and an ETA.

    Args:
        total: items in the job.
        label: what is counted (shown first).
        file: where to write (default standard error). On a terminal the line is redrawn; elsewhere a line is
            written every ``every_s`` seconds and at the end.
        half_life_s: half-life, in seconds of work, of the exponential smoothing of the rate.
        every_s: seconds between lines when ``file`` is not a terminal.
        clock: a monotonic clock (tests pass their own).
        quiet: write nothing (for callers that print the rate and ETA in their own lines).
    """

    def __init__(self, total: int, label: str, file: Optional[TextIO] = None, half_life_s: float = 10.0,
                 every_s: float = 10.0, clock: Callable[[], float] = time.perf_counter, quiet: bool = False):
        self.total, self.label = max(0, int(total)), label
        self.file = file if file is not None else sys.stderr
        self.half_life_s, self.every_s, self.clock = float(half_life_s), float(every_s), clock
        self.done = 0
        self.rate: Optional[float] = None  # smoothed items per second
        self._t_last: Optional[float] = None
        self._t_print = -math.inf
        self.quiet = bool(quiet)
        self._tty = bool(getattr(self.file, "isatty", lambda: False)())

    def update(self, n: int = 1) -> None:
        """``n`` more items are done."""
        now = self.clock()
        self.done = min(self.total, self.done + int(n)) if self.total else self.done + int(n)
        if self._t_last is None:  # the first items only start the clock: start-up is not extrapolated
            self._t_last = now
        elif now > self._t_last:
            dt = now - self._t_last
            inst = n / dt
            w = 1.0 - 0.5 ** (dt / self.half_life_s) if self.half_life_s > 0 else 1.0
            self.rate = inst if self.rate is None else self.rate + w * (inst - self.rate)
            self._t_last = now
        self._show(now)

    def eta_s(self) -> Optional[float]:
        """Seconds left at the smoothed rate, or None before a rate is known."""
        if self.rate is None or self.rate <= 0:
            return None
        return (self.total - self.done) / self.rate

    def line(self) -> str:
        eta = self.eta_s()
        parts = [f"{self.label}: {self.done}/{self.total}"]
        if self.rate is not None:
            parts.append(f"{self.rate:.1f}/s")
        if self.total and self.done >= self.total:
            parts.append("done")
        else:
            parts.append("ETA " + (format_seconds(eta) if eta is not None else "…"))
        return "  ".join(parts)

    def _show(self, now: float, final: bool = False) -> None:
        if self.quiet:
            return
        if self._tty:
            self.file.write("\r" + self.line() + ("\n" if final else ""))
            self.file.flush()
        elif final or now - self._t_print >= self.every_s:
            self.file.write(self.line() + "\n")
            self.file.flush()
            self._t_print = now

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self._show(self.clock(), final=True)


__all__ = ["Progress", "format_seconds"]
