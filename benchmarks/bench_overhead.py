"""What kaibantrace costs the program that uses it.

Run from the repository root::

    python benchmarks/bench_overhead.py            # everything, about a minute
    python benchmarks/bench_overhead.py --quick    # fewer rounds, same sections

Two sections (exit delay, memory and delivery rate are in ``bench_delivery.py``,
next to PostHog):

* **calls**: nanoseconds per call, on the calling thread, of a decorated no-op
  function: bare, a pass-through ``wrapt`` decorator (the floor for any wrapt
  decorator), kaibantrace opted out, enabled (with the worker really sending to
  a loopback ``Collector``), enabled with a static payload, opted out by
  ``DO_NOT_TRACK``, and OpenTelemetry/PostHog when installed. The cases take
  turns round by round, so drift in the machine's speed hits all of them alike;
  each row is its best round. Enabled rounds are at most 5,000 calls long and
  followed by an untimed ``flush()``, so every timed call queues an event
  instead of hitting the 10,000-event queue limit.
* **imports**: what ``import kaibantrace`` drags in, and how long it takes next
  to ``import wrapt``, the dependency the calling thread imports (``requests`` is imported
  by the sending thread only) (``python -X importtime``).

Everything talks to 127.0.0.1 only. The collector runs in a child process so
that its request parsing does not compete with the measured loop for the GIL,
as a remote ingest service would not. The exit status is 1 when a check fails
(``requests`` imported at ``import kaibantrace``, an event dropped in a measured round).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import importlib.metadata
import itertools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import wrapt

import kaibantrace

APP_ID = "6C1A37E0-2F4B-4E8D-9B7A-3D5E1F2A4C60"
OUR_VARIABLES = ("KAIBAN_TELEMETRY_OPT_OUT", "DO_NOT_TRACK", "KAIBAN_TELEMETRY_DEBUG",
                 "KAIBAN_TELEMETRY_ENDPOINT", "KAIBAN_TELEMETRY_APP_ID", "KAIBAN_TELEMETRY_DIR")
OPTED_OUT = {"KAIBAN_TELEMETRY_OPT_OUT": "1"}

# Same environment as this process, less anything that would change what is measured.
CHILD_ENV = {k: v for k, v in os.environ.items()
             if k not in OUR_VARIABLES and not k.startswith("PYTHONPROFILE")}


def arguments(doc: Optional[str], quick_help: str, sections: List[str]) -> argparse.ArgumentParser:
    """The options every benchmark script takes: ``--quick``, ``--json FILE``, ``--only``."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", metavar="FILE", help="write the figures to FILE")
    parser.add_argument("--only", choices=sections, action="append",
                        help="run only this section (may be repeated)")
    return parser


def isolate() -> None:
    """Measure kaibantrace as configured here: the caller's own opt-out or endpoint must
    not decide what is measured, and nothing touches the user's state directory."""
    for name in OUR_VARIABLES:
        os.environ.pop(name, None)
    use_private_state_dir()


def use_private_state_dir() -> str:
    """Point this process and its children at a fresh state directory, never the user's own."""
    directory = tempfile.mkdtemp(prefix="kaibantrace-bench-")
    os.environ["KAIBAN_TELEMETRY_DIR"] = directory
    CHILD_ENV["KAIBAN_TELEMETRY_DIR"] = directory
    return directory


@dataclasses.dataclass
class Config:
    repeats: int
    calls: int
    warmup: int
    import_runs: int
    exit_runs: int
    exit_events: int


FULL = Config(repeats=7, calls=5_000, warmup=200, import_runs=7, exit_runs=7, exit_events=100)
QUICK = Config(repeats=3, calls=2_000, warmup=100, import_runs=3, exit_runs=3, exit_events=100)

failures: List[str] = []
results: Dict[str, Any] = {"calls": {}, "imports": {}}  # the figures --json writes


def check(ok: bool, message: str) -> None:
    """Print a check's outcome; a failed check makes the script exit with status 1."""
    print(f"  [{'ok' if ok else 'FAIL'}] {message}")
    if not ok:
        failures.append(message)


missed: List[str] = []  # performance targets missed (only ``--strict`` fails on them)


def target(ok: bool, message: str) -> None:
    """Print whether a performance target was met; only ``--strict`` fails the run on a miss."""
    print(f"  [{'ok' if ok else 'MISSED'}] {message}")
    if not ok:
        missed.append(message)


def summarize(strict: bool) -> int:
    """List the missed targets and failed checks; the exit status (1 when a check failed, or
    a target was missed under ``--strict``)."""
    print()
    if missed:
        print(f"{len(missed)} target(s) missed:")
        for message in missed:
            print(f"  - {message}")
    if failures:
        print(f"{len(failures)} check(s) failed:")
        for message in failures:
            print(f"  - {message}")
    if not missed and not failures:
        print("every target met, every check passed")
    return 1 if failures or (strict and missed) else 0


@contextlib.contextmanager
def environment(values: Mapping[str, Optional[str]]) -> Iterator[None]:
    """Set (a string) or remove (``None``) environment variables for the block."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        _apply(values)
        yield
    finally:
        _apply(saved)


def _apply(values: Mapping[str, Optional[str]]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


# -- a collector in a child process -------------------------------------------

COLLECTOR_SCRIPT = textwrap.dedent("""
    import sys, threading
    from kaibantrace.testing import Collector

    def accepted(requests):
        return sum(len(r.signals) for r in requests if 200 <= r.status < 300)

    with Collector() as collector:
        print(collector.url, flush=True)
        done = threading.Event()
        threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
        total, previous = 0, []
        while not done.wait(0.25):
            # Swap out what arrived so memory stays flat; count a list one turn
            # later, when no request can still be appending to it.
            total += accepted(previous)
            previous, collector.requests = collector.requests, []
        total += accepted(previous) + accepted(collector.requests)
    print(total, flush=True)
""")


@contextlib.contextmanager
def collector_process(script: str = COLLECTOR_SCRIPT) -> Iterator[Tuple[str, Callable[[], int]]]:
    """A ``kaibantrace.testing.Collector`` in a child process: its URL, and a function
    that stops it and returns how many signals it accepted.

    ``script`` may be another loopback server with the same protocol: it prints its
    URL, serves until its stdin closes, then prints how many events it accepted."""
    child = subprocess.Popen([sys.executable, "-c", script], env=CHILD_ENV, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None
    url = child.stdout.readline().strip()
    if not url.startswith("http://127.0.0.1:"):
        child.kill()
        raise RuntimeError(f"the collector did not start (it said {url!r})")

    def stop() -> int:
        out, _ = child.communicate(timeout=30)
        return int(out.strip() or -1)

    try:
        yield url, stop
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


# -- timing ---------------------------------------------------------------------

def time_round(func: Callable[[], object], calls: int) -> int:
    """Nanoseconds that ``calls`` calls of ``func`` take, loop included."""
    loop = itertools.repeat(None, calls)
    start = time.perf_counter_ns()
    for _ in loop:
        func()
    return time.perf_counter_ns() - start


def empty_loop_ns(calls: int, repeats: int) -> float:
    """The loop's own cost per iteration, which every row includes."""
    best = None
    for _ in range(repeats):
        loop = itertools.repeat(None, calls)
        start = time.perf_counter_ns()
        for _ in loop:
            pass
        elapsed = time.perf_counter_ns() - start
        best = elapsed if best is None else min(best, elapsed)
    assert best is not None
    return best / calls


@dataclasses.dataclass
class Case:
    """One row of the table: a no-arguments function and the environment it runs in."""

    name: str
    func: Callable[[], object]
    env: Mapping[str, Optional[str]] = dataclasses.field(default_factory=dict)
    after_round: Optional[Callable[[], None]] = None  # untimed, e.g. flush()
    cleanup: Optional[Callable[[], None]] = None  # once, after all rounds
    calls: Optional[int] = None  # calls per round, if not the configured number
    queues: bool = False  # every call queues a kaibantrace event
    samples: List[float] = dataclasses.field(default_factory=list)
    error: Optional[str] = None
    key: Optional[str] = None  # its name in --json output


    @property
    def best(self) -> float:
        return min(self.samples)


def run_cases(cases: List[Case], config: Config) -> None:
    """Best-of-``repeats`` rounds per case, the cases taking turns round by round."""
    baseline_env = {name: None for name in OUR_VARIABLES if name != "KAIBAN_TELEMETRY_DIR"}
    for _ in range(config.repeats):
        for case in cases:
            if case.error is not None:
                continue
            try:
                with environment({**baseline_env, **case.env}):
                    time_round(case.func, config.warmup)  # the client re-decides here
                    if case.after_round is not None:
                        case.after_round()  # start the timed round with an empty queue
                    gc.collect()
                    calls = case.calls or config.calls
                    elapsed = time_round(case.func, calls)
                    if case.after_round is not None:
                        case.after_round()
            except Exception as exc:  # an optional third-party case must not end the run
                case.error = f"{type(exc).__name__}: {exc}"
                continue
            case.samples.append(elapsed / calls)


# -- the functions measured -------------------------------------------------------

def noop() -> None:
    return None


def functools_passthru(func: Callable[..., Any]) -> Callable[..., Any]:
    """The usual hand-written decorator, for scale: a closure and ``functools.wraps``."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return wrapper


def two_clock_reads() -> None:
    """What ``duration=True`` adds by design: a clock reading at each end of the call."""
    time.perf_counter()
    time.perf_counter()


@wrapt.decorator
def passthru(wrapped: Callable[..., Any], instance: Any, args: Tuple[Any, ...],
             kwargs: Dict[str, Any]) -> Any:
    return wrapped(*args, **kwargs)


def opentelemetry_case(name: str, url: str) -> Case:
    """OpenTelemetry's API with no SDK configured: the no-op tracer, as a decorator."""
    from opentelemetry import trace  # type: ignore[import-not-found,unused-ignore]

    tracer = trace.get_tracer("kaibantrace-benchmark")
    return Case(name, tracer.start_as_current_span("x")(noop), key="otel_noop")


def opentelemetry_sdk_case(name: str, url: str) -> Case:
    """OpenTelemetry's SDK: a real tracer, a ``BatchSpanProcessor`` and the in-memory
    exporter (its cheapest exporter: no network at all), flushed after each round."""
    from opentelemetry.sdk.trace import TracerProvider  # type: ignore[import-not-found,unused-ignore]
    from opentelemetry.sdk.trace.export import (  # type: ignore[import-not-found,unused-ignore]
        BatchSpanProcessor,
    )
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # type: ignore[import-not-found,unused-ignore]
        InMemorySpanExporter,
    )

    exporter = InMemorySpanExporter()
    processor = BatchSpanProcessor(exporter)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("kaibantrace-benchmark")

    def after_round() -> None:
        processor.force_flush()
        exporter.clear()

    return Case(name, tracer.start_as_current_span("x")(noop), after_round=after_round,
                cleanup=provider.shutdown, key="otel_sdk")


# A loopback server that answers PostHog's client as its ingest does: 200 to every batch.
POSTHOG_SERVER_SCRIPT = textwrap.dedent("""
    import gzip, json, sys, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    events = [0]
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # as kaibantrace.testing.Collector does

        def log_message(self, *args):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                batch = json.loads(body).get("batch")
            except Exception:
                batch = None
            with lock:
                events[0] += len(batch) if isinstance(batch, list) else 0
            self.answer()

        def do_GET(self):
            self.answer()

        def answer(self):
            answer = b'{"status": 1}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"http://127.0.0.1:{server.server_address[1]}", flush=True)
    sys.stdin.read()
    server.shutdown()
    print(events[0], flush=True)
""")


def posthog_case(name: str, url: str, *, disabled: bool = False) -> Case:
    """PostHog's ``capture`` in a wrapt decorator, its worker posting to a loopback server
    of its own that answers 200 (or ``disabled=True``, its own off switch)."""
    from posthog import Posthog  # type: ignore[import-not-found,unused-ignore]

    servers = contextlib.ExitStack()
    host, _ = servers.enter_context(collector_process(POSTHOG_SERVER_SCRIPT))
    client = Posthog("phc_kaibantrace_benchmark", host=host, disabled=disabled)

    def cleanup() -> None:
        client.shutdown()
        servers.close()

    @wrapt.decorator
    def tracked(wrapped: Callable[..., Any], instance: Any, args: Tuple[Any, ...],
                kwargs: Dict[str, Any]) -> Any:
        client.capture(event="workflow_started", distinct_id="benchmark")
        return wrapped(*args, **kwargs)

    return Case(name, tracked(noop), after_round=client.flush, cleanup=cleanup,
                key="posthog_disabled" if disabled else "posthog")


OPTIONAL_CASES: List[Tuple[str, str, Callable[[str, str], Case]]] = [
    ("OpenTelemetry no-op start_as_current_span", "opentelemetry-api", opentelemetry_case),
    ("OpenTelemetry SDK span (BatchSpanProcessor)", "opentelemetry-sdk", opentelemetry_sdk_case),
    ("PostHog capture (worker sending)", "posthog", posthog_case),
    ("PostHog capture, disabled=True", "posthog",
     functools.partial(posthog_case, disabled=True)),
]


def optional_cases(url: str) -> Tuple[List[Case], List[str]]:
    """The third-party cases whose package is installed, and a note for each one that is not."""
    cases: List[Case] = []
    notes: List[str] = []
    for name, package, build in OPTIONAL_CASES:
        try:
            cases.append(build(name, url))
        except ImportError:
            notes.append(f"{name} ({package}): not installed")
        except Exception as exc:
            cases.append(Case(name, noop, error=f"setup failed: {type(exc).__name__}: {exc}"))
    return cases, notes


# -- section: calls ---------------------------------------------------------------

def reference_cases() -> List[Case]:
    return [
        Case("bare call", noop, key="bare"),
        Case("wrapt pass-through", passthru(noop), key="wrapt"),
        Case("functools.wraps pass-through (for scale)", functools_passthru(noop)),
    ]


def kaibantrace_cases(client: kaibantrace.Telemetry, flush: Callable[[], None]) -> List[Case]:
    """One client in each state; the enabled rounds end with an untimed ``flush()``.

    ``client`` queues every call (no signal budget), so the enabled rows are the cost of an
    event that is sent; the "over its budget" row is a hot loop with the default budget,
    where all but the first calls of a minute are only counted."""
    tracked = client.track("workflow_started")(noop)
    timed = client.track("workflow_finished", duration=True)(noop)

    def timed_block() -> None:
        with client.timed("block_finished"):
            noop()

    batch = client.settings.batch_size
    from kaibantrace.testing import MemoryTransport

    # Its own app and a transport in memory: what it lets through is not the enabled
    # client's, whose deliveries the checks below count.
    budgeted = kaibantrace.Telemetry(app_id="0F5A5C1E-0000-4000-8000-00000000B0D6",
                                     transport=MemoryTransport())
    return [
        Case("kaibantrace, KAIBAN_TELEMETRY_OPT_OUT=1", tracked, env=OPTED_OUT, key="opted_out"),
        Case("kaibantrace, enabled (queues, worker sends)", tracked, after_round=flush,
             queues=True, key="enabled"),
        Case("kaibantrace, enabled, static payload",
             client.track("workflow_started", payload={"agents": 3})(noop), after_round=flush,
             queues=True),
        # Fewer calls than a batch: the worker stays asleep, so this is the enqueue alone.
        Case(f"kaibantrace, enabled, rounds of {batch - 1} (worker idle)", tracked,
             after_round=flush, calls=batch - 1, queues=True),
        Case("kaibantrace, DO_NOT_TRACK=1", tracked, env={"DO_NOT_TRACK": "1"}),
        # duration=True: the event when the call ends, with its duration and outcome
        Case("kaibantrace, enabled, duration=True", timed, after_round=flush, queues=True,
             key="duration"),
        Case("kaibantrace, enabled, `with client.timed(...)` around the call", timed_block,
             after_round=flush, queues=True, key="timed_block"),
        Case("kaibantrace, opted out, duration=True", timed, env=OPTED_OUT,
             key="opted_out_duration"),
        Case("two `time.perf_counter()` reads (for scale)", two_clock_reads, key="two_clocks"),
        Case("kaibantrace, enabled, a hot loop over its signal budget",
             budgeted.track("workflow_started")(noop), cleanup=budgeted.shutdown,
             key="over_budget"),
    ]


def bench_calls(config: Config) -> None:
    print(f"\n== per-call cost on the calling thread: best of {config.repeats} rounds of "
          f"{config.calls:,} calls ==")
    with collector_process() as (url, stop_collector):
        client = kaibantrace.Telemetry(app_id=APP_ID, endpoint=url, max_per_minute=0)
        flushed: List[bool] = []
        cases = reference_cases() + kaibantrace_cases(
            client, lambda: flushed.append(client.flush(timeout=60)))
        extra, not_installed = optional_cases(url)
        cases += extra

        loop_ns = empty_loop_ns(config.calls, config.repeats)
        run_cases(cases, config)
        stats = client.stats()
        client.shutdown()
        for case in cases:
            if case.cleanup is not None:
                try:
                    case.cleanup()
                except Exception as exc:
                    print(f"  {case.name}: cleanup failed: {type(exc).__name__}: {exc}")
        received = stop_collector()

    print_table(cases)
    for case in cases:
        if case.key and case.samples and case.error is None:
            results["calls"][case.key] = case.best
    print(f"  every row includes the loop itself: {loop_ns:.1f} ns per iteration")
    calls = results["calls"]
    if all(k in calls for k in ("duration", "enabled", "two_clocks", "bare")):
        # the reads alone: their row less a bare call, which it also includes
        budget = calls["enabled"] + calls["two_clocks"] - calls["bare"]
        target(calls["duration"] <= budget,
               f"duration=True costs at most the enabled path plus two clock reads "
               f"({calls['duration']:.0f} ns vs {budget:.0f} ns, "
               f"{calls['duration'] / budget:.2f}x)")
    for note in not_installed:
        print(f"  {note}")
    expected = sum(len(c.samples) * (config.warmup + (c.calls or config.calls))
                   for c in cases if c.queues)
    check_delivery(stats, expected, all(flushed), received)


def check_delivery(stats: Dict[str, Any], expected: int, flushed: bool, received: int) -> None:
    """Every call of the enabled rows queued an event, and every event arrived."""
    print(f"  enabled client stats after the rounds: {json.dumps(stats)}")
    dropped = stats["dropped"]
    check("queue_full" not in dropped,
          f"no 'queue_full' drop in the measured rounds (dropped: {dropped})")
    check(stats["queued"] == expected,
          f"every enabled call queued an event ({stats['queued']:,} of {expected:,})")
    check(flushed and stats["sent"] == stats["queued"],
          f"every queued event was delivered ({stats['sent']:,} sent in "
          f"{stats['requests']:,} requests)")
    check(received == stats["sent"], f"the collector accepted {received:,} signals")


def print_table(cases: List[Case]) -> None:
    bare = next(c for c in cases if c.name == "bare call").best
    floor = next(c for c in cases if c.name == "wrapt pass-through").best
    width = max(len(c.name) for c in cases)
    print(f"  {'case':<{width}}  {'ns/call':>8}  {'x bare':>7}  {'x wrapt':>7}  {'median':>8}")
    for case in cases:
        if case.error is not None or not case.samples:
            print(f"  {case.name:<{width}}  failed: {case.error}")
            continue
        best = case.best
        print(f"  {case.name:<{width}}  {best:8.1f}  {best / bare:7.2f}  {best / floor:7.2f}  "
              f"{statistics.median(case.samples):8.1f}")


# -- section: imports -----------------------------------------------------------

# A program that uses kaibantrace: import, decorate, call, deliver to a closed port.
USED_SCRIPT = textwrap.dedent("""
    import json, sys
    import kaibantrace
    after_import = {m: m in sys.modules for m in sys.argv[2:]}
    client = kaibantrace.Telemetry(app_id=sys.argv[1], endpoint="http://127.0.0.1:9/v2/")

    @client.track("workflow_started")
    def work():
        return None

    work()
    client.flush(2)
    print(json.dumps({"after_import": after_import,
                      "after_use": {m: m in sys.modules for m in sys.argv[2:]}}))
""")


def modules_loaded(names: List[str]) -> Dict[str, Dict[str, bool]]:
    """Which of ``names`` a fresh interpreter has loaded after ``import kaibantrace``, and
    after using it (decorate, call, send)."""
    out = subprocess.run([sys.executable, "-c", USED_SCRIPT, APP_ID, *names], env=CHILD_ENV,
                         check=True, capture_output=True, text=True).stdout
    result: Dict[str, Dict[str, bool]] = json.loads(out)
    return result


def import_time_us(code: str, packages: List[str], runs: int) -> int:
    """Best cumulative microseconds of the top-level entries of ``packages`` (and their
    submodules) in ``python -X importtime -c code``."""
    best: Optional[int] = None
    for _ in range(runs):
        err = subprocess.run([sys.executable, "-X", "importtime", "-c", code], env=CHILD_ENV,
                             check=True, capture_output=True, text=True).stderr
        total = 0
        for line in err.splitlines():
            if not line.startswith("import time:"):
                continue
            parts = line.split("|")
            if len(parts) != 3 or not parts[1].strip().isdigit():
                continue  # the header line
            name = parts[2].rstrip()
            top_level = name.startswith(" ") and not name.startswith("  ")
            module = name.strip()
            if top_level and any(module == p or module.startswith(p + ".") for p in packages):
                total += int(parts[1])
        best = total if best is None else min(best, total)
    assert best is not None
    return best


def compile_package() -> None:
    """Write kaibantrace's bytecode, as an installed package has it: without it (say with
    PYTHONDONTWRITEBYTECODE set) every import would compile the source again."""
    import compileall

    compileall.compile_dir(os.path.dirname(kaibantrace.__file__), quiet=1)


def bench_imports(config: Config) -> None:
    print("\n== import ==")
    compile_package()
    watched = ["requests", "asyncio", "wrapt", "sqlite3", "logging", "http.client"]
    loaded = modules_loaded(watched)
    for moment, seen in loaded.items():
        print(f"  modules loaded {moment.replace('_', ' ')}: "
              + ", ".join(f"{name}={'yes' if seen[name] else 'no'}" for name in watched))
    check(not loaded["after_import"]["requests"],
          "kaibantrace never imports requests at import (only its sending thread does)")
    check(not loaded["after_use"]["asyncio"], "kaibantrace never imports asyncio")
    print(f"  import time (python -X importtime, cumulative, best of {config.import_runs}):")
    rows = [
        ("kaibantrace", "import kaibantrace", ["kaibantrace"]),
        ("kaibantrace_decorated", "import kaibantrace; kaibantrace.Telemetry().track('x')",
         ["kaibantrace", "wrapt"]),
        ("wrapt", "import wrapt", ["wrapt"]),
        ("posthog", "import posthog", ["posthog"]),
        ("opentelemetry", "import opentelemetry.trace", ["opentelemetry"]),
    ]
    labels = {
        "kaibantrace": "import kaibantrace",
        "kaibantrace_decorated": "import kaibantrace + first track() (loads wrapt)",
        "wrapt": "import wrapt",
        "posthog": "import posthog",
        "opentelemetry": "import opentelemetry.trace",
    }
    for key, code, packages in rows:
        try:
            micros = import_time_us(code, packages, config.import_runs)
        except subprocess.CalledProcessError:
            print(f"    {labels[key]:<50} not installed")
            continue
        results["imports"][key] = micros / 1000
        print(f"    {labels[key]:<50} {micros / 1000:7.1f} ms")


# -- section: exit delay ----------------------------------------------------------

EXIT_SCRIPT = textwrap.dedent("""
    import atexit, json, sys, time

    marks = {}

    def report():  # registered before kaibantrace's own hook, so it runs after it
        marks["hooks_done"] = time.perf_counter()
        print(json.dumps({"stats": client.stats(),
                          "after_last_event_ms": 1000 * (marks["hooks_done"] - marks["last"])}))

    atexit.register(report)
    import kaibantrace

    client = kaibantrace.Telemetry(app_id=sys.argv[1], endpoint=sys.argv[2], max_per_minute=0)

    @client.track("workflow_started")
    def work():
        return None

    if sys.argv[4:] == ["warm"]:  # a program that has run a while: its sender is ready
        work()
        client.flush(10)
    for _ in range(int(sys.argv[3])):
        work()
    marks["last"] = time.perf_counter()
""")


@dataclasses.dataclass
class ExitRun:
    wall: float
    returncode: Optional[int]
    report: Dict[str, Any]
    stderr: str


def run_exit_script(url: str, events: int, env: Mapping[str, str], *, warm: bool = False
                    ) -> ExitRun:
    return run_child(EXIT_SCRIPT, [APP_ID, url, str(events), *(["warm"] if warm else [])], env)


def run_child(script: str, args: List[str], env: Mapping[str, str],
              timeout: float = 60) -> ExitRun:
    """Run ``python -c script *args``: its wall time, and the JSON object on its last line."""
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-c", script, *args],
                              env={**CHILD_ENV, **env}, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return ExitRun(time.perf_counter() - start, None, {}, f"hung: killed after {timeout:g} s")
    wall = time.perf_counter() - start
    report: Dict[str, Any] = {}
    with contextlib.suppress(IndexError, ValueError):
        report = json.loads(done.stdout.strip().splitlines()[-1])
    return ExitRun(wall, done.returncode, report, done.stderr.strip())


@contextlib.contextmanager
def black_hole() -> Iterator[str]:
    """A listening socket that is never accepted from: connections complete in the
    kernel's backlog and the request is never answered."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v2/"


def refused_url() -> str:
    """A loopback port on which nothing listens."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v2/"


# -- main -------------------------------------------------------------------------

def main(argv: Optional[List[str]] = None) -> int:
    args = arguments(__doc__, "fewer rounds and runs", ["calls", "imports"]).parse_args(argv)
    config = QUICK if args.quick else FULL
    isolate()
    print(f"kaibantrace {kaibantrace.__version__}, wrapt {importlib.metadata.version('wrapt')}, "
          f"Python {platform.python_version()} ({platform.python_implementation()}), "
          f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs"
          f"{', quick' if args.quick else ''}")
    sections = args.only or ["calls", "imports"]
    if "calls" in sections:
        bench_calls(config)
    if "imports" in sections:
        bench_imports(config)
    return finish(results, args.json)


def finish(figures: Dict[str, Any], json_path: Optional[str]) -> int:
    """Write the figures for ``run_all.py`` if asked; the exit status (1 if a check failed)."""
    if json_path:
        with open(json_path, "w", encoding="utf-8") as handle:
            json.dump(figures, handle, indent=2)
    if failures:
        print(f"\n{len(failures)} check(s) failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
