"""App IDs in one spelling, captures under opt-out, typed settings, and the values events carry."""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable

import pytest

import kaibantrace
from kaibantrace import events
from kaibantrace._config import Options, Settings, canonical_app_id, decide
from kaibantrace._outbox import outbox_path
from kaibantrace._state import state_dir
from kaibantrace.testing import Collector, MemoryTransport, capture

from .conftest import APP_ID

MakeClient = Callable[..., kaibantrace.Telemetry]

SPELLINGS = [
    APP_ID,
    APP_ID.lower(),
    "{" + APP_ID + "}",
    "{" + APP_ID.lower() + "}",
    "urn:uuid:" + APP_ID.lower(),
    APP_ID.replace("-", "").lower(),
]


class TestCanonicalAppId:
    @pytest.mark.parametrize("spelling", SPELLINGS)
    def test_every_spelling_names_one_app(self, spelling: str) -> None:
        """Case, braces, ``urn:uuid:`` and missing hyphens all give TelemetryDeck's spelling."""
        assert canonical_app_id(spelling) == APP_ID

    @pytest.mark.parametrize("value", ["", "my-app", APP_ID + "0", None, 42])
    def test_what_is_not_a_uuid_has_none(self, value: object) -> None:
        assert canonical_app_id(value) is None

    @pytest.mark.parametrize("spelling", SPELLINGS)
    def test_code_and_configure_keep_the_canonical_form(self, spelling: str) -> None:
        """``Telemetry(app_id=)`` and ``configure(app_id=)`` store the one spelling."""
        assert kaibantrace.Telemetry(app_id=spelling).settings.app_id == APP_ID
        client = kaibantrace.Telemetry()
        client.configure(app_id=spelling)
        assert client.settings.app_id == APP_ID

    @pytest.mark.parametrize("spelling", SPELLINGS)
    def test_environment_variable_is_canonical(self, spelling: str) -> None:
        assert decide(Settings(), {"KAIBAN_TELEMETRY_APP_ID": f" {spelling} "}).app_id == APP_ID

    def test_one_outbox_whatever_the_spelling(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The outbox a client opens, and the one an opted-out client purges, is the same file
        for every spelling of its app ID, whether given in code or in the environment."""
        expected = outbox_path(state_dir(), APP_ID)
        for spelling in SPELLINGS:
            assert outbox_path(state_dir(), kaibantrace.Telemetry(app_id=spelling)
                               ._app_id_even_if_off() or "") == expected
            monkeypatch.setenv("KAIBAN_TELEMETRY_APP_ID", spelling)
            assert outbox_path(state_dir(), kaibantrace.Telemetry()._app_id_even_if_off()
                               or "") == expected

    def test_signals_carry_the_canonical_app_id(self, collector: Collector) -> None:
        """What reaches the ingest is the upper-case, hyphenated ID its SDKs send."""
        client = kaibantrace.Telemetry(app_id="{" + APP_ID.lower() + "}", endpoint=collector.url,
                                       flush_interval=0.02)
        try:
            client.emit("spelled")
            assert client.flush(5)
            assert collector.wait_for(1)[0]["appID"] == APP_ID
        finally:
            client.shutdown()


class TestCaptureUnderOptOut:
    def test_capture_records_the_app_id_of_an_opted_out_client(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The pytest plugin opts the run out; a capture still shows the client's app ID."""
        monkeypatch.setenv("DO_NOT_TRACK", "1")
        client = kaibantrace.Telemetry(app_id=APP_ID.lower())
        with capture() as signals:
            client.emit("captured")
        assert signals[0]["appID"] == APP_ID

    def test_capture_records_the_app_id_from_the_environment(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("KAIBAN_TELEMETRY_OPT_OUT", "1")
        monkeypatch.setenv("KAIBAN_TELEMETRY_APP_ID", APP_ID.lower())
        with capture() as signals:
            kaibantrace.emit("captured")
        assert signals[0]["appID"] == APP_ID

    def test_capture_records_kaibanjs_app_id_for_the_profile(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("DO_NOT_TRACK", "1")
        client = kaibantrace.Telemetry(profile="kaibanjs")
        with capture() as signals:
            client.emit(events.WORKFLOW_STARTED)
        assert signals[0]["appID"] == events.LIBRARY_APP_ID

    def test_no_app_id_stays_empty(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A client with no app ID at all records an empty one, as before: nothing to show."""
        monkeypatch.setenv("DO_NOT_TRACK", "1")
        with capture() as signals:
            kaibantrace.Telemetry().emit("captured")
        assert signals[0]["appID"] == ""


class TestTypedConfigure:
    def test_options_name_every_setting(self) -> None:
        """The typed keywords of configure() are Settings' fields plus transport, and those
        of Telemetry() too, so no setting is missing from either."""
        expected = set(Settings._fields) | {"transport"}
        assert set(Options.__annotations__) == expected
        assert set(inspect.signature(kaibantrace.Telemetry).parameters) == expected

    @pytest.mark.parametrize("configure", [kaibantrace.configure,
                                           kaibantrace.Telemetry().configure])
    def test_unknown_keyword_is_named_at_run_time(self, configure: Any) -> None:
        with pytest.raises(TypeError, match="batch_sise"):
            configure(batch_sise=10)


class TestSenderSettingsAfterStart:
    def test_batch_size_applies_to_the_running_sender(self, make_client: MakeClient,
                                                      collector: Collector) -> None:
        """configure(batch_size=...) after the first event sizes the requests that follow."""
        client = make_client(batch_size=100)
        client.emit("first")
        assert client.flush(5)
        collector.wait_for(1)
        client.configure(batch_size=2)
        for number in range(7):
            client.emit("after", {"n": number})
        assert client.flush(5)
        collector.wait_for(8)
        later = [r for r in collector.requests[1:] if r.status == 200]
        assert sum(len(r.signals) for r in later) == 7
        assert max(len(r.signals) for r in later) == 2

    def test_transport_after_the_first_event_warns_once(self, make_client: MakeClient) -> None:
        """A transport cannot replace the running sender's: the author is told, once."""
        client = make_client()
        client.emit("first")
        with pytest.warns(RuntimeWarning, match="transport given after the first event") as caught:
            client.configure(transport=MemoryTransport())
        assert caught[0].filename == __file__
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            client.configure(transport=MemoryTransport())

    def test_transport_before_the_first_event_is_used(self, make_client: MakeClient) -> None:
        transport = MemoryTransport()
        client = make_client()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            client.configure(transport=transport)
        client.emit("first")
        assert client.flush(5)
        assert [s["type"] for s in transport.signals] == ["first"]
