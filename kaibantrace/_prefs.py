"""The user's saved choice and this machine's markers, as small private files.

In the config directory (``_state.config_dir``):

* ``preferences.json``: what ``kaibantrace disable``/``enable`` saved;
* ``notice-<app id>``: the first-run notice was really shown on a terminal;
* ``projects/<hash>``: a CLI's install event was recorded for that project;
* ``secret``: random bytes mixed into CLI identities before hashing, never sent.

In the state directory: ``retired.json``, the endpoints that answered
410 Gone, which this machine never contacts again.

``decide`` reads the saved choice and the retired list on every decision, so
both are cached against the file's ``stat``: a decision costs a ``stat`` call,
and a change made by another process is seen at the next one. Nothing here
creates a file unless asked to by the user (the command line) or by a client
that is sending; an opted-out process only ever reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from ._state import config_dir, ensure_private_dir, state_dir, write_private_file

logger = logging.getLogger("kaibantrace")

DISABLED = "disabled"
ENABLED = "enabled"

_cache: Dict[str, Tuple[Tuple[int, int, int], Any]] = {}
_secret: Optional[bytes] = None
_secret_lock = threading.Lock()


def _read_json(path: str) -> Any:
    """The file's JSON content, re-read only when its ``stat`` changed; ``None`` if unreadable."""
    try:
        info = os.stat(path)
    except OSError:
        _cache.pop(path, None)
        return None
    key = (info.st_mtime_ns, info.st_size, info.st_ino)
    cached = _cache.get(path)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, ValueError):
        value = None
    _cache[path] = (key, value)
    return value


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# -- the saved choice ------------------------------------------------------------

def preferences_path() -> str:
    return os.path.join(config_dir(), "preferences.json")


def saved_choice() -> Optional[str]:
    """``"disabled"``, ``"enabled"``, or ``None`` when the user saved nothing (or it is unreadable)."""
    data = _read_json(preferences_path())
    choice = data.get("telemetry") if isinstance(data, dict) else None
    return choice if choice in (DISABLED, ENABLED) else None


def save_choice(choice: str) -> None:
    assert choice in (DISABLED, ENABLED)
    write_private_file(preferences_path(), json.dumps({"telemetry": choice, "changed": _now()}))


# -- markers -----------------------------------------------------------------------

def _marker(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:32]


def notice_path(app_id: str) -> str:
    return os.path.join(config_dir(), f"notice-{app_id.lower()}")


def notice_shown(app_id: str) -> bool:
    return os.path.exists(notice_path(app_id))


def mark_notice_shown(app_id: str) -> None:
    write_private_file(notice_path(app_id), _now() + "\n")


def install_path(app_id: str, project: str) -> str:
    # The file name is a hash, so the directory lists no project IDs.
    return os.path.join(config_dir(), "projects", _marker(app_id.lower(), project))


def install_recorded(app_id: str, project: str) -> bool:
    return os.path.exists(install_path(app_id, project))


def mark_install(app_id: str, project: str) -> None:
    write_private_file(install_path(app_id, project), _now() + "\n")


# -- the local secret ----------------------------------------------------------------

def secret_path() -> str:
    return os.path.join(config_dir(), "secret")


def local_secret(*, persist: bool) -> bytes:
    """This machine's secret, made on first use; only in memory when ``persist`` is False (CI).

    If the file cannot be written, the secret lives for this process only:
    identities then change from run to run, which costs the author accuracy,
    never the user privacy.
    """
    global _secret
    with _secret_lock:
        if _secret is not None:
            return _secret
        secret: Optional[bytes] = None
        path = secret_path()
        if persist:
            try:
                with open(path, encoding="ascii") as handle:
                    secret = bytes.fromhex(handle.read().strip()) or None
            except (OSError, ValueError):
                secret = None
            if secret is None:
                secret = os.urandom(32)
                try:
                    write_private_file(path, secret.hex() + "\n")
                except OSError:
                    logger.debug("kaibantrace: could not save the local secret", exc_info=True)
        _secret = secret or os.urandom(32)
        return _secret


def forget_in_memory() -> None:
    """Read every file again at the next use (the secret too): after ``reset``, and in tests."""
    global _secret
    with _secret_lock:
        _secret = None
    _cache.clear()


# -- retired endpoints ---------------------------------------------------------------

def retired_path() -> str:
    return os.path.join(state_dir(), "retired.json")


def is_retired(app_id: str, url: str) -> bool:
    data = _read_json(retired_path())
    return isinstance(data, dict) and _marker(app_id.lower(), url) in data


def mark_retired(app_id: str, url: str) -> None:
    """Record that ``url`` answered 410 Gone for this app: never contact it again from here."""
    data = _read_json(retired_path())
    entries = dict(data) if isinstance(data, dict) else {}
    entries[_marker(app_id.lower(), url)] = _now()
    ensure_private_dir(state_dir())
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
    projects = os.path.join(directory, "projects")
    if os.path.isdir(projects):
        import shutil  # deferred: only a reset needs it

        shutil.rmtree(projects, ignore_errors=True)
        removed.append("projects")
    forget_in_memory()
    return removed
