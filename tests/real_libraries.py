#!/usr/bin/env python
"""Run real libraries' own test suites with every public function tracked.

Tracking must never change the code it decorates. This script checks that on
code written elsewhere: it takes pure-Python libraries from PyPI whose source
distributions ship their tests, and runs each suite three times in a pytest
subprocess:

1. as released (the baseline);
2. with every public function and every public method of every public class
   replaced by ``Telemetry(app_id, endpoint=...).track(name)``, telemetry on and
   sending to a loopback collector that this script runs;
3. tracked the same way, with ``KAIBAN_TELEMETRY_OPT_OUT=1``.

Each test's outcome (from ``--junitxml``) in runs 2 and 3 must equal its
outcome in run 1. A test whose outcome differs is printed with its message,
and the script exits 1, unless the test is in ``ALLOWED_DIFFERENCES`` below.
The opted-out run must send nothing; the run with telemetry on must deliver
events. Sdists are downloaded once with pip into a cache directory of this
user's in the system's temporary directory, never in the home directory.

Exit status: 0 when every outcome matches; 1 when some differ or a check on
the events fails; 2 when a run broke (timeout, pytest crashed or collected
nothing); 77 when the sdists cannot be obtained (no package index reachable).

The same file is the pytest plugin that does the tracking (``-p
real_libraries``, with a copy of it and of kaibantrace on ``PYTHONPATH``): imported with
``KAIBANTRACE_REAL_LIBS_PACKAGES`` set, it tracks those packages before any
test module or conftest imports them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib
import inspect
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
APP_ID = "6F1C2D3E-4B5A-4978-8C1D-2E3F4A5B6C7D"

# Talking to the plugin role of this file, in the pytest subprocess.
ENV_PACKAGES = "KAIBANTRACE_REAL_LIBS_PACKAGES"  # the package, then the modules to import
ENV_ENDPOINT = "KAIBANTRACE_REAL_LIBS_ENDPOINT"
ENV_REPORT = "KAIBANTRACE_REAL_LIBS_REPORT"


@dataclasses.dataclass(frozen=True)
class Library:
    """A pinned sdist, where its code imports from and where its tests are."""

    name: str
    version: str
    package: str  # the top-level package, whose functions and classes are tracked
    imports: Tuple[str, ...]  # what to import first: the package and the submodules it does not
    import_dir: str  # relative to the unpacked sdist: "." or "src"
    tests: Tuple[str, ...]  # relative to the unpacked sdist


# Pinned to versions that still support Python 3.9, the oldest kaibantrace supports.
# Their test suites run in seconds with plain pytest and no dependency of their own.
# boltons' factories name their caller's module (namedutils, typeutils.make_sentinel)
# and its tbutils tests read tracebacks frame by frame; more-itertools and toolz have
# hundreds of small functions, generators and classes called many thousand times.
LIBRARIES: Tuple[Library, ...] = (
    Library("more-itertools", "10.5.0", "more_itertools", ("more_itertools",), ".", ("tests",)),
    Library("toolz", "1.0.0", "toolz", ("toolz",), ".", ("toolz/tests",)),
    Library("boltons", "26.2.0", "boltons", tuple(f"boltons.{m}" for m in (
        "cacheutils", "debugutils", "dictutils", "fileutils", "formatutils", "funcutils",
        "gcutils", "ioutils", "iterutils", "jsonutils", "listutils", "mathutils", "namedutils",
        "queueutils", "setutils", "socketutils", "statsutils", "strutils", "tableutils",
        "tbutils", "timeutils", "typeutils", "urlutils")), ".", ("tests",)),
)

# Tests whose outcome may differ when tracked, each with the reason. Only a test that
# counts stack frames may be listed, and none needs to be: a tracked call adds no frame
# (boltons' tests.test_tbutils::test_contextual, which reads a traceback's frames by
# index, passes tracked as it does undecorated).
# Keys are "<library>: <classname>::<name>" as the JUnit report names the test.
ALLOWED_DIFFERENCES: Dict[str, str] = {}

RUNS = ("undecorated", "tracked, telemetry on", "tracked, opted out")


# --------------------------------------------------------------------------
# The plugin role: track every public function of the packages named in the
# environment, as soon as pytest imports this module (before conftest files).
# --------------------------------------------------------------------------

_EVENT_NAME_BAD = re.compile(r"[^A-Za-z0-9_.:-]")


def event_name(package: str, qualname: str) -> str:
    """A valid event name for a function: letters, digits and ``_ . : -``, at most 128."""
    return _EVENT_NAME_BAD.sub("_", f"{package}:{qualname}")[:128]


def _defined_in(obj: Any, package: str) -> bool:
    module = getattr(obj, "__module__", None)
    return isinstance(module, str) and (module == package or module.startswith(package + "."))


def _public_submodules(package: str) -> List[Any]:
    """The package and those of its modules that are imported now (by the package itself
    or as ``Library.imports`` asks); other modules, which may warn when imported or which
    tests import on purpose, are left alone."""
    found = []
    for name, module in sorted(sys.modules.items()):
        if module is None or not (name == package or name.startswith(package + ".")):
            continue
        parts = name.split(".")
        if any(part.startswith("_") or part in ("tests", "test") for part in parts):
            continue
        found.append(module)
    return found


def track_package(package: str, imports: Sequence[str], client: Any) -> int:
    """Import ``imports``, then replace every public function and public method of every
    public class that ``package`` defines, in every module of it that holds them, by
    tracked versions.
    A function re-exported under several names gets one tracked version for all.
    Dunder and private names, properties, builtins and classes themselves stay."""
    tracked: Dict[int, Tuple[Any, Any]] = {}  # id(original) -> (original, tracked)
    done_classes: Set[int] = set()

    def tracked_version(original: Any, package: str, qualname: str) -> Any:
        entry = tracked.get(id(original))
        if entry is None:
            entry = (original, client.track(event_name(package, qualname))(original))
            tracked[id(original)] = entry
        return entry[1]

    for name in imports:
        importlib.import_module(name)
    for module in _public_submodules(package):
        for name, value in list(vars(module).items()):
            if name.startswith("_") or not _defined_in(value, package):
                continue
            if inspect.isfunction(value):
                setattr(module, name, tracked_version(value, package, value.__qualname__))
            elif inspect.isclass(value) and id(value) not in done_classes:
                done_classes.add(id(value))
                for attribute, raw in list(vars(value).items()):
                    if attribute.startswith("_"):
                        continue
                    inner = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
                    if not inspect.isfunction(inner):
                        continue  # properties, nested classes, data, C functions
                    qualname = f"{value.__qualname__}.{attribute}"
                    setattr(value, attribute, tracked_version(raw, package, qualname))
    _point_defaults_at_tracked(tracked)
    return len(tracked)


def _point_defaults_at_tracked(tracked: Dict[int, Tuple[Any, Any]]) -> None:
    """A default argument that is one of the tracked functions becomes its tracked version
    (``def cached(cache, key=hashkey)``), as if the library had been decorated in its
    source, where the decorator runs before later definitions capture the name."""
    for original, _ in list(tracked.values()):
        function = getattr(original, "__func__", original)
        if function.__defaults__:
            function.__defaults__ = tuple(tracked.get(id(v), (v, v))[1] for v in function.__defaults__)
        if function.__kwdefaults__:
            function.__kwdefaults__ = {k: tracked.get(id(v), (v, v))[1]
                                       for k, v in function.__kwdefaults__.items()}


_client: Any = None
_installed = 0


def _install_from_environment() -> None:
    global _client, _installed
    import kaibantrace

    _client = kaibantrace.Telemetry(APP_ID, endpoint=os.environ[ENV_ENDPOINT], flush_interval=0.1)
    package, *imports = os.environ[ENV_PACKAGES].split(",")
    _installed = track_package(package, imports, _client)


def pytest_unconfigure(config: Any) -> None:
    """Deliver what is queued (bounded), then tell the parent what was installed and sent."""
    if _client is None or not os.environ.get(ENV_REPORT):
        return
    delivered = _client.flush(20.0)
    report = {"installed": _installed, "delivered": delivered, "stats": _client.stats()}
    Path(os.environ[ENV_REPORT]).write_text(json.dumps(report, default=str))


if __name__ != "__main__" and os.environ.get(ENV_PACKAGES):
    _install_from_environment()


# --------------------------------------------------------------------------
# The script role.
# --------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``kaibantrace-tests-<uid>`` in the temporary directory, private to this user (a fresh
    one when that name is someone else's): the suite writes nothing in the home directory,
    and the libraries' own tests run outside this project's tree, where its pytest
    configuration would apply to them."""
    path = Path(tempfile.gettempdir()) / f"kaibantrace-tests-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        info = path.lstat()
        if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() \
                and not info.st_mode & 0o077:
            return path
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="kaibantrace-tests-"))


class DownloadFailed(Exception):
    pass


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


_SDIST = re.compile(r"^(?P<name>.+)-(?P<version>[^-]+)\.(?:tar\.gz|zip)$")


def _cached_sdist(directory: Path, library: Library) -> Optional[Path]:
    """The sdist of ``library`` in ``directory`` (pip names it ``more-itertools-...`` or
    ``more_itertools-...``, depending on the release), if there is one."""
    for path in sorted(directory.iterdir()) if directory.is_dir() else []:
        match = _SDIST.match(path.name)
        if match and match["version"] == library.version \
                and _normalized(match["name"]) == _normalized(library.name):
            return path
    return None


def fetch(library: Library, cache: Path) -> Path:
    """The unpacked sdist of ``library`` in ``cache``, downloaded with pip the first time."""
    unpacked = cache / "src" / f"{library.name}-{library.version}"
    if (unpacked / ".complete").exists():
        return unpacked
    sdists = cache / "sdists"
    sdists.mkdir(parents=True, exist_ok=True)
    archive = _cached_sdist(sdists, library)
    if archive is None:
        with tempfile.TemporaryDirectory(dir=cache) as scratch:
            command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                       "--no-deps", "--no-binary", ":all:", f"{library.name}=={library.version}",
                       "-d", scratch]
            # pip, and what it asks for its user agent (a rustup shim writes its settings),
            # see a home directory of their own: nothing lands in the real one.
            env = {**os.environ, "HOME": scratch, "PIP_NO_CACHE_DIR": "1"}
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                                      env=env, cwd=scratch)
            except subprocess.TimeoutExpired as exc:
                raise DownloadFailed(f"pip download {library.name} timed out") from exc
            got = _cached_sdist(Path(scratch), library)
            if done.returncode != 0 or got is None:
                raise DownloadFailed(f"pip download {library.name}=={library.version} failed "
                                     f"(exit {done.returncode}): {done.stderr.strip()[-2000:]}")
            archive = sdists / got.name
            os.replace(got, archive)
    (cache / "src").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache / "src") as scratch:
        if archive.name.endswith(".zip"):
            shutil.unpack_archive(str(archive), scratch)
        else:
            with tarfile.open(archive) as tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(scratch, filter="data")
                else:  # Python before 3.9.17 / 3.10.12 / 3.11.4
                    tar.extractall(scratch)  # a pinned sdist from the package index
        tops = os.listdir(scratch)
        if len(tops) != 1:
            raise DownloadFailed(f"{archive.name} does not hold one top-level folder")
        top = Path(scratch) / tops[0]
        (top / ".complete").write_text("unpacked\n")
        if unpacked.exists():
            shutil.rmtree(unpacked)
        os.replace(top, unpacked)
    return unpacked


@dataclasses.dataclass
class Outcome:
    result: str  # passed, failed, error, skipped
    message: str = ""


@dataclasses.dataclass
class Run:
    label: str
    seconds: float
    outcomes: Dict[str, Outcome]
    report: Dict[str, Any]
    received: int = 0
    requests: int = 0
    broken: Optional[str] = None

    def counts(self) -> Dict[str, int]:
        totals: Dict[str, int] = {}
        for outcome in self.outcomes.values():
            totals[outcome.result] = totals.get(outcome.result, 0) + 1
        return totals


_RANK = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}


def read_junit(path: Path) -> Dict[str, Outcome]:
    """Each test case's outcome; a case reported twice (a teardown error) keeps the worst."""
    outcomes: Dict[str, Outcome] = {}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = Outcome("passed")
        for child in case:
            kind = {"failure": "failed", "error": "error", "skipped": "skipped"}.get(child.tag)
            if kind is not None and _RANK[kind] > _RANK[outcome.result]:
                message = child.get("message") or ""
                if not message:
                    lines = (child.text or "").strip().splitlines()
                    message = lines[-1] if lines else ""
                outcome = Outcome(kind, message)
        previous = outcomes.get(test_id)
        if previous is None or _RANK[outcome.result] > _RANK[previous.result]:
            outcomes[test_id] = outcome
    return outcomes


def importable_copy(directory: Path) -> Path:
    """A folder holding only this tree's kaibantrace and this file, for the suites'
    ``PYTHONPATH``: this repository's own ``tests`` and ``conftest`` stay out of their way."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO_ROOT / "kaibantrace", directory / "kaibantrace", ignore=ignore)
    shutil.copy2(Path(__file__).resolve(), directory / "real_libraries.py")
    return directory


def child_environment(library_dir: Path, library: Library, mode: str, endpoint: str,
                      scratch: Path, importable: Path) -> Dict[str, str]:
    """The environment of a suite's pytest: none of kaibantrace's variables but the
    ones set here (a state directory of its own, no delivery process)."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("KAIBAN_") and key not in ("DO_NOT_TRACK", "PYTEST_ADDOPTS",
                                                            "PYTEST_PLUGINS", "PYTHONPATH")}
    env["PYTHONPATH"] = os.pathsep.join([str(library_dir / library.import_dir), str(importable)])
    env["KAIBAN_TELEMETRY_DIR"] = str(scratch / "state")
    env["KAIBAN_TELEMETRY_CONFIG_DIR"] = str(scratch / "config")
    env["KAIBAN_TELEMETRY_DETACHED"] = "0"
    if mode != "undecorated":
        env[ENV_PACKAGES] = ",".join((library.package, *library.imports))
        env[ENV_ENDPOINT] = endpoint
        env[ENV_REPORT] = str(scratch / "report.json")
    if mode == "tracked, opted out":
        env["KAIBAN_TELEMETRY_OPT_OUT"] = "1"
    return env


def run_suite(library: Library, library_dir: Path, mode: str, timeout: float, importable: Path) -> Run:
    """Run the library's tests once in a pytest subprocess, in the given mode."""
    from kaibantrace.testing import Collector

    with tempfile.TemporaryDirectory(prefix="kaibantrace-real-") as scratch_name, Collector() as collector:
        scratch = Path(scratch_name)
        junit = scratch / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:kaibantrace", "-p", "no:cacheprovider",
                   "-o", "addopts=", f"--rootdir={library_dir}", f"--basetemp={scratch / 'tmp'}",
                   f"--junitxml={junit}"]
        if mode != "undecorated":
            command += ["-p", "real_libraries"]
        command += list(library.tests)
        env = child_environment(library_dir, library, mode, collector.url, scratch, importable)
        started = time.monotonic()
        broken: Optional[str] = None
        try:
            done = subprocess.run(command, cwd=library_dir, env=env, capture_output=True, text=True,
                                  timeout=timeout)
            if done.returncode not in (0, 1) or not junit.exists():
                tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-30:])
                broken = f"pytest exited {done.returncode}:\n{tail}"
        except subprocess.TimeoutExpired:
            broken = f"pytest did not finish within {timeout:.0f} s"
        seconds = time.monotonic() - started
        outcomes = read_junit(junit) if junit.exists() and broken is None else {}
        if broken is None and not outcomes:
            broken = "pytest reported no test"
        report_path = scratch / "report.json"
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
        return Run(mode, seconds, outcomes, report, len(collector.signals), len(collector.requests),
                   broken)


def differences(baseline: Run, other: Run) -> List[Tuple[str, str, str, str]]:
    """(test, baseline outcome, this run's outcome, this run's message) for every test
    whose outcome differs, tests missing from one of the runs included."""
    found = []
    for test_id in sorted(set(baseline.outcomes) | set(other.outcomes)):
        before = baseline.outcomes.get(test_id, Outcome("missing"))
        after = other.outcomes.get(test_id, Outcome("missing"))
        if before.result != after.result:
            found.append((test_id, before.result, after.result, after.message or before.message))
    return found


def describe(run: Run) -> str:
    counts = ", ".join(f"{n} {kind}" for kind, n in sorted(run.counts().items()))
    text = f"  {run.label:<22} {run.seconds:6.1f} s  {counts or 'no result'}"
    if run.label != "undecorated":
        stats = run.report.get("stats", {})
        counters = ", ".join(f"{key} {stats[key]}" for key in ("queued", "sent", "held_back", "dropped")
                             if key in stats)
        text += (f"; {run.report.get('installed', '?')} tracked functions; {run.received} events received "
                 f"in {run.requests} requests (client: {counters or 'no report'})")
    return text


def check(library: Library, runs: Sequence[Run]) -> int:
    """Print the runs of one library and what differs; the exit status they call for."""
    status = 0
    for run in runs:
        print(describe(run), flush=True)
        if run.broken is not None:
            print(f"    BROKEN: {run.broken}", flush=True)
            status = 2
    baseline, on, off = runs
    if baseline.broken is not None:
        return status
    if on.broken is None and on.report.get("installed", 0) == 0:
        print("    FAILED: no function was tracked", flush=True)
        status = max(status, 1)
    if on.broken is None and on.received == 0:
        print("    FAILED: with telemetry on, no event reached the collector", flush=True)
        status = max(status, 1)
    if off.requests:
        print(f"    FAILED: opted out, yet {off.requests} request(s) reached the collector", flush=True)
        status = max(status, 1)
    for run in (on, off):
        if run.broken is not None:
            continue
        for test_id, before, after, message in differences(baseline, run):
            key = f"{library.name}: {test_id}"
            if key in ALLOWED_DIFFERENCES:
                print(f"    allowed ({run.label}): {test_id}: {before} -> {after} "
                      f"({ALLOWED_DIFFERENCES[key]})", flush=True)
                continue
            status = max(status, 1)
            message = " ".join(message.split())[:400]
            print(f"    DIFFERS ({run.label}): {test_id}: {before} -> {after}: {message}", flush=True)
    return status


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                        help="where sdists are downloaded and unpacked (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=240.0,
                        help="seconds one test-suite run may take before it counts as hung")
    parser.add_argument("--jobs", type=int, default=2, help="test-suite runs at a time (default: 2)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only this library (repeatable)")
    args = parser.parse_args(argv)
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))  # this tree's kaibantrace, for the collector

    chosen = [lib for lib in LIBRARIES if not args.only or lib.name in args.only]
    cache: Path = args.cache_dir
    cache.mkdir(parents=True, exist_ok=True)
    try:
        sources = [(lib, fetch(lib, cache)) for lib in chosen]
    except (DownloadFailed, OSError, tarfile.TarError) as exc:
        print(f"cannot obtain the sdists: {exc}", file=sys.stderr)
        return 77

    status = 0
    started = time.monotonic()
    # Two suites at a time: the machines this runs on have two cores or more.
    with tempfile.TemporaryDirectory(prefix="kaibantrace-real-path-") as path_name, \
            concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        importable = importable_copy(Path(path_name))
        futures = {(library.name, mode): pool.submit(run_suite, library, directory, mode, args.timeout,
                                                     importable)
                   for library, directory in sources for mode in RUNS}
        for library, _ in sources:
            print(f"{library.name} {library.version}", flush=True)
            runs = [futures[library.name, mode].result() for mode in RUNS]
            status = max(status, check(library, runs))
    print(f"total {time.monotonic() - started:.1f} s; "
          f"{'every outcome matches' if status == 0 else 'see above'}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
