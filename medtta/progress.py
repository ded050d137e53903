"""Progress bars: tqdm's on a terminal; in a log (CI, Docker, SLURM, `> log`) plain lines instead of thousands of
carriage-return updates, one per bar at most every `LOG_INTERVAL` seconds, and its final state when it closes."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm
from tqdm.auto import tqdm as terminal_tqdm

LOG_INTERVAL = 30.0  # seconds between two lines of one bar in a log
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}{postfix}]"


class LogLines(tqdm):
    """A tqdm bar that writes whole lines: after `LOG_INTERVAL` seconds without one, and when it closes (unless
    nothing moved since its last line). It never rewrites or clears a line, so a log keeps every line it wrote."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._line_at, self._line_n, self._closing = None, 0, False
        super().__init__(*args, mininterval=LOG_INTERVAL, maxinterval=LOG_INTERVAL, bar_format=LOG_FORMAT, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        now = self._time()  # tqdm's clock
        if self._line_at is None:  # drawn when created: the first line is due LOG_INTERVAL later
            self._line_at = now
        if (self._closing or now - self._line_at >= LOG_INTERVAL) and self.n != self._line_n:
            self.fp.write(f"{self}\n")
            self.fp.flush()
            self._line_at, self._line_n = now, self.n
        return True

    def clear(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to clear: lines stay (tqdm.write clears the bars before it writes)."""

    def close(self) -> None:
        if not getattr(self, "disable", True):
            self._closing = True
            self.display()
            self.sp = None  # tqdm.close then ends a bar the way it ends a GUI one: without writing "\r" or "\n"
        super().close()


def progress_bar(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar (same arguments) drawn on a terminal, written as `LogLines` where stderr is not one."""
    if sys.stderr.isatty():
        return terminal_tqdm(iterable, **kwargs)
    return LogLines(iterable, **kwargs)
