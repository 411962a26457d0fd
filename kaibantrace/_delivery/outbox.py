"""The outbox: encoded signals waiting to be delivered, in SQLite or in memory.

Every batch passes through it: the sender adds the encoded signals, claims a
batch, posts it, and deletes it after a 2xx. What is still there when a
process ends (the endpoint was down, the exit budget ran out, the process was
killed after the write) is claimed and sent by the next process that runs with
the same app: at-least-once delivery, and no duplicate in normal operation.

``SqliteOutbox`` keeps one database per app ID in the state directory (WAL
mode, file 0600, directory 0700). Several processes may share it: a claim is a
short lease taken in an ``IMMEDIATE`` transaction, so two processes never post
the same signal while the lease holds. Each thread uses its own connection,
and every call runs under the fork guard (``_fork``), so a child never
inherits SQLite halfway through a statement.

``MemoryOutbox`` has the same interface and is used when no file can be
written (read-only home, container): nothing survives the process then.

Both are bounded: at most ``MAX_SIGNALS`` rows and nothing older than 24 hours
(the ingest clamps older events anyway). The oldest go first, and every drop
is reported to the caller so it can be counted.

Rows hold only encoded signals, exactly the bytes that would be sent: hashed
identities and privacy-checked payloads, never raw input.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from typing import (
    TYPE_CHECKING,
    Callable,
    Dict,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Protocol,
    Sequence,
    Tuple,
)

from .._fork import guarded
from .._log import logger
from .._policy.config import canonical_app_id, companion_apps
from .._policy.state import create_private_file, ensure_private_dir

if TYPE_CHECKING:
    import sqlite3

MAX_SIGNALS = 10_000
MAX_AGE = 24 * 3600.0
_rows_per_insert = 0  # set at the first insert, from the SQLite version (see _insert_size)


class Row(NamedTuple):
    id: int
    body: str


class Health(NamedTuple):
    """How the endpoint fared lately, as every process of the app sees it.

    ``failures`` in a row, across processes; no attempt before ``not_before``
    (wall-clock seconds); ``mine`` when this process wrote it.
    """

    failures: int = 0
    not_before: float = 0.0
    mine: bool = False


class Added(NamedTuple):
    """What an ``add`` did: the id of its last row, and rows it pushed out (too many, too old)."""

    last_id: int
    full: int = 0
    expired: int = 0


class Outbox(Protocol):
    durable: bool

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
        self._max = max_signals
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
            if count > self._max:
                full = db.execute("DELETE FROM signals WHERE id IN (SELECT id FROM signals "
                                  "ORDER BY id LIMIT ?)", (count - self._max,)).rowcount
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


def _lenient_text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")  # bad bytes become lone surrogates


# A signal kaibantrace writes is at most about 5 KiB (a 4 KiB payload and the fixed
# fields); a row far beyond that was not written by it.
MAX_ROW_CHARS = 16 * 1024


def row_problem(body: str, app_id: str) -> Optional[str]:
    """Why a claimed row must not be sent, or ``None`` when it is a signal of ``app_id``
    (or of its companion app: see ``companion_apps``).

    Rows come from a file others could write to (another program, an older
    version, a damaged disk); one that is not a signal of this app would be
    refused by the ingest with the whole batch, or worse, sent as it is.
    """
    if len(body) > MAX_ROW_CHARS:
        return "too large"
    if not body.isascii():
        try:
            body.encode("utf-8")
        except UnicodeEncodeError:  # bytes that were not UTF-8 in the file
            return "not UTF-8"
    import json

    try:
        signal = json.loads(body)
    except ValueError:
        return "not JSON"
    if not isinstance(signal, dict) or not all(
            isinstance(signal.get(key), str) for key in ("appID", "clientUser", "type")):
        return "not a signal"
    if signal["appID"].lower() not in companion_apps(app_id):
        return "another app's signal"
    return None


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


class MemoryOutbox:
    """The same interface in memory, for when no outbox file can be written."""

    durable = False

    def __init__(self, *, max_signals: int = MAX_SIGNALS, first_id: int = 1) -> None:
        self._max = max_signals
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
            over = max(0, len(self._rows) - self._max)
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
