"""Shared set-up for the examples: where to send, which app ID, and what arrived.

This is not part of kaibantrace and not something your program needs. It only
makes the examples safe to run anywhere, including a machine without internet:

* If ``KAIBAN_TELEMETRY_ENDPOINT`` is set, the examples leave ``endpoint`` out
  of their code so that variable decides where signals go (an argument given
  in code would beat it).
* Otherwise they start kaibantrace's own loopback collector
  (``kaibantrace.testing.Collector``) and send there, never to the real
  TelemetryDeck service.
* If ``KAIBAN_TELEMETRY_APP_ID`` is set, they leave ``app_id`` out of their
  code for the same reason. Otherwise they use a demo app ID: KaibanJS's own
  app ID when talking to the local collector (or none, for an example in the
  KaibanJS profile, which picks KaibanJS's app IDs itself), and a made-up one
  otherwise.

After the example ran, ``Demo.report()`` prints what happened: what the local
collector received, where signals went, or that telemetry is off.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import kaibantrace
from kaibantrace.testing import Collector

ENV_ENDPOINT = "KAIBAN_TELEMETRY_ENDPOINT"
ENV_APP_ID = "KAIBAN_TELEMETRY_APP_ID"

DEMO_APP_ID = "00000000-0000-4000-8000-000000000000"
"""A made-up app ID, used when the examples send to an endpoint you chose."""


def _from_env(name: str) -> Optional[str]:
    """The variable's value, or ``None`` when unset or blank (as kaibantrace reads it)."""
    value = os.environ.get(name, "").strip()
    return value or None


class Demo:
    """Decides the example's settings and, when needed, runs the local collector."""

    def __init__(self, local_app_id: Optional[str]) -> None:
        self.endpoint_from_env = _from_env(ENV_ENDPOINT)
        self.collector: Optional[Collector] = None
        self.settings: Dict[str, Any] = {}
        """Keyword arguments for ``configure()``: only what the environment does not set."""

        if self.endpoint_from_env is None:
            self.collector = Collector().start()
            self.settings["endpoint"] = self.collector.url
        if _from_env(ENV_APP_ID) is None:
            # KaibanJS's real app IDs are only ever used with the local collector.
            app_id = local_app_id if self.collector else DEMO_APP_ID
            if app_id is not None:
                self.settings["app_id"] = app_id

    def report(self, client: kaibantrace.Telemetry) -> None:
        """Print what became of the example's signals, then stop the local collector."""
        try:
            self._report(client)
        finally:
            if self.collector is not None:
                self.collector.stop()

    def _report(self, client: kaibantrace.Telemetry) -> None:
        stats = client.stats()
        if not client.enabled:
            decided_by = client.decision().decided_by
            reason = "opted out in code" if decided_by == "code" else f"{decided_by} is set"
            if stats["sent"] == 0 and not self._received():
                print(f"Telemetry is off ({reason}), so nothing was sent.")
            else:
                print(f"Telemetry is off ({reason}), yet something was sent:")
                self._print_received()
            return
        if client.decision().debug:
            print("Debug mode (KAIBAN_TELEMETRY_DEBUG): the signals were printed to stderr "
                  "instead of being sent.")
            return
        if self.collector is not None:
            self._print_received()
        else:
            print(f"Delivered {stats['sent']} of {stats['queued']} signal(s) to "
                  f"{self.endpoint_from_env} (from {ENV_ENDPOINT}).")
        _print_problems(stats)

    def _received(self) -> list[Dict[str, Any]]:
        return self.collector.signals if self.collector is not None else []

    def _print_received(self) -> None:
        assert self.collector is not None
        signals = self.collector.signals
        if not signals:
            print(f"The local collector at {self.collector.url} received nothing.")
            return
        sessions = {signal.get("sessionID") for signal in signals}
        app_ids = ", ".join(sorted({signal["appID"] for signal in signals}))
        print(f"The local collector at {self.collector.url} received {len(signals)} signal(s) "
              f"in {len(sessions)} session(s), appID {app_ids}:")
        for signal in signals:
            # clientUser is a salted SHA-256 hash: of a random identity of this
            # process, or of the project ID for CLI events. Nothing here says who you are.
            payload = json.dumps(signal.get("payload", {}), sort_keys=True)
            print(f"  {signal['type']:<17} sessionID={signal.get('sessionID')} "
                  f"clientUser={signal['clientUser'][:12]}... payload={payload}")


def _print_problems(stats: Dict[str, Any]) -> None:
    """Say so when signals were dropped or not yet delivered (e.g. the endpoint is down)."""
    dropped = {cause: count for cause, count in stats["dropped"].items() if count}
    if dropped:
        print(f"Not delivered, by cause: {dropped}")
    unfinished = stats["queued"] - stats["sent"] - sum(dropped.values())
    if unfinished > 0:
        print(f"Not delivered before the flush timed out: {unfinished} "
              "(is the endpoint reachable?)")
