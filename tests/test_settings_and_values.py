"""App IDs in one spelling, captures under opt-out, typed settings, and the values events carry."""

from __future__ import annotations

import decimal
import enum
import fractions
import inspect
import logging
import math
import pathlib
import subprocess
import sys
import textwrap
import uuid
import warnings
from typing import Any, Callable, Dict, Iterator, List

import pytest

import kaibantrace
from kaibantrace import EventError, PrivacyError, events
from kaibantrace._delivery.outbox import outbox_path
from kaibantrace._encode.identity import Session
from kaibantrace._encode.pipeline import (
    EncodeContext,
    Reporter,
    build_signal,
    float_value_of,
    snapshot_payload,
)
from kaibantrace._policy.config import Options, Settings, canonical_app_id, decide
from kaibantrace._policy.state import state_dir
from kaibantrace.testing import Collector, MemoryTransport, capture

from .conftest import APP_ID, subprocess_env

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
                               .app_id or "") == expected
            monkeypatch.setenv("KAIBAN_TELEMETRY_APP_ID", spelling)
            assert outbox_path(state_dir(), kaibantrace.Telemetry().app_id
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

    def test_a_late_transport_turned_into_an_error_leaves_no_half_change(
            self, make_client: MakeClient, collector: Collector) -> None:
        """Under ``-W error`` the warning raises; every other setting given with it is in
        force all the same (the warning comes once the change is applied)."""
        client = make_client()
        client.emit("first")
        assert client.flush(5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(RuntimeWarning):
                client.configure(transport=MemoryTransport(), opt_out=True, batch_size=7)
        assert client.settings.batch_size == 7 and client.settings.opt_out is True
        client.emit("after")  # the opt-out is in force at once: refused, not queued
        assert client.stats()["queued"] == 1
        assert [s["type"] for s in collector.signals] == ["first"]

    def test_transport_before_the_first_event_is_used(self, make_client: MakeClient) -> None:
        transport = MemoryTransport()
        client = make_client()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            client.configure(transport=transport)
        client.emit("first")
        assert client.flush(5)
        assert [s["type"] for s in transport.signals] == ["first"]


class Colour(enum.Enum):
    RED = "red"
    PAIR = (1, 2)
    ODD = object()


class Level(enum.IntEnum):
    HIGH = 2


class Mode(str, enum.Enum):
    FAST = "fast"


def encoded(payload: Any = None, float_value: Any = None, *, strict: bool = False
            ) -> Dict[str, Any]:
    """The signal the pipeline makes of one event with this payload and float value."""
    raw = ("evt", payload, Session(), None, 1_700_000_000.0, float_value_of(float_value))
    return build_signal(raw, EncodeContext(APP_ID, "", False, strict, Reporter()))


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.WARNING, logger="kaibantrace"):
        yield caplog


class TestFloatValue:
    @pytest.mark.parametrize(("given", "sent"), [
        (2.5, 2.5), (3, 3.0), (decimal.Decimal("1.5"), 1.5), (fractions.Fraction(1, 4), 0.25)])
    def test_numbers_are_sent(self, given: Any, sent: float) -> None:
        assert encoded(float_value=given)["floatValue"] == sent

    @pytest.mark.parametrize(("given", "said"), [
        ("3", "not a str"), (True, "not a bool"), (math.nan, "not NaN"),
        (math.inf, "not Infinity"), (-math.inf, "not -Infinity"), (10**400, "beyond a double"),
        (decimal.Decimal("NaN"), "not NaN")])
    def test_what_is_not_a_finite_number_is_left_out_with_a_warning(
            self, given: Any, said: str, logged: pytest.LogCaptureFixture) -> None:
        """The event is sent without floatValue, and the author is told why."""
        assert "floatValue" not in encoded(float_value=given)
        (message,) = logged.messages
        assert "float_value of 'evt' must be a finite number" in message and said in message

    def test_warned_once_per_cause(self, make_client: MakeClient, collector: Collector,
                                   logged: pytest.LogCaptureFixture) -> None:
        client = make_client()
        values: List[Any] = ["3", "4", math.nan, math.nan, 2.0]  # what a program may pass
        for value in values:
            client.emit("measured", float_value=value)
        assert client.flush(5)
        signals = collector.wait_for(5)
        assert [s.get("floatValue") for s in signals] == [None, None, None, None, 2.0]
        assert len(logged.messages) == 2

    @pytest.mark.parametrize("given", ["3", math.nan, True])
    def test_strict_mode_raises_at_the_call(self, given: Any, make_client: MakeClient) -> None:
        client = make_client(strict=True)
        with pytest.raises(EventError, match="float_value of 'measured'"):
            client.emit("measured", float_value=given)
        with capture() as signals, pytest.raises(EventError, match="finite number"):
            kaibantrace.Telemetry(app_id=APP_ID).emit("measured", float_value=given)
        assert signals == []


class TestPayloadValues:
    @pytest.mark.parametrize(("value", "text"), [
        (decimal.Decimal("1.10"), "1.1"),  # as the equal double prints in JavaScript
        (decimal.Decimal("2"), "2"),
        (decimal.Decimal("-0"), "0"),
        (decimal.Decimal("1e21"), "1e+21"),
        (decimal.Decimal("NaN"), "NaN"),
        (fractions.Fraction(1, 3), "0.3333333333333333"),
        (fractions.Fraction(6, 3), "2"),
        (Colour.RED, "red"),
        (Colour.PAIR, "[1,2]"),
        (Level.HIGH, "2"),
        (Mode.FAST, "fast"),
    ])
    def test_numbers_and_enum_members_are_sent(self, value: Any, text: str) -> None:
        """Decimal and Fraction as the JavaScript SDK would write the equal number; enum
        members by their value, whatever else the enum derives from."""
        assert encoded({"v": value})["payload"] == {"v": text}
        assert snapshot_payload({"v": value}) == {"v": text}  # the text is made at the call

    @pytest.mark.parametrize(("value", "shown", "why", "error"), [
        (b"abc", "bytes", "bytes have no one text form", EventError),
        (bytearray(b"abc"), "bytearray", "bytes have no one text form", EventError),
        (pathlib.PurePosixPath("/home/alice/notes.txt"), "PurePosixPath", "a path names the user's files",
         PrivacyError),
        (uuid.UUID(APP_ID), "UUID", "a UUID identifies one thing", PrivacyError),
        (Colour.ODD, "Colour", "only text, numbers, booleans, dates, enum members", EventError),
    ])
    def test_refused_values_say_why(self, value: Any, shown: str, why: str, error: type,
                                    logged: pytest.LogCaptureFixture) -> None:
        """The field is dropped with a warning naming the type and the reason, whether it
        was found at the call (a snapshot) or on the worker; strict mode raises."""
        assert "payload" not in encoded({"v": value})
        assert "payload" not in encoded(snapshot_payload({"v": value}))
        first, second = logged.messages
        assert first == second
        assert f"'v' of 'evt' is a {shown}; {why}" in first
        with pytest.raises(error, match=why):
            encoded({"v": value}, strict=True)
        if error is EventError:  # not a privacy refusal
            with pytest.raises(EventError) as raised:
                encoded({"v": value}, strict=True)
            assert not isinstance(raised.value, PrivacyError)

    def test_recognised_without_importing_their_modules(self) -> None:
        """Sending events imports none of decimal, fractions, numbers, uuid or pathlib."""
        code = textwrap.dedent("""
            import sys
            watched = ("decimal", "fractions", "numbers", "uuid", "pathlib")
            before = {name for name in watched if name in sys.modules}
            import kaibantrace
            from kaibantrace._client import capture as _capture
            sink = _capture.Capture(strict=False, respect_opt_out=False)
            _capture.captures.append(sink)  # what testing.capture() does; testing imports uuid
            kaibantrace.emit("evt", {"s": "x", "i": 1, "f": 1.5, "b": True, "o": object()},
                             float_value=2)
            assert sink.signals[0]["payload"] == {"s": "x", "i": "1", "f": "1.5", "b": "true"}
            print(sorted({name for name in watched if name in sys.modules} - before))
        """)
        result = subprocess.run([sys.executable, "-c", code], env=subprocess_env(),
                                capture_output=True, text=True, timeout=60, check=True)
        assert result.stdout.strip() == "[]"
