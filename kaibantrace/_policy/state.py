"""Where kaibantrace may keep files, created privately and only when needed.

The *state* directory (outboxes, the log of what was sent) is
``KAIBAN_TELEMETRY_DIR`` when set, otherwise the platform's per-user state
directory for ``kaibantrace``:

* Linux and other Unix: ``$XDG_STATE_HOME/kaibantrace`` (``~/.local/state/kaibantrace``);
* macOS: ``~/Library/Application Support/kaibantrace``;
* Windows: ``%LOCALAPPDATA%\\kaibantrace``.

The *config* directory (the user's saved choice, the notice and install
markers, the local secret) is ``KAIBAN_TELEMETRY_CONFIG_DIR`` when set,
otherwise ``$XDG_CONFIG_HOME/kaibantrace`` (``~/.config/kaibantrace``) on Linux,
the same folder as the state on macOS, and ``%APPDATA%\\kaibantrace`` on Windows.

Nothing here runs at import. ``state_dir()`` only computes the path;
``ensure_private_dir()`` creates it (0700) when a file is about to be written.
``read_private_file()`` is how every small file is read on the host's thread:
whatever sits under a known name (a FIFO, a link to ``/dev/zero``, a file of
another user) is refused at once rather than read.
This module never decides opt-out: callers ask only when telemetry is on, or
to remove what an opted-out user left behind.
"""

from __future__ import annotations

import os
import stat
import sys
from typing import Mapping, Optional

ENV_DIR = "KAIBAN_TELEMETRY_DIR"
ENV_CONFIG_DIR = "KAIBAN_TELEMETRY_CONFIG_DIR"


def state_dir(environ: Optional[Mapping[str, str]] = None) -> str:
    """The directory for kaibantrace's files (not created here)."""
    env = os.environ if environ is None else environ
    chosen = (env.get(ENV_DIR) or "").strip()
    if chosen:
        return os.path.abspath(os.path.expanduser(chosen))
    home = os.path.expanduser("~")
    if sys.platform == "win32":
        base = env.get("LOCALAPPDATA") or os.path.join(home, "AppData", "Local")
    elif sys.platform == "darwin":
        base = os.path.join(home, "Library", "Application Support")
    else:
        base = env.get("XDG_STATE_HOME") or os.path.join(home, ".local", "state")
    return os.path.join(base, "kaibantrace")


def config_dir(environ: Optional[Mapping[str, str]] = None) -> str:
    """The directory for the user's choices and local identity material (not created here)."""
    env = os.environ if environ is None else environ
    chosen = (env.get(ENV_CONFIG_DIR) or "").strip()
    if chosen:
        return os.path.abspath(os.path.expanduser(chosen))
    home = os.path.expanduser("~")
    if sys.platform == "win32":
        base = env.get("APPDATA") or os.path.join(home, "AppData", "Roaming")
    elif sys.platform == "darwin":
        base = os.path.join(home, "Library", "Application Support")
    else:
        base = env.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    return os.path.join(base, "kaibantrace")


def ensure_private_dir(path: str) -> str:
    """Create ``path`` readable only by this user (its missing parents as the umask says);
    raise ``OSError`` if impossible.

    A directory of kaibantrace's own name that others can read is made private. One of
    another name (``KAIBAN_TELEMETRY_DIR`` may point anywhere, even the home directory)
    is left as the user made it: the files in it are 0600 all the same.
    """
    os.makedirs(path, mode=0o700, exist_ok=True)
    if os.name == "posix":
        check_private_dir(path)
        if os.lstat(path).st_mode & 0o077 and os.path.basename(path) == "kaibantrace":
            os.chmod(path, 0o700)
    if not os.access(path, os.W_OK | os.X_OK):
        raise OSError(f"{path} is not writable")
    return path


def check_private_dir(path: str) -> None:
    """Raise ``OSError`` unless ``path`` is a plain directory of this user that no one else
    can write to: files another user could have planted there (a known secret, a link)
    must never be trusted."""
    if os.name != "posix":
        return
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise OSError(f"{path} is not a plain directory")
    if info.st_uid != os.getuid():
        raise OSError(f"{path} belongs to another user")
    if info.st_mode & 0o022:
        raise OSError(f"{path} can be written by other users")


def open_private_file(path: str, flags: int) -> int:
    """Open (or create) ``path`` as a 0600 file of this user and return the descriptor.

    A symbolic link there is never followed, and a file of another user is refused:
    only root could have put it in a private directory, and writing into it (or
    beside it: SQLite's journal files would be ours) would leave files one of the
    two users cannot use.
    """
    fd = os.open(path, flags | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
                 | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        if os.name == "posix":
            info = os.fstat(fd)
            if info.st_uid != os.getuid():
                raise OSError(f"{path} belongs to another user")
            if info.st_mode & 0o077:
                os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


READ_LIMIT = 64 * 1024
"""The most ``read_private_file`` reads by default: kaibantrace's own small files are far
below it, so anything larger was not written by kaibantrace."""


def read_private_file(path: str, limit: int = READ_LIMIT) -> bytes:
    """The bytes of ``path``, a plain file of this user of at most ``limit`` bytes.

    These files are read on the host's thread (every decision reads the saved choice),
    so reading must end promptly whatever was put under the name: the file is opened
    without following a link and without waiting (a FIFO would otherwise block until
    a writer came, and a link to ``/dev/zero`` would be read without end), and it is
    read only if it turns out to be a regular file of this user; at most ``limit + 1``
    bytes are read even if it grows meanwhile. ``FileNotFoundError`` when there is no
    such file, another ``OSError`` when it is refused or cannot be read.
    """
    flags = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
             | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        _check_mine(path, info)
        if info.st_size > limit:
            raise OSError(f"{path} is larger than {limit} bytes")
        data = b""
        while len(data) <= limit:
            chunk = os.read(fd, limit + 1 - len(data))
            if not chunk:
                return data
            data += chunk
        raise OSError(f"{path} is larger than {limit} bytes")
    finally:
        os.close(fd)


def is_private_file(path: str) -> bool:
    """Whether ``path`` is a plain file of this user, looked at without opening or following it:
    how a marker file, whose presence is all it says, is checked."""
    try:
        _check_mine(path, os.lstat(path))
    except OSError:
        return False
    return True


def _check_mine(path: str, info: os.stat_result) -> None:
    """Raise ``OSError`` unless ``info`` is that of a plain file of this user."""
    if not stat.S_ISREG(info.st_mode):
        raise OSError(f"{path} is not a plain file")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise OSError(f"{path} belongs to another user")


def create_private_file(path: str) -> None:
    """Create ``path`` as an empty private file unless it exists, for SQLite to open next.

    An existing file is checked by its path, never opened: closing any descriptor of
    a database file drops every POSIX lock this process holds on it, those of SQLite's
    other connections here included, and another process could then write while one
    of them does (a corrupted database). The checks are ``open_private_file``'s: no
    link, no file of another user, 0600.
    """
    try:
        os.close(open_private_file(path, os.O_RDWR | os.O_EXCL))
        return
    except FileExistsError:  # also what O_EXCL says of a symbolic link: refused below
        pass
    info = os.lstat(path)
    _check_mine(path, info)
    if os.name == "posix" and info.st_mode & 0o077:
        os.chmod(path, 0o600)


def write_private_file(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` at once (readers see the old or the new file), 0600."""
    directory = os.path.dirname(path)
    ensure_private_dir(directory)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    flags = (os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0)
             | getattr(os, "O_CLOEXEC", 0))
    try:
        os.unlink(temporary)  # left by a process with our pid that died mid-write
    except FileNotFoundError:
        pass
    fd = os.open(temporary, flags, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
