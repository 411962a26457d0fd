"""Names, payload conversion, the privacy guard and the size limit."""

from __future__ import annotations

import datetime
import logging
import os
import socket

import pytest

from kaibantrace import EventError, PrivacyError
from kaibantrace._encode.identity import Session
from kaibantrace._encode.pipeline import (
    EncodeContext,
    Reporter,
    build_signal,
    clean_payload,
    js_text,
    name_problem,
    received_at,
)
from kaibantrace._encode.privacy import forget_local_markers, personal_data_kind


def clean(payload: object, strict: bool = False) -> dict[str, str]:
    return clean_payload("evt", payload, Reporter(), strict)


class TestNames:
    @pytest.mark.parametrize("name", ["workflow_started", "a", "x" * 128, "a.b:c-d_e", "Run9"])
    def test_valid(self, name: str) -> None:
        """Letters, digits and _ . : - up to 128 characters make a valid name."""
        assert name_problem(name) is None

    @pytest.mark.parametrize(("name", "says"), [
        ("", "empty"), ("x" * 129, "128"), ("has space", "only contain"), ("é", "only contain"),
        ("TelemetryDeck.Session.started", "reserved"), (123, "string"),
    ])
    def test_invalid(self, name: object, says: str) -> None:
        """Bad names are refused with a reason that says what is wrong."""
        problem = name_problem(name)
        assert problem is not None and says in problem


class TestJavaScriptText:
    @pytest.mark.parametrize(("value", "text"), [
        (True, "true"), (False, "false"), (3, "3"), (-7, "-7"), (1.0, "1"), (1.5, "1.5"),
        (0.1, "0.1"), (1e21, "1e+21"), (1e-7, "1e-7"), (123456789012345680000.0, "123456789012345680000"),
        (0.000001, "0.000001"), (float("inf"), "Infinity"), (float("nan"), "NaN"), (-0.0, "0"),
        ("text", "text"),
    ])
    def test_scalars_match_the_javascript_sdk(self, value: object, text: str) -> None:
        """Booleans, numbers and strings are written as JavaScript writes them."""
        assert js_text(value) == text

    def test_dates_are_iso_8601(self) -> None:
        """Dates become ISO-8601 text, datetimes in UTC with milliseconds."""
        aware = datetime.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=datetime.timezone.utc)
        assert js_text(aware) == "2026-01-02T03:04:05.678Z"
        assert js_text(datetime.date(2026, 1, 2)) == "2026-01-02"

    def test_naive_datetimes_are_local_time(self) -> None:
        """A naive datetime is taken as local time and sent in UTC, as Python treats it."""
        naive = datetime.datetime(2026, 1, 2, 3, 4, 5)
        expected = naive.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        assert js_text(naive) == expected

    def test_received_at_format(self) -> None:
        """receivedAt looks like JavaScript's Date.toISOString(), second after second."""
        assert received_at(0.25) == "1970-01-01T00:00:00.250Z"
        assert received_at(0.999) == "1970-01-01T00:00:00.999Z"
        assert received_at(86_401.5) == "1970-01-02T00:00:01.500Z"
        assert received_at(0.0) == "1970-01-01T00:00:00.000Z"


class TestPayload:
    def test_values_become_text(self) -> None:
        """Payload values are converted to text the way the JavaScript SDK converts them."""
        assert clean({"n": 3, "ok": True, "r": 2.0, "s": "x", "d": {"a": 1}, "l": [1, "b"]}) == {
            "n": "3", "ok": "true", "r": "2", "s": "x", "d": '{"a":1}', "l": '[1,"b"]'}

    def test_none_values_are_left_out(self) -> None:
        """A None value means "no value" and is simply not sent."""
        assert clean({"a": None, "b": 1}) == {"b": "1"}

    def test_nested_and_odd_values_are_dropped_with_one_warning(
            self, caplog: pytest.LogCaptureFixture) -> None:
        """Deeper nesting and arbitrary objects are dropped, warned about once per cause."""
        reporter = Reporter()
        with caplog.at_level(logging.WARNING, logger="kaibantrace"):
            for _ in range(3):
                result = clean_payload("evt", {"deep": {"a": {"b": 1}}, "obj": object(), "ok": 1},
                                       reporter, False)
        assert result == {"ok": "1"}
        assert len(caplog.records) == 2
        assert "'deep'" in caplog.text and "'obj'" in caplog.text

    def test_reserved_keys_are_dropped(self) -> None:
        """TelemetryDeck's reserved keys never travel inside a payload."""
        assert clean({"type": "x", "clientUser": "u", "TelemetryDeck.Device.os": "x", "k": "v"}) == {
            "k": "v"}

    def test_oversized_payload_is_dropped_whole(self) -> None:
        """A payload over 4 KiB encoded is sent as no payload at all."""
        assert clean({f"k{i}": "v" * 100 for i in range(50)}) == {}

    def test_payload_at_the_size_limit(self) -> None:
        """The 4 KiB limit counts the compact JSON bytes exactly, multi-byte characters included."""
        fits = {"k": "é" * 2043}  # {"k":"..."} is 8 + 2 x 2043 = 4094 bytes
        assert clean(fits) == fits
        assert clean({"k": "é" * 2045}) == {}

    def test_text_that_is_not_valid_unicode_is_dropped(self, caplog: pytest.LogCaptureFixture
                                                       ) -> None:
        """A lone surrogate cannot be sent as UTF-8: that field is dropped, the rest kept."""
        with caplog.at_level(logging.WARNING, logger="kaibantrace"):
            assert clean({"bad": "a\ud800b", "ok": "ü"}) == {"ok": "ü"}
            assert clean({"\udc00": "v", "ok": 1}) == {"ok": "1"}
        assert "lone surrogate" in caplog.text

    def test_not_a_mapping(self) -> None:
        """A payload that is not a mapping is dropped (it comes from a callable at run time)."""
        assert clean(["a"]) == {}

    def test_strict_mode_raises(self) -> None:
        """In strict mode the problem raises EventError instead of being logged."""
        with pytest.raises(EventError, match="'obj'"):
            clean({"obj": object()}, strict=True)


class TestPrivacyGuard:
    @pytest.mark.parametrize("text", [
        "mail me at Bob.Smith@Example.org please", "bob%40example.org",
        "10.0.0.12", "server 192.168.1.1:8080", "fe80::1ff:fe23:4567:890a", "::1",
        "sk-abcdefghijklmnopqrstuvwxyz123456", "ghp_ABCDEFghijkl1234567890abcdefghij",
        "Xy7Qm2Lp9Rt4Vw8Zk3Nb6Hc1Jd5Fg0Sa", "nic 00:1A:2b:3C:4d:5E", "00-1a-2b-3c-4d-5e",
    ])
    def test_personal_or_secret_text_is_recognised(self, text: str) -> None:
        """E-mail and IP addresses and token-like secrets are recognised, however embedded."""
        assert personal_data_kind(text) is not None

    def test_home_directory_is_recognised_in_any_disguise(self) -> None:
        """The home directory is caught plain, URL-encoded, upper-cased and with backslashes."""
        home = os.path.expanduser("~")
        if home in ("/", "~"):
            pytest.skip("this account has no home directory to look for")
        for text in (home + "/project/x.py", "file://" + home.replace("/", "%2F"),
                     home.upper(), home.replace("/", "\\")):
            assert personal_data_kind(text) is not None, text

    def test_user_name_is_recognised_as_a_word(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The login name is caught as a word of its own, not inside other words."""
        monkeypatch.setenv("LOGNAME", "alice.smith")
        forget_local_markers()
        try:
            assert personal_data_kind("report by Alice.Smith today") == "the user name"
            assert personal_data_kind("alice.smiths") is None
            assert personal_data_kind("alice.smith_cause") is None
        finally:
            monkeypatch.undo()
            forget_local_markers()

    def test_shared_service_accounts_are_not_personal(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A shared account name such as "runner" does not refuse the ordinary word."""
        monkeypatch.setenv("LOGNAME", "runner")
        forget_local_markers()
        try:
            assert personal_data_kind("runner") is None
        finally:
            monkeypatch.undo()
            forget_local_markers()

    @pytest.mark.parametrize("text", ["3", "workflow_started", "1.2.3", "12:30:45", "linux",
                                      "python 3.11.7", "a1b2c3d"])
    def test_ordinary_values_pass(self, text: str) -> None:
        """Version numbers, times, short commit IDs and plain words are not personal data
        (a 32-digit hex digest is refused: see test_privacy_guard.py)."""
        assert personal_data_kind(text) is None

    def test_refused_field_warning_names_the_key_not_the_value(
            self, caplog: pytest.LogCaptureFixture) -> None:
        """A refused field is dropped; the WARNING names its key and never its value."""
        with caplog.at_level(logging.WARNING, logger="kaibantrace"):
            result = clean({"contact": "alice@example.com", "n": 1})
        assert result == {"n": "1"}
        assert "'contact'" in caplog.text and "alice@example.com" not in caplog.text

    def test_strict_mode_raises_privacy_error(self) -> None:
        """In strict mode a personal value raises PrivacyError, an EventError."""
        with pytest.raises(PrivacyError, match="'ip'"):
            clean({"ip": "8.8.8.8"}, strict=True)

    def test_host_name_is_recognised(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """This machine's host name is caught as a word of its own."""
        monkeypatch.setattr(socket, "gethostname", lambda: "alices-laptop.local")
        forget_local_markers()
        try:
            assert personal_data_kind("built on Alices-Laptop") == "the host name"
        finally:
            monkeypatch.undo()
            forget_local_markers()

    def test_event_names_are_checked_at_run_time(self) -> None:
        """An emitted event name that looks personal is refused, and the warning omits it."""
        ctx = EncodeContext("app", "", False, True, Reporter())
        raw = ("10.1.2.3", None, Session(), None, 0.0, None)
        with pytest.raises(PrivacyError) as refused:
            build_signal(raw, ctx)
        assert "10.1.2.3" not in str(refused.value)

    def test_keys_are_checked_too(self) -> None:
        """Personal data hidden in a key is refused as well."""
        assert clean({"alice@example.com": "1"}) == {}


class TestFastEncoding:
    def test_encode_event_is_byte_for_byte_the_plain_encoding(self) -> None:
        """The worker's fast path gives exactly ``encode_signal(build_signal(...))``, and
        refuses exactly what it refuses, over many generated events."""
        import random

        from kaibantrace._encode.pipeline import DropEvent, encode_event, encode_signal

        rng = random.Random(20261202)
        sessions = [Session() for _ in range(3)]
        names = ["run", "workflow_started", 'quote"name', "ünïcode", "x" * 200, "", "a b",
                 "bad\nname"]
        values = [1, -2.5, 1e21, True, None, "plain", 'with "quotes" and \\ slash', "é\u2028",
                  datetime.date(2026, 12, 2), [1, "a", None], {"k": 1}, {"deep": {"x": 1}},
                  object(), float("nan"), "x" * 5000]
        contexts = [
            EncodeContext("APP-1", "", False, False, Reporter()),
            EncodeContext("APP-2", "salt", True, False, Reporter(), secret=lambda: b"s" * 32),
            EncodeContext("APP-3", "", False, False, Reporter(),
                          defaults={"kaibantrace.python": "3.11"}),
        ]
        compared = refused = 0
        for _ in range(3000):
            payload = None if rng.random() < 0.3 else {
                rng.choice(["a", "b", "type", "telemetryDeck.x", "count", ""]): rng.choice(values)
                for _ in range(rng.randint(0, 4))}
            raw = (rng.choice(names), payload, rng.choice(sessions),
                   rng.choice([None, "project-id"]), 1_764_633_600 + rng.random() * 1e6,
                   rng.choice([None, 0.5, -3.0, 1e300]))
            ctx = rng.choice(contexts)
            try:
                expected = encode_signal(build_signal(raw, ctx))  # type: ignore[arg-type]
            except DropEvent as plain:
                with pytest.raises(DropEvent) as fast:
                    encode_event(raw, ctx)  # type: ignore[arg-type]
                assert fast.value.cause == plain.cause
                refused += 1
                continue
            assert encode_event(raw, ctx) == expected  # type: ignore[arg-type]
            compared += 1
        assert compared > 500 and refused > 100  # both paths well exercised
