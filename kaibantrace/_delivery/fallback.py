"""An outbox file that may stop working mid-run, with memory behind it.

A disk fills up, a file system is remounted read-only, a network home goes
away: from then on SQLite refuses to write. Without help the batch being
saved would be lost and a failing claim would stop the poster. ``FallbackOutbox``
wraps the file and keeps the sender going:

* a batch the file refuses goes to memory instead, and so does every later
  one: the outbox has degraded to memory-only, said once in the log. (Even a
  file merely locked past its two-second wait: ids must keep growing in the
  order signals were saved, so no batch may go back to the file after one went
  to memory.)
* claims take from memory first (nothing else will send those rows), then from
  the file; a file that cannot be read or leased simply yields nothing;
* rows already in the file stay there for a later process to deliver.

Memory rows get ids from ``MEMORY_BASE`` up, above any id the file hands out,
so ids still grow in the order signals were saved, which is what a waiting
``flush()`` counts on: it waits until nothing up to its id is left.
"""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple, TypeVar

from .._log import logger
from .memory_outbox import MemoryOutbox
from .outbox import Outbox
from .outbox_records import Added, Health, Row

MEMORY_BASE = 1 << 62  # far above any id SQLite gives a table of at most 10,000 live rows
T = TypeVar("T")


class FallbackOutbox:
    """``primary`` (the outbox file) while it works; memory for what it refuses."""

    def __init__(self, primary: Outbox) -> None:
        self.primary = primary
        self.max_signals = primary.max_signals
        self.memory = MemoryOutbox(max_signals=primary.max_signals, first_id=MEMORY_BASE)
        self.degraded = False
        self.durable = primary.durable  # until it degrades
        self._in_file = False  # whether this process saved anything in the file
        self._logged: set[str] = set()

    def set_busy_timeout(self, seconds: float) -> None:
        """At exit, how long saving waits for another process's write lock (see the sender)."""
        setter = getattr(self.primary, "set_busy_timeout", None)
        if setter is not None:
            self._try(lambda: setter(seconds), None)

    def add(self, app_id: str, url: str, signals: Sequence[Tuple[float, str]]) -> Added:
        if not self.degraded:
            try:
                added = self.primary.add(app_id, url, signals)
                self._in_file = True
                return added
            except Exception as exc:
                self.degraded, self.durable = True, False
                self._note("degraded", "kaibantrace: the outbox file can no longer be written "
                           "(%s); new signals stay in memory", exc)
        return self.memory.add(app_id, url, signals)

    def claim(self, app_id: str, url: str, limit: int, lease: float) -> List[Row]:
        rows = self.memory.claim(app_id, url, limit, lease)
        if rows:
            return rows
        return self._try(lambda: self.primary.claim(app_id, url, limit, lease), [])

    def delete(self, ids: Sequence[int]) -> None:
        in_memory, in_file = _split(ids)
        self.memory.delete(in_memory)
        if in_file:  # if this fails, the lease runs out and the rows are sent again: never lost
            self._try(lambda: self.primary.delete(in_file), None)

    def release(self, ids: Sequence[int]) -> None:
        in_memory, in_file = _split(ids)
        self.memory.release(in_memory)
        if in_file:
            self._try(lambda: self.primary.release(in_file), None)

    def count(self, app_id: str, url: str) -> int:
        return (self.memory.count(app_id, url)
                + self._try(lambda: self.primary.count(app_id, url), 0))

    def count_mine(self, upto: int) -> int:
        in_file = 0
        if self._in_file:  # a file that cannot be read raises here: "unknown", not "none"
            in_file = self.primary.count_mine(min(upto, MEMORY_BASE - 1))
        return in_file + self.memory.count_mine(upto)

    def drop_app(self, app_id: str) -> int:
        return self.memory.drop_app(app_id) + self._try(lambda: self.primary.drop_app(app_id), 0)

    def lease(self, ids: Sequence[int], seconds: float) -> None:
        in_memory, in_file = _split(ids)
        self.memory.lease(in_memory, seconds)
        if in_file:
            self._try(lambda: self.primary.lease(in_file, seconds), None)

    # The endpoint's health lives in the file while it can be read, so other
    # processes see it; in memory only once the file has failed.
    def health(self, url: str) -> Health:
        if self.degraded:
            return self.memory.health(url)
        return self._try(lambda: self.primary.health(url), Health())

    def record_failure(self, url: str, delay: Callable[[int], float]) -> Health:
        if not self.degraded:
            try:
                return self.primary.record_failure(url, delay)
            except Exception as exc:
                self._note("read", "kaibantrace: the outbox file failed (%s); trying again later", exc)
        return self.memory.record_failure(url, delay)

    def record_success(self, url: str) -> None:
        self.memory.record_success(url)
        if not self.degraded:
            self._try(lambda: self.primary.record_success(url), None)

    def _try(self, call: Callable[[], T], otherwise: T) -> T:
        try:
            return call()
        except Exception as exc:
            self._note("read", "kaibantrace: the outbox file failed (%s); trying again later", exc)
            return otherwise

    def _note(self, key: str, message: str, exc: BaseException) -> None:
        """Each kind of trouble once: a failing disk must not fill the host's log."""
        if key not in self._logged:
            self._logged.add(key)
            logger.debug(message, exc, stacklevel=3)


def _split(ids: Sequence[int]) -> Tuple[List[int], List[int]]:
    """``(ids of memory rows, ids of file rows)``."""
    in_memory = [i for i in ids if i >= MEMORY_BASE]
    if not in_memory:
        return [], list(ids)
    return in_memory, [i for i in ids if i < MEMORY_BASE]
