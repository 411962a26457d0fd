"""The transparency log: what this machine actually sent, exactly as it was sent.

After every request the ingest service accepted (a 2xx), the poster appends
to ``sent.log`` in the state directory a line of JSON (when, for which app, to
which URL, how many signals, the body's length) and then the request body
itself, byte for byte, on a line of its own. A signal
appears here only once it has left the machine, never before, so the log is a
record of fact, not of intent; ``kaibantrace log`` shows it.

The log is bounded: when the next write would take ``sent.log`` past 256 KiB,
it first replaces ``sent.log.1`` and a new one starts, so the two hold at most
512 KiB (one write, the requests of one claim, larger than that makes a file of
its own). The files are 0600, written without following symlinks, and refused
when another user owns them. A write that fails is given
up quietly: the log must never cost the host anything.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from .._log import logger
from .._policy.state import ensure_private_dir, open_private_file, read_private_file, state_dir

MAX_BYTES = 256 * 1024
READ_LIMIT = 64 * MAX_BYTES  # far above what one write of a claim's requests makes
NAME = "sent.log"


def log_path(directory: Optional[str] = None) -> str:
    return os.path.join(directory or state_dir(), NAME)


class _Appender:
    """Keeps the log open between requests: a request costs one write and two stats.

    The file is opened again when it was rotated (by this process or another:
    the path then names a different file) or when a fork made this a new
    process.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd = -1
        self._path = ""
        self._pid = 0
        self.failed = False

    def write(self, path: str, data: bytes) -> None:
        with self._lock:
            if (self._fd < 0 or self._path != path or self._pid != os.getpid()
                    or not self._still_at(path)):  # new, forked, or rotated by another process
                self._open(path)
            size = os.fstat(self._fd).st_size
            if size and size + len(data) > MAX_BYTES:  # rotate first: a file stays in its bound
                os.replace(path, path + ".1")
                self._open(path)
            os.write(self._fd, data)  # one write, so lines of processes never interleave

    def _still_at(self, path: str) -> bool:
        """Whether the open file is still the one ``path`` names."""
        mine = os.fstat(self._fd)
        try:
            current = os.stat(path)
        except FileNotFoundError:
            return False
        return (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev)

    def _open(self, path: str) -> None:
        self._close()
        ensure_private_dir(os.path.dirname(path))
        self._fd = open_private_file(path, os.O_WRONLY | os.O_APPEND)
        self._path, self._pid = path, os.getpid()

    def _close(self) -> None:
        if self._fd >= 0 and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd = -1


_appender = _Appender()


def append(app_id: str, url: str, requests: List[Tuple[bytes, int]]) -> None:
    """Record accepted requests (body, signal count), in one write; never raises.

    Each request is two lines: a JSON object that says when, where and how many
    (and the body's length), then the body itself, byte for byte. Storing the
    body as it is, rather than as a JSON string, spares the poster escaping
    every request again, and shows what was sent without a decoding step.
    """
    import json  # deferred: loaded already by then (the writer thread loads it), or never

    try:
        now = time.time()
        sent_at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        parts: List[bytes] = []
        for body, count in requests:
            head = json.dumps({"sent_at": sent_at, "app_id": app_id, "url": url,
                               "signals": count, "body_bytes": len(body)})
            parts += [head.encode("utf-8"), b"\n", body, b"\n"]
        _appender.write(log_path(), b"".join(parts))
    except Exception:
        if not _appender.failed:  # once: a full disk would otherwise say so at every request
            _appender.failed = True
            logger.debug("kaibantrace: could not add to the transparency log", exc_info=True)


def read(directory: Optional[str] = None) -> List[Dict[str, Any]]:
    """Every recorded request, oldest first, each with its ``body`` as text; what cannot be
    read (a damaged or cut-off record) is skipped. Reads the one-line records of earlier
    versions too. A log file that is not a plain file of this user, or is larger than
    ``READ_LIMIT``, is skipped whole: ``status`` reads the log too, and must end."""
    import json

    path = log_path(directory)
    records: List[Dict[str, Any]] = []
    for name in (path + ".1", path):
        try:  # never blocks, never reads without end: see read_private_file
            lines = read_private_file(name, READ_LIMIT).split(b"\n")
        except OSError:
            continue
        index = 0
        while index < len(lines):
            line = lines[index]
            index += 1
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            size = record.get("body_bytes")
            if isinstance(size, int) and index < len(lines) and len(lines[index]) == size:
                try:
                    record["body"] = lines[index].decode("utf-8")
                except UnicodeDecodeError:
                    continue
                index += 1
                del record["body_bytes"]
                records.append(record)
            elif isinstance(record.get("body"), str):  # the one-line form
                records.append(record)
    return records


def last_sent(directory: Optional[str] = None) -> Optional[str]:
    """When the last accepted request left this machine (ISO-8601 UTC), or ``None``."""
    records = read(directory)
    return str(records[-1].get("sent_at")) if records else None

