"""Short runs: a command-line tool run again and again, as a shell loop runs it, next to PostHog.

Run from the repository root::

    python benchmarks/bench_short_runs.py            # both sections, two or three minutes
    python benchmarks/bench_short_runs.py --quick    # fewer runs, same sections
    python benchmarks/bench_short_runs.py --black-hole-runs 1000   # the issue's loop

The program measured is a click command wrapped with
``kaibantrace.track_cli("run_board")`` whose body sleeps 50 ms and never calls
``flush()``: a run usually ends before its own sender has sent anything, so
what it emitted is left to the detached delivery process its exit hook starts
(``python -m kaibantrace deliver``), or to one already running. PostHog's equivalent is the same click
command capturing one event through PostHog's default client (module-level
``posthog.capture``), with no flush of its own: its exit hook does what it
does. Each run is a fresh ``python`` process started when the previous one
has ended; the runs of one loop share a state directory, and every loop gets
a fresh one (and a fresh config directory, so its first run records the
``install`` event as a user's first run would). Each event carries its run's
number, so a duplicate or a missing run can be named. Needs ``click``; the
PostHog figures need ``posthog`` (``pip install -e ".[bench]"``).

Two sections (``--only`` picks one):

* **healthy**: ``--rounds`` rounds (3; 2 with ``--quick``), each of
  ``--runs`` runs (20; 8 with ``--quick``) against a fresh
  ``kaibantrace.testing.Collector`` in a thread of this process, then as many
  PostHog runs against a loopback server of its own (also a thread here).
  After each loop the benchmark waits, for 30 s at most, until every event
  has arrived, and then until no delivery process runs
  (``kaibantrace._delivery.handoff.running``). Figures: events delivered, each exactly
  once or not, and how long after the loop's last exit the last of them
  arrived; the delivery processes started (the outbox's ``delivery_runs``);
  the exit delay, the median of the rounds' figures.
* **black-hole**: ``--black-hole-runs`` runs (200; 40 with ``--quick``)
  against a loopback socket that accepts connections and never answers (it
  counts them), then a wait until no delivery process runs. Figures: delivery
  processes started (a handful, not one per run), connections accepted,
  the exit delay, and the signals still waiting in the outbox (all of them:
  nothing can be delivered, and nothing may be lost). PostHog runs
  ``--runs`` times against a black hole of its own: each of its runs takes
  about a second to exit there, so more runs would add minutes and no
  information.

The **exit delay** is the median wall time of a loop's runs (from starting
``python`` until it has exited and its output pipes have closed) minus the
median of the same loop with telemetry off: ``KAIBAN_TELEMETRY_OPT_OUT=1``
for kaibantrace, ``posthog.disabled = True`` for PostHog, in a loop of its
own (``--runs`` runs) and a state directory of its own. The opted-out loop
runs before the measured one in odd rounds and after it in even ones; in
the black-hole section, half of it before and half after. A delivery
process that competes with the next runs for the CPU is counted in their
wall time, as a user would feel it. On a shared machine the load moves these
medians by tens of milliseconds from one loop to the next, hence the rounds.
kaibantrace's bytecode is written first, as an installed package has it.

Everything talks to 127.0.0.1 only. Each target prints ``[ok]`` or
``[MISSED]``; a failed hard check (a run that failed or printed on stderr, a
delivery process still running at the end, an event lost from the outbox)
prints ``[FAIL]`` and makes the exit status 1; ``--strict`` makes a missed
target do the same. ``--json FILE`` writes the figures for ``run_all.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Set, Tuple

import bench_overhead as overhead
from bench_overhead import APP_ID, CHILD_ENV, OPTED_OUT, check

import kaibantrace
from kaibantrace._delivery.handoff import DELIVERY_BOUND, running
from kaibantrace._delivery.outbox import delivery_runs, waiting
from kaibantrace.testing import Collector

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RUN_VARIABLE = "KAIBANTRACE_BENCH_RUN"  # tells each run its number, which its event carries
POSTHOG_KEY = "phc_kaibantrace_benchmark"
ARRIVAL_DEADLINE = 30.0  # seconds after the last exit to wait for the last event
DELIVERY_WAIT = DELIVERY_BOUND + 15.0  # a delivery process ends within its bound, whatever happens

TARGET_ARRIVAL_S = 15.0  # every event exactly once within this long after the last exit
TARGET_EXIT_MS = 10.0  # exit delay over opted out, median
TARGET_PROCESSES = 10  # delivery processes started by the black-holed loop: a handful
RECORDED_RUNS = 100  # the outbox remembers the last hundred delivery processes

# Variables of ours that bench_overhead.isolate() leaves alone but that would change
# what is measured here: the hand-off switch, the profile, the user's config directory.
MORE_OF_OURS = ("KAIBAN_TELEMETRY_DETACHED", "KAIBAN_TELEMETRY_PROFILE",
                "KAIBAN_TELEMETRY_CONFIG_DIR")

KAIBANTRACE_CLI = textwrap.dedent(f"""
    import os, time

    import click
    import kaibantrace

    kaibantrace.configure(app_id="{APP_ID}")  # the endpoint comes from the environment
    RUN = int(os.environ["{RUN_VARIABLE}"])


    @kaibantrace.track_cli("run_board", payload={{"run": RUN}})
    @click.command()
    def run_board():
        time.sleep(0.05)


    if __name__ == "__main__":
        run_board()
""")

POSTHOG_CLI = textwrap.dedent(f"""
    import logging, os, sys, time

    import click
    import posthog

    logging.getLogger("posthog").setLevel(logging.CRITICAL)  # a CLI keeps its stderr quiet
    posthog.api_key = "{POSTHOG_KEY}"
    posthog.host = sys.argv[1]
    posthog.disabled = sys.argv[2] == "disabled"
    RUN = int(os.environ["{RUN_VARIABLE}"])


    @click.command()
    def run_board():
        posthog.capture("run_board", distinct_id="benchmark", properties={{"run": RUN}})
        time.sleep(0.05)


    if __name__ == "__main__":
        run_board(sys.argv[3:])
""")


@dataclasses.dataclass(frozen=True)
class Plan:
    runs: int  # the healthy loops, PostHog's black-holed loop and every opted-out loop
    rounds: int  # of the healthy section
    black_hole_runs: int  # kaibantrace's black-holed loop


FULL = Plan(runs=20, rounds=3, black_hole_runs=200)
QUICK = Plan(runs=8, rounds=2, black_hole_runs=40)

target = overhead.target
results: Dict[str, Any] = {}


# -- running a loop ------------------------------------------------------------

@dataclasses.dataclass
class Run:
    wall: float  # seconds from starting the process until it exited and its pipes closed
    ended: float  # time.monotonic() then
    returncode: Optional[int]
    stderr: str


@dataclasses.dataclass
class Loop:
    """A directory for one loop of runs: the state and config directories, and the CLI."""

    root: str
    script: str

    @property
    def state(self) -> str:
        return os.path.join(self.root, "state")

    @property
    def config(self) -> str:
        return os.path.join(self.root, "config")

    @property
    def project(self) -> str:  # the CLI's working directory: its project
        return os.path.join(self.root, "project")

    def run(self, count: int, env: Mapping[str, str], args: Tuple[str, ...] = ()) -> List[Run]:
        """Run the CLI ``count`` times, each run starting when the previous one has ended."""
        child_env = {**CHILD_ENV, **env, "KAIBAN_TELEMETRY_DIR": self.state,
                     "KAIBAN_TELEMETRY_CONFIG_DIR": self.config,
                     # this checkout's kaibantrace, whatever is installed
                     "PYTHONPATH": os.pathsep.join(filter(None, [ROOT,
                                                                 CHILD_ENV.get("PYTHONPATH")]))}
        runs = []
        for number in range(count):
            child_env[RUN_VARIABLE] = str(number)
            start = time.perf_counter()
            try:
                done = subprocess.run([sys.executable, self.script, *args], cwd=self.project,
                                      env=child_env, capture_output=True, text=True, timeout=60)
                returncode, stderr = done.returncode, done.stderr.strip()
            except subprocess.TimeoutExpired:
                returncode, stderr = None, "hung: killed after 60 s"
            runs.append(Run(time.perf_counter() - start, time.monotonic(), returncode, stderr))
        return runs

    def installs(self) -> int:
        """``install`` events the loop's runs emitted: one per marker they wrote."""
        with contextlib.suppress(OSError):
            return len(os.listdir(os.path.join(self.config, "projects")))
        return 0


@contextlib.contextmanager
def fresh_loop(source: str) -> Iterator[Loop]:
    """A fresh directory with the CLI in it, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="kaibantrace-bench-") as root:
        script = os.path.join(root, "project", "run_board.py")
        os.makedirs(os.path.dirname(script))
        with open(script, "w", encoding="utf-8") as handle:
            handle.write(source)
        yield Loop(root, script)


def median_ms(runs: List[Run]) -> float:
    return 1000 * statistics.median(run.wall for run in runs)


def check_runs(name: str, runs: List[Run], *, quiet: bool = True) -> None:
    """Every run exited with status 0 (and, when ``quiet``, printed nothing on stderr)."""
    bad = [(n, r) for n, r in enumerate(runs)
           if r.returncode != 0 or (quiet and r.stderr)]
    detail = "".join(f"; run {n}: status {r.returncode}, stderr {r.stderr[-200:]!r}"
                     for n, r in bad[:3])
    check(not bad, f"{name}: all {len(runs)} runs exited with status 0"
          + (" and printed nothing on stderr" if quiet else "") + detail)


def loop_line(name: str, runs: List[Run], reference: List[Run]) -> float:
    """Print a loop's wall times next to its reference; the exit delay (ms, medians)."""
    walls = sorted(1000 * r.wall for r in runs)
    delay = median_ms(runs) - median_ms(reference)
    print(f"  {name}: {len(runs)} runs in {sum(walls) / 1000:.1f} s; wall per run median "
          f"{statistics.median(walls):.0f} ms (opted out {median_ms(reference):.0f} ms), "
          f"90th percentile {walls[int(0.9 * (len(walls) - 1))]:.0f} ms, worst {walls[-1]:.0f} ms; "
          f"exit delay {delay:+.1f} ms")
    return delay


# -- what arrived ----------------------------------------------------------------

Key = Tuple[str, Optional[str]]  # (event, run number); the install event has no number


@dataclasses.dataclass
class Delivered:
    expected: int
    accepted: int  # events accepted by the server, duplicates included
    missing: List[Key]
    duplicates: Dict[Key, int]  # key -> times it arrived, when more than once
    unexpected: int
    last_after_exit: Optional[float]  # seconds after the last exit the set was complete

    @property
    def exactly_once(self) -> bool:
        return not self.missing and not self.duplicates and not self.unexpected

    def describe(self) -> str:
        text = f"{self.expected - len(self.missing)} of {self.expected} events delivered"
        if self.exactly_once:
            text += ", each exactly once"
        else:
            if self.duplicates:
                text += (f", {sum(self.duplicates.values()) - len(self.duplicates)} duplicates "
                         f"(runs {names(self.duplicates)})")
            if self.missing:
                text += f", missing: runs {names(self.missing)}"
            if self.unexpected:
                text += f", {self.unexpected} unexpected"
        if self.last_after_exit is not None:
            text += (f"; the last arrived {self.last_after_exit:.2f} s after the last run exited"
                     if self.last_after_exit >= 0 else
                     "; the last arrived before the last run exited")
        return text


def names(keys: Iterable[Key], most: int = 10) -> str:
    """Run numbers (or event names, for the install event) in order, the first ``most``."""
    ordered = sorted(keys, key=lambda key: (key[1] is None, int(key[1] or 0), key[0]))
    shown = ", ".join(key[1] or key[0] for key in ordered[:most])
    return shown + (", ..." if len(ordered) > most else "")


def tally(arrivals: List[Tuple[float, Key]], expected: Set[Key], last_exit: float) -> Delivered:
    """What arrived (``(time.monotonic(), key)`` in arrival order) against what was emitted."""
    counts: Dict[Key, int] = {}
    complete_at: Optional[float] = None
    unexpected = 0
    for arrived, key in sorted(arrivals, key=lambda item: item[0]):
        if key not in expected:
            unexpected += 1
            continue
        counts[key] = counts.get(key, 0) + 1
        if complete_at is None and len(counts) == len(expected):
            complete_at = arrived
    return Delivered(
        expected=len(expected), accepted=len(arrivals),
        missing=[key for key in expected if key not in counts],
        duplicates={key: n for key, n in counts.items() if n > 1}, unexpected=unexpected,
        last_after_exit=None if complete_at is None else complete_at - last_exit)


def kaibantrace_arrivals(collector: Collector) -> List[Tuple[float, Key]]:
    arrivals = []
    for request in list(collector.requests):
        if 200 <= request.status < 300:
            for signal in request.signals:
                run = (signal.get("payload") or {}).get("run")
                arrivals.append((request.arrived, (str(signal.get("type")),
                                                   None if run is None else str(run))))
    return arrivals


def kaibantrace_expected(loop: Loop, runs: int) -> Set[Key]:
    expected: Set[Key] = {("run_board", str(n)) for n in range(runs)}
    if loop.installs():
        expected.add(("install", None))
    return expected


class PosthogServer:
    """PostHog's ingest on loopback, in a thread: answers 200 to everything and keeps each
    captured event's name and ``run`` property with the time it arrived."""

    def __init__(self) -> None:
        self.arrivals: List[Tuple[float, Key]] = []
        self._changed = threading.Condition()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                arrived = time.monotonic()
                server._record(arrived, body, self.headers.get("Content-Encoding") == "gzip")
                self.answer()

            def do_GET(self) -> None:
                self.answer()

            def answer(self) -> None:
                text = b'{"status": 1}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"

    def _record(self, arrived: float, body: bytes, gzipped: bool) -> None:
        try:
            data = json.loads(gzip.decompress(body) if gzipped else body)
        except (OSError, ValueError):
            return
        events = data.get("batch") if isinstance(data, dict) else None
        if not isinstance(events, list):
            events = [data] if isinstance(data, dict) and "event" in data else []
        with self._changed:
            for event in events:
                run = (event.get("properties") or {}).get("run")
                self.arrivals.append((arrived, (str(event.get("event")),
                                                None if run is None else str(run))))
            self._changed.notify_all()

    def wait_for(self, count: int, timeout: float) -> None:
        """Until ``count`` events have arrived, or ``timeout`` seconds have passed."""
        with self._changed:
            self._changed.wait_for(lambda: len(self.arrivals) >= count, timeout)

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()


class BlackHole:
    """A loopback socket that accepts every connection, counts it, and never answers: each
    connection stays open, unread, until ``close()``."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self._listener.settimeout(0.1)  # how soon close() is noticed
        self._held: List[socket.socket] = []
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                connection, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self._held.append(connection)

    @property
    def accepted(self) -> int:
        return len(self._held)

    def close(self) -> None:
        self._closing.set()
        self._thread.join()
        self._listener.close()
        for connection in self._held:
            connection.close()


def wait_for_delivery_processes(loop: Loop) -> Tuple[Optional[int], float]:
    """Wait until no delivery process runs for the loop's state directory (one may end and
    another start meanwhile), for ``DELIVERY_WAIT`` seconds at most: the process ID still
    running then (``None`` when none runs), and ``time.monotonic()`` at the end of the wait."""
    deadline = time.monotonic() + DELIVERY_WAIT
    while True:
        pid = running(loop.state, APP_ID)
        now = time.monotonic()
        if pid is None or now >= deadline:
            return pid, now
        time.sleep(0.02)


def processes_started(loop: Loop) -> Tuple[int, str]:
    """Delivery processes the loop started, and that figure as text (the outbox keeps the
    last hundred only: at that many it is a lower bound)."""
    count = len(delivery_runs(loop.state, APP_ID))
    text = f"at least {count}" if count >= RECORDED_RUNS else str(count)
    return count, f"{text} delivery process{'' if count == 1 else 'es'}"


def ended_text(pid: Optional[int], after_exit: float) -> str:
    if pid is not None:
        return f"one still ran {after_exit:.1f} s after the last run's exit"
    return f"none was running {after_exit:.1f} s after the last run's exit"


def check_none_left(name: str, pid: Optional[int]) -> None:
    check(pid is None, f"{name}: no delivery process left running"
          + ("" if pid is None else f" (pid {pid} still ran {DELIVERY_WAIT:.0f} s after the "
             "last run)"))


# -- section: healthy endpoint ------------------------------------------------------------

@dataclasses.dataclass
class Round:
    """One round of a client: its loop, the opted-out loop next to it, and what arrived."""

    runs: List[Run]
    reference: List[Run]
    delivered: Delivered
    started: int = 0  # delivery processes (kaibantrace)
    started_text: str = "0 delivery processes"
    left: Optional[int] = 0  # signals still in the outbox at the end (kaibantrace)
    pid: Optional[int] = None  # a delivery process still running at the end
    quiet_after: float = 0.0  # seconds from the last exit until no delivery process ran

    @property
    def delay(self) -> float:
        return median_ms(self.runs) - median_ms(self.reference)


def kaibantrace_round(n: int, reference_first: bool) -> Round:
    """``n`` runs against a fresh ``Collector``, and ``n`` opted-out runs before or after."""
    with Collector() as collector:
        env = {"KAIBAN_TELEMETRY_ENDPOINT": collector.url}

        def opted_out() -> List[Run]:
            with fresh_loop(KAIBANTRACE_CLI) as loop:
                return loop.run(n, {**env, **OPTED_OUT})

        reference = opted_out() if reference_first else []
        with fresh_loop(KAIBANTRACE_CLI) as loop:
            runs = loop.run(n, env)
            last_exit = runs[-1].ended
            expected = kaibantrace_expected(loop, n)
            with contextlib.suppress(TimeoutError):
                collector.wait_for(len(expected),
                                   max(0.0, last_exit + ARRIVAL_DEADLINE - time.monotonic()))
            pid, quiet_at = wait_for_delivery_processes(loop)
            delivered = tally(kaibantrace_arrivals(collector), expected, last_exit)
            started, started_text = processes_started(loop)
            left = waiting(loop.state, APP_ID)
        if not reference_first:
            reference = opted_out()
    return Round(runs, reference, delivered, started, started_text, left, pid,
                 quiet_at - last_exit)


def posthog_round(n: int, reference_first: bool) -> Round:
    """``n`` PostHog runs against a fresh loopback server, and ``n`` with ``disabled``."""
    server = PosthogServer()
    try:
        with fresh_loop(POSTHOG_CLI) as loop:
            reference = loop.run(n, {}, (server.url, "disabled")) if reference_first else []
            runs = loop.run(n, {}, (server.url, "enabled"))
            last_exit = runs[-1].ended
            server.wait_for(n, max(0.0, last_exit + ARRIVAL_DEADLINE - time.monotonic()))
            if not reference_first:
                reference = loop.run(n, {}, (server.url, "disabled"))
        delivered = tally(list(server.arrivals), {("run_board", str(k)) for k in range(n)},
                          last_exit)
    finally:
        server.close()
    return Round(runs, reference, delivered)


def bench_healthy(plan: Plan, with_posthog: bool) -> None:
    n, rounds = plan.runs, plan.rounds
    print(f"\n== healthy endpoint: {rounds} rounds of {n} consecutive runs of a 50 ms click CLI, "
          "no flush(); every event waited for ==")
    ours: List[Round] = []
    theirs: List[Round] = []
    for number in range(rounds):
        reference_first = number % 2 == 0  # so that a drifting machine favours neither
        print(f"  round {number + 1} (opted-out loop {'before' if reference_first else 'after'}):")
        ours.append(kaibantrace_round(n, reference_first))
        report_round("kaibantrace", ours[-1])
        if with_posthog:
            theirs.append(posthog_round(n, reference_first))
            report_round("PostHog", theirs[-1])

    for number, one in enumerate(ours, 1):
        check_none_left(f"kaibantrace, round {number}", one.pid)
        check_runs(f"kaibantrace, round {number}", one.runs)
        check_runs(f"kaibantrace, round {number}, opted out", one.reference)
        check(one.left == 0,
              f"kaibantrace, round {number}: nothing waits in the outbox ({one.left} signals)")
    for one in theirs:
        check_runs("PostHog", one.runs, quiet=False)
    exactly_once = all(one.delivered.exactly_once for one in ours)
    latest = max((one.delivered.last_after_exit for one in ours
                  if one.delivered.last_after_exit is not None), default=None)
    events = sum(one.delivered.expected for one in ours)
    delivered = sum(one.delivered.expected - len(one.delivered.missing) for one in ours)
    target(exactly_once and latest is not None and latest <= TARGET_ARRIVAL_S,
           f"kaibantrace: {delivered} of {events} events delivered"
           f"{', each exactly once' if exactly_once else ', NOT each exactly once'}; the last "
           f"of a round at most {latest if latest is not None else float('nan'):.2f} s after "
           f"that round's last exit (target: every event exactly once within "
           f"{TARGET_ARRIVAL_S:.0f} s of the last exit)")
    delay = statistics.median(one.delay for one in ours)
    target(delay <= TARGET_EXIT_MS,
           f"kaibantrace: exit delay over opted out {delay:.1f} ms (median of the rounds' "
           f"{', '.join(f'{one.delay:.1f}' for one in ours)} ms, each a median of {n} runs; "
           f"target: at most {TARGET_EXIT_MS:.0f} ms)")
    figures: Dict[str, Any] = {"runs": n, "rounds": rounds, "kaibantrace": {
        "events": events, "delivered": delivered, "exactly_once": exactly_once,
        "duplicates": sum(sum(one.delivered.duplicates.values()) - len(one.delivered.duplicates)
                          for one in ours),
        "last_after_exit_s": latest, "exit_delay_ms": delay,
        "exit_delay_ms_rounds": [one.delay for one in ours],
        "processes_started": [one.started for one in ours]}}
    if theirs:
        theirs_delay = statistics.median(one.delay for one in theirs)
        print(f"  PostHog: exit delay over disabled {theirs_delay:.1f} ms (median of the rounds' "
              f"{', '.join(f'{one.delay:.1f}' for one in theirs)} ms)")
        figures["posthog"] = {
            "events": sum(one.delivered.expected for one in theirs),
            "delivered": sum(one.delivered.expected - len(one.delivered.missing)
                             for one in theirs),
            "exactly_once": all(one.delivered.exactly_once for one in theirs),
            "last_after_exit_s": max((one.delivered.last_after_exit for one in theirs
                                      if one.delivered.last_after_exit is not None),
                                     default=None),
            "exit_delay_ms": theirs_delay}
    results["healthy"] = figures


def report_round(name: str, one: Round) -> None:
    loop_line(f"  {name}", one.runs, one.reference)
    print(f"    {name}: {one.delivered.describe()}")
    if name == "kaibantrace":
        print(f"    {name}: {one.started_text} started for {len(one.runs)} "
              f"runs; {ended_text(one.pid, one.quiet_after)}")


# -- section: black-holed endpoint ----------------------------------------------------------

def bench_black_hole(plan: Plan, with_posthog: bool) -> None:
    n, m = plan.runs, plan.black_hole_runs
    print(f"\n== black-holed endpoint: {m} consecutive runs of the same CLI against a socket "
          f"that accepts and never answers ==")
    figures: Dict[str, Any] = {"runs": m}
    hole = BlackHole()
    try:
        env = {"KAIBAN_TELEMETRY_ENDPOINT": hole.url + "/v2/"}
        with fresh_loop(KAIBANTRACE_CLI) as loop:  # the opted-out loop: half before, half after
            reference = loop.run(n // 2, {**env, **OPTED_OUT})
        with fresh_loop(KAIBANTRACE_CLI) as loop:
            runs = loop.run(m, env)
            pid, quiet_at = wait_for_delivery_processes(loop)
            started, started_text = processes_started(loop)
            emitted = len(kaibantrace_expected(loop, m))
            left = waiting(loop.state, APP_ID)
        connections = hole.accepted
        with fresh_loop(KAIBANTRACE_CLI) as loop:
            reference += loop.run(n - n // 2, {**env, **OPTED_OUT})
    finally:
        hole.close()
    delay = loop_line("kaibantrace", runs, reference)
    print(f"  kaibantrace: {started_text} started for {m} runs; the black "
          f"hole accepted {connections} connections; "
          f"{ended_text(pid, quiet_at - runs[-1].ended)}")
    check_none_left("kaibantrace", pid)
    check_runs("kaibantrace", runs)
    check_runs("kaibantrace, opted out", reference)
    check(left == emitted, f"kaibantrace: every event waits in the outbox for a later run "
          f"({left} of {emitted})")
    target(started <= TARGET_PROCESSES,
           f"kaibantrace: {started_text} for {m} runs (target: a handful, "
           f"at most {TARGET_PROCESSES})")
    print(f"  [info] kaibantrace: exit delay over opted out {delay:.1f} ms, median of {m} runs")
    figures["kaibantrace"] = {"exit_delay_ms": delay, "processes_started": started,
                              "processes_recorded_max": RECORDED_RUNS,
                              "connections": connections, "waiting": left, "events": emitted}

    if with_posthog:
        theirs_hole = BlackHole()
        try:
            with fresh_loop(POSTHOG_CLI) as loop:
                theirs_reference = loop.run(n, {}, (theirs_hole.url, "disabled"))
                theirs = loop.run(n, {}, (theirs_hole.url, "enabled"))
            theirs_connections = theirs_hole.accepted
        finally:
            theirs_hole.close()
        theirs_delay = loop_line("PostHog", theirs, theirs_reference)
        print(f"  PostHog: its black hole accepted {theirs_connections} connections in {n} runs")
        check_runs("PostHog", theirs, quiet=False)
        figures["posthog"] = {"runs": n, "exit_delay_ms": theirs_delay,
                              "connections": theirs_connections}
    results["black_hole"] = figures


# -- main ------------------------------------------------------------------------------

SECTIONS = ("healthy", "black-hole")


def prepare() -> None:
    """This process and its runs measure the defaults: no variable of the caller's decides."""
    overhead.isolate()
    # With PYTHONDONTWRITEBYTECODE set and no bytecode yet, every run would compile each
    # module it imports, and an enabled run imports more of them than an opted-out one.
    overhead.compile_package()
    for name in [*MORE_OF_OURS, *(n for n in os.environ if n.startswith("POSTHOG_"))]:
        os.environ.pop(name, None)
        CHILD_ENV.pop(name, None)
    if any(n.lower().endswith("_proxy") and n.lower() != "no_proxy" for n in os.environ):
        for name in ("NO_PROXY", "no_proxy"):  # loopback must never go through a proxy
            os.environ[name] = CHILD_ENV[name] = "127.0.0.1,localhost"
    # The black holes hold every connection open: a storm of runs must not run out of files.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: Optional[List[str]] = None) -> int:
    parser = overhead.arguments(__doc__, "fewer runs", list(SECTIONS))
    parser.add_argument("--runs", type=int, metavar="N",
                        help=f"runs per healthy loop (default {FULL.runs}, quick {QUICK.runs})")
    parser.add_argument("--rounds", type=int, metavar="N",
                        help=f"rounds of the healthy section (default {FULL.rounds}, "
                        f"quick {QUICK.rounds})")
    parser.add_argument("--black-hole-runs", type=int, metavar="N",
                        help=f"runs of the black-holed loop (default {FULL.black_hole_runs}, "
                        f"quick {QUICK.black_hole_runs})")
    parser.add_argument("--strict", action="store_true",
                        help="exit with status 1 when a target is missed, too")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    plan = Plan(runs=args.runs or plan.runs, rounds=args.rounds or plan.rounds,
                black_hole_runs=args.black_hole_runs or plan.black_hole_runs)
    sections = args.only or list(SECTIONS)
    prepare()

    posthog_version = (importlib.metadata.version("posthog")
                       if importlib.util.find_spec("posthog") is not None else None)
    with_posthog = posthog_version is not None
    if importlib.util.find_spec("click") is None:
        print("click is not installed (pip install click): the CLI measured here is a click "
              "command, so nothing was measured")
        return 1
    print(f"kaibantrace {kaibantrace.__version__}, "
          f"posthog {posthog_version or 'not installed (PostHog skipped)'}, "
          f"Python {platform.python_version()} ({platform.python_implementation()}), "
          f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs"
          f"{', quick' if args.quick else ''}")
    if "healthy" in sections:
        bench_healthy(plan, with_posthog)
    if "black-hole" in sections:
        bench_black_hole(plan, with_posthog)

    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"short_runs": results}, handle, indent=2)
    return overhead.summarize(args.strict)


if __name__ == "__main__":
    sys.exit(main())
