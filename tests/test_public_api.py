"""The public surface: exactly what __all__ names, and an import that does almost nothing."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap

import kaibantrace

from .conftest import subprocess_env

PUBLIC = {
    "ConfigurationError", "Decision", "DeliveryStatus", "EventError", "KaibanTraceError", "PrivacyError",
    "Session", "SessionScope", "Settings", "Telemetry", "__version__", "aflush", "command_line",
    "configure",
    "default_client", "emit", "events", "flush", "project_id", "session", "shutdown",
    "telemetry_commands", "timed", "track", "track_cli",
}


class TestSurface:
    def test_all_is_exactly_the_public_surface(self) -> None:
        """__all__ is sorted and names exactly the public API, so nothing leaks by accident."""
        assert kaibantrace.__all__ == sorted(kaibantrace.__all__)
        assert set(kaibantrace.__all__) == PUBLIC
        public_attributes = {n for n in dir(kaibantrace) if not n.startswith(("_", "@"))}
        public_attributes.add("__version__")
        not_api = {"testing", "pytest_plugin", "TYPE_CHECKING", "annotations"}
        assert public_attributes - not_api == PUBLIC

    def test_client_methods(self) -> None:
        """A Telemetry has the methods the module-level API mirrors."""
        for name in ("track", "track_cli", "session", "emit", "flush", "aflush", "shutdown",
                     "enabled", "configure"):
            assert hasattr(kaibantrace.Telemetry, name), name

    def test_event_names(self) -> None:
        """events holds KaibanJS's signal names and app IDs."""
        assert kaibantrace.events.ALL == ("install_kaibanjs", "init_board", "run_board",
                                          "deploy_board", "workflow_started")
        assert kaibantrace.events.CLI_APP_ID == "95BF7A3E-9D86-432D-9633-3526DD3A8977"


class TestImport:
    def test_import_is_light(self) -> None:
        """Importing kaibantrace imports neither requests nor asyncio and starts no thread."""
        code = ("import sys, threading, kaibantrace, json; print(json.dumps(["
                "'requests' in sys.modules, 'asyncio' in sys.modules, threading.active_count()]))")
        out = subprocess.run([sys.executable, "-c", code], env=subprocess_env(),
                             capture_output=True, text=True, timeout=60, check=True).stdout
        assert json.loads(out) == [False, False, 1]

    def test_import_loads_only_its_own_small_modules(self) -> None:
        """No standard module either: the client, SQLite, logging and hashing come later."""
        code = ("import sys; before = set(sys.modules); import kaibantrace; "
                "print(sorted(set(sys.modules) - before))")
        out = subprocess.run([sys.executable, "-c", code], env=subprocess_env(),
                             capture_output=True, text=True, timeout=60, check=True).stdout
        new = ast.literal_eval(out)  # the list of module names the child printed
        # ``__future__`` is the compiler's few lines behind ``from __future__ import
        # annotations``; an editable install's import hook has often loaded it already.
        assert new and all(name.startswith("kaibantrace.") or name in ("kaibantrace", "__future__")
                           for name in new), new
        assert "kaibantrace._client.client" not in new

    def test_a_first_track_loads_wrapt_and_its_own_modules_only(self) -> None:
        """Opted out, a first ``@track`` and call load ``wrapt`` (with what the installed
        wrapt imports, as docs/performance.md's table says for each wrapt series), kaibantrace's own
        modules and ``contextvars``; never SQLite or any HTTP code."""
        code = textwrap.dedent("""
            import json, sys
            import kaibantrace
            before = set(sys.modules)
            import wrapt
            by_wrapt = set(sys.modules) - before
            @kaibantrace.track("used")
            def work():
                return 1
            work()
            rest = set(sys.modules) - before - by_wrapt
            from importlib.metadata import version
            print(json.dumps([version("wrapt"), sorted(by_wrapt), sorted(rest),
                              sorted(set(sys.modules) & {"sqlite3", "requests", "urllib3",
                                                         "http.client", "hashlib"})]))
        """)
        out = subprocess.run([sys.executable, "-c", code],
                             env=subprocess_env(KAIBAN_TELEMETRY_OPT_OUT="1"),
                             capture_output=True, text=True, timeout=60, check=True).stdout
        wrapt_version, by_wrapt, rest, heavy = json.loads(out)
        assert heavy == []
        assert all(name.startswith("kaibantrace.") or name in ("contextvars", "_contextvars")
                   for name in rest), rest
        series = tuple(int(part) for part in wrapt_version.split(".")[:2])
        # The "What importing costs" table of docs/performance.md, row by row.
        assert ("socket" in by_wrapt) == (series >= (2, 0)), (wrapt_version, by_wrapt)
        assert ("asyncio" in by_wrapt) == (series >= (2, 2)), (wrapt_version, by_wrapt)
        assert ("ssl" in by_wrapt) == (series >= (2, 2)), (wrapt_version, by_wrapt)
