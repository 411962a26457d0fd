"""Smoke test of an installed kaibantrace wheel, run by .ci/package in a fresh venv.

    python smoke.py VERSION

Checks that the package imported is the installed one, at VERSION; that capture() records a
signal; that ``python -m kaibantrace --help`` and the ``kaibantrace status --json`` console
script run; and that the pytest plugin's entry point is registered. kaibantrace's state and
config directories are pointed at a temporary directory, so nothing is written in the home
directory. Exits non-zero, saying what failed, when any check fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile


def check(condition: bool, what: str, found: object = None) -> None:
    """Say that ``what`` holds, or exit saying it does not and what was ``found``."""
    if not condition:
        sys.exit(f"smoke test failed: {what}" + ("" if found is None else f" (found: {found})"))
    print(f"ok: {what}")


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    expected_version = sys.argv[1]
    scratch = tempfile.mkdtemp(prefix="kaibantrace-smoke-")
    try:
        os.environ["KAIBAN_TELEMETRY_DIR"] = os.path.join(scratch, "state")
        os.environ["KAIBAN_TELEMETRY_CONFIG_DIR"] = os.path.join(scratch, "config")
        run_checks(expected_version, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_checks(expected_version: str, scratch: str) -> None:
    import kaibantrace
    from kaibantrace.testing import capture

    site_packages = os.path.realpath(sysconfig.get_paths()["purelib"])
    location = os.path.realpath(kaibantrace.__file__)
    check(location.startswith(site_packages + os.sep),
          f"kaibantrace is imported from the installed wheel, in {site_packages}", location)
    check(kaibantrace.__version__ == expected_version,
          f"kaibantrace.__version__ is {expected_version}", kaibantrace.__version__)

    client = kaibantrace.Telemetry(app_id="00000000-0000-4000-8000-00000000C0DE")
    with capture() as signals:
        client.emit("smoke_tested", {"step": 1})
    check([s["type"] for s in signals] == ["smoke_tested"]
          and signals[0].get("payload") == {"step": "1"},
          "kaibantrace.testing.capture() records one signal", signals)

    done = subprocess.run([sys.executable, "-m", "kaibantrace", "--help"], cwd=scratch,
                          capture_output=True, text=True, timeout=60)
    check(done.returncode == 0 and "usage: kaibantrace" in done.stdout,
          "python -m kaibantrace --help prints the usage and exits 0",
          f"exit {done.returncode}: {done.stdout}{done.stderr}")

    script = shutil.which("kaibantrace", path=os.path.dirname(sys.executable))
    check(script is not None, "the kaibantrace console script is installed beside python")
    assert script is not None
    done = subprocess.run([script, "status", "--json"], cwd=scratch,
                          capture_output=True, text=True, timeout=60)
    check(done.returncode == 0, "the console script kaibantrace status --json exits 0",
          f"exit {done.returncode}: {done.stderr}")
    status = json.loads(done.stdout)
    check(status.get("state_dir") == os.environ["KAIBAN_TELEMETRY_DIR"],
          "kaibantrace status --json prints JSON naming the temporary state directory", status)

    from importlib.metadata import entry_points

    all_points = entry_points()
    if hasattr(all_points, "select"):  # Python 3.10 and later
        plugins = list(all_points.select(group="pytest11"))
    else:  # Python 3.9: a dict of groups
        plugins = list(all_points.get("pytest11", []))
    ours = [point.value for point in plugins if point.name == "kaibantrace"]
    check(ours == ["kaibantrace.pytest_plugin"],
          "the pytest plugin's entry point (pytest11: kaibantrace) is registered", ours)


if __name__ == "__main__":
    main()
