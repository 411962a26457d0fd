"""The user's saved choice and this machine's markers, as small private files.

In the config directory (``_policy.state.config_dir``):

* ``preferences.json``: what ``kaibantrace disable``/``enable`` saved;
* ``notice-<app id>``: the first-run notice was really shown on a terminal;
* ``projects/<hash>``: a CLI's install event was recorded for that project;
* ``secret``: random bytes mixed into CLI identities before hashing, never sent.

In the state directory: ``retired.json``, the endpoints that answered
410 Gone, which this machine never contacts again.

``decide`` reads the saved choice and the retired list on every decision, so
both are cached against the file's ``lstat``: a decision costs one such call,
and a change made by another process is seen at the next one. Every file is
read by ``_policy.state.read_private_file``, which cannot block the host: a FIFO, a
link or a file of another user under one of these names is refused. Nothing
here creates a file unless asked to by the user (the command line) or by a
client that is sending; an opted-out process only ever reads.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Dict, List, Optional, Set, Tuple

from .._log import logger
from .state import (
    check_private_dir,
    config_dir,
    ensure_private_dir,
    is_private_file,
    read_private_file,
    state_dir,
    write_private_file,
)

DISABLED = "disabled"
ENABLED = "enabled"

_cache: Dict[str, Tuple[Tuple[int, ...], Any]] = {}
_secret: Optional[bytes] = None
_unsaved: Optional[bytes] = None  # a capture's, when no secret was saved
_secret_lock = threading.Lock()
_reported: Set[str] = set()

UNREADABLE = object()
"""What ``_read_json`` gives for a file that is there but could not be used."""


def _read_json(path: str) -> Any:
    """The file's JSON content, re-read only when its ``lstat`` changed: ``None`` when there
    is no file, ``UNREADABLE`` when there is one that was refused or is not JSON.

    The read is ``read_private_file``'s, which never blocks: a FIFO, a link or a file of
    another user under this name is refused, not waited on. The refusal is logged once
    per file, not at every decision.
    """
    try:
        info = os.lstat(path)
    except OSError:
        _cache.pop(path, None)
        return None
    # The change time too: a chown or chmod changes what may be read, not the content.
    key = (info.st_mtime_ns, info.st_ctime_ns, info.st_size, info.st_ino, info.st_mode)
    cached = _cache.get(path)
    if cached is not None and cached[0] == key:
        return cached[1]
    import json  # deferred, as below: most machines have no such file to read

    try:
        value = json.loads(read_private_file(path).decode("utf-8"))
    except FileNotFoundError:  # removed since the lstat
        value = None
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        value = UNREADABLE
        if path not in _reported:
            _reported.add(path)
            logger.warning("kaibantrace: ignoring %s: %s", os.path.basename(path), exc)
    _cache[path] = (key, value)
    return value


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# -- the saved choice ------------------------------------------------------------

def preferences_path() -> str:
    return os.path.join(config_dir(), "preferences.json")


def saved_choice() -> Optional[str]:
    """``"disabled"``, ``"enabled"``, or ``None`` when the user saved nothing.

    A preferences file that is there but says neither (refused, unreadable, not JSON,
    an unknown value) counts as ``"disabled"``: it may be the user's ``disable``
    damaged, and when in doubt nothing is sent. Nor can someone who may write into
    this directory turn telemetry on by putting a file of theirs (or a link) in place
    of the user's: it is refused, so it can only keep telemetry off. ``enable``,
    ``disable`` and ``reset`` replace or remove whatever is there.
    """
    data = _read_json(preferences_path())
    if data is None:
        return None
    choice = data.get("telemetry") if isinstance(data, dict) else None
    return choice if choice in (DISABLED, ENABLED) else DISABLED


def save_choice(choice: str) -> None:
    assert choice in (DISABLED, ENABLED)
    import json

    write_private_file(preferences_path(), json.dumps({"telemetry": choice, "changed": _now()}))


# -- markers -----------------------------------------------------------------------

def _marker(*parts: str) -> str:
    import hashlib  # deferred: only markers need it

    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:32]


def notice_path(app_id: str) -> str:
    return os.path.join(config_dir(), f"notice-{app_id.lower()}")


def notice_shown(app_id: str) -> bool:
    # Only a plain file of this user counts: anything else there (a link, a FIFO)
    # must not silence the notice, and is replaced when the notice is shown.
    return is_private_file(notice_path(app_id))


def mark_notice_shown(app_id: str) -> bool:
    """Record the notice as seen; False if the marker cannot be written (then it is not shown)."""
    return _write_marker(notice_path(app_id))


def forget_notice(app_id: str) -> None:
    """Undo ``mark_notice_shown`` when the notice could not be printed after all."""
    _remove_quietly(notice_path(app_id))


def install_path(app_id: str, project: str) -> str:
    # The file name is a hash, so the directory lists no project IDs.
    return os.path.join(config_dir(), "projects", _marker(app_id.lower(), project))


def install_recorded(app_id: str, project: str) -> bool:
    return is_private_file(install_path(app_id, project))


def mark_install(app_id: str, project: str) -> bool:
    """Record the install event; False if the marker cannot be written (then none is sent,
    so an unwritable config directory never turns every run into an install)."""
    return _write_marker(install_path(app_id, project))


def _write_marker(path: str) -> bool:
    try:
        write_private_file(path, _now() + "\n")
        return True
    except OSError:
        logger.debug("kaibantrace: could not write %s", os.path.basename(path), exc_info=True)
        return False


# -- the local secret ----------------------------------------------------------------

def secret_path() -> str:
    return os.path.join(config_dir(), "secret")


def existing_secret() -> Optional[bytes]:
    """The secret saved on this machine, without making one; ``None`` if there is none."""
    if _secret is not None:
        return _secret
    try:
        check_private_dir(config_dir())  # a secret someone else could have written is no secret
        return bytes.fromhex(read_private_file(secret_path(), 4096).decode("ascii").strip()) or None
    except (OSError, ValueError):
        return None


def local_secret(*, persist: bool) -> bytes:
    """This machine's secret, made on first use; only in memory when ``persist`` is False
    (in CI, or in a browser page, whose files go with it).

    If the file cannot be written, the secret lives for this process only:
    identities then change from run to run, which costs the author accuracy,
    never the user privacy. Two processes making it at once agree on one: the
    file is created exclusively, and the one that loses the race reads the
    winner's.
    """
    global _secret
    with _secret_lock:
        if _secret is not None:
            return _secret
        secret = existing_secret() if persist else None
        if secret is None and persist:
            secret = _create_secret()
        _secret = secret or os.urandom(32)
        return _secret


def unsaved_secret() -> bytes:
    """The saved secret when there is one, else one for this process that is never written.

    What ``kaibantrace.testing.capture`` keys identities with: recording signals
    in a test must not leave a secret in the user's config directory, yet a CLI
    event recorded on a machine that has one shows the identity it would send.
    """
    global _unsaved
    with _secret_lock:
        if _unsaved is None:
            _unsaved = existing_secret() or os.urandom(32)
        return _unsaved


def _create_secret() -> Optional[bytes]:
    """Write a new secret in full beside its place, then link it there only if nothing is
    there yet: a reader never sees a half-written secret, and a race has one winner."""
    path = secret_path()
    fresh = os.urandom(32)
    temporary = f"{path}.{os.getpid()}.new"
    try:
        write_private_file(temporary, fresh.hex() + "\n")
        try:
            os.link(temporary, path)
        except FileExistsError:  # another process made it first: use theirs
            return existing_secret()
        finally:
            _remove_quietly(temporary)
    except OSError:
        logger.debug("kaibantrace: could not save the local secret", exc_info=True)
        return None
    return fresh


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def forget_in_memory() -> None:
    """Read every file again at the next use (the secret too): after ``reset``, and in tests."""
    global _secret, _unsaved
    with _secret_lock:
        _secret = _unsaved = None
    _cache.clear()
    _reported.clear()


# -- retired endpoints ---------------------------------------------------------------

def retired_path() -> str:
    return os.path.join(state_dir(), "retired.json")


def is_retired(app_id: str, url: str) -> bool:
    """Whether ``url`` answered 410 Gone for this app. An unusable list retires nothing: the
    endpoint is asked again, and its next 410 writes a new list in place of that file."""
    data = _read_json(retired_path())
    return isinstance(data, dict) and _marker(app_id.lower(), url) in data


def mark_retired(app_id: str, url: str) -> None:
    """Record that ``url`` answered 410 Gone for this app: never contact it again from here."""
    data = _read_json(retired_path())
    entries = dict(data) if isinstance(data, dict) else {}
    entries[_marker(app_id.lower(), url)] = _now()
    ensure_private_dir(state_dir())
    import json

    write_private_file(retired_path(), json.dumps(entries))


# -- reset ---------------------------------------------------------------------------

def reset() -> List[str]:
    """Forget the saved choice, the notice and install markers and the secret; what was removed."""
    removed: List[str] = []
    directory = config_dir()
    paths = [preferences_path(), secret_path()]
    try:
        paths += [os.path.join(directory, name) for name in os.listdir(directory)
                  if name.startswith("notice-")]
    except OSError:
        pass
    for path in paths:
        try:
            os.unlink(path)
            removed.append(os.path.basename(path))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise OSError(f"could not remove {path}: {exc.strerror or exc}") from None
    projects = os.path.join(directory, "projects")
    if os.path.isdir(projects):
        import shutil  # deferred: only a reset needs it

        shutil.rmtree(projects, ignore_errors=True)
        removed.append("projects")
    forget_in_memory()
    return removed
