"""``MemoryOutbox``: the outbox in this process's memory, for when no file can be written.

It has the same interface as the SQLite outbox (``sqlite_outbox``) and the same
bounds, and is used when no outbox file can be written (read-only home,
container): nothing survives the process then. The fallback outbox
(``fallback``) also keeps one behind a file that stops working mid-run.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Callable, Dict, List, Sequence, Tuple

from .outbox_records import MAX_AGE, MAX_SIGNALS, Added, Health, Row


class MemoryOutbox:
    """The same interface in memory, for when no outbox file can be written."""

    durable = False

    def __init__(self, *, max_signals: int = MAX_SIGNALS, first_id: int = 1) -> None:
        self.max_signals = max_signals
        self._rows: Dict[int, Tuple[str, str, float, str, float]] = {}
        self._next = first_id
        self._lock = threading.Lock()
        self._health: Dict[str, Health] = {}  # this process only: nothing else sees memory

    def add(self, app_id: str, url: str, signals: Sequence[Tuple[float, str]]) -> Added:
        app_id = app_id.lower()  # app IDs are UUIDs: any case names the same app
        with self._lock:
            for created, body in signals:
                self._rows[self._next] = (app_id, url, created, body, 0.0)
                self._next += 1
            cutoff = time.time() - MAX_AGE
            old = [i for i, row in self._rows.items() if row[2] < cutoff]
            for i in old:
                del self._rows[i]
            over = max(0, len(self._rows) - self.max_signals)
            for i in list(itertools.islice(self._rows, over)):  # ids ascend: oldest first
                del self._rows[i]
            return Added(self._next - 1, over, len(old))

    def claim(self, app_id: str, url: str, limit: int, lease: float) -> List[Row]:
        app_id = app_id.lower()  # app IDs are UUIDs: any case names the same app
        now = time.time()
        with self._lock:
            rows = list(itertools.islice((Row(i, row[3]) for i, row in self._rows.items()
                                          if row[0] == app_id and row[1] == url and row[4] < now),
                                         limit))
            for r in rows:
                self._rows[r.id] = (*self._rows[r.id][:4], now + lease)
            return rows

    def delete(self, ids: Sequence[int]) -> None:
        with self._lock:
            for i in ids:
                self._rows.pop(i, None)

    def release(self, ids: Sequence[int]) -> None:
        with self._lock:
            for i in ids:
                if i in self._rows:
                    self._rows[i] = (*self._rows[i][:4], 0.0)

    def count(self, app_id: str, url: str) -> int:
        app_id = app_id.lower()  # app IDs are UUIDs: any case names the same app
        with self._lock:
            return sum(1 for row in self._rows.values() if row[0] == app_id and row[1] == url)

    def count_mine(self, upto: int) -> int:
        with self._lock:
            return sum(1 for i in self._rows if i <= upto)

    def drop_app(self, app_id: str) -> int:
        app_id = app_id.lower()  # app IDs are UUIDs: any case names the same app
        with self._lock:
            doomed = [i for i, row in self._rows.items() if row[0] == app_id]
            for i in doomed:
                del self._rows[i]
            return len(doomed)

    def lease(self, ids: Sequence[int], seconds: float) -> None:
        until = time.time() + seconds
        with self._lock:
            for i in ids:
                if i in self._rows:
                    self._rows[i] = (*self._rows[i][:4], until)

    def health(self, url: str) -> Health:
        return self._health.get(url, Health())

    def record_failure(self, url: str, delay: Callable[[int], float]) -> Health:
        failures = self._health.get(url, Health()).failures + 1
        health = self._health[url] = Health(failures, time.time() + delay(failures), True)
        return health

    def record_success(self, url: str) -> None:
        self._health.pop(url, None)
