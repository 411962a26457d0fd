"""What a client owes the process: a flush at exit, and a clean start after ``fork``.

Registered once, when the first sender starts, so an opted-out process
registers nothing. At exit every live client saves what is queued and sends
what fits in its exit budget (all clients in parallel), then hands what still
waits to a delivery process (``_delivery.handoff``). In a forked child each
client forgets the parent's threads, queue and locks.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING, Optional

from .. import _fork
from .._delivery import handoff as _handoff
from .._encode.identity import after_fork_in_child as identity_after_fork
from .._log import logger
from .._policy.config import decide, ingest_url
from .._policy.state import state_dir
from .router import after_fork_in_child as routers_after_fork
from .router import bump_generation

if TYPE_CHECKING:
    from .._policy.config import Settings
    from .client import Telemetry

live_clients: weakref.WeakSet[Telemetry] = weakref.WeakSet()
"""Clients with a running sender: the ones the exit and fork hooks look after."""

_hooks_registered = False
_hooks_lock = threading.Lock()


def register_hooks() -> None:
    """Register the exit and fork hooks, once per process."""
    global _hooks_registered
    with _hooks_lock:
        if _hooks_registered:
            return
        _hooks_registered = True
    atexit.register(at_exit)
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(before=_fork.before_fork, after_in_parent=_fork.after_fork_in_parent,
                            after_in_child=_after_fork_in_child)
    _exit_with_the_worker(None)


# A process that multiprocessing forked (a Pool or ProcessPoolExecutor worker) ends with
# os._exit(), so atexit hooks never run there: what its tracked functions recorded would
# be lost. multiprocessing runs its own "finalizers" just before that exit; the exit hook
# becomes one of them. Its registry is emptied when a forked worker starts, after the fork
# hooks ran, so a fork asks to be called again once the worker has started.
_mp_marker = type("_WorkerExit", (), {})()  # what multiprocessing keeps a weak reference to
_exit_done = False


def _exit_with_the_worker(_: object) -> None:
    util = sys.modules.get("multiprocessing.util")
    process = sys.modules.get("multiprocessing.process")
    if util is None or process is None:
        return  # not a multiprocessing worker: nothing else ends it with os._exit()
    try:
        if process.parent_process() is not None:  # a worker (the main process has atexit)
            util.Finalize(None, at_exit, exitpriority=0)
    except Exception:
        logger.debug("kaibantrace: could not join the worker's exit", exc_info=True)


def at_exit() -> None:
    """Save what is queued, let each sender use what is left of its exit budget (100 ms by
    default, all clients in parallel), then hand what still waits to a delivery process.
    Once per process, whether atexit or multiprocessing's worker exit calls it."""
    global _exit_done
    if _exit_done:
        return
    _exit_done = True
    start = time.monotonic()
    clients = list(live_clients)
    for client in clients:
        _exit_begins(client, start)
    for client in clients:
        _exit_ends(client, start)


def _exit_begins(client: Telemetry, start: float) -> None:
    """At exit, before any client waits: later events are saved for the hand-off
    (``routes.choose``), and the sender saves what is queued."""
    client._closed = True
    client._router.forget()
    delivery = client._delivery
    delivery.exited = True
    delivery.exit_deadline = start + client._settings.exit_timeout
    sender = delivery.sender
    if sender is not None:
        try:
            sender.begin_exit(delivery.exit_deadline)
        except Exception:
            logger.debug("kaibantrace: could not save queued signals at exit", exc_info=True)


def _exit_ends(client: Telemetry, start: float) -> None:
    """At exit, once every client's sender saved its queue: use what is left of the budget
    to send, then hand what still waits to a delivery process."""
    sender = client._delivery.sender
    if sender is None:
        return
    exit_timeout = client._settings.exit_timeout
    sender.join(start + exit_timeout)
    try:
        sender.settle_at_exit(grace=exit_timeout)
        hand_off(client)
    except Exception:
        logger.debug("kaibantrace: could not hand off at exit", exc_info=True)


def may_hand_off(client: Telemetry) -> bool:
    """Whether what is left at exit may go to a delivery process (decided again at exit)."""
    return (client._settings.detached_delivery and not client._delivery.holding
            and client._transport is None and not _handoff.in_delivery_process
            and _handoff.allowed(os.environ) and _handoff.interpreter() is not None)


def hand_off(client: Telemetry) -> Optional[int]:
    """At exit: start a delivery process when signals wait for this client's app and
    endpoint and one could send them (see ``_delivery.handoff``); its process ID, if started."""
    s = client._settings
    if not may_hand_off(client):
        return None
    decision = decide(s, os.environ)
    if not decision.enabled or decision.debug or decision.app_id is None:
        return None
    url = ingest_url(s, os.environ)
    sender = client._delivery.sender
    outbox = sender.outbox if sender is not None else client._delivery.direct_outbox
    outbox = getattr(outbox, "primary", outbox)  # the file: memory dies with this process
    if url is None or outbox is None or not outbox.durable:
        return None
    try:
        if not outbox.count(decision.app_id, url):
            return None
        health = outbox.health(url)
    except Exception:
        return None
    if health.not_before - time.time() > _handoff.DELIVERY_BOUND / 2:
        return None  # the endpoint is failing: it would only wait, and a later run will try
    arguments = ["--opt-out-env", s.opt_out_env, "--timeout", repr(s.timeout),
                 "--backoff", repr(s.backoff)]
    if s.profile is not None:
        arguments += ["--profile", s.profile]
    # The outbox's own directory: the environment may name another one by now.
    directory = os.path.dirname(getattr(outbox, "path", "")) or state_dir()
    return _handoff.hand_off(directory, decision.app_id, url, arguments)


def _after_fork_in_child() -> None:
    global _hooks_lock, _exit_done
    _exit_done = False
    util = sys.modules.get("multiprocessing.util")
    if util is not None:  # perhaps a multiprocessing worker: see _exit_with_the_worker
        try:
            util.register_after_fork(_mp_marker, _exit_with_the_worker)
        except Exception:
            logger.debug("kaibantrace: could not join the worker's exit", exc_info=True)
    _fork.after_fork_in_child()
    identity_after_fork()
    _hooks_lock = threading.Lock()
    routers_after_fork()
    for client in list(live_clients):
        after_fork(client)


def after_fork(client: Telemetry) -> None:
    """In a forked child: the parent's thread, queue and locks do not exist here."""
    client._router.lock = threading.RLock()  # also for a fork from C, which no hook saw
    reset_transport = getattr(client._transport, "after_fork", None)
    if reset_transport is not None:  # a transport given in code, shared with the parent
        try:
            reset_transport()
        except Exception:
            logger.debug("kaibantrace: the transport failed to reset after fork", exc_info=True)
    # A client shut down in the parent stays shut down; a run that showed the
    # notice keeps holding in its children; the first-run work is not redone.
    kept = (client._closed, client._delivery.holding, client._cli_seen)
    client._reset_state()
    client._closed, client._delivery.holding, client._cli_seen = kept
    bump_generation()


def reset(client: Telemetry, settings: Optional[Settings] = None) -> None:
    """Back to a fresh client, with ``settings`` if given: its sender stopped, its counters
    and sessions forgotten (``kaibantrace.testing.reset``)."""
    client._delivery.stop(time.monotonic() + client._settings.exit_timeout)
    with client._router.lock:
        if settings is not None:
            client._settings = settings
            client._transport = None
        client._reset_state()
    live_clients.discard(client)
    bump_generation()
