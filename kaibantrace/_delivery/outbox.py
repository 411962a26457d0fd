"""The outbox: encoded signals waiting to be delivered, in SQLite or in memory.

Every batch passes through it: the sender adds the encoded signals, claims a
batch, posts it, and deletes it after a 2xx. What is still there when a
process ends (the endpoint was down, the exit budget ran out, the process was
killed after the write) is claimed and sent by the next process that runs with
the same app: at-least-once delivery, and no duplicate in normal operation.

This module is where to start: the contract every outbox meets (``Outbox``),
and what is done with an app's outbox as a whole, by its directory and app ID
(``open_outbox``, ``outbox_path``, ``purge``, ``waiting``, ``apps_with_outbox``,
``delivery_runs``). The rest lives next to it:

* ``outbox_records``: the rows and records an outbox hands back (``Row``,
  ``Added``, ``Health``), its bounds (``MAX_SIGNALS``, 24 hours) and the check
  on a claimed row (``row_problem``);
* ``sqlite_outbox``: ``SqliteOutbox``, one SQLite file per app ID in the state
  directory, shared by every process of the app;
* ``memory_outbox``: ``MemoryOutbox``, the same interface in memory, used when
  no file can be written (read-only home, container): nothing survives the
  process then.

Those names are imported here too (``__all__``), so ``from
kaibantrace._delivery.outbox import ...`` finds every one of them. ``fallback``
(a file with memory behind it, for a file that stops working mid-run) builds
on this module.

Both outboxes are bounded: at most ``MAX_SIGNALS`` rows and nothing older than
24 hours (the ingest clamps older events anyway). The oldest go first, and every
drop is reported to the caller so it can be counted.

Rows hold only encoded signals, exactly the bytes that would be sent: hashed
identities and privacy-checked payloads, never raw input.
"""

from __future__ import annotations

import os
import time
from typing import Callable, List, Optional, Protocol, Sequence, Tuple

from .._log import logger
from .._policy.config import canonical_app_id
from .._policy.state import ensure_private_dir
from .memory_outbox import MemoryOutbox
from .outbox_records import MAX_AGE, MAX_ROW_CHARS, MAX_SIGNALS, Added, Health, Row, row_problem
from .sqlite_outbox import SqliteOutbox

# Defined here: Outbox and the functions below. Defined next door (outbox_records,
# memory_outbox, sqlite_outbox) and imported from here by the rest of the package and
# the tests: the rest.
__all__ = [
    "MAX_AGE",
    "MAX_ROW_CHARS",
    "MAX_SIGNALS",
    "Added",
    "Health",
    "MemoryOutbox",
    "Outbox",
    "Row",
    "SqliteOutbox",
    "apps_with_outbox",
    "delivery_runs",
    "open_outbox",
    "outbox_path",
    "purge",
    "row_problem",
    "waiting",
]


class Outbox(Protocol):
    durable: bool
    max_signals: int  # the rows it keeps at most; ``add`` drops the oldest beyond that

    def add(self, app_id: str, url: str, signals: Sequence[Tuple[float, str]]) -> Added:
        """Store ``(event time, signal JSON)`` pairs, then trim to the bounds."""

    def claim(self, app_id: str, url: str, limit: int, lease: float) -> List[Row]:
        """Up to ``limit`` oldest unleased rows for this target, leased for ``lease`` seconds."""

    def delete(self, ids: Sequence[int]) -> None:
        """Forget rows: delivered, or refused for good."""

    def release(self, ids: Sequence[int]) -> None:
        """Give up a lease so the rows can be claimed again at once."""

    def count(self, app_id: str, url: str) -> int:
        """Rows waiting for this app and endpoint."""

    def count_mine(self, upto: int) -> int:
        """Rows this process added, up to id ``upto``, that are still here."""

    def drop_app(self, app_id: str) -> int:
        """Delete every row of the app (opt-out); how many there were."""

    def lease(self, ids: Sequence[int], seconds: float) -> None:
        """Set the lease of rows to end ``seconds`` from now."""

    def health(self, url: str) -> Health:
        """The endpoint's recent failures, shared by every process of the app."""

    def record_failure(self, url: str, delay: Callable[[int], float]) -> Health:
        """One more failure in a row; no attempt for ``delay(failures)`` seconds."""

    def record_success(self, url: str) -> None:
        """The endpoint answered: forget its failures."""


def outbox_path(directory: str, app_id: str) -> str:
    """The app's outbox file, one per app however its ID was written."""
    return os.path.join(directory, f"outbox-{(canonical_app_id(app_id) or app_id).lower()}.sqlite3")


def purge(directory: str, app_id: str) -> bool:
    """Delete an app's outbox files without opening them, damaged copies moved aside
    included (they may hold unsent signals too); ``True`` if one existed."""
    removed = False
    base = outbox_path(directory, app_id)
    try:
        aside = [os.path.join(directory, name) for name in os.listdir(directory)
                 if name.startswith(os.path.basename(base) + ".corrupt-")]
    except OSError:
        aside = []
    # The delivery lock goes too: an opted-out user's directory keeps nothing of the app.
    lock = os.path.join(directory, f"delivery-{app_id.lower()}.lock")
    for path in (base, base + "-wal", base + "-shm", *aside, lock):
        try:
            os.unlink(path)
            removed = True
        except FileNotFoundError:
            pass
        except OSError:
            logger.debug("kaibantrace: could not remove %s", path, exc_info=True)
    return removed


def apps_with_outbox(directory: str) -> List[str]:
    """The app IDs that have an outbox file in ``directory`` (none if it does not exist)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    apps = (name[len("outbox-"):-len(".sqlite3")] for name in names
            if name.startswith("outbox-") and name.endswith(".sqlite3"))
    # Named in lower case (as written before app IDs had one spelling), shown canonical.
    return sorted(filter(None, map(canonical_app_id, apps)))  # other files are not ours


def waiting(directory: str, app_id: str) -> Optional[int]:
    """Signals waiting in the app's outbox, read without creating or changing anything;
    ``None`` when the file cannot be read."""
    path = outbox_path(directory, app_id)
    if not os.path.exists(path):
        return 0
    import sqlite3
    from urllib.parse import quote

    try:
        uri = "file:" + quote(os.path.abspath(path)) + "?mode=ro"
        connection = sqlite3.connect(uri, uri=True, timeout=2.0)
        try:
            (count,) = connection.execute("SELECT COUNT(*) FROM signals").fetchone()
        finally:
            connection.close()
        return int(count)
    except sqlite3.Error:
        return None


def delivery_runs(directory: str, app_id: str) -> List[Tuple[float, int]]:
    """``(start time, process ID)`` of the app's last delivery processes, oldest first; read
    without creating or changing anything (empty when there is no such record)."""
    path = outbox_path(directory, app_id)
    if not os.path.exists(path):
        return []
    import sqlite3
    from urllib.parse import quote

    try:
        uri = "file:" + quote(os.path.abspath(path)) + "?mode=ro"
        connection = sqlite3.connect(uri, uri=True, timeout=2.0)
        try:
            rows = connection.execute("SELECT started, pid FROM delivery_runs ORDER BY rowid").fetchall()
        finally:
            connection.close()
    except sqlite3.Error:  # an older outbox without the table, or one that cannot be read
        return []
    return [(float(started), int(pid)) for started, pid in rows]


def open_outbox(directory: str, app_id: str, *, max_signals: int = MAX_SIGNALS) -> Outbox:
    """The app's SQLite outbox, or a memory one when the directory is unusable (logged at DEBUG).

    A file that is not a sound SQLite database (corrupted, truncated, something
    else under that name) is moved aside, never deleted, as
    ``outbox-<app>.sqlite3.corrupt-<time>``, and a new outbox takes its place.
    """
    import sqlite3  # here, not at the top: a process that never sends never loads SQLite

    path = outbox_path(directory, app_id)
    for attempt in (1, 2):
        try:
            ensure_private_dir(directory)
            return SqliteOutbox(path, max_signals=max_signals)
        except sqlite3.DatabaseError as exc:
            corrupt = not isinstance(exc, sqlite3.OperationalError)  # not "locked", "no disk"
            if attempt == 1 and corrupt and _move_aside(path):
                logger.debug("kaibantrace: the outbox was damaged (%s); moved aside, starting anew",
                             exc)
                continue
            problem = type(exc).__name__
        except OSError as exc:
            problem = type(exc).__name__
        break
    logger.debug("kaibantrace: no outbox file (%s); undelivered signals stay in memory", problem)
    return MemoryOutbox(max_signals=max_signals)


def _move_aside(path: str) -> bool:
    """Rename a damaged outbox (and its journal files) out of the way; whether it moved."""
    suffix = f".corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    try:
        os.replace(path, path + suffix)
    except OSError:
        return False
    for journal in ("-wal", "-shm"):
        try:
            os.replace(path + journal, path + suffix + journal)
        except OSError:
            pass
    return True


