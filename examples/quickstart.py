"""Quick start: count how often a function is used, anonymously.

Run it with ``python examples/quickstart.py``. It needs no internet: unless
``KAIBAN_TELEMETRY_ENDPOINT`` is set, signals go to a collector running on
127.0.0.1 inside this script, and the script prints what that collector
received. Set ``KAIBAN_TELEMETRY_OPT_OUT=1`` (or ``DO_NOT_TRACK=1``) to see
telemetry switch itself off.
"""

import _demo  # these examples' helper: a local collector, unless KAIBAN_TELEMETRY_ENDPOINT is set

import kaibantrace

demo = _demo.Demo(local_app_id=kaibantrace.events.LIBRARY_APP_ID)

# 1. Configure once, at start-up. Your program would write
#    kaibantrace.configure(app_id="YOUR-TELEMETRYDECK-APP-ID"); here the helper
#    supplies a demo app ID and the local collector's URL.
kaibantrace.configure(**demo.settings)


# 2. Decorate what you want to count: each call sends one "workflow_started".
@kaibantrace.track("workflow_started")
def start_workflow(team: list[str]) -> str:
    return f"{len(team)} agents at work"


# 3. Events inside a session block share one random session ID.
with kaibantrace.session():
    start_workflow(["researcher", "writer"])
    kaibantrace.emit("workflow_finished", {"agents": 2, "status": "done"})

# 4. Signals are sent from a background thread; a short script waits (at most
#    2 s here) until they are delivered. Long-running programs can skip this.
kaibantrace.flush(timeout=2.0)

demo.report(kaibantrace.default_client())
