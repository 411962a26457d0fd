"""``SqliteOutbox``: the outbox in an SQLite file, shared by every process of one app.

There is one database per app ID in the state directory (WAL mode, file 0600). Several
processes may share it: a claim is a short lease taken in an ``IMMEDIATE``
transaction, so two processes never post the same signal while the lease holds.
Each thread uses its own connection, closed when the thread ends or the outbox
goes, and every call runs under the fork guard (``_fork``), so a child never
inherits SQLite halfway through a statement.

What is still in the file when a process ends is claimed and sent by the next
process that runs with the same app. The file also keeps the endpoint's recent
failures and the last delivery runs, which every process of the app shares.

The class and its SQL (schema, statement helpers) are here. What the file is
called, how it is opened (a damaged one moved aside, memory when none can be
written) and how other commands read it without opening an outbox are in ``outbox``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator, List, Optional, Sequence, Tuple

from .._fork import guarded
from .._policy.state import create_private_file
from .outbox_records import MAX_AGE, MAX_SIGNALS, Added, Health, Row

if TYPE_CHECKING:
    import sqlite3

_rows_per_insert = 0  # set at the first insert, from the SQLite version (see _insert_size)


def _origin() -> str:
    return f"{os.getpid()}-{os.urandom(6).hex()}"


_process: Tuple[int, str] = (0, "")


def _process_origin() -> str:
    """One name for this process (a forked child gets its own): the endpoint's health is
    shared between processes, while the clients of one process each keep their own
    backoff and circuit breaker."""
    global _process
    pid = os.getpid()
    if _process[0] != pid:
        _process = (pid, _origin())
    return _process[1]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS signals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    app_id TEXT NOT NULL,
    url TEXT NOT NULL,
    created REAL NOT NULL,
    body TEXT NOT NULL,
    origin TEXT NOT NULL,
    lease_until REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS signals_by_app ON signals (app_id, url);
CREATE TABLE IF NOT EXISTS delivery_runs (
    started REAL NOT NULL,
    pid INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS endpoint_health (
    url TEXT PRIMARY KEY,
    failures INTEGER NOT NULL,
    not_before REAL NOT NULL,
    origin TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS signals_by_created ON signals (created);
DROP INDEX IF EXISTS signals_by_target;
DROP INDEX IF EXISTS signals_by_origin;
"""
# Two indexes only: every row is inserted, leased and deleted once, and each index
# costs on all three. A claim reads the (app, url) index in id order and checks the
# lease on the row it reads anyway; counting a process's own rows scans a range of
# ids. The two dropped indexes are those of earlier versions. ``delivery_runs`` keeps when
# the last hundred delivery processes started (``kaibantrace status`` shows it). ``endpoint_health`` holds
# the failures every process of the app saw in a row, so that a new process, a short
# run of a CLI started in a loop say, does not try an endpoint another one just found
# down: the backoff outlives the process that backed off.


class SqliteOutbox:
    """The outbox in an SQLite file shared by every process of one app."""

    durable = True

    @guarded
    def __init__(self, path: str, *, max_signals: int = MAX_SIGNALS) -> None:
        self.path = path
        self.max_signals = max_signals
        self._origin = _origin()
        self._checked = False  # the first connection checks the file and sets up the schema
        self._local = threading.local()
        create_private_file(path)
        self._connection()  # fail now, in open_outbox, if the file is unusable

    def _connection(self) -> sqlite3.Connection:
        connection: Optional[sqlite3.Connection] = getattr(self._local, "connection", None)
        if connection is None:
            import sqlite3

            connection = sqlite3.connect(self.path, timeout=2.0, isolation_level=None,
                                         check_same_thread=True)
            # Text that is not UTF-8 (a row another program planted) must not make
            # every claim fail: it is read with its bad bytes kept apart, then refused.
            connection.text_factory = _lenient_text
            try:
                self._prepare(connection, check=not self._checked)
                self._checked = True
            except BaseException:
                connection.close()
                raise
            self._local.connection = connection
            self._local.closer = _Closer(connection)  # closes it when the thread or outbox goes
        return connection

    @staticmethod
    def _prepare(connection: sqlite3.Connection, *, check: bool = True) -> None:
        """WAL mode and the schema, retried briefly while another process sets them up.

        Switching to WAL needs the database to itself and does not wait on the
        busy timeout, so processes opening a new outbox together may see
        "database is locked" for a moment. The integrity check and the schema
        are for the first connection only: another thread's (the exit hook's)
        need not read the whole file again.
        """
        import sqlite3

        deadline = time.monotonic() + 2.0
        while True:
            try:
                (mode,) = connection.execute("PRAGMA journal_mode").fetchone()
                if str(mode).lower() != "wal":
                    connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("PRAGMA synchronous=NORMAL")  # survives a killed process
                if not check:
                    return
                (verdict,) = connection.execute("PRAGMA quick_check(1)").fetchone()
                if verdict != "ok":
                    raise sqlite3.DatabaseError(f"the integrity check says {verdict!r}")
                connection.executescript(_SCHEMA)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)

    @guarded
    def set_busy_timeout(self, seconds: float) -> None:
        """How long this thread's statements wait for another process's write lock."""
        self._connection().execute(f"PRAGMA busy_timeout = {max(0, int(seconds * 1000))}")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """An IMMEDIATE transaction, rolled back on any failure, a failed COMMIT included
        (a full disk refuses the COMMIT and would leave the write lock held)."""
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except Exception:  # the original failure is the one worth reporting
                    pass
            raise

    def _write(self, statements: list[Tuple[str, Sequence[object]]]) -> List[int]:
        """Run statements in one IMMEDIATE transaction; the row counts of each."""
        if not statements:
            return []
        with self._transaction() as db:
            return [db.execute(sql, args).rowcount for sql, args in statements]

    @guarded
    def add(self, app_id: str, url: str, signals: Sequence[Tuple[float, str]]) -> Added:
        app_id = app_id.lower()  # app IDs are UUIDs: any case names the same app
        now = time.time()
        with self._transaction() as db:
            rows = _insert_size()
            for start in range(0, len(signals), rows):
                chunk = signals[start:start + rows]
                # One statement per chunk: the sqlite3 module lets go of the GIL
                # at every step, and a busy host thread makes each hand-back cost
                # up to a switch interval (5 ms), so a row per step would be slow.
                db.execute(
                    "WITH new (created, body) AS (VALUES " + ",".join(["(?,?)"] * len(chunk))
                    + ") INSERT INTO signals (app_id, url, created, body, origin) "
                    "SELECT ?, ?, created, body, ? FROM new",
                    [value for pair in chunk for value in pair] + [app_id, url, self._origin])
            (last_id,) = db.execute("SELECT last_insert_rowid()").fetchone()
            expired = db.execute("DELETE FROM signals WHERE created < ?", (now - MAX_AGE,)).rowcount
            (count,) = db.execute("SELECT COUNT(*) FROM signals").fetchone()
            full = 0
            if count > self.max_signals:
                full = db.execute("DELETE FROM signals WHERE id IN (SELECT id FROM signals "
                                  "ORDER BY id LIMIT ?)", (count - self.max_signals,)).rowcount
        return Added(int(last_id), full, expired)

    @guarded
    def claim(self, app_id: str, url: str, limit: int, lease: float) -> List[Row]:
        app_id = app_id.lower()  # app IDs are UUIDs: any case names the same app
        now = time.time()
        with self._transaction() as db:
            # The batch comes back as one row (see ``add``): the ids, and the
            # bodies joined by a character that JSON text always escapes.
            ids_text, bodies = db.execute(
                "SELECT group_concat(id), group_concat(body, char(30)) FROM (SELECT id, body "
                "FROM signals WHERE app_id = ? AND url = ? AND lease_until < ? "
                "ORDER BY id LIMIT ?)", (app_id, url, now, limit)).fetchone()
            rows: List[Row] = []
            if ids_text is not None:
                ids = [int(i) for i in ids_text.split(",")]
                parts = bodies.split("\x1e")
                if len(parts) != len(ids):  # a row not written by kaibantrace holds the separator
                    found = dict(db.execute(f"SELECT id, body FROM signals WHERE id IN ({_marks(ids)})",
                                            ids).fetchall())
                    parts = [str(found.get(i, "")) for i in ids]
                rows = [Row(i, body) for i, body in zip(ids, parts)]
            if rows:  # the same rows: nothing else writes inside this transaction
                db.execute("UPDATE signals SET lease_until = ? WHERE id IN (SELECT id FROM signals "
                           "WHERE app_id = ? AND url = ? AND lease_until < ? ORDER BY id LIMIT ?)",
                           (now + lease, app_id, url, now, limit))
        return rows

    @guarded
    def delete(self, ids: Sequence[int]) -> None:
        self._write([(f"DELETE FROM signals WHERE id IN ({_marks(part)})", part)
                     for part in _parts(ids)])

    @guarded
    def release(self, ids: Sequence[int]) -> None:
        self._write([(f"UPDATE signals SET lease_until = 0 WHERE id IN ({_marks(part)})", part)
                     for part in _parts(ids)])

    @guarded
    def count(self, app_id: str, url: str) -> int:
        app_id = app_id.lower()  # app IDs are UUIDs: any case names the same app
        (n,) = self._connection().execute(
            "SELECT COUNT(*) FROM signals WHERE app_id = ? AND url = ?", (app_id, url)).fetchone()
        return int(n)

    @guarded
    def count_mine(self, upto: int) -> int:
        (n,) = self._connection().execute(
            "SELECT COUNT(*) FROM signals WHERE origin = ? AND id <= ?",
            (self._origin, upto)).fetchone()
        return int(n)

    @guarded
    def drop_app(self, app_id: str) -> int:
        app_id = app_id.lower()  # app IDs are UUIDs: any case names the same app
        return self._write([("DELETE FROM signals WHERE app_id = ?", (app_id,))])[0]

    @guarded
    def lease(self, ids: Sequence[int], seconds: float) -> None:
        until = time.time() + seconds
        self._write([(f"UPDATE signals SET lease_until = ? WHERE id IN ({_marks(part)})",
                      [until, *part]) for part in _parts(ids)])

    @guarded
    def health(self, url: str) -> Health:
        row = self._connection().execute(
            "SELECT failures, not_before, origin FROM endpoint_health WHERE url = ?", (url,)).fetchone()
        if row is None:
            return Health()
        return Health(int(row[0]), float(row[1]), row[2] == _process_origin())

    @guarded
    def record_failure(self, url: str, delay: Callable[[int], float]) -> Health:
        with self._transaction() as db:
            row = db.execute("SELECT failures FROM endpoint_health WHERE url = ?", (url,)).fetchone()
            failures = (int(row[0]) if row else 0) + 1
            not_before = time.time() + delay(failures)
            db.execute("INSERT OR REPLACE INTO endpoint_health (url, failures, not_before, origin) "
                       "VALUES (?, ?, ?, ?)", (url, failures, not_before, _process_origin()))
        return Health(failures, not_before, True)

    @guarded
    def record_success(self, url: str) -> None:
        self._write([("DELETE FROM endpoint_health WHERE url = ?", (url,))])

    @guarded
    def note_delivery_run(self, pid: int) -> None:
        """A delivery process started: remembered, the last hundred only."""
        self._write([("INSERT INTO delivery_runs (started, pid) VALUES (?, ?)", (time.time(), pid)),
                     ("DELETE FROM delivery_runs WHERE rowid NOT IN (SELECT rowid FROM delivery_runs "
                      "ORDER BY rowid DESC LIMIT 100)", ())])


class _Closer:
    """Closes a thread's connection when that thread's slot in ``_local`` is dropped: when
    the thread ends, or when the outbox itself goes (a one-off use, a client shut down).

    Left to the garbage collector, the connection would be closed all the same, but
    Python 3.13 reports each one it finds open as a ``ResourceWarning`` (``unclosed
    database``) in the host program's output.
    """

    __slots__ = ("connection",)

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection

    def __del__(self) -> None:
        try:
            self.connection.close()
        except Exception:  # never raise from a finalizer; the collector closes it then
            pass


def _lenient_text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")  # bad bytes become lone surrogates


def _insert_size() -> int:
    """Rows per INSERT: two parameters each, under the limit of the SQLite in use (999
    before 3.32, 32,766 since). Fewer statements, fewer hand-backs of the GIL."""
    global _rows_per_insert
    if not _rows_per_insert:
        import sqlite3

        _rows_per_insert = 5_000 if sqlite3.sqlite_version_info >= (3, 32, 0) else 400
    return _rows_per_insert


def _parts(ids: Sequence[int], size: int = 900) -> List[List[int]]:
    """``ids`` in lists short enough for one statement on any SQLite (at most 999 parameters)."""
    return [list(ids[start:start + size]) for start in range(0, len(ids), size)]


def _marks(items: Sequence[object]) -> str:
    return ",".join("?" * len(items))

