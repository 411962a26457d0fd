"""What a tracked call costs in a browser page (Pyodide, run by Node.js), beside CPython.

Run from the repository root, with Node.js and npm on the machine::

    python benchmarks/bench_pyodide.py

It uses the test suite's pinned Pyodide (``tests/test_pyodide.py`` installs it from npm
into a cache the first time) and runs the same loop in the page and in this CPython:
a plain call, a tracked call with telemetry on (the page's ``fetch`` answers 200 at
once; CPython's sender posts to a ``MemoryTransport``), a tracked call opted out in
code and one opted out by the page's variable. Figures are nanoseconds per call, the
median of 5 rounds; WebAssembly runs Python several times slower than a native build,
so the ratio to a plain call in the same runtime is the figure to compare.
"""

from __future__ import annotations

import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Dict

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

APP_ID = "6C1A37E0-2F4B-4E8D-9B7A-3D5E1F2A4C60"

# Runs in both runtimes: sets FIGURES (ns per call by case).
LOOP = textwrap.dedent(f"""
    import statistics, time
    import kaibantrace

    def per_call(function, calls=20_000, rounds=5):
        times = []
        for _ in range(rounds):
            began = time.perf_counter()
            for _ in range(calls):
                function()
            times.append((time.perf_counter() - began) / calls * 1e9)
        return statistics.median(times)

    def plain():
        pass

    on = kaibantrace.Telemetry(app_id={APP_ID!r}, flush_interval=30, max_queue=1_000_000,
                               max_per_minute=0, **SENDS_TO)
    off = kaibantrace.Telemetry(app_id={APP_ID!r}, opt_out=True)
    tracked_on = on.track("board_started")(plain)
    tracked_off = off.track("board_started")(plain)
    tracked_on()
    FIGURES = {{"a plain call": per_call(plain),
               "a tracked call, telemetry on": per_call(tracked_on),
               "a tracked call, opted out in code": per_call(tracked_off)}}
""")

PAGE_OPT_OUT = textwrap.dedent(f"""
    import js
    js.globalThis.KAIBAN_TELEMETRY_OPT_OUT = "1"
    by_page = kaibantrace.Telemetry(app_id={APP_ID!r})
    tracked_by_page = by_page.track("board_started")(plain)
    FIGURES["a tracked call, opted out by the page's variable"] = per_call(tracked_by_page)
""")


def in_cpython() -> Dict[str, float]:
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["KAIBAN_TELEMETRY_DIR"] = os.environ["KAIBAN_TELEMETRY_CONFIG_DIR"] = scratch
        from kaibantrace.testing import MemoryTransport

        namespace: Dict[str, Any] = {
            "SENDS_TO": {"transport": MemoryTransport(), "detached_delivery": False}}
        exec(LOOP, namespace)
        namespace["on"].shutdown(1.0)  # its sender stops before its directory goes
        figures = namespace["FIGURES"]
    assert isinstance(figures, dict)
    return figures


def in_the_page() -> Dict[str, float]:
    from tests.real_libraries import default_cache_dir
    from tests.test_pyodide import PYODIDE_VERSION, WHEELS, Runtime, _pure_wheel

    cache = default_cache_dir() / f"pyodide-{PYODIDE_VERSION}"
    pyodide = cache / "node_modules" / "pyodide"
    if not (pyodide / "pyodide.mjs").exists():
        sys.exit("Pyodide is not installed yet: run `python -m pytest tests/test_pyodide.py` once")
    wheels = {name: _pure_wheel(cache / "wheels", name, req) for name, req in WHEELS.items()}
    with tempfile.TemporaryDirectory() as scratch:
        script = (f"SENDS_TO = {{'endpoint': 'https://nom.telemetrydeck.com/v2/'}}\n{LOOP}\n"
                  f"{PAGE_OPT_OUT}\nimport json\nRESULT = json.dumps(FIGURES)\n")
        outcome = Runtime(pyodide, wheels, Path(scratch)).run(script)
    figures: Dict[str, float] = outcome["result"]
    return figures


def main() -> None:
    began = time.monotonic()
    page, cpython = in_the_page(), in_cpython()
    print(f"ns per call, median of 5 rounds of 20,000 ({time.monotonic() - began:.0f} s)\n")
    print(f"| | in a page (Pyodide {page_version()}) | CPython {sys.version.split()[0]} |")
    print("|---|---:|---:|")
    base_page, base_cpython = page["a plain call"], cpython["a plain call"]
    for case, figure in page.items():
        native = cpython.get(case)
        shown_native = "" if native is None else f"{native:,.0f} ({native / base_cpython:.0f}x)"
        print(f"| {case} | {figure:,.0f} ({figure / base_page:.0f}x) | {shown_native} |")
    print("\n(n x): the cost as a multiple of a plain call in the same runtime")


def page_version() -> str:
    from tests.test_pyodide import PYODIDE_VERSION

    return PYODIDE_VERSION


if __name__ == "__main__":
    main()
