"""What sending costs the host's own threads: the GIL, and many threads emitting at once.

Run from the repository root::

    python benchmarks/bench_host.py            # both sections, about a minute
    python benchmarks/bench_host.py --quick    # fewer rounds

Two sections:

* **host**: a CPU-bound loop (pure Python arithmetic, as a host's own busy
  thread) runs in rounds of one second. In a *loaded* round the same loop also
  emits 10,000 events per second through an enabled client, whose worker sends
  them to a loopback server in another process; the round then goes on, with
  the loop alone, until every event has been delivered, so the catch-up is
  counted too. Each loaded round is paired with a plain round of the same
  length right before it (the machine's speed drifts; pairs share the drift).
  The slowdown is one minus the median of (work done loaded) / (work done
  plain). The server is a minimal one (it counts signals without parsing
  them), so that it takes as little CPU as a remote service would.
* **scaling**: 1, 10 and 100 threads each emit through one client at once;
  nanoseconds per call on the calling threads (total thread time / calls), and
  the process's extra peak RSS.

Everything talks to 127.0.0.1 only. ``--json FILE`` writes the figures for
``run_all.py``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import textwrap
import time
from typing import Any, Dict, List, Optional

from bench_overhead import (
    APP_ID,
    arguments,
    check,
    collector_process,
    finish,
    isolate,
)

import kaibantrace

RATE = 10_000  # events per second in a loaded round
CHUNK = 2_000  # loop iterations between two looks at the clock

# A loopback HTTP server that answers every POST at once and counts the signals in
# it without decoding them: the least CPU a server here can take.
SINK_SCRIPT = textwrap.dedent("""
    import selectors, socket, sys, threading

    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    print(f"http://127.0.0.1:{listener.getsockname()[1]}/v2/", flush=True)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    pending = {}
    total = 0
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    OK = b"HTTP/1.1 200 OK\\r\\nContent-Length: 0\\r\\n\\r\\n"
    while not done.is_set():
        for key, _ in selector.select(0.2):
            if key.fileobj is listener:
                conn, _ = listener.accept()
                conn.setblocking(False)
                selector.register(conn, selectors.EVENT_READ)
                pending[conn] = b""
                continue
            conn = key.fileobj
            try:
                chunk = conn.recv(262144)
            except OSError:
                chunk = b""
            if not chunk:
                selector.unregister(conn)
                conn.close()
                pending.pop(conn, None)
                continue
            data = pending[conn] + chunk
            while True:
                end = data.find(b"\\r\\n\\r\\n")
                if end < 0:
                    break
                head = data[:end].lower()
                at = head.find(b"content-length:") + len(b"content-length:")
                stop = head.find(b"\\r\\n", at)
                length = int(head[at:stop if stop >= 0 else len(head)])
                if len(data) < end + 4 + length:
                    break
                total += data[end + 4:end + 4 + length].count(b'"appID"')
                data = data[end + 4 + length:]
                conn.sendall(OK)
            pending[conn] = data
    print(total, flush=True)
""")

results: Dict[str, Any] = {}


def work(iterations: int) -> int:
    total = 0
    for i in range(iterations):
        total += i * i % 7
    return total


def plain_round(seconds: float) -> float:
    """Loop iterations per second over ``seconds`` with no telemetry."""
    start = time.perf_counter()
    chunks = 0
    while time.perf_counter() - start < seconds:
        work(CHUNK)
        chunks += 1
    return chunks * CHUNK / (time.perf_counter() - start)


def loaded_round(client: kaibantrace.Telemetry, seconds: float, cap: float
                 ) -> Dict[str, float]:
    """Emit ``RATE`` events/s for ``seconds`` while looping, then loop on until all
    are delivered (at most ``cap`` seconds in all)."""
    before = client.stats()["sent"]
    start = time.perf_counter()
    chunks = emitted = 0
    emit = client.emit
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
        work(CHUNK)
        chunks += 1
        due = int(min(elapsed, seconds) * RATE)
        while emitted < due:
            emit("tick")
            emitted += 1
    sent_in_emitting = int(client.stats()["sent"]) - int(before)  # type: ignore[call-overload]
    emitting_took = time.perf_counter() - start
    while time.perf_counter() - start < cap:
        if int(client.stats()["sent"]) - int(before) >= emitted:  # type: ignore[call-overload]
            break
        work(CHUNK)
        chunks += 1
    took = time.perf_counter() - start
    delivered = int(client.stats()["sent"]) - int(before)  # type: ignore[call-overload]
    return {"rate": chunks * CHUNK / took, "seconds": took, "emitted": emitted,
            "delivered": delivered, "delivered_while_emitting": sent_in_emitting,
            "emitting_seconds": emitting_took}


def bench_host(pairs: int) -> None:
    print(f"\n== host slowdown: a CPU-bound loop emitting {RATE:,} events/s for 1 s, then "
          f"until all are delivered; {pairs} pairs of rounds ==")
    with collector_process(SINK_SCRIPT) as (url, stop):
        client = kaibantrace.Telemetry(app_id=APP_ID, endpoint=url, max_per_minute=0)
        client.emit("warm-up")  # the worker starts, imports and connects before measuring
        client.flush(30)
        ratios: List[float] = []
        loaded: List[Dict[str, float]] = []
        plain_round(0.5)
        for _ in range(pairs):
            round_ = loaded_round(client, 1.0, 10.0)
            base = plain_round(round_["seconds"])
            # Alternate the order, so that neither side always runs first.
            ratios.append(round_["rate"] / base)
            loaded.append(round_)
            base2 = plain_round(1.0)
            round2 = loaded_round(client, 1.0, 10.0)
            ratios.append(round2["rate"] / base2)
            loaded.append(round2)
        flushed = client.flush(30)
        stats = client.stats()
        client.shutdown()
        received = stop()
    slowdown = 1 - statistics.median(ratios)
    quartiles = statistics.quantiles(ratios, n=4)
    emitted = sum(r["emitted"] for r in loaded)
    seconds = statistics.median(r["seconds"] for r in loaded)
    while_emitting = sum(r["delivered_while_emitting"] for r in loaded) / sum(
        r["emitting_seconds"] for r in loaded)
    print("  host work loaded / plain, per round: "
          + ", ".join(f"{r:.3f}" for r in ratios))
    print(f"  slowdown (median): {100 * slowdown:.1f}%; middle half of the rounds: "
          f"{100 * (1 - quartiles[2]):.1f}% to {100 * (1 - quartiles[0]):.1f}% (the machine's own "
          "noise: plain rounds differ as much)")
    print(f"  each loaded round: 1 s of emitting, all delivered after {seconds:.2f} s (median); "
          f"delivered while emitting: {while_emitting:,.0f} events/s")
    check(flushed and received >= emitted and not stats["dropped"],
          f"every event was delivered ({received:,} received of {emitted:,} emitted in the "
          f"loaded rounds, dropped: {stats['dropped']})")
    results["host_slowdown"] = slowdown
    results["host_slowdown_range"] = [1 - quartiles[2], 1 - quartiles[0]]
    results["host_catch_up_seconds"] = seconds
    results["host_delivered_while_emitting"] = while_emitting


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


SCALING_CHILD = textwrap.dedent("""
    import json, os, resource, sys, threading, time
    import kaibantrace

    def rss_mb():  # resident now (Linux), else the peak so far
        try:
            with open("/proc/self/statm") as statm:
                return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    threads, per_thread, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    client = kaibantrace.Telemetry(app_id=sys.argv[5], endpoint=sys.argv[4], max_per_minute=0)
    client.emit("warm-up")
    client.flush(30)
    before = rss_mb()
    most = 0.0
    best = best_wall = None
    delivered = True
    for _ in range(rounds):  # each round fits in the queue; then it is delivered, untimed
        start = threading.Barrier(threads + 1)
        spent = []

        def emitter():
            start.wait()
            began = time.thread_time()
            for _ in range(per_thread):
                client.emit("tick")
            spent.append(time.thread_time() - began)

        workers = [threading.Thread(target=emitter) for _ in range(threads)]
        for w in workers:
            w.start()
        start.wait()
        wall = time.perf_counter()
        for w in workers:
            w.join()
        wall = time.perf_counter() - wall
        most = max(most, rss_mb() - before)  # the threads and the queue, before delivery
        delivered = client.flush(60) and delivered
        calls = threads * per_thread
        best = min(best or 1e18, 1e9 * sum(spent) / calls)
        best_wall = min(best_wall or 1e18, 1e9 * wall / calls)
    stats = client.stats()
    client.shutdown()
    print(json.dumps({"ns_per_call": best, "wall_ns_per_call": best_wall,
                      "extra_rss_mb": most, "delivered": delivered,
                      "stats": stats}))
""")


def bench_scaling(rounds: int) -> None:
    import subprocess

    from bench_overhead import CHILD_ENV

    total_events = 9_000  # a round fits in the default queue (10,000): nothing overflows
    print(f"\n== scaling: threads emitting {total_events:,} events in all through one client, "
          f"best of {rounds} rounds ==")
    print(f"  {'threads':>7}  {'ns/call (thread CPU)':>20}  {'ns/call (wall)':>14}  "
          f"{'extra RSS':>14}")
    rows: Dict[str, Dict[str, float]] = {}
    with collector_process(SINK_SCRIPT) as (url, stop):
        for threads in (1, 10, 100):
            done = subprocess.run(
                [sys.executable, "-c", SCALING_CHILD, str(threads), str(total_events // threads),
                 str(rounds), url, APP_ID], env=CHILD_ENV, capture_output=True, text=True,
                timeout=300)
            try:
                report = json.loads(done.stdout.strip().splitlines()[-1])
            except (IndexError, ValueError):
                check(False, f"{threads} threads: the child failed: {done.stderr.strip()[-300:]}")
                continue
            print(f"  {threads:>7}  {report['ns_per_call']:>20,.0f}  "
                  f"{report['wall_ns_per_call']:>14,.0f}  {report['extra_rss_mb']:>11.1f} MB")
            stats = report["stats"]
            check(report["delivered"] and not stats["dropped"],
                  f"{threads} threads: all {stats['queued']:,} events delivered, none dropped "
                  f"({stats['dropped']})")
            rows[str(threads)] = {"ns_per_call": report["ns_per_call"],
                                  "extra_rss_mb": report["extra_rss_mb"]}
        stop()
    results["scaling"] = rows


def main(argv: Optional[List[str]] = None) -> int:
    args = arguments(__doc__, "fewer rounds", ["host", "scaling"]).parse_args(argv)
    isolate()
    print(f"kaibantrace {kaibantrace.__version__}, Python {platform.python_version()}, "
          f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs")
    sections = args.only or ["host", "scaling"]
    if "host" in sections:
        bench_host(4 if args.quick else 10)
    if "scaling" in sections:
        bench_scaling(3 if args.quick else 7)
    return finish(results, args.json)


if __name__ == "__main__":
    sys.exit(main())
