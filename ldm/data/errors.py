"""Counting, rate-limited skipping of bad samples.

webdataset's ``warn_and_continue`` prints every error and sleeps 0.5 s each time,
which turns a corrupt shard into minutes of stalled training. :class:`SkipCounter`
is a drop-in handler that continues at once, counts the skip in a counter shared
by all DataLoader workers of the process, and logs at most one line per
``interval_s`` seconds (the first error is always logged, with its message).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time

log = logging.getLogger("ldm.data")


class SkipCounter:
    """A webdataset exception handler that counts and skips."""

    def __init__(self, name: str, interval_s: float = 30.0):
        self.name = name
        self.interval_s = interval_s
        self._count = mp.get_context("spawn").Value("q", 0)
        self._last_log = -float("inf")
        self._since_log = 0

    @property
    def count(self) -> int:
        return int(self._count.value)

    def __call__(self, exn: BaseException) -> bool:
        with self._count.get_lock():
            self._count.value += 1
            total = self._count.value
        self._since_log += 1
        now = time.monotonic()
        if now - self._last_log >= self.interval_s:
            log.warning(
                "[%s] skipped a bad sample (%d skipped so far, %d since the last report): %s: %s",
                self.name, total, self._since_log, type(exn).__name__, str(exn)[:300],
            )
            self._last_log = now
            self._since_log = 0
        return True

    def __getstate__(self) -> dict:
        # the shared counter travels to DataLoader workers; the log clock restarts there
        state = dict(self.__dict__)
        state["_last_log"] = -float("inf")
        state["_since_log"] = 0
        return state
