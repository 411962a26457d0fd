"""Delivery: exit delay, memory, delivery rate and per-call cost, next to PostHog.

Run from the repository root::

    python benchmarks/bench_delivery.py            # everything, a few minutes
    python benchmarks/bench_delivery.py --quick    # fewer rounds and events, same sections

Five sections, in one run (``--only`` picks some of them):

* **exit**: how much later a script that emits 100 events exits than the same
  script with telemetry off, for kaibantrace (``KAIBAN_TELEMETRY_OPT_OUT=1``)
  and PostHog (``disabled=True``), with the endpoint black-holed (a listening
  socket that never accepts), refusing (a closed port) and healthy. Best of 3.
  Every kaibantrace run gets a fresh ``KAIBAN_TELEMETRY_DIR``; afterwards the
  benchmark counts the signals left in its outbox. Delivery processes are
  turned off here (``KAIBAN_TELEMETRY_DETACHED=0``), so that what is counted
  is what the run itself left; ``bench_short_runs.py`` measures the hand-off.
* **memory**: a child emits 1,000,000 events as fast as it can with the
  endpoint down (refused); extra peak RSS, the worst sampled ``emit`` latency,
  and ``stats()``. The worker starts at the first event and, competing for the
  GIL, is still starting when the burst ends; so a second burst follows once
  it has started, to show the memory stays flat while it works.
* **delivery**: a child emits 100,000 events to a healthy ``Collector`` (in a
  process of its own), never letting more than 5,000 wait in the queue (the
  queue holds 10,000), then ``flush()``es; events per second from the first
  ``emit`` until ``flush()`` returns and all have arrived.
* **calls**: nanoseconds per call of kaibantrace's ``emit`` and PostHog's
  ``capture``, enabled (each worker posting to its loopback server) and off,
  measured as ``bench_overhead.py`` does (rounds taking turns, best round).
* **transport**: CPU time of the sending thread per request of 100 signals
  (a body the encoder made) through kaibantrace's transport, which sends
  with ``requests``, to a ``Collector`` in a process of its own, next to the
  same request through a bare ``http.client`` connection: what sending on
  ``requests`` costs, best round of several. Plain HTTP on loopback: TLS
  would add the same to both.

Everything talks to 127.0.0.1 only. Each target prints ``[ok]`` or
``[MISSED]``; a failed hard check (a signal missing from the outbox, an event
lost, a child that crashed or printed at exit) prints ``[FAIL]`` and makes the
exit status 1. ``--strict`` makes a missed target do the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import sqlite3
import sys
import tempfile
import textwrap
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import bench_overhead as overhead
from bench_overhead import APP_ID, OPTED_OUT, Case, ExitRun, check

import kaibantrace

POSTHOG_KEY = "phc_kaibantrace_benchmark"
MAX_OUTBOX = 10_000  # the outbox bound the issue sets (kaibantrace._delivery.outbox.MAX_SIGNALS)
EXIT_BUDGET_MS = 100.0
EXIT_RATIO = 10.0
MEMORY_BUDGET_MB = 30.0
WORST_EMIT_MS = 20.0  # four times the GIL switch interval: no wait on a file or the network
DELIVERY_HIGH_WATER = 5_000  # the delivery child waits while more than this are queued


@dataclasses.dataclass(frozen=True)
class Plan:
    base: overhead.Config  # per-call rounds, exit runs and events
    memory_events: int
    memory_samples: Tuple[int, ...]
    delivery_events: int
    transport_requests: int  # requests per round; the best of ``base.repeats`` rounds counts


MEMORY_SAMPLES = (1_000, 10_000, 100_000, 250_000, 500_000, 750_000, 1_000_000)
FULL = Plan(overhead.FULL, 1_000_000, MEMORY_SAMPLES, 100_000, 500)
QUICK = Plan(overhead.QUICK, 1_000_000, MEMORY_SAMPLES, 20_000, 200)

target = overhead.target


def posthog_version() -> Optional[str]:
    if importlib.util.find_spec("posthog") is None:
        return None
    return importlib.metadata.version("posthog")


@contextlib.contextmanager
def state_dir() -> Iterator[str]:
    """A fresh ``KAIBAN_TELEMETRY_DIR`` (not yet created, as for a first run), removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="kaibantrace-bench-") as parent:
        yield os.path.join(parent, "state")


def outbox_rows(directory: str) -> Optional[int]:
    """Signals in the app's outbox under ``directory``, or ``None`` when there is no outbox file."""
    path = os.path.join(directory, f"outbox-{APP_ID.lower()}.sqlite3")
    if not os.path.exists(path):
        return None
    with contextlib.closing(sqlite3.connect(path)) as db:
        (count,) = db.execute("SELECT COUNT(*) FROM signals").fetchone()
    return int(count)


def run_with_state_dir(script: str, args: List[str], *, timeout: float
                       ) -> Tuple[overhead.ExitRun, Optional[int]]:
    """Run ``script`` in a child with a fresh state directory; its result and outbox rows after."""
    with state_dir() as directory:
        run = overhead.run_child(script, args, {"KAIBAN_TELEMETRY_DIR": directory,
                                                "KAIBAN_TELEMETRY_DETACHED": "0"}, timeout=timeout)
        return run, outbox_rows(directory)


def finished_cleanly(run: overhead.ExitRun) -> bool:
    """Check (and report) that a child exited 0, quietly, with a report; ``False`` if not."""
    check(run.returncode == 0 and not run.stderr and bool(run.report),
          f"the child exited with status 0 and printed nothing on stderr ({describe(run)})")
    return bool(run.report)


def ratio_text(numerator: float, denominator: float) -> str:
    """``numerator / denominator`` as ``12.3x``, each counted as at least 1 (ms): a delay
    within the noise then shows as a bound (``>=``, ``<=``) instead of a wild ratio."""
    top, bottom = max(numerator, 1.0), max(denominator, 1.0)
    ratio = top / bottom
    bound = ">=" if bottom > denominator else "<=" if top > numerator else ""
    return f"{bound}{ratio:.1f}x" if ratio >= 1 else f"{bound}{ratio:.2f}x"


# -- a loopback server for PostHog ---------------------------------------------------



def posthog_server() -> contextlib.AbstractContextManager[Tuple[str, Callable[[], int]]]:
    """A server in a child process that answers 200 to anything: its URL (PostHog's ``host``),
    and a function that stops it and returns how many events PostHog's batches held."""
    return overhead.collector_process(overhead.POSTHOG_SERVER_SCRIPT)


# -- section: exit delay ----------------------------------------------------------------

POSTHOG_EXIT_SCRIPT = textwrap.dedent("""
    import atexit, json, logging, sys, time

    marks = {}

    def report():  # registered before PostHog's own hook, so it runs after it
        print(json.dumps({"after_last_event_ms": 1000 * (time.perf_counter() - marks["last"])}))

    atexit.register(report)
    from posthog import Posthog

    logging.getLogger("posthog").setLevel(logging.CRITICAL)
    client = Posthog(sys.argv[1], host=sys.argv[2], disabled=sys.argv[4] == "disabled")
    for _ in range(int(sys.argv[3])):
        client.capture("workflow_started", distinct_id="benchmark")
    marks["last"] = time.perf_counter()
""")


@dataclasses.dataclass
class ExitState:
    """One endpoint state, with every run of both clients in it."""

    name: str
    kaibantrace_url: str
    posthog_url: str
    kaibantrace: List[ExitRun] = dataclasses.field(default_factory=list)
    outbox: List[Optional[int]] = dataclasses.field(default_factory=list)  # rows after each run
    posthog: List[ExitRun] = dataclasses.field(default_factory=list)
    warm: bool = False  # the script sends one event and flushes before the measured ones


def best_wall_ms(runs: Sequence[ExitRun]) -> float:
    return min(run.wall for run in runs) * 1000


def run_kaibantrace_exit(state: ExitState, events: int, env: Mapping[str, str]) -> None:
    with state_dir() as directory:
        run = overhead.run_exit_script(state.kaibantrace_url, events,
                                       {**env, "KAIBAN_TELEMETRY_DIR": directory,
                                        "KAIBAN_TELEMETRY_DETACHED": "0"}, warm=state.warm)
        state.kaibantrace.append(run)
        state.outbox.append(outbox_rows(directory))


def run_posthog_exit(state: ExitState, events: int, mode: str) -> None:
    state.posthog.append(overhead.run_child(POSTHOG_EXIT_SCRIPT,
                                            [POSTHOG_KEY, state.posthog_url, str(events), mode],
                                            {}))


def bench_exit(plan: Plan, with_posthog: bool) -> None:
    events, runs = plan.base.exit_events, plan.base.exit_runs
    print(f"\n== exit delay: a script emits {events} events and exits; wall time minus the same "
          f"script with telemetry off, best of {runs} ==")
    with contextlib.ExitStack() as stack:
        hole = stack.enter_context(overhead.black_hole())
        refused = overhead.refused_url()
        collector, stop_collector = stack.enter_context(overhead.collector_process())
        healthy_posthog, stop_posthog = (stack.enter_context(posthog_server()) if with_posthog
                                         else ("", lambda: 0))
        warm_collector, stop_warm_collector = stack.enter_context(overhead.collector_process())
        off = ExitState("telemetry off", collector, healthy_posthog)
        states = [ExitState("black-holed", hole, hole.split("/v2/")[0]),
                  ExitState("refused", refused, refused.split("/v2/")[0]),
                  ExitState("healthy", collector, healthy_posthog)]
        warm = ExitState("healthy, warm", warm_collector, "", warm=True)
        for _ in range(runs):  # the states take turns, so drift hits them all alike
            run_kaibantrace_exit(off, events, OPTED_OUT)
            for state in (*states, warm):
                run_kaibantrace_exit(state, events, {})
            if with_posthog:
                run_posthog_exit(off, events, "disabled")
                for state in states:
                    run_posthog_exit(state, events, "enabled")
        received = stop_collector()
        warm_received = stop_warm_collector()
        posthog_received = stop_posthog()

    print_exit_table(off, states, warm, with_posthog)
    check_exit(off, states, with_posthog, events, received, posthog_received)
    check_warm_exit(warm, events, warm_received)


def print_exit_table(off: ExitState, states: List[ExitState], warm: ExitState,
                     with_posthog: bool) -> None:
    print(f"  telemetry off (the reference): kaibantrace {best_wall_ms(off.kaibantrace):.0f} ms"
          + (f", PostHog {best_wall_ms(off.posthog):.0f} ms" if with_posthog else "")
          + " wall, interpreter start-up and imports included")
    print(f"  {'endpoint':<12} {'kaibantrace':>12} {'(atexit)':>9} {'PostHog':>9} {'(atexit)':>9} "
          f"{'PostHog/kaibantrace':>20}  kaibantrace outbox rows after each run")
    exits = overhead.results.setdefault("exit", {})
    for state in states:
        ours = best_wall_ms(state.kaibantrace) - best_wall_ms(off.kaibantrace)
        exits[state.name] = {"kaibantrace_ms": ours}
        row = f"  {state.name:<12} {ours:9.0f} ms {atexit_ms(state.kaibantrace):>9}"
        if with_posthog:
            theirs = best_wall_ms(state.posthog) - best_wall_ms(off.posthog)
            exits[state.name]["posthog_ms"] = theirs
            row += (f" {theirs:6.0f} ms {atexit_ms(state.posthog):>9} "
                    f"{ratio_text(theirs, ours):>20}")
        else:
            row += f" {'-':>9} {'-':>9} {'-':>20}"
        row += "  " + ", ".join("no file" if n is None else str(n) for n in state.outbox)
        print(row)
    print(f"  {warm.name:<12} {'-':>12} {atexit_ms(warm.kaibantrace):>9} {'-':>9} {'-':>9} "
          f"{'-':>20}  " + ", ".join("no file" if n is None else str(n) for n in warm.outbox))
    print("  each figure: best wall time minus the best telemetry-off wall time; (atexit): last "
          "event -> end of the exit hooks, in the best run")
    print("  healthy, warm: the script sends one event and flushes first (a program that has run "
          "a while); its wall time includes that, so only (atexit) is its exit delay")
    if with_posthog:
        print("  note: PostHog imports requests in both of its scripts; kaibantrace never does")


def check_warm_exit(warm: ExitState, events: int, received: int) -> None:
    """A program whose sender is ready delivers at exit, within the budget."""
    hooks = [run.report.get("after_last_event_ms") for run in warm.kaibantrace]
    worst = max((h for h in hooks if isinstance(h, (int, float))), default=float("inf"))
    target(worst < EXIT_BUDGET_MS,
           f"kaibantrace, healthy, warm: the exit hooks took at most {worst:.0f} ms "
           f"(target: under {EXIT_BUDGET_MS:.0f} ms)")
    total = (events + 1) * len(warm.kaibantrace)
    left = sum(n or 0 for n in warm.outbox)
    check(received + left == total,
          f"kaibantrace, healthy, warm: every event was delivered or is in the outbox "
          f"({received:,} delivered + {left:,} in the outbox of {total:,})")
    target(received == total,
           f"kaibantrace, healthy, warm: {received:,} of {total:,} events delivered before exit "
           "(target: all, as the sender was ready)")


def atexit_ms(runs: List[ExitRun]) -> str:
    best = min(runs, key=lambda run: run.wall)
    value = best.report.get("after_last_event_ms")
    return f"{value:.0f} ms" if isinstance(value, (int, float)) else "n/a"


def check_exit(off: ExitState, states: List[ExitState], with_posthog: bool, events: int,
               received: int, posthog_received: int) -> None:
    reference = best_wall_ms(off.kaibantrace)
    delays = {s.name: best_wall_ms(s.kaibantrace) - reference for s in states}
    for name, delay in delays.items():
        target(delay < EXIT_BUDGET_MS,
               f"kaibantrace, {name}: exits {delay:.0f} ms later than opted out "
               f"(target: under {EXIT_BUDGET_MS:.0f} ms)")
    if with_posthog:
        hole = states[0]
        theirs = best_wall_ms(hole.posthog) - best_wall_ms(off.posthog)
        target(max(theirs, 1.0) / max(delays[hole.name], 1.0) >= EXIT_RATIO,
               f"black-holed: kaibantrace's exit delay is {ratio_text(theirs, delays[hole.name])} "
               f"shorter than PostHog's (target: at least {EXIT_RATIO:.0f}x)")

    for state in (off, *states):
        bad = [run for run in state.kaibantrace if run.returncode != 0 or run.stderr]
        check(not bad, f"kaibantrace, {state.name}: every run exited with status 0 and printed "
              "nothing on stderr" + "".join(f"; status {r.returncode}, stderr {r.stderr[-200:]!r}"
                                            for r in bad))
    check(all(n is None for n in off.outbox),
          f"kaibantrace, telemetry off: no outbox file was created ({off.outbox})")
    for state in states[:2]:
        check(all(n == events for n in state.outbox),
              f"kaibantrace, {state.name}: all {events} signals of every run are in the outbox "
              f"({', '.join(str(n) for n in state.outbox)})")
    healthy = states[2]
    left = sum(n or 0 for n in healthy.outbox)
    total = events * len(healthy.outbox)
    check(received + left == total,
          f"kaibantrace, healthy: every event was delivered or is in the outbox ({received:,} "
          f"delivered before exit + {left:,} in the outbox of {total:,})")
    print(f"  [info] kaibantrace, healthy: {received:,} of {total:,} events delivered before exit "
          "(a run that ends within 50 ms of its first event does not set up HTTP at all: its "
          "events go out with the next run)")
    if with_posthog:
        posthog_total = events * len(healthy.posthog)
        print(f"  [info] PostHog, healthy: its server received {posthog_received:,} of "
              f"{posthog_total:,} events before exit")
        said = {run.stderr.splitlines()[0] for s in states for run in s.posthog if run.stderr}
        for line in sorted(said):
            print(f"  [info] PostHog printed at exit: {line[:150]}")


# -- section: memory --------------------------------------------------------------

MEMORY_SCRIPT = textwrap.dedent("""
    import atexit, itertools, json, resource, sys, time

    result = {}

    def report():  # registered before kaibantrace's own hook, so it runs after it
        result["exit_hooks_ms"] = 1000 * (time.perf_counter() - result.pop("ended"))
        result["exit_stats"] = client.stats()
        print(json.dumps(result))

    atexit.register(report)
    import kaibantrace

    def peak_mb():
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes / KiB

    app_id, url, events = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sample_at = {int(n) for n in sys.argv[4].split(",")}
    client = kaibantrace.Telemetry(app_id=app_id, endpoint=url, max_per_minute=0)
    emit, payload, clock = client.emit, {"agents": 3}, time.perf_counter_ns
    samples, bursts = [], []

    def burst(name):
        latencies = []
        start = time.perf_counter()
        for done in range(1000, events + 1, 1000):
            # Every 1,000th call is timed; the other 999 run as a plain loop.
            began = clock()
            emit("workflow_started", payload)
            latencies.append(clock() - began)
            for _ in itertools.repeat(None, 999):
                emit("workflow_started", payload)
            if done in sample_at:
                stats = client.stats()
                samples.append([name, done, peak_mb() - before, time.perf_counter() - start,
                                stats["queued"] - stats["pending"], stats["requests"]])
        bursts.append({"name": name, "seconds": time.perf_counter() - start,
                       "extra_mb": peak_mb() - before, "latencies_ns": latencies,
                       "stats": client.stats()})

    before = peak_mb()
    burst("cold")  # the worker starts at the first event and competes for the GIL
    deadline = time.monotonic() + 30
    while client.stats()["requests"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # let the worker finish starting: TLS loaded, outbox open
    warm_mb = peak_mb() - before
    burst("warm")
    result.update(before_mb=before, warm_mb=warm_mb, samples=samples, bursts=bursts)
    result["ended"] = time.perf_counter()  # the process exits with 10,000 events queued
""")


def bench_memory(plan: Plan) -> None:
    events = plan.memory_events
    print(f"\n== memory: a child emits {events:,} events as fast as it can, endpoint refusing; "
          "then, once the worker has started, another burst as large ==")
    samples = ",".join(str(n) for n in plan.memory_samples if n <= events)
    run, rows = run_with_state_dir(MEMORY_SCRIPT, [APP_ID, overhead.refused_url(), str(events),
                                                   samples], timeout=600)
    if not finished_cleanly(run):
        return
    report = run.report
    cold, warm = report["bursts"]
    print(f"  peak RSS before the first event: {report['before_mb']:.1f} MB "
          "(interpreter, kaibantrace, the client)")
    print(f"  {'burst':<6} {'events':>10} {'extra peak RSS':>15} {'after':>8} "
          f"{'taken by the worker':>20} {'requests':>9}")
    for name, count, mb, seconds, taken, requests in report["samples"]:
        print(f"  {name:<6} {count:>10,} {mb:12.1f} MB {seconds:6.2f} s {taken:>20,} "
              f"{requests:>9,}")
    print(f"  between the bursts the worker finished starting (TLS loaded, outbox open): "
          f"{report['warm_mb']:.1f} MB extra by then")
    worst = 0.0
    for burst in (cold, warm):
        latencies = sorted(burst["latencies_ns"])
        worst = max(worst, latencies[-1] / 1e6)
        seconds = float(burst["seconds"])
        print(f"  {burst['name']} burst: {seconds:.2f} s, {events / seconds:,.0f} events/s on the "
              f"calling thread; every 1,000th emit timed: median "
              f"{percentile(latencies, 50) / 1000:.1f} us, p99 "
              f"{percentile(latencies, 99) / 1000:.1f} us, worst {latencies[-1] / 1e6:.2f} ms")
        print(f"    stats() after it: {json.dumps(burst['stats'])}")
    print(f"  exit, with a full queue: the exit hooks took {float(report['exit_hooks_ms']):.0f} ms; "
          f"stats() after them: {json.dumps(report['exit_stats'])}")
    print(f"  outbox rows after the child exited: {rows}; child wall time {run.wall:.2f} s")

    extra = float(cold["extra_mb"])
    def at(burst: str, count: int) -> Optional[float]:
        return next((float(mb) for name, n, mb, *_ in report["samples"]
                     if name == burst and n == count), None)

    overhead.results["memory"] = {
        "extra_mb": extra, "events": events, "worker_started_mb": float(report["warm_mb"]),
        "running_at_100k": at("warm", 100_000), "running_at_end": at("warm", events)}
    target(extra < MEMORY_BUDGET_MB,
           f"extra peak RSS {extra:.1f} MB after {events:,} events (target: under "
           f"{MEMORY_BUDGET_MB:.0f} MB)")
    growth = float(warm["extra_mb"]) - float(report["warm_mb"])
    target(float(warm["extra_mb"]) < MEMORY_BUDGET_MB,
           f"extra peak RSS {float(warm['extra_mb']):.1f} MB after the second burst, of which "
           f"{growth:.1f} MB during it, with the worker running (target: under "
           f"{MEMORY_BUDGET_MB:.0f} MB)")
    target(worst < WORST_EMIT_MS, f"the caller never blocks: worst timed emit {worst:.2f} ms "
           f"(target: under {WORST_EMIT_MS:.0f} ms)")
    stats: Dict[str, Any] = warm["stats"]
    dropped: Dict[str, int] = stats["dropped"]
    accounted = int(stats["queued"]) + dropped.get("queue_full", 0)
    check(accounted == 2 * events, f"every event is counted: queued {stats['queued']:,} + "
          f"dropped queue_full {dropped.get('queue_full', 0):,} = {accounted:,} of {2 * events:,}")
    check(rows is not None and rows <= MAX_OUTBOX,
          f"the outbox stayed bounded: {rows} rows (at most {MAX_OUTBOX:,})")
    # At exit the queue (full: 10,000) goes to the outbox, which keeps the newest 10,000.
    after_exit: Dict[str, Any] = report["exit_stats"]
    lost = {cause: n for cause, n in after_exit["dropped"].items()
            if cause not in ("queue_full", "outbox_full")}
    check(not lost and rows == MAX_OUTBOX,
          f"at exit the queued events went to the outbox: {rows} rows, dropped at exit other "
          f"than by the bounds: {lost or 'none'}")
    hooks = float(report["exit_hooks_ms"])
    target(hooks < EXIT_BUDGET_MS,
           f"exit with a full queue: the exit hooks took {hooks:.0f} ms (target: under "
           f"{EXIT_BUDGET_MS:.0f} ms)")


def percentile(ordered: Sequence[float], pct: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


# -- section: delivery rate -------------------------------------------------------

DELIVERY_SCRIPT = textwrap.dedent("""
    import itertools, json, sys, time
    import kaibantrace

    app_id, url, events, high_water = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    client = kaibantrace.Telemetry(app_id=app_id, endpoint=url, max_per_minute=0)
    emit, payload = client.emit, {"agents": 3}
    waits = 0
    start = time.perf_counter()
    for _ in range(events // 1000):
        for _ in itertools.repeat(None, 1000):
            emit("workflow_started", payload)
        while client.stats()["pending"] > high_water:  # never overflow the queue
            waits += 1
            time.sleep(0.001)
    emitted = time.perf_counter()
    flushed = client.flush(timeout=300)
    done = time.perf_counter()
    print(json.dumps({"emit_s": emitted - start, "total_s": done - start, "flushed": flushed,
                      "waits": waits, "stats": client.stats()}))
""")


def bench_delivery(plan: Plan) -> None:
    events = plan.delivery_events
    print(f"\n== delivery rate: a child emits {events:,} events to a healthy Collector in another "
          f"process, then flush() ==")
    with overhead.collector_process() as (url, stop_collector):
        run, rows = run_with_state_dir(DELIVERY_SCRIPT,
                                       [APP_ID, url, str(events), str(DELIVERY_HIGH_WATER)],
                                       timeout=900)
        received = stop_collector()
    if not finished_cleanly(run):
        return
    report = run.report
    stats: Dict[str, Any] = report["stats"]
    total = float(report["total_s"])
    requests = max(int(stats["requests"]), 1)
    print(f"  first emit() -> flush() returned {report['flushed']}: {total:.2f} s, "
          f"{events / total:,.0f} events/s end to end")
    print(f"  emitting took {float(report['emit_s']):.2f} s: the emitter waited 1 ms "
          f"{report['waits']:,} times for the queue to fall to {DELIVERY_HIGH_WATER:,}, so "
          "nothing overflowed")
    print(f"  {stats['requests']:,} requests, {1000 * total / requests:.1f} ms each on average "
          "(SQLite write, claim and delete included)")
    print(f"  stats(): {json.dumps(stats)}")
    overhead.results["delivery"] = {"events_per_s": events / total, "events": events}
    check(bool(report["flushed"]), "flush() returned True")
    check(received == events, f"the collector accepted {received:,} of {events:,} signals")
    check(not stats["dropped"], f"nothing was dropped ({stats['dropped']})")
    check(rows == 0, f"the outbox is empty afterwards ({rows} rows)")


def describe(run: Optional[ExitRun]) -> str:
    """A child's exit status and the end of what it printed on stderr."""
    if run is None:
        return "did not run"
    return f"status {run.returncode}" + (f", stderr {run.stderr[-300:]!r}" if run.stderr else "")


# -- section: per call ---------------------------------------------------------------

def noop() -> None:
    return None


def posthog_cases(url: str) -> List[Case]:
    """PostHog's ``capture``, enabled (its worker posting to ``url``) and ``disabled=True``."""
    from posthog import Posthog  # type: ignore[import-not-found,unused-ignore]

    logging.getLogger("posthog").setLevel(logging.CRITICAL)
    enabled = Posthog(POSTHOG_KEY, host=url)
    disabled = Posthog(POSTHOG_KEY, host=url, disabled=True)

    def capture(client: Any) -> Callable[[], object]:
        return functools.partial(client.capture, "workflow_started", distinct_id="benchmark")

    cases = [
        Case("PostHog capture(), enabled (worker sending)", capture(enabled),
             after_round=enabled.flush, cleanup=enabled.shutdown, queues=True),
        Case("PostHog capture(), disabled=True", capture(disabled), cleanup=disabled.shutdown),
    ]
    return cases


def bench_calls(plan: Plan, with_posthog: bool) -> None:
    config = plan.base
    print(f"\n== per-call cost on the calling thread: best of {config.repeats} rounds of "
          f"{config.calls:,} calls ==")
    with contextlib.ExitStack() as stack:
        directory = stack.enter_context(state_dir())
        url, stop_collector = stack.enter_context(overhead.collector_process())
        env = {"KAIBAN_TELEMETRY_DIR": directory}
        client = kaibantrace.Telemetry(app_id=APP_ID, endpoint=url, max_per_minute=0)
        flushed: List[bool] = []

        def flush() -> None:
            flushed.append(client.flush(timeout=60))

        emit = functools.partial(client.emit, "workflow_started")
        cases = [
            Case("bare call", noop),
            Case("kaibantrace emit(), enabled (worker sending)", emit, env=env, after_round=flush,
                 queues=True),
            Case("kaibantrace emit(), KAIBAN_TELEMETRY_OPT_OUT=1", emit,
                 env={**env, **OPTED_OUT}),
            Case("kaibantrace @track no-op, enabled (worker sending)",
                 client.track("workflow_started")(noop), env=env, after_round=flush, queues=True),
        ]
        if with_posthog:
            posthog_url, stop_posthog = stack.enter_context(posthog_server())
            cases += posthog_cases(posthog_url)
        overhead.run_cases(cases, config)
        stats = client.stats()
        client.shutdown()
        for case in cases:
            if case.cleanup is not None:
                case.cleanup()
        received = stop_collector()
        posthog_received = stop_posthog() if with_posthog else 0

    print_calls_table(cases)
    ours = [c for c in cases if c.queues and c.name.startswith("kaibantrace")]
    expected = sum(len(c.samples) * (config.warmup + (c.calls or config.calls)) for c in ours)
    overhead.check_delivery(stats, expected, all(flushed), received)
    if with_posthog:
        theirs = next(c for c in cases if c.name.startswith("PostHog") and c.queues)
        expected_posthog = len(theirs.samples) * (config.warmup + config.calls)
        print(f"  [info] PostHog's server received {posthog_received:,} of {expected_posthog:,} "
              "events captured by the enabled client")


def print_calls_table(cases: List[Case]) -> None:
    by_name = {c.name: c for c in cases}
    bare = by_name["bare call"].best
    width = max(len(c.name) for c in cases)
    print(f"  {'case':<{width}}  {'ns/call':>9}  {'median':>9}  {'x bare':>7}")
    for case in cases:
        if case.error is not None or not case.samples:
            print(f"  {case.name:<{width}}  failed: {case.error}")
            continue
        print(f"  {case.name:<{width}}  {case.best:9,.0f}  "
              f"{sorted(case.samples)[len(case.samples) // 2]:9,.0f}  {case.best / bare:7.1f}")
    pairs = [("enabled", "PostHog capture(), enabled (worker sending)",
              "kaibantrace emit(), enabled (worker sending)"),
             ("off", "PostHog capture(), disabled=True",
              "kaibantrace emit(), KAIBAN_TELEMETRY_OPT_OUT=1")]
    for label, theirs, ours in pairs:
        a, b = by_name.get(theirs), by_name.get(ours)
        if a is not None and b is not None and a.samples and b.samples:
            print(f"  PostHog/kaibantrace, {label}: {a.best / b.best:.1f}x "
                  f"({a.best:,.0f} / {b.best:,.0f} ns)")


# -- section: CPU per request -----------------------------------------------------------

TRANSPORT_SCRIPT = textwrap.dedent("""
    import http.client, json, sys, time
    from urllib.parse import urlsplit
    import kaibantrace
    from kaibantrace._delivery.transport import HttpTransport, Result
    from kaibantrace.testing import MemoryTransport

    app_id, url, per_round, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    memory = MemoryTransport()  # the encoder's own 100-signal body, as the sender posts it
    maker = kaibantrace.Telemetry(app_id=app_id, transport=memory, batch_size=100, max_per_minute=0)
    for n in range(100):
        maker.emit("workflow_started", {"agents": n % 7, "model": "gpt-4o-mini"})
    maker.flush(30)
    maker.shutdown()
    body = max(memory.bodies, key=len)
    outcomes = []

    def best_cpu_ms(send):
        for _ in range(20):  # warm: connection open, caches filled
            send()
        best = float("inf")
        for _ in range(rounds):
            start = time.thread_time()
            for _ in range(per_round):
                send()
            best = min(best, (time.thread_time() - start) / per_round * 1000)
        return best

    transport = HttpTransport()
    transport.prepare()

    def with_transport():
        outcomes.append(transport.send(url, body, 5).result is Result.SENT)

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    headers = {"Content-Type": "application/json; charset=utf-8", "User-Agent": "benchmark"}

    def with_http_client():
        connection.request("POST", parts.path, body, headers)
        answer = connection.getresponse()
        answer.read()
        outcomes.append(200 <= answer.status < 300)

    report = {"transport_ms": best_cpu_ms(with_transport),
              "http_client_ms": best_cpu_ms(with_http_client)}
    transport.close()
    connection.close()
    print(json.dumps({**report, "signals": body.count(b'"appID"'), "body_bytes": len(body),
                      "requests": len(outcomes), "sent": sum(outcomes)}))
""")


def bench_transport(plan: Plan) -> None:
    per_round, rounds = plan.transport_requests, plan.base.repeats
    print(f"\n== CPU per request: the sending thread's CPU time per request of 100 signals to a "
          f"Collector in another process, best of {rounds} rounds of {per_round} ==")
    with overhead.collector_process() as (url, stop_collector):
        run, _ = run_with_state_dir(TRANSPORT_SCRIPT, [APP_ID, url, str(per_round), str(rounds)],
                                    timeout=600)
        received = stop_collector()
    if not finished_cleanly(run):
        return
    report = run.report
    ours, bare = float(report["transport_ms"]), float(report["http_client_ms"])
    print(f"  kaibantrace's transport (requests): {ours:.3f} ms of CPU per request of "
          f"{report['signals']} signals ({report['body_bytes']:,} bytes)")
    print(f"  the same request on a bare http.client connection: {bare:.3f} ms; requests adds "
          f"{ours - bare:.3f} ms ({ours / bare:.1f}x)")
    print(f"  at one request a second, the transport takes {ours / 10:.3f} % of a core")
    overhead.results["transport"] = {"cpu_ms_per_request": ours, "http_client_cpu_ms": bare,
                                     "signals_per_request": report["signals"]}
    check(report["sent"] == report["requests"] and report["signals"] == 100,
          f"every request was a 2xx ({report['sent']:,} of {report['requests']:,}), "
          f"each of {report['signals']} signals")
    expected = int(report["requests"]) * int(report["signals"])
    check(received == expected, f"the collector accepted {received:,} of {expected:,} signals")


# -- main ---------------------------------------------------------------------------

SECTIONS = ("exit", "memory", "delivery", "calls", "transport")


def main(argv: Optional[List[str]] = None) -> int:
    parser = overhead.arguments(__doc__, "fewer rounds and events", list(SECTIONS))
    parser.add_argument("--strict", action="store_true",
                        help="exit with status 1 when a target is missed, too")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    sections = args.only or list(SECTIONS)
    overhead.isolate()
    for name in [n for n in os.environ if n.startswith("POSTHOG_")]:
        os.environ.pop(name, None)
        overhead.CHILD_ENV.pop(name, None)
    if any(n.lower().endswith("_proxy") and n.lower() != "no_proxy" for n in os.environ):
        for name in ("NO_PROXY", "no_proxy"):  # loopback must never go through a proxy
            os.environ[name] = overhead.CHILD_ENV[name] = "127.0.0.1,localhost"

    version = posthog_version()
    print(f"kaibantrace {kaibantrace.__version__}, "
          f"posthog {version or 'not installed (PostHog columns skipped)'}, "
          f"Python {platform.python_version()} ({platform.python_implementation()}), "
          f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs"
          f"{', quick' if args.quick else ''}")
    if "exit" in sections:
        bench_exit(plan, version is not None)
    if "memory" in sections:
        bench_memory(plan)
    if "delivery" in sections:
        bench_delivery(plan)
    if "calls" in sections:
        bench_calls(plan, version is not None)
    if "transport" in sections:
        bench_transport(plan)

    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({k: v for k, v in overhead.results.items() if v}, handle, indent=2)
    return overhead.summarize(args.strict)


if __name__ == "__main__":
    sys.exit(main())
