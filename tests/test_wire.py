"""What reaches a real HTTP endpoint: TelemetryDeck's v2 format, field by field."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest

import kaibantrace
from kaibantrace._encode import identity as _identity
from kaibantrace.testing import Collector

from .conftest import APP_ID

MakeClient = Callable[..., kaibantrace.Telemetry]


class TestSignalFields:
    def test_runtime_event_fields(self, make_client: MakeClient, collector: Collector) -> None:
        """A runtime event carries exactly the documented fields with the documented values."""
        client = make_client(salt="pepper")
        before = time.time()
        with client.session() as s:
            client.emit("workflow_started")
        assert client.flush(5)
        (signal,) = collector.wait_for(1)
        assert set(signal) == {"appID", "clientUser", "sessionID", "type",
                               "telemetryClientVersion", "receivedAt"}
        assert signal["appID"] == APP_ID
        assert signal["type"] == "workflow_started"
        assert signal["sessionID"] == s.id
        # the hash of the process's own identity, which is never sent; not of the session
        assert signal["clientUser"] == hashlib.sha256(
            (_identity.process_identity() + "pepper").encode()).hexdigest()
        assert signal["telemetryClientVersion"] == f"kaibantrace {kaibantrace.__version__}"
        sent_at = datetime.datetime.strptime(signal["receivedAt"], "%Y-%m-%dT%H:%M:%S.%fZ")
        assert abs(sent_at.replace(tzinfo=datetime.timezone.utc).timestamp() - before) < 5

    def test_payload_float_value_and_test_mode(self, make_client: MakeClient,
                                               collector: Collector) -> None:
        """Payload values arrive as text, floatValue at top level, isTestMode only in test mode."""
        client = make_client(test_mode=True)
        client.emit("measured", {"agents": 3, "fast": True, "name": "board"}, float_value=2.5)
        assert client.flush(5)
        (signal,) = collector.wait_for(1)
        assert signal["payload"] == {"agents": "3", "fast": "true", "name": "board"}
        assert signal["floatValue"] == 2.5
        assert signal["isTestMode"] is True

    def test_every_kind_of_value_arrives_as_javascript_text(
            self, make_client: MakeClient, collector: Collector) -> None:
        """Floats, lists, dicts and dates reach the endpoint written as the JavaScript SDK writes them."""
        client = make_client()
        when = datetime.datetime(2026, 5, 4, 3, 2, 1, 500000, tzinfo=datetime.timezone.utc)
        client.emit("kinds", {"f": 2.0, "g": 0.25, "l": [1, "a", None], "d": {"k": True},
                              "t": when, "day": datetime.date(2026, 5, 4), "none": None})
        assert client.flush(5)
        (signal,) = collector.wait_for(1)
        assert signal["payload"] == {"f": "2", "g": "0.25", "l": '[1,"a",null]', "d": '{"k":true}',
                                     "t": "2026-05-04T03:02:01.500Z", "day": "2026-05-04"}

    def test_no_payload_key_when_empty_and_no_test_mode_key(
            self, make_client: MakeClient, collector: Collector) -> None:
        """An empty payload and test mode off leave their keys out entirely."""
        client = make_client()
        client.emit("plain", {})
        assert client.flush(5)
        (signal,) = collector.wait_for(1)
        assert "payload" not in signal and "isTestMode" not in signal and "floatValue" not in signal

    def test_cli_events_key_the_project_id_with_the_local_secret(
            self, make_client: MakeClient, collector: Collector, tmp_path: Any,
            monkeypatch: Any) -> None:
        """track_cli events send SHA-256(HMAC(local secret, project ID) + salt): no dictionary
        of project and user names can match it."""
        monkeypatch.chdir(str(tmp_path))
        client = make_client(salt="s")

        @client.track_cli("run_board")
        def main() -> int:
            return 0

        assert main() == 0
        assert client.flush(5)
        install, signal = collector.wait_for(2)  # the first run in a project records an install
        assert install["clientUser"] == signal["clientUser"]
        secret_file = Path(os.environ["KAIBAN_TELEMETRY_CONFIG_DIR"]) / "secret"
        secret = bytes.fromhex(secret_file.read_text().strip())
        keyed = hmac.new(secret, kaibantrace.project_id().encode(), hashlib.sha256).hexdigest()
        assert signal["clientUser"] == hashlib.sha256((keyed + "s").encode()).hexdigest()
        assert kaibantrace.project_id() not in json.dumps(signal)
        if os.name == "posix":
            assert secret_file.stat().st_mode & 0o777 == 0o600

    def test_kaibanjs_profile_sends_the_seed_identity(
            self, make_client: MakeClient, collector: Collector, tmp_path: Any,
            monkeypatch: Any) -> None:
        """In the KaibanJS profile, clientUser is SHA-256(project ID + salt), as KaibanJS sends."""
        monkeypatch.chdir(str(tmp_path))
        client = make_client(salt="s", profile="kaibanjs")

        @client.track_cli("run_board")
        def main() -> int:
            return 0

        assert main() == 0
        assert client.flush(5)
        install, signal = collector.wait_for(2)  # the first run in a project records an install
        assert install["clientUser"] == signal["clientUser"]
        expected = hashlib.sha256((kaibantrace.project_id() + "s").encode()).hexdigest()
        assert signal["clientUser"] == expected
        assert not (Path(os.environ["KAIBAN_TELEMETRY_CONFIG_DIR"]) / "secret").exists()


class TestSessionsOnTheWire:
    def test_asyncio_tasks_and_threads_send_their_own_session_ids(
            self, make_client: MakeClient, collector: Collector) -> None:
        """Signals from tasks and threads in their own session() carry their own sessionID."""
        client = make_client()

        @client.track("step")
        async def step(label: str) -> None:
            await asyncio.sleep(0)

        async def task(label: str) -> None:
            async with client.session():
                for _ in range(3):
                    await step(label)

        async def main() -> None:
            await asyncio.gather(*(task(f"t{i}") for i in range(4)))

        def thread_work() -> None:
            with client.session():
                for _ in range(3):
                    client.emit("threaded")

        asyncio.run(main())
        threads = [threading.Thread(target=thread_work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        client.emit("outside")
        assert client.flush(10)
        signals = collector.wait_for(25)
        by_session: dict[str, list[str]] = {}
        for s in signals:
            by_session.setdefault(s["sessionID"], []).append(s["type"])
        assert {s["clientUser"] for s in signals} == {
            hashlib.sha256(_identity.process_identity().encode()).hexdigest()}  # one user, nine sessions
        groups = sorted(by_session.values())
        assert groups == sorted([["outside"]] + [["step"] * 3] * 4 + [["threaded"] * 3] * 4)


class TestRequests:
    def test_body_is_a_json_array_with_headers(self, make_client: MakeClient,
                                               collector: Collector) -> None:
        """Each request is a UTF-8 JSON array posted with the JSON content type and our agent."""
        client = make_client()
        client.emit("one")
        assert client.flush(5)
        (request,) = collector.wait_for_requests(1)
        assert request.status == 200 and request.error is None
        assert isinstance(json.loads(request.body), list)
        assert request.headers["Content-Type"] == "application/json; charset=utf-8"
        assert request.headers["User-Agent"] == f"kaibantrace/{kaibantrace.__version__}"

    def test_batches_hold_at_most_100_signals(self, make_client: MakeClient,
                                              collector: Collector) -> None:
        """250 events go out as requests of at most 100 signals, none lost or repeated."""
        client = make_client(flush_interval=0.5)
        for i in range(250):
            client.emit("bulk", {"i": i})
        assert client.flush(10)
        signals = collector.wait_for(250)
        sizes = [len(r.signals) for r in collector.requests]
        assert max(sizes) == 100 and sum(sizes) == 250
        assert sorted(int(s["payload"]["i"]) for s in signals) == list(range(250))

    def test_namespace_url(self, make_client: MakeClient, collector: Collector) -> None:
        """With a namespace, signals are posted to /v2/namespace/<ns>/."""
        client = make_client(namespace="kaiban")
        client.emit("ns")
        assert client.flush(5)
        (request,) = collector.wait_for_requests(1)
        assert request.path == "/v2/namespace/kaiban/"

    def test_endpoint_from_environment(self, collector: Collector, monkeypatch: Any) -> None:
        """KAIBAN_TELEMETRY_ENDPOINT and KAIBAN_TELEMETRY_APP_ID point a client without arguments."""
        app = str(uuid.uuid4()).upper()  # the canonical spelling, as it is sent
        monkeypatch.setenv("KAIBAN_TELEMETRY_ENDPOINT", collector.url)
        monkeypatch.setenv("KAIBAN_TELEMETRY_APP_ID", app)
        client = kaibantrace.Telemetry(flush_interval=0.02)
        try:
            client.emit("env")
            assert client.flush(5)
            assert collector.wait_for(1)[0]["appID"] == app
        finally:
            client.shutdown()

    def test_module_level_api_uses_the_default_client(self, collector: Collector) -> None:
        """configure/track/emit/flush at module level drive the default client."""
        kaibantrace.configure(app_id=APP_ID, endpoint=collector.url, flush_interval=0.02)

        @kaibantrace.track("workflow_started", payload={"agents": 2})
        def start() -> str:
            return "started"

        with kaibantrace.session():
            assert start() == "started"
            kaibantrace.emit("extra")
        assert kaibantrace.flush(5)
        signals = collector.wait_for(2)
        assert [s["type"] for s in signals] == ["workflow_started", "extra"]
        assert signals[0]["sessionID"] == signals[1]["sessionID"]
        kaibantrace.shutdown()

    def test_two_clients_keep_their_own_app_ids(self, make_client: MakeClient,
                                                collector: Collector) -> None:
        """Two libraries' clients in one process send under their own app IDs."""
        other_app = str(uuid.uuid4()).upper()  # the canonical spelling, as it is sent
        a, b = make_client(), make_client(app_id=other_app)
        a.emit("from_a")
        b.emit("from_b")
        assert a.flush(5) and b.flush(5)
        by_type = {s["type"]: s["appID"] for s in collector.wait_for(2)}
        assert by_type == {"from_a": APP_ID, "from_b": other_app}


class TestStrictClient:
    def test_strict_client_raises_at_the_call(self, make_client: MakeClient) -> None:
        """A strict client raises PrivacyError at emit() for a personal value, and sends nothing."""
        client = make_client(strict=True)
        with pytest.raises(kaibantrace.PrivacyError, match="'ip'"):
            client.emit("leaky", {"ip": "192.168.0.7"})
        assert client.stats()["queued"] == 0

    def test_bad_runtime_name_is_dropped_quietly_unless_strict(
            self, make_client: MakeClient, collector: Collector,
            caplog: pytest.LogCaptureFixture) -> None:
        """emit() with a bad name drops the event with one warning; a strict client raises."""
        client = make_client()
        with caplog.at_level(logging.WARNING, logger="kaibantrace"):
            client.emit("bad name")
            client.emit("bad name")
            client.emit("good")
        assert client.flush(5) is False  # the bad one was not delivered
        assert [s["type"] for s in collector.wait_for(1)] == ["good"]
        assert caplog.text.count("event name") == 1
        with pytest.raises(kaibantrace.EventError, match="event name"):
            make_client(strict=True).emit("bad name")
