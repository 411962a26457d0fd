"""The hand-off at exit: one detached process delivers what a short run leaves behind.

Most runs of a command-line tool end within a second, long before a request
could be made and answered, so their signals wait in the outbox. Left for
"the next run", they would wait forever: the next run is just as short. So
when a process ends with signals still waiting for its app and endpoint, its
exit hook starts one *delivery process* and returns at once:

* the same interpreter running ``kaibantrace deliver`` (a command users may
  run themselves) with the program's own module search path, in isolated
  mode so nothing in the current directory is imported in its place; in a
  session of its own (a closed terminal does not end it), with standard
  input and output on the null device, no other descriptor of the parent
  than the lock below, at low priority;
* the same environment, so it decides opt-out again before it touches the
  network (a user who opted out meanwhile is honoured);
* it drains the outbox with the usual leases, backoff and circuit breaker,
  and ends when nothing waits, when the circuit opens, or after
  ``DELIVERY_BOUND`` seconds, whatever happens.

At most one runs per state directory and app: it holds an OS lock on
``delivery-<app>.lock`` for as long as it runs. The parent takes that lock
before starting it and hands the locked descriptor down, so two parents
ending together never start two. A parent that finds the lock taken starts
nothing. And since the endpoint's failures are kept in the outbox, a parent
whose endpoint is known to be down starts nothing either: a command run in a
loop against a blocked network starts a handful of delivery processes, not
one per run.

Never started by an opted-out process, a run that showed the first-run
notice, a client with a transport of its own (a child could not use it),
under a frozen application or an embedding interpreter (``sys.executable``
is then not a Python), in the delivery process itself, or when
``detached_delivery=False`` or ``KAIBAN_TELEMETRY_DETACHED=0``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Dict, Iterator, List, Mapping, Optional, Sequence

from .._log import logger
from .._policy.config import ENV_DETACHED, flag_is_set
from .._policy.state import ensure_private_dir, open_private_file

DELIVERY_BOUND = 30.0  # seconds a delivery process may live, whatever happens

in_delivery_process = False  # set in a delivery process: it never hands off in turn


@contextlib.contextmanager
def delivering() -> Iterator[None]:
    """While a delivery run sends (``kaibantrace deliver``): it never hands off in turn."""
    global in_delivery_process
    was = in_delivery_process
    in_delivery_process = True
    try:
        yield
    finally:
        in_delivery_process = was


def allowed(environ: Mapping[str, str]) -> bool:
    """Whether the user left detached delivery on (``KAIBAN_TELEMETRY_DETACHED=0`` turns it off)."""
    raw = environ.get(ENV_DETACHED)
    return raw is None or not raw.strip() or flag_is_set(raw)


def interpreter() -> Optional[str]:
    """The Python to start the delivery process with, or ``None`` where there is none.

    A frozen application's ``sys.executable`` is the application itself, and an
    embedding program's (uWSGI, a game engine) is that program: starting it
    again would run the program, not kaibantrace.
    """
    if getattr(sys, "frozen", False):
        return None
    path = sys.executable
    if not path or not os.path.isfile(path) or not os.access(path, os.X_OK):
        return None
    name = os.path.basename(path).lower()
    if not name.startswith(("python", "pypy")):
        return None
    return path


def lock_path(directory: str, app_id: str) -> str:
    return os.path.join(directory, f"delivery-{app_id.lower()}.lock")


def take_lock(directory: str, app_id: str) -> Optional[int]:
    """A descriptor holding the app's delivery lock, or ``None`` when another process holds
    it (or no lock can be had here)."""
    try:
        ensure_private_dir(directory)
        fd = open_private_file(lock_path(directory, app_id), os.O_RDWR)
    except OSError:
        return None
    if _lock(fd):
        return fd
    os.close(fd)
    return None


def _lock(fd: int) -> bool:
    """Take the lock without waiting; whether it was free (or already held through ``fd``)."""
    try:
        if sys.platform == "win32":  # pragma: no cover - Windows
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def running(directory: str, app_id: str) -> Optional[int]:
    """The process ID of the app's delivery process when one runs, else ``None``. Reads
    only, and takes no lock: asking must never make a program's hand-off find the lock
    taken. A delivery process writes its ID into the lock file and empties it as it ends;
    an ID left by one that was killed names no live process (or, on Linux, none that is
    a delivery process)."""
    try:
        with open(lock_path(directory, app_id), "rb") as handle:
            text = handle.read(32).decode("ascii", "replace").strip()
    except OSError:
        return None
    if not text.isdigit():
        return None
    pid = int(text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except OSError:  # alive, but another user's: not ours to have started
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            if b"deliver" not in handle.read():
                return None  # the ID was reused by another program
    except OSError:  # no /proc here (macOS): the live ID is all there is to go by
        pass
    return pid


def hand_off(directory: str, app_id: str, url: str, arguments: Sequence[str]) -> Optional[int]:
    """Start the app's delivery process unless one runs; its process ID, or ``None``.

    ``arguments`` are the ``deliver`` command's options that describe the
    client (endpoint, opt-out variable, profile, timeouts). Never raises.
    """
    python = interpreter()
    if python is None:
        return None
    fd = take_lock(directory, app_id)
    if fd is None:
        return None
    try:
        argv = [python, *_interpreter_flags(), "-c", _BOOT, _search_path(), "deliver",
                "--app", app_id, "--endpoint", url, *arguments]
        if sys.platform == "win32":  # pragma: no cover
            fd, windows_fd = -1, fd
            return _start_windows(argv, dict(os.environ), windows_fd)
        pid = _start(argv, dict(os.environ), fd)  # the same environment
        lower_priority(pid)  # from the start: starting Python is most of what it costs
        write_pid(fd, pid)  # so that ``status`` names it before it has started up
        return pid
    except Exception as exc:  # no process could be started: the signals wait for a later run
        logger.debug("kaibantrace: could not start a delivery process (%s)", exc)
        return None
    finally:
        if fd >= 0:
            os.close(fd)  # the child holds its own copy of the lock


# ``kaibantrace deliver``, as the program that hands off would import it: with its module
# search path, given as the first argument. The working directory is kept off the path
# until then (see ``_interpreter_flags``), so a ``json.py`` (or another copy of
# kaibantrace) in the directory the user ran the program from is never imported instead.
_BOOT = ("import json, sys; sys.path[:] = json.loads(sys.argv.pop(1)); "
         "from kaibantrace._cli.command import main; main()")


def _interpreter_flags() -> List[str]:
    """``-P`` (Python 3.11+) keeps the working directory off the module path and the
    environment as it is. Older Pythons only have isolated mode (``-I``), which also
    ignores the ``PYTHON*`` variables: the bytecode settings are passed on as flags
    (``PYTHONHOME`` cannot be; where a program needs it, its delivery process fails to
    start and what waits is sent by a later run)."""
    if sys.version_info >= (3, 11):
        return ["-P"]
    flags = ["-I"]
    if sys.dont_write_bytecode:
        flags.append("-B")
    prefix = getattr(sys, "pycache_prefix", None)
    if prefix:
        flags += ["-X", f"pycache_prefix={prefix}"]
    return flags


def _search_path() -> str:
    import json

    return json.dumps([os.path.abspath(entry) if entry else os.getcwd()
                       for entry in sys.path if isinstance(entry, str)])


def _start(argv: List[str], env: Dict[str, str], lock_fd: int) -> int:
    # The child finds the lock at descriptor 3 (4 if ours is 3: dup2 onto itself may keep
    # its close-on-exec flag).
    target = 4 if lock_fd == 3 else 3
    argv = [*argv, "--lock-fd", str(target)]
    if getattr(os, "posix_spawn", None) is not None:
        try:
            return _posix_spawn(argv, env, lock_fd, target)
        except (NotImplementedError, TypeError):  # no setsid in this libc: subprocess can
            pass
    import subprocess

    child = subprocess.Popen([*argv[:-1], str(lock_fd)], env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
                             pass_fds=(lock_fd,), start_new_session=True)
    child.returncode = 0  # never waited for: it outlives us by design, so no warning about it
    return child.pid


def _posix_spawn(argv: List[str], env: Dict[str, str], lock_fd: int, target: int) -> int:
    """``posix_spawn``: cheaper than ``subprocess`` at exit (no fork of a big process, no
    import). The lock's descriptor is the only one the child keeps besides the null device."""
    devnull = os.devnull
    actions: List[tuple] = [  # type: ignore[type-arg]
        (os.POSIX_SPAWN_OPEN, 0, devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, devnull, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 2, devnull, os.O_WRONLY, 0),
    ]
    # Descriptors marked inheritable by the program or its parent (a shell's ``3>``, a
    # jobserver's pipe) would keep a pipe open as long as the child lives.
    actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_descriptors()]
    # The lock goes to a number of its own in the child only (dup2 there makes it survive
    # exec): marked inheritable here, another thread's fork could take it along meanwhile.
    actions.append((os.POSIX_SPAWN_DUP2, lock_fd, target))
    return os.posix_spawn(argv[0], argv, env, file_actions=actions, setsid=True,
                          setsigmask=(), setsigdef=_default_signals())


def _inheritable_descriptors() -> List[int]:
    for listing in ("/proc/self/fd", "/dev/fd"):
        try:
            names = os.listdir(listing)
        except OSError:
            continue
        found = []
        for name in names:
            if name.isdigit() and int(name) > 2:
                try:
                    if os.get_inheritable(int(name)):
                        found.append(int(name))
                except OSError:  # the listing's own descriptor, closed by now
                    pass
        return found
    return []


def _default_signals() -> List[int]:
    """Signals the program may ignore (``nohup`` ignores SIGHUP) that the child should not:
    it must stay stoppable."""
    import signal

    return [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]


def _start_windows(argv: List[str], env: Dict[str, str], lock_fd: int) -> int:  # pragma: no cover
    assert sys.platform == "win32"
    import subprocess

    flags = (getattr(subprocess, "DETACHED_PROCESS", 0x8)
             | getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200)
             | getattr(subprocess, "CREATE_NO_WINDOW", 0x8000000))
    os.close(lock_fd)  # Windows locks are not inherited: the child takes it itself
    child = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, close_fds=True, creationflags=flags)
    child.returncode = 0
    return child.pid


LOW_PRIORITY = 10


def lower_priority(pid: int = 0) -> None:
    """Run process ``pid`` (0: this one) at low priority where the system has one, so the
    user's own work comes first. Set, not added: doing it twice changes nothing."""
    get = getattr(os, "getpriority", None)
    set_ = getattr(os, "setpriority", None)
    if get is None or set_ is None:
        return
    try:
        if get(os.PRIO_PROCESS, pid) < LOW_PRIORITY:
            set_(os.PRIO_PROCESS, pid, LOW_PRIORITY)
    except OSError:
        pass


def adopt_lock(directory: str, app_id: str, fd: Optional[int]) -> Optional[int]:
    """The delivery lock for this process: the descriptor the parent handed down (checked),
    or one taken now; ``None`` when another delivery process has it."""
    if fd is not None and sys.platform != "win32":
        try:
            os.set_inheritable(fd, False)
            if _lock(fd):  # the same lock, already ours: this only checks it
                write_pid(fd)
                return fd
        except OSError:
            pass
        return None
    taken = take_lock(directory, app_id)
    if taken is not None:
        write_pid(taken)
    return taken


def write_pid(fd: int, pid: Optional[int] = None) -> None:
    """Write a process ID (default: this one) in the lock file, for ``status`` to show."""
    try:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, str(pid or os.getpid()).encode("ascii"))
    except OSError:
        pass


def release(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass
    os.close(fd)


def note_run(directory: str, app_id: str) -> None:
    """Record in the app's outbox that a delivery run started (``status`` counts them)."""
    from .outbox import SqliteOutbox, outbox_path

    try:
        SqliteOutbox(outbox_path(directory, app_id)).note_delivery_run(os.getpid())
    except Exception:
        logger.debug("kaibantrace: could not note the delivery run", exc_info=True)
