"""The commands that send: ``flush`` (now, for the user who asked) and ``deliver``
(the delivery process a program starts at exit, which users may run too).

Both go through a client's public methods (``send_waiting``, ``drain``,
``delivery_status``), so they send the way every event is sent: the same
outbox, leases, backoff and circuit breaker.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, Tuple

from .._client.client import Telemetry
from .._client.delivery import DeliveryStatus
from .._delivery import outbox as _outbox
from .._policy.config import ingest_url
from .._policy.state import state_dir
from .common import Failure, app_of, decision_for, describe, say
from .delivery_process import deliver


def run_flush(telemetry: Telemetry, args: argparse.Namespace) -> Dict[str, Any]:
    decision = decision_for(telemetry, args)
    if not decision.enabled:
        raise Failure(f"telemetry is off ({describe(decision.decided_by, args)}); nothing is sent")
    if decision.debug:
        raise Failure("debug mode is on (KAIBAN_TELEMETRY_DEBUG): signals are printed, "
                      "never sent")
    app_ids = ([app_of(telemetry, args, decision)] if (args.app or decision.app_id)
               else _outbox.apps_with_outbox(state_dir()))
    totals = {"sent": 0, "left": 0}
    dropped = 0
    problems: List[str] = []
    for app in filter(None, app_ids):
        assert app is not None
        waiting = _outbox.waiting(state_dir(), app) or 0
        if waiting == 0:
            continue
        s = telemetry.settings
        # The author's own transport and timeout: the same way out as every send.
        client = Telemetry(app_id=app, endpoint=s.endpoint, namespace=s.namespace, salt=s.salt,
                        opt_out_env=s.opt_out_env, profile=s.profile, timeout=s.timeout,
                        backoff=s.backoff, transport=telemetry.transport)
        sent, left, lost, problem = _drain(client, waiting, args)
        totals["sent"] += sent
        totals["left"] += left
        dropped += lost
        if problem:
            problems.append(problem)
    if not args.json:
        say(f"Sent {totals['sent']} signal(s); {totals['left']} still waiting.")
    reason = f" ({problems[0]})" if problems else ""
    if dropped:
        raise Failure(f"{dropped} signal(s) could not be sent and were dropped{reason}"
                      + (f"; {totals['left']} wait for a later run" if totals["left"] else ""))
    if totals["left"]:
        raise Failure(f"{totals['left']} signal(s) could not be sent{reason}; they wait for a "
                      "later run")
    return {"ok": True, **totals}


def run_deliver(telemetry: Telemetry, args: argparse.Namespace) -> Dict[str, Any]:
    s = telemetry.settings
    decision = decision_for(telemetry, args)
    app = app_of(telemetry, args, decision)
    if app is None:
        raise Failure("no app ID: give --app or set KAIBAN_TELEMETRY_APP_ID")
    try:
        settings = s.replace(app_id=app, endpoint=args.endpoint, opt_out_env=args.opt_out_env,
                             profile=args.profile)
    except ValueError as exc:  # ConfigurationError: say what is wrong, in one line
        raise Failure(str(exc).removeprefix("kaibantrace: ")) from None
    url = ingest_url(settings, os.environ)
    if url is None:
        raise Failure("the endpoint is not usable")
    done = deliver(app, url, opt_out_env=settings.opt_out_env, profile=settings.profile,
                   timeout=args.timeout or s.timeout, backoff=args.backoff or s.backoff,
                   bound=args.max_time, lock_fd=args.lock_fd)
    if not args.json:
        say(f"Sent {done.sent} signal(s); {done.left} still waiting"
              + (f" ({done.problem})." if done.problem else "."))
    return {"ok": not done.problem, "sent": done.sent, "left": done.left, "problem": done.problem or None}


def _drain(client: Telemetry, waiting: int, args: argparse.Namespace) -> Tuple[int, int, int, str]:
    """Send what waits for ``client``'s app now, and wait until none is left or sending
    stops: (sent, left, dropped, the last problem)."""
    show = not args.json and sys.stdout.isatty()

    def progress(status: DeliveryStatus) -> None:
        if show:
            say(f"Sending for app {client.settings.app_id}: {client.stats()['sent']} of "
                f"{waiting}", start="\r", end="", flush=True)

    try:
        client.drain(args.timeout, progress=progress)
        status = client.delivery_status()  # before the shutdown forgets the sender
    finally:
        if show:
            say()
        client.shutdown(timeout=1.0)
    if not status.sending:
        return 0, waiting, 0, "no sender could start"
    sent = int(client.stats()["sent"])  # type: ignore[call-overload]  # after the last send
    # What is left is read, not computed: a delivery process may have sent some meanwhile.
    still = _outbox.waiting(state_dir(), str(client.settings.app_id))
    dropped = sum(client.stats()["dropped"].values())  # type: ignore[attr-defined]  # 410, refused
    left = waiting - sent - dropped if still is None else still
    return sent, left, dropped, status.problem
