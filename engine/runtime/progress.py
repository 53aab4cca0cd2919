"""A one-line progress bar on stderr for long start-up work (building a book, replaying
the journal): ``label [#########.....] done/total unit``, redrawn in place at most every
0.1 s and once at the end, then a newline. Shown only when ``total`` reaches
``min_total``, so small books and short journals start without noise."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    WIDTH = 30
    REDRAW_S = 0.1

    def __init__(self, label: str, total: int, *, min_total: int = 1, unit: str = "", scale: int = 1,
                 stream=None, enabled: bool = True):
        """``scale``: shown numbers are ``done // scale`` (e.g. 2**20 with ``unit`` "MiB")."""
        self.label, self.total, self.unit, self.scale = label, max(int(total), 0), unit, max(int(scale), 1)
        self.stream = stream if stream is not None else sys.stderr
        self.shown = enabled and self.total >= min_total and self.total > 0
        self._last = 0.0
        self._done = 0

    def update(self, done: int) -> None:
        """Progress to ``done`` of ``total``; redrawn when due (always at the end)."""
        self._done = min(int(done), self.total)
        if not self.shown:
            return
        now = time.monotonic()
        if self._done < self.total and now - self._last < self.REDRAW_S:
            return
        self._last = now
        fill = self.WIDTH * self._done // self.total
        unit = f" {self.unit}" if self.unit else ""
        self.stream.write(f"\r{self.label} [{'#' * fill}{'.' * (self.WIDTH - fill)}] "
                          f"{self._done // self.scale:,}/{self.total // self.scale:,}{unit}")
        if self._done >= self.total:
            self.stream.write("\n")
        self.stream.flush()

    def close(self) -> None:
        """The bar at its end (work that finished short of ``total`` shows where it stopped)."""
        if self.shown and self._done < self.total:
            self.stream.write("\n")
            self.stream.flush()
