"""The commands that show and decide: ``status``, ``enable``, ``disable``, ``reset``,
``log`` and ``project-id``. Each takes the client it speaks for and the parsed
arguments, prints for people (or returns what ``--json`` prints), and raises
``Failure`` with a one-line reason.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any, Dict, Optional, cast

from .._delivery import handoff as _handoff
from .._delivery import outbox as _outbox
from .._delivery import sentlog as _sentlog
from .._encode.identity import hash_user, keyed_identity, project_id
from .._policy import prefs as _prefs
from .._policy.config import canonical_app_id, in_ci, ingest_url, keyed_with_local_secret, why_nothing_is_sent
from .._policy.page import in_a_page
from .._policy.state import config_dir, state_dir
from .common import Failure, app_of, decision_for, describe, say

if TYPE_CHECKING:
    from .._client.client import Telemetry


def run_status(telemetry: Telemetry, args: argparse.Namespace) -> Dict[str, Any]:
    decision = decision_for(telemetry, args)
    app_id = app_of(telemetry, args, decision)
    directory = state_dir()
    sent_in_page: Optional[int] = None
    if in_a_page():  # no outbox, sent log or delivery process: what this page holds and sent
        stats = telemetry.stats()
        pending, sent_in_page = cast(int, stats["pending"]), cast(int, stats["sent"])
        apps = [app_id] if app_id else []
        counts: Dict[str, Optional[int]] = {app: pending for app in apps}
        last = None
        delivering: Dict[str, Optional[int]] = {}
        runs = 0
    else:
        apps = [app_id] if app_id else _outbox.apps_with_outbox(directory)
        counts = {app: _outbox.waiting(directory, app) for app in apps}
        pending = sum(n for n in counts.values() if n is not None)
        last = _sentlog.last_sent()
        delivering = {app: pid for app in apps
                      if (pid := _handoff.running(directory, app)) is not None}
        runs = sum(len(_outbox.delivery_runs(directory, app)) for app in apps)
    endpoint = ingest_url(telemetry.settings, os.environ)
    settings = telemetry.settings if args.app is None else telemetry.settings.replace(app_id=args.app)
    # The ``kaibantrace`` command itself speaks for every program on the machine, whose
    # app IDs are their own; a client handed over by a program is that program.
    any_app = app_id is None and args.client_given is False
    blocked = why_nothing_is_sent(settings, decision, os.environ, any_app=any_app)
    result = {
        "enabled": decision.enabled,
        "decided_by": decision.decided_by,
        "debug": decision.debug,
        "can_send": blocked is None,
        "cannot_send_because": blocked,
        "endpoint": endpoint,
        "app_id": app_id,
        "profile": decision.profile,
        "saved_preference": _prefs.saved_choice(),
        "ci": in_ci(os.environ),
        "state_dir": directory,
        "config_dir": config_dir(),
        "pending": pending,
        "pending_by_app": counts,
        "last_sent": last,
        "delivery_process": delivering or None,
        "delivery_runs": runs,
    }
    if not args.json:
        if not decision.enabled:
            say("Telemetry is off.")
        elif blocked is not None:
            say(f"Telemetry is on, but nothing can be sent: {blocked}.")
        else:
            say("Telemetry is on.")
        say(f"  decided by:  {describe(decision.decided_by, args)}")
        say(f"  app:         {app_id or '(none configured)'}")
        say(f"  endpoint:    {endpoint or '(none usable)'}")
        say(f"  profile:     {decision.profile}")
        if sent_in_page is not None:
            say(f"  waiting:     {pending} signal(s) in this page's queue")
            say(f"  sent:        {sent_in_page} signal(s) since the page was loaded")
        else:
            say(f"  waiting:     {pending} signal(s) in the outbox")
            say(f"  last sent:   {last or 'never (from this machine)'}")
        for app, pid in delivering.items():
            shown = f"process {pid}" if pid else "a process"
            say(f"  delivering:  {shown} is sending what waits"
                  + (f" for app {app}" if len(apps) > 1 else ""))
        say(f"  state dir:   {directory}")
        say(f"  config dir:  {config_dir()}")
        if in_ci(os.environ):
            say("  CI:          yes (no notice, no files that identify this machine)")
    return result


def run_enable(telemetry: Telemetry, args: argparse.Namespace) -> Dict[str, Any]:
    _save(_prefs.ENABLED)
    decision = telemetry.decision()
    if not args.json:
        if decision.enabled:
            say(f"Telemetry is enabled. Turn it off again with `{args.prog} disable`.")
        else:
            say(f"Saved. Telemetry stays off, though: {describe(decision.decided_by, args)} "
                  "still says so, and an opt-out always wins.")
    return {"ok": True, "saved": _prefs.ENABLED, "enabled": decision.enabled,
            "decided_by": decision.decided_by}


def run_disable(telemetry: Telemetry, args: argparse.Namespace) -> Dict[str, Any]:
    _save(_prefs.DISABLED)
    directory = state_dir()
    removed = 0
    for app in _outbox.apps_with_outbox(directory):
        removed += _outbox.waiting(directory, app) or 0
        _outbox.purge(directory, app)
    if not args.json:
        say("Telemetry is disabled for every program that uses kaibantrace on this machine.")
        say(f"Deleted {removed} signal(s) that were waiting to be sent. "
              f"`{args.prog} enable` turns it back on.")
    return {"ok": True, "saved": _prefs.DISABLED, "enabled": False, "deleted": removed}


def _save(choice: str) -> None:
    try:
        _prefs.save_choice(choice)
    except OSError as exc:
        raise Failure(f"could not save your choice in {config_dir()}: {exc.strerror or exc}") from None


def run_reset(telemetry: Telemetry, args: argparse.Namespace) -> Dict[str, Any]:
    try:
        removed = _prefs.reset()
    except OSError as exc:
        raise Failure(str(exc)) from None
    decision = telemetry.decision()
    if not args.json:
        if removed:
            say(f"Forgot {', '.join(removed)}: the saved choice, the first-run notices, the "
                  "install markers and the local secret, whichever existed.")
            say("A new secret is made at the next CLI event; the notice shows again on a "
                  "terminal.")
        else:
            say("Nothing to forget: no saved choice, notice or install marker, or local secret.")
        state = "on" if decision.enabled else "off"
        say(f"Telemetry is now {state} ({describe(decision.decided_by, args)}).")
    return {"ok": True, "removed": removed, "enabled": decision.enabled,
            "decided_by": decision.decided_by}


def run_log(telemetry: Telemetry, args: argparse.Namespace) -> Any:
    records = _sentlog.read()
    if args.app:
        records = [r for r in records if canonical_app_id(r.get("app_id")) == args.app]
    shown = records[-args.limit:] if args.limit else []
    if not args.json:
        if not shown:
            say("Nothing has been sent from this machine (or the log was cleared).")
        for record in shown:
            say(f"{record.get('sent_at')}  {record.get('signals')} signal(s) for app "
                  f"{record.get('app_id')} to {record.get('url')}")
            say(f"  {record['body']}")
    return shown


def run_project_id(telemetry: Telemetry, args: argparse.Namespace) -> Dict[str, Any]:
    decision = decision_for(telemetry, args)
    settings = telemetry.settings
    identifier = project_id()
    keyed = keyed_with_local_secret(settings)
    sent: Optional[str] = None
    why_none = "nothing: telemetry is off"
    if not decision.enabled:
        pass
    elif not keyed:
        sent = hash_user(identifier, settings.salt)
    elif in_ci(os.environ):  # a fresh secret in memory for each run: nothing to show
        why_none = "a different value on every run (in CI the secret is never saved)"
    else:  # the saved secret, read, never made here
        secret = _prefs.existing_secret()
        if secret is not None:
            sent = hash_user(keyed_identity(identifier, secret), settings.salt)
        else:
            why_none = "not known yet: this machine's secret is made at the first send"
    if not args.json:
        say(f"project ID:  {identifier}  (KaibanJS's formula; never sent)")
        if sent is not None:
            how = "keyed with this machine's secret, then hashed" if keyed else "hashed"
            say(f"sent as:     {sent}  ({how})")
        else:
            say(f"sent as:     {why_none}")
    return {"project_id": identifier, "sent_as": sent, "keyed_with_local_secret": keyed,
            "enabled": decision.enabled}
