"""Tracking never changes code written elsewhere: real libraries' own test suites give the
same outcomes with every public function tracked (see tests/real_libraries.py)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from .conftest import subprocess_env

SCRIPT = pathlib.Path(__file__).resolve().parent / "real_libraries.py"
CANNOT_DOWNLOAD = 77  # the script's exit status when pip cannot get the sdists


def test_library_test_suites_give_the_same_outcomes_when_tracked() -> None:
    """more-itertools, toolz and boltons: every test passes, fails or skips as it does
    undecorated, with telemetry on (events reach a loopback collector) and opted out
    (nothing does)."""
    done = subprocess.run([sys.executable, str(SCRIPT)], env=subprocess_env(), capture_output=True,
                          text=True, timeout=900)
    if done.returncode == CANNOT_DOWNLOAD:
        pytest.skip(f"the libraries' sdists cannot be obtained with pip: {done.stderr.strip()[-500:]}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every outcome matches" in done.stdout
