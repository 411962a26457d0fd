"""What ``kaibantrace deliver`` runs: one bounded run that sends what waits for an app.

A program that leaves signals behind at exit starts this in a process of its
own (``_delivery.handoff`` says how and when); users may run it too. It holds
the app's delivery lock, decides opt-out again from its own environment and
the user's saved choice, sends through an ordinary ``Telemetry`` client, and
ends when nothing has waited for a while, when sending stops (the circuit
opened), or after its bound, whatever happens.
"""

from __future__ import annotations

import time
from typing import NamedTuple, Optional

from .._client.client import Telemetry
from .._delivery.handoff import (
    DELIVERY_BOUND,
    adopt_lock,
    delivering,
    lower_priority,
    note_run,
    release,
    take_lock,
    write_pid,
)
from .._delivery.outbox import waiting
from .._policy.state import state_dir

_POLL = 0.05
_LOOK_AGAIN = 0.25  # seconds between the delivery process's looks at the outbox
# How long the outbox stays empty before the delivery process ends: a command run in a
# loop adds to it every fraction of a second, and one process then serves the loop.
_LINGER = 2.0


class Delivered(NamedTuple):
    """What a delivery run did: signals it sent, signals still waiting, and why it stopped
    early (empty when it did not)."""

    sent: int
    left: int
    problem: str = ""


def deliver(app_id: str, url: str, *, opt_out_env: str, profile: Optional[str], timeout: float,
            backoff: float, bound: float = DELIVERY_BOUND, lock_fd: Optional[int] = None
            ) -> Delivered:
    """Send what waits in the outbox for ``app_id`` and ``url``, holding the app's delivery
    lock, for at most ``bound`` seconds.

    Opt-out is decided again here, before anything is sent, from this process's
    environment and the user's saved choice.
    """
    with delivering():
        try:
            return _deliver(app_id, url, opt_out_env=opt_out_env, profile=profile,
                            timeout=timeout, backoff=backoff, bound=bound, lock_fd=lock_fd)
        finally:
            if lock_fd is not None:
                _cancel_alarm()


def _deliver(app_id: str, url: str, *, opt_out_env: str, profile: Optional[str], timeout: float,
             backoff: float, bound: float, lock_fd: Optional[int]) -> Delivered:
    deadline = time.monotonic() + bound
    if lock_fd is not None:  # started by a program's exit: a process of its own to bound
        _end_at_the_latest(bound + 5.0)
        lower_priority()
    directory = state_dir()
    fd = adopt_lock(directory, app_id, lock_fd)
    if fd is None:
        return Delivered(0, waiting(directory, app_id) or 0, "another delivery process is running")
    client = Telemetry(app_id=app_id, endpoint=url, opt_out_env=opt_out_env, profile=profile,
                       timeout=timeout, backoff=backoff, detached_delivery=False)
    problem = ""
    try:
        if client.decision().enabled:
            note_run(directory, app_id)  # before the sender's threads share the file
        # Decides opt-out; when on, starts the sender, which sends what waits, with no
        # request still under way when the bound comes.
        if not client.send_waiting(stop_after=max(0.0, deadline - time.monotonic())):
            decision = client.decision()
            return Delivered(0, waiting(directory, app_id) or 0, "telemetry is off" if not
                             decision.enabled else "nothing can be sent from here")
        poked = time.monotonic()
        idle_since: Optional[float] = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                problem = f"stopped after {bound:g} s"
                break
            status = client.delivery_status()
            if status.stopped:
                problem = status.problem or "the endpoint failed"
                break
            if status.backoff_until - time.time() > left:
                problem = "the endpoint is backing off for longer than this run may last"
                break
            empty = status.passes and not status.in_outbox
            if not empty:
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            if empty and idle_since is not None and time.monotonic() - idle_since >= _LINGER:
                # Nothing has waited for a while. Let go of the lock, then look again: a
                # process that ended meanwhile found the lock taken and left its signals to us.
                release(fd)
                fd = -1
                if not client.waiting():
                    break
                retaken = take_lock(directory, app_id)
                if retaken is None:
                    break  # the other process started a delivery of its own
                fd = retaken
                write_pid(fd)
                idle_since = None
                client.send_waiting()
            elif time.monotonic() - poked >= _LOOK_AGAIN:
                # Rows may be leased by a process that has ended, or added by one that found
                # this one running: have the poster look again, rather than at its own pace.
                client.send_waiting()
                poked = time.monotonic()
            time.sleep(_POLL)
    finally:
        client.shutdown(timeout=max(0.05, min(1.0, deadline - time.monotonic())))
        if fd >= 0:
            release(fd)
    stats = client.stats()
    return Delivered(int(stats["sent"]), waiting(directory, app_id) or 0,  # type: ignore[call-overload]
                     problem)


def _cancel_alarm() -> None:
    import signal

    alarm = getattr(signal, "alarm", None)
    if alarm is not None:
        try:
            alarm(0)
        except ValueError:  # not the main thread: none was set
            pass


def _end_at_the_latest(seconds: float) -> None:
    """Have the system end this process after ``seconds``, even if a thread is stuck in a
    call that takes no timeout (a name lookup): a delivery process never outlives its bound."""
    import signal
    import threading

    alarm = getattr(signal, "alarm", None)
    if alarm is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        alarm(max(1, int(seconds + 0.999)))
