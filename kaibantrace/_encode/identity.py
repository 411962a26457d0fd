"""Who an event is from, without saying who anyone is.

Three identifiers exist, as in KaibanJS:

* a **process identity**: a random UUID made once per process (afresh in a
  forked child). It is never sent: its hash is a runtime event's
  ``clientUser``, so TelemetryDeck counts one user per process, however many
  sessions the process opens.
* a **session**: a random UUID, one per ``session()`` block, or one per
  client outside any block, sent as ``sessionID``. It is made lazily, at the
  first event or the first read of ``Session.id``.
* a **project ID** for CLI events: KaibanJS's formula, exactly, so a Python
  port reports the same project as KaibanJS would; its hash is a CLI event's
  ``clientUser``.

The ``clientUser`` field is always a hash (SHA-256 of identifier + salt) of a
value that itself never leaves the machine.
"""

from __future__ import annotations

import contextvars
import functools
import os
import threading
from types import TracebackType
from typing import Any, Callable, Mapping, Optional, Tuple, Type, TypeVar

R = TypeVar("R")

_id_lock = threading.Lock()
_process_identity: Optional[str] = None


def after_fork_in_child() -> None:
    """A fresh lock, as the parent's may have been held by a thread the child does not
    have; and a new process identity, so a child is never counted as its parent."""
    global _id_lock, _process_identity
    _id_lock = threading.Lock()
    _process_identity = None


if hasattr(os, "register_at_fork"):
    # Here, not only with the client's hooks (made when a sender starts): a child is a
    # new user in capture() and debug output too.
    os.register_at_fork(after_in_child=after_fork_in_child)


def process_identity() -> str:
    """This process's random identity, made at first use; only its hash is ever sent."""
    global _process_identity
    identity = _process_identity
    if identity is None:
        with _id_lock:
            if _process_identity is None:
                _process_identity = random_uuid()
            identity = _process_identity
    return identity


class Session:
    """A group of events that share one anonymous, random ID."""

    __slots__ = ("_id",)

    def __init__(self) -> None:
        self._id: Optional[str] = None

    @property
    def id(self) -> str:
        """The session's UUID, made on first use so an unused session costs nothing."""
        if self._id is None:
            with _id_lock:
                if self._id is None:
                    self._id = random_uuid()
        return self._id

    def __repr__(self) -> str:
        return f"<kaibantrace.Session id={self._id or '(not yet made)'}>"


# What a client's ContextVar holds: the current session and the node it
# replaced, so leaving a block restores the outer session in whichever context
# (thread, task) the block was left, with no token tied to one context.
SessionNode = Tuple[Session, Optional["SessionNode"]]


class SessionScope:
    """``with``/``async with`` block that makes events inside it share a new session.

    ``with kaibantrace.session() as s:`` gives the ``Session``; ``s.id`` is its
    UUID. The current session lives in a ``ContextVar``, so asyncio tasks
    created in the block inherit it and concurrent tasks or threads with their
    own block never see each other's ID. One scope object may even be entered
    by several tasks at once. A thread does not inherit it (Python starts a
    thread with empty context variables): hand the thread ``scope.wrap(fn)``,
    or ``contextvars.copy_context().run`` and ``fn``.
    """

    __slots__ = ("_session", "_var")

    def __init__(self, var: contextvars.ContextVar[Optional[SessionNode]]) -> None:
        self._var = var
        self._session = Session()

    @property
    def session(self) -> Session:
        """The session this block makes current."""
        return self._session

    def __enter__(self) -> Session:
        self._var.set((self._session, self._var.get()))
        return self._session

    def __exit__(self, exc_type: Optional[Type[BaseException]],
                 exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        node = self._var.get()
        while node is not None and node[0] is not self._session:
            node = node[1]  # an inner block left without __exit__: unwind it too
        if node is not None:
            self._var.set(node[1])

    async def __aenter__(self) -> Session:
        return self.__enter__()

    # Python gives a new thread empty context variables, not the starting thread's:
    # a thread started inside the block is outside it. These carry the block over.

    def run(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        """Call ``fn(*args, **kwargs)`` inside this session, from any thread."""
        with self:
            return fn(*args, **kwargs)

    def wrap(self, fn: Callable[..., R]) -> Callable[..., R]:
        """``fn``, made to run inside this session wherever it is called: give it to
        ``threading.Thread(target=...)`` or ``executor.submit`` as it is."""
        @functools.wraps(fn)
        def in_session(*args: Any, **kwargs: Any) -> R:
            with self:
                return fn(*args, **kwargs)

        return in_session

    async def __aexit__(self, exc_type: Optional[Type[BaseException]],
                        exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.__exit__(exc_type, exc, tb)


def random_uuid() -> str:
    """A random (version 4) UUID as text, like ``str(uuid.uuid4())``, without importing
    ``uuid`` (which costs more than everything else a first event needs)."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    text = raw.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def _md5_hex(text: str) -> str:
    # KaibanJS's formula uses MD5 as a fingerprint, not for security; saying so
    # keeps it working where OpenSSL runs in FIPS mode. A build that refuses MD5
    # even so gets the pure-Python one: the ID must be KaibanJS's everywhere.
    import hashlib  # deferred, as in every hashing function here: a cost only when hashing

    data = text.encode("utf-8")
    try:
        return hashlib.md5(data, usedforsecurity=False).hexdigest()
    except (ValueError, TypeError, AttributeError):  # refused, or an md5 without the flag
        from .md5 import md5_hex

        return md5_hex(data)


def _node_basename(path: str) -> str:
    """``path.basename`` as Node.js computes it: trailing separators ignored, ``"/"`` → ``""``."""
    separators = os.sep + (os.altsep or "")
    return os.path.basename(path.rstrip(separators))


def project_id(cwd: Optional[str] = None, environ: Optional[Mapping[str, str]] = None) -> str:
    """The KaibanJS project ID for ``cwd`` (default: the working directory).

    ``md5(basename(cwd) + "-" + md5(HOME or USERPROFILE or ""))``, with
    JavaScript's ``||``: an empty variable counts as missing. The value is an
    unsalted hash of low-entropy inputs, so kaibantrace never sends it: CLI
    events carry ``SHA-256(HMAC(secret, ID) + salt)``, keyed with this machine's
    secret, or in the KaibanJS profile ``SHA-256(ID + salt)``, as KaibanJS sends.
    """
    env = os.environ if environ is None else environ
    directory = os.getcwd() if cwd is None else os.fspath(cwd)
    home = env.get("HOME") or env.get("USERPROFILE") or ""
    return _md5_hex(f"{_node_basename(directory)}-{_md5_hex(home)}")


@functools.lru_cache(maxsize=256)  # a process has few sessions; hashing each event again is waste
def hash_user(identifier: str, salt: str) -> str:
    """``clientUser`` as TelemetryDeck expects it: hex SHA-256 of identifier + salt."""
    import hashlib

    return hashlib.sha256((identifier + salt).encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=64)
def keyed_identity(identifier: str, secret: bytes) -> str:
    """``identifier`` keyed with this machine's secret (HMAC-SHA256, hex), before it is hashed.

    KaibanJS's project ID is an unsalted hash of a project name and a home
    directory; a dictionary of common names reverses it. Keyed with a secret
    that never leaves the machine, what is sent can no longer be matched to
    any guess.
    """
    import hashlib
    import hmac

    return hmac.new(secret, identifier.encode("utf-8"), hashlib.sha256).hexdigest()
