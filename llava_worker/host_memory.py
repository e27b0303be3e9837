"""Host memory that goes back to the system after large requests (glibc's allocator, on Linux).

glibc keeps what a burst of large requests freed (tens of MB per decoded picture, in several
threads, each with its own heap) and serves later allocations from it: the resident size stays at
the burst's peak, gigabytes above the idle worker's, and fragmentation lets it creep up round after
round. Fixing glibc's mmap threshold low would give every large block back the moment it is freed,
but then each large tensor of every step costs fresh page faults: on the CPU that took the vision
benchmark from 83 to 66 tokens/s. So the heaps are kept while the worker is busy, and trimmed
(`malloc_trim`, which also returns free pages inside the heaps) once it has been idle for a moment.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)

#: Seconds the worker must stay idle before its free heap memory is given back.
TRIM_AFTER_IDLE = 2.0


def _load_glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    # Other C libraries (musl, macOS) have no malloc_trim; their allocators are left alone.
    return libc if hasattr(libc, "malloc_trim") else None


_GLIBC = _load_glibc()


def trim() -> bool:
    """Gives the heaps' free memory back to the system; False where the C library cannot."""
    if _GLIBC is None:
        return False
    _GLIBC.malloc_trim(0)
    return True


class IdleTrimmer:
    """Trims host memory once the worker has been idle for `delay` seconds after some work.

    `poke()` is called on the event loop whenever a piece of work ends; `is_idle` says whether any
    is still going on. The trim runs in a thread (it walks every heap), at most one at a time.
    """

    def __init__(self, is_idle: Callable[[], bool], delay: float = TRIM_AFTER_IDLE) -> None:
        self._is_idle = is_idle
        self._delay = delay
        self._timer: asyncio.TimerHandle | None = None
        self._trimming: asyncio.Future[bool] | None = None
        self.trims = 0

    def poke(self) -> None:
        if _GLIBC is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self._delay, self._trim_if_idle)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _trim_if_idle(self) -> None:
        self._timer = None
        if self._trimming is not None or not self._is_idle():
            return  # the work that is going on will poke again when it ends
        self._trimming = asyncio.get_running_loop().run_in_executor(None, trim)
        self._trimming.add_done_callback(self._trimmed)

    def _trimmed(self, _: asyncio.Future[bool]) -> None:
        self._trimming = None
        self.trims += 1
