"""The outbox file's connections are closed, not left to the garbage collector.

``SqliteOutbox`` opens one SQLite connection per thread that uses it. Each must
be closed when its thread ends or when the outbox is dropped (a one-off use, the
delivery process noting its run, say): one the garbage collector finds still open
is closed all the same, but Python 3.13 reports it as a ``ResourceWarning``
(``unclosed database``) in the host program's output.
"""

from __future__ import annotations

import gc
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import List

from kaibantrace._delivery.outbox import SqliteOutbox

from .conftest import APP_ID, subprocess_env

URL = "http://127.0.0.1:9/v2/"


def closed(connection: sqlite3.Connection, wait: float = 5.0) -> bool:
    """Whether ``connection`` is closed (from any thread: ``total_changes`` checks no thread)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            connection.total_changes  # noqa: B018 (an attribute read that raises once closed)
        except sqlite3.ProgrammingError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


def test_a_dropped_outbox_closes_its_connection(tmp_path: Path) -> None:
    """The connection the outbox opened to check the file goes with the outbox."""
    box = SqliteOutbox(str(tmp_path / "o.sqlite3"))
    box.add(APP_ID, URL, [(time.time(), "{}")])
    connection = box._local.connection
    del box
    gc.collect()
    assert closed(connection)


def test_a_thread_that_ends_closes_its_connection(tmp_path: Path) -> None:
    """A thread's own connection goes with the thread; the outbox keeps working."""
    box = SqliteOutbox(str(tmp_path / "o.sqlite3"))
    theirs: List[sqlite3.Connection] = []

    def use() -> None:
        box.add(APP_ID, URL, [(time.time(), "{}")])
        theirs.append(box._local.connection)

    thread = threading.Thread(target=use)
    thread.start()
    thread.join()
    assert len(theirs) == 1 and theirs[0] is not box._local.connection
    assert closed(theirs[0])
    assert not closed(box._local.connection, wait=0) and box.count(APP_ID, URL) == 1


_ONE_OFF = textwrap.dedent("""
    import gc, os, sys, threading, time
    from kaibantrace._delivery.outbox import SqliteOutbox, delivery_runs, open_outbox, outbox_path, waiting

    directory, app_id = sys.argv[1], sys.argv[2]
    path = outbox_path(directory, app_id)
    SqliteOutbox(path).note_delivery_run(os.getpid())  # what the delivery process does
    box = open_outbox(directory, app_id)
    box.add(app_id, "http://127.0.0.1:9/v2/", [(time.time(), "{}")])
    thread = threading.Thread(target=lambda: box.count(app_id, "http://127.0.0.1:9/v2/"))
    thread.start()
    thread.join()
    del box
    print(waiting(directory, app_id), len(delivery_runs(directory, app_id)))
    gc.collect()
""")


def test_no_unclosed_database_warning(tmp_path: Path) -> None:
    """Run as a program would, in development mode with ResourceWarning an error: nothing
    is reported (Python 3.13 and later report an unclosed connection; older ones never do)."""
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error::ResourceWarning", "-c", _ONE_OFF,
         str(tmp_path), APP_ID],
        env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "1"]
    assert "unclosed database" not in done.stderr, done.stderr
