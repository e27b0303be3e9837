"""A log that cannot flood: warnings that repeat are passed a few times per window, then counted."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

#: Lines of one kind (logger, level and message template) passed per window.
REPEATS_PER_WINDOW = 5
#: Seconds of one window.
WINDOW_SECONDS = 10.0
#: Kinds tracked per window; lines of kinds past this many share one allowance.
MAX_KINDS = 1000


class RepeatLimit(logging.Filter):
    """Passes at most `repeats` warnings (and errors) of a kind per `window` seconds.

    A fault that repeats in a tight loop (asyncio logs each failed accept() when the process runs out
    of file descriptors, thousands a second) would otherwise fill the disk and drown every other
    line. The last line passed in a window says that more like it are being dropped; the first
    line of the next window says how many were. Lines below `level` (a request's own log line, the
    access log) all pass: there is one per request served, which is what the log is for.
    """

    def __init__(
        self,
        repeats: int = REPEATS_PER_WINDOW,
        window: float = WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        level: int = logging.WARNING,
    ) -> None:
        super().__init__()
        self._level = level
        self._repeats = repeats
        self._window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._window_start = clock()
        self._passed: dict[tuple[str, int, str], int] = {}
        self._dropped: dict[tuple[str, int, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self._level:
            return True
        kind = (record.name, record.levelno, str(record.msg))
        with self._lock:
            now = self._clock()
            if now - self._window_start >= self._window:
                self._window_start = now
                earlier_drops = self._dropped
                self._passed, self._dropped = {}, {}
            else:
                earlier_drops = {}
            if kind not in self._passed and len(self._passed) >= MAX_KINDS:
                kind = ("", 0, "")  # too many kinds at once: the rest share one allowance
            passed = self._passed.get(kind, 0)
            if passed >= self._repeats:
                self._dropped[kind] = self._dropped.get(kind, 0) + 1
                return False
            self._passed[kind] = passed + 1
            dropped_before = earlier_drops.get(kind, 0)
        if dropped_before:
            _append(record, f" [{dropped_before} more like this were dropped in the previous {self._window:g} s]")
        if passed + 1 == self._repeats:
            _append(
                record, f" [repeated {self._repeats} times; more like this are dropped for up to {self._window:g} s]"
            )
        return True


def _append(record: logging.LogRecord, note: str) -> None:
    # Rendered once here, so the note cannot break the record's own %-formatting.
    record.msg = record.getMessage() + note
    record.args = None
