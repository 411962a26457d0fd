"""A tiny "agent workflow" library that ships telemetry of its own.

Run it with ``python examples/workflow.py`` (no internet needed; see
``_demo.py`` for the environment variables it honours).

What it shows:

* a library holds its OWN ``kaibantrace.Telemetry`` client, so it never shares
  an app ID, settings or queue with the program that imports it, or with
  another library that also uses kaibantrace;
* ``TELEMETRY.track`` on a method, on an ``async def`` and on a generator: the
  event is sent when the work starts (when the coroutine is awaited, when the
  generator is first iterated), not when the object is created;
* a static payload, and a payload computed from the call's arguments;
* sessions: two workflows running concurrently on one event loop, each in its
  own ``TELEMETRY.session()``, keep their session IDs apart.
"""

from __future__ import annotations

import asyncio
from typing import Any, Dict, Iterator, List

import _demo  # these examples' helper: a local collector, unless KAIBAN_TELEMETRY_ENDPOINT is set

import kaibantrace
from kaibantrace import events

# The library's own client. A real library would pass its TelemetryDeck app ID
# here: kaibantrace.Telemetry(app_id="YOUR-APP-ID"). This demo configures it in
# main() instead, so that it never talks to the real service.
TELEMETRY = kaibantrace.Telemetry()


class Agent:
    def __init__(self, name: str, role: str) -> None:
        self.name = name
        self.role = role


# An async step. The payload callable receives the call's arguments by
# parameter name. Send coarse facts (a role), never user content (the topic).
@TELEMETRY.track("agent_step", payload=lambda args: {"role": args["agent"].role})
async def perform_step(agent: Agent, topic: str) -> str:
    await asyncio.sleep(0.01)  # stands for a call to a language model
    return f"{agent.name} ({agent.role}) has notes on {topic}."


# A generator, with a static payload (checked once, when the module is imported).
@TELEMETRY.track("report_streamed", payload={"format": "words"})
def stream_report(notes: List[str]) -> Iterator[str]:
    for note in notes:
        yield from note.split()


def _team_size(args: Dict[str, Any]) -> Dict[str, int]:
    """Payload for workflow_started: how many agents, nothing about who they are."""
    return {"agents": len(args["self"].agents)}


class Team:
    def __init__(self, name: str, agents: List[Agent]) -> None:
        self.name = name
        self.agents = agents

    # For a method, the arguments include ``self``.
    @TELEMETRY.track(events.WORKFLOW_STARTED, payload=_team_size)
    def start(self, topic: str) -> str:
        """Run the workflow to the end and return the report (blocking)."""
        return asyncio.run(self._work(topic))

    @TELEMETRY.track(events.WORKFLOW_STARTED, payload=_team_size)
    async def start_async(self, topic: str) -> str:
        """The same, for callers that already run an event loop."""
        return await self._work(topic)

    async def _work(self, topic: str) -> str:
        notes = await asyncio.gather(*(perform_step(agent, topic) for agent in self.agents))
        return " ".join(stream_report(list(notes)))


async def run_two_workflows(team: Team) -> List[str]:
    """Two workflows at once on one event loop, each in a session of its own."""

    async def one(topic: str) -> str:
        async with TELEMETRY.session():
            return await team.start_async(topic)

    return list(await asyncio.gather(one("pricing"), one("onboarding")))


def main() -> None:
    demo = _demo.Demo(local_app_id=events.LIBRARY_APP_ID)
    TELEMETRY.configure(**demo.settings)

    team = Team("launch", [Agent("Ada", "researcher"), Agent("Grace", "writer")])

    # A blocking run. Every event inside the block shares one session ID,
    # including those of the async steps that start() runs on its own loop.
    with TELEMETRY.session():
        print(team.start("release notes"))

    # Two concurrent runs: asyncio tasks inherit the session of the block
    # they were created in, so each run's events share that run's session ID.
    for report in asyncio.run(run_two_workflows(team)):
        print(report)

    TELEMETRY.flush(timeout=2.0)
    print()
    demo.report(TELEMETRY)


if __name__ == "__main__":
    main()
