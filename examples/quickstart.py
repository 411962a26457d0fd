"""Quick start: count how often a function is used, anonymously.

Run it with ``python examples/quickstart.py``. It needs no internet and leaves
nothing behind: the signals go to kaibantrace's own TelemetryDeck-compatible
collector, started here on 127.0.0.1, and kaibantrace keeps its files (the
outbox, the log of what was sent) in a temporary directory deleted at the end.
Run it with ``KAIBAN_TELEMETRY_OPT_OUT=1`` (or ``DO_NOT_TRACK=1``) to see
telemetry switch itself off.
"""

import os
import shutil
import tempfile

import kaibantrace
from kaibantrace.testing import Collector

# Only for this demo: a local stand-in for TelemetryDeck, and a scratch state directory.
collector = Collector().start()
scratch = os.environ["KAIBAN_TELEMETRY_DIR"] = tempfile.mkdtemp(prefix="kaibantrace-quickstart-")

# 1. Configure once, at start-up. A real program gives only its app ID (a UUID,
#    from TelemetryDeck; this one is made up), and signals go to TelemetryDeck.
kaibantrace.configure(app_id="00000000-0000-4000-8000-00000000C0DE", endpoint=collector.url)


# 2. Decorate what you want to count: each call sends one "workflow_started".
@kaibantrace.track("workflow_started")
def start_workflow(team: list[str]) -> str:
    return f"{len(team)} agents at work"


# 3. Events inside a session block share one random session ID.
with kaibantrace.session():
    start_workflow(["researcher", "writer"])
    kaibantrace.emit("workflow_finished", {"agents": 2, "status": "done"})

# 4. Signals leave from a background thread. A long-running program does nothing
#    more; this short script lets them go now, waiting at most 2 seconds.
kaibantrace.shutdown(timeout=2.0)

# What arrived is exactly what TelemetryDeck would have received.
decision = kaibantrace.default_client().decision()
if not decision.enabled:
    print(f"Telemetry is off (decided by {decision.decided_by}), so nothing was sent.")
for signal in collector.signals:
    # clientUser is a salted SHA-256 hash of a random identity of this process.
    print(f"{signal['type']:<17} sessionID={signal['sessionID']} "
          f"clientUser={signal['clientUser'][:12]}... payload={signal.get('payload', {})}")

collector.stop()
shutil.rmtree(scratch)
