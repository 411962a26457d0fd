"""Other environments kaibantrace finds itself in: a Jupyter kernel, a gevent-patched process."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap
import time

import pytest

from kaibantrace.testing import Collector

from .conftest import APP_ID, rows_in_outbox, subprocess_env

# These environments' packages are an extra of their own (they do not ship wheels for every
# Python and platform); without them the tests skip and say how to get them.
_MISSING = "{} is not installed: pip install -e '.[environments]'"


def test_in_a_jupyter_kernel_signals_arrive_and_shutdown_is_not_held_up(
        collector: Collector, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    """A real IPython kernel runs decorated code cell by cell; the signals arrive, and the
    kernel shuts down as promptly with telemetry as a kernel does anyway."""
    pytest.importorskip("ipykernel", reason=_MISSING.format("ipykernel"))
    manager_module = pytest.importorskip("jupyter_client.manager",
                                         reason=_MISSING.format("jupyter_client"))
    # IPython's profile (~/.ipython) and Jupyter's runtime, data and config directories go
    # to this test's temporary directory, for the kernel and for this process alike.
    for variable, name in [("IPYTHONDIR", "ipython"), ("JUPYTER_RUNTIME_DIR", "jupyter-runtime"),
                           ("JUPYTER_DATA_DIR", "jupyter-data"),
                           ("JUPYTER_CONFIG_DIR", "jupyter-config")]:
        monkeypatch.setenv(variable, str(tmp_path / name))
    manager = manager_module.KernelManager(kernel_name="python3")
    manager.start_kernel(env=subprocess_env())
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        cells = [
            "import kaibantrace\n"
            f"telemetry = kaibantrace.Telemetry(app_id={APP_ID!r}, endpoint={collector.url!r})",
            "@telemetry.track('cell_ran')\ndef analyse(n):\n    return n * 2",
            "analyse(1)\nanalyse(2)",
            "assert telemetry.flush(10)",
            "telemetry.emit('left_at_shutdown')",
        ]
        for cell in cells:
            reply = client.execute_interactive(cell, timeout=60)
            assert reply["content"]["status"] == "ok", reply["content"]
        assert [s["type"] for s in collector.wait_for(2)] == ["cell_ran", "cell_ran"]
    finally:
        client.stop_channels()
        started = time.monotonic()
        manager.shutdown_kernel(now=False)  # the polite way: the kernel runs its exit hooks
        took = time.monotonic() - started
    assert not manager.is_alive()
    assert took < 10  # a generous bound: it catches a hang, not a slowdown
    # The event emitted just before shutdown was delivered at exit, or kept for the next run.
    delivered = [s["type"] for s in collector.signals].count("left_at_shutdown")
    assert delivered + rows_in_outbox(os.environ["KAIBAN_TELEMETRY_DIR"]) == 1


_GEVENT = textwrap.dedent("""
    from gevent import monkey
    monkey.patch_all()
    import sys, gevent, kaibantrace

    client = kaibantrace.Telemetry(app_id=sys.argv[1], endpoint=sys.argv[2])

    @client.track("greenlet_work")
    def work(i):
        gevent.sleep(0)
        return i

    gevent.joinall([gevent.spawn(work, i) for i in range(50)], timeout=30)
    print(client.flush(15))
""")


def test_in_a_gevent_patched_process(collector: Collector) -> None:
    """With threads and sockets monkey-patched, events from greenlets are delivered and the
    process exits cleanly."""
    pytest.importorskip("gevent", reason=_MISSING.format("gevent"))
    done = subprocess.run([sys.executable, "-c", _GEVENT, APP_ID, collector.url],
                          env=subprocess_env(), capture_output=True, text=True, timeout=90)
    assert (done.returncode, done.stdout.strip()) == (0, "True"), done.stderr
    assert "Traceback" not in done.stderr
    assert len(collector.wait_for(50)) == 50
