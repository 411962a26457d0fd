"""The payload an event keeps from its call: what will be sent, as it was then, and never
more memory than that (``snapshot_payload``)."""

from __future__ import annotations

import datetime
import json
import logging
import subprocess
import sys
import textwrap
from collections import OrderedDict
from types import MappingProxyType
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kaibantrace
from kaibantrace import EventError, PrivacyError
from kaibantrace._encode import payload as _payload
from kaibantrace._encode.identity import Session
from kaibantrace._encode.pipeline import (
    MAX_PAYLOAD_BYTES,
    CleanPayload,
    EncodeContext,
    PayloadFailed,
    PayloadRefused,
    Reporter,
    Unsendable,
    clean_payload,
    encode_event,
    snapshot_payload,
)
from kaibantrace._errors import DropEvent
from kaibantrace.testing import Collector, capture

from .conftest import APP_ID, subprocess_env
from .test_fuzz import PAYLOADS

MakeClient = Callable[..., kaibantrace.Telemetry]
OVERSIZED_WARNING = f"is over {MAX_PAYLOAD_BYTES} bytes encoded; sent without payload"


def payloads(collector: Collector, count: int, name: str) -> List[Optional[Dict[str, str]]]:
    """The payloads of the first ``count`` signals called ``name`` (``None``: no payload)."""
    signals = collector.wait_for(count)
    return [s.get("payload") for s in signals if s["type"] == name]


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """kaibantrace's WARNING messages, in ``logged.messages``."""
    with caplog.at_level(logging.WARNING, logger="kaibantrace"):
        yield caplog


class TestSentAsAtTheCall:
    """The worker encodes later; what the caller changes meanwhile must not reach the wire.
    A long flush interval keeps the event queued until ``flush()``, after the change."""

    def test_a_list_changed_after_emit(self, make_client: MakeClient,
                                       collector: Collector) -> None:
        client = make_client(flush_interval=5.0)
        tags = ["first"]
        client.emit("tagged", {"tags": tags, "count": 1})
        tags.append("later")
        tags[0] = "changed"
        assert client.flush(10)
        assert payloads(collector, 1, "tagged") == [{"tags": '["first"]', "count": "1"}]

    def test_a_mapping_inside_the_payload_and_the_payload_itself(
            self, make_client: MakeClient, collector: Collector) -> None:
        client = make_client(flush_interval=5.0)
        options: Dict[str, Any] = {"fast": True}
        payload: Dict[str, Any] = {"options": options, "mode": "run"}
        client.emit("configured", payload)
        options["fast"] = False
        options["extra"] = 1
        payload["mode"] = "changed"
        payload["added"] = "later"
        assert client.flush(10)
        assert payloads(collector, 1, "configured") == [{"options": '{"fast":true}', "mode": "run"}]

    def test_a_list_a_payload_callable_returns(self, make_client: MakeClient,
                                               collector: Collector) -> None:
        """The payload callable runs at the call; the function then fills the very list
        it returned."""
        client = make_client(flush_interval=5.0)

        @client.track("job_run", payload=lambda args: {"steps": args["steps"]})
        def job(steps: List[str]) -> None:
            steps.append("ran")

        job(["queued"])
        assert client.flush(10)
        assert payloads(collector, 1, "job_run") == [{"steps": '["queued"]'}]

    def test_a_callable_returning_a_list_as_its_payload(
            self, make_client: MakeClient, collector: Collector,
            logged: pytest.LogCaptureFixture) -> None:
        """Not a mapping: sent without payload, reported with the type it had at the call."""
        client = make_client(flush_interval=5.0)
        returned: List[Any] = []

        @client.track("listed", payload=lambda args: returned)
        def job() -> None:
            returned.append({"now": "a mapping inside"})

        job()
        assert client.flush(10)
        assert payloads(collector, 1, "listed") == [None]
        assert [m for m in logged.messages if "must be a mapping" in m] == [
            "kaibantrace: payload of 'listed' must be a mapping, not list; sent without payload"]


class TestBoundedMemory:
    def test_oversized_payloads_are_refused_at_the_call_and_reported_once(
            self, make_client: MakeClient, collector: Collector,
            logged: pytest.LogCaptureFixture) -> None:
        client = make_client()
        for i in range(3):
            client.emit("huge", {"blob": "y" * 100_000 + str(i), "small": "kept?"})
        assert client.flush(10)
        assert payloads(collector, 3, "huge") == [None, None, None]
        assert [m for m in logged.messages if OVERSIZED_WARNING in m] == [
            f"kaibantrace: payload of 'huge' {OVERSIZED_WARNING}"]

    def test_what_is_queued_is_a_shared_marker_not_the_text(self) -> None:
        """The point of the check at the call: the queue never holds the 100 KB."""
        first = snapshot_payload({"blob": "y" * 100_000})
        second = snapshot_payload({"other": ["z" * 5_000]})
        assert isinstance(first, PayloadRefused) and first.cause == "size"
        assert first is second

    # Run in a child: the figure must not depend on what this test process loaded before.
    _CHILD = textwrap.dedent("""
        import json, logging, os, resource, sys
        import kaibantrace

        warnings = []

        class Collect(logging.Handler):
            def emit(self, record):
                warnings.append(record.getMessage())

        logging.getLogger("kaibantrace").addHandler(Collect(logging.WARNING))
        # A queue as long as the burst, so that every event is kept: it is the bytes
        # each one holds that are measured here, not the queue bound in events.
        client = kaibantrace.Telemetry(os.environ["APP"], endpoint=os.environ["URL"],
                                       max_queue=20_000, max_per_minute=0)
        client.emit("warm_up")  # the sender, the outbox and the HTTP stack load first
        assert client.flush(30)
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes there, KiB here
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        for i in range(20_000):
            client.emit("x", {"blob": "y" * 100_000 + str(i)})
        flushed = client.flush(120)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        print(json.dumps({"growth": after - before, "flushed": flushed,
                          "warnings": warnings, "stats": client.stats()}))
    """)

    @pytest.mark.skipif(sys.platform == "win32", reason="the resource module is POSIX only")
    def test_twenty_thousand_100_kb_payloads_take_little_memory(self, collector: Collector
                                                                ) -> None:
        """The case that took 1.2 GB: each event carries a fresh 100 KB string."""
        done = subprocess.run([sys.executable, "-c", self._CHILD], timeout=300,
                              env=subprocess_env(APP=APP_ID, URL=collector.url),
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["growth"] <= 60 * 1024 * 1024, result
        assert result["flushed"] is True, result
        assert [m for m in result["warnings"] if OVERSIZED_WARNING in m] == [
            f"kaibantrace: payload of 'x' {OVERSIZED_WARNING}"]
        signals = [s for s in collector.wait_for(20_001, timeout=60) if s["type"] == "x"]
        assert len(signals) == 20_000
        assert not any("payload" in s for s in signals)


class TestStrictModeRaisesAsBefore:
    """Strict mode encodes at the call; the size check at the call must not change which
    problem it raises."""

    def test_oversized(self, make_client: MakeClient) -> None:
        client = make_client(strict=True)
        with pytest.raises(EventError, match="over 4096 bytes"):
            client.emit("huge", {"blob": "y" * 100_000})

    def test_personal_data_in_an_oversized_field_is_a_privacy_error(
            self, make_client: MakeClient) -> None:
        client = make_client(strict=True)
        with pytest.raises(PrivacyError):
            client.emit("huge", {"log": "mail alice@example.com " + "y" * 10_000})

    def test_a_reserved_key_comes_before_the_size(self, make_client: MakeClient) -> None:
        client = make_client(strict=True)
        with pytest.raises(EventError, match="reserved"):
            client.emit("huge", {"type": "x", "blob": "y" * 10_000})

    def test_not_a_mapping_and_unsendable_values(self, make_client: MakeClient) -> None:
        client = make_client(strict=True)
        with pytest.raises(EventError, match="must be a mapping, not list"):
            client.emit("bad", ["a"])  # type: ignore[arg-type]
        with pytest.raises(EventError, match="'deep' of 'bad' is a list"):
            client.emit("bad", {"deep": [[1]]})

    def test_in_a_capture_too(self) -> None:
        with capture() as signals, pytest.raises(PrivacyError):
            kaibantrace.emit("huge", {"log": "mail alice@example.com " + "y" * 10_000})
        assert signals == []

    def test_a_decorator_payload_callable(self, make_client: MakeClient) -> None:
        client = make_client(strict=True)

        @client.track("job", payload=lambda args: {"log": "alice@example.com " + "y" * 10_000})
        def job() -> None:
            pass

        with pytest.raises(PrivacyError):
            job()


class TestSnapshot:
    def test_scalars_are_kept_as_they_are(self) -> None:
        when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
        payload = {"s": "text", "i": 3, "f": 1.5, "b": True, "n": None, "d": when,
                   "day": datetime.date(2026, 1, 2)}
        snapshot = snapshot_payload(payload)
        assert snapshot == payload and snapshot is not payload
        assert all(snapshot[k] is v for k, v in payload.items())

    def test_containers_become_the_text_that_is_sent(self) -> None:
        snapshot = snapshot_payload({"l": [1, "a", None], "t": (True, 2.5), "m": {"k": "v"}})
        assert snapshot == {"l": '[1,"a",null]', "t": "[true,2.5]", "m": '{"k":"v"}'}

    def test_what_cannot_be_sent_is_named_by_its_type(
            self, logged: pytest.LogCaptureFixture) -> None:
        snapshot = snapshot_payload({"deep": [[1]], "set": {1}, "obj": object()})
        assert {k: type(v) for k, v in snapshot.items()} == dict.fromkeys(snapshot, Unsendable)
        assert clean_payload("evt", snapshot, Reporter(), strict=False) == {}
        assert len(logged.messages) == 3
        assert "'deep' of 'evt' is a list" in logged.messages[0]
        assert "'set' of 'evt' is a set" in logged.messages[1]
        assert "'obj' of 'evt' is a object" in logged.messages[2]

    def test_other_mappings_are_copied_too(self) -> None:
        assert snapshot_payload(OrderedDict(a=[1])) == {"a": "[1]"}
        assert snapshot_payload(MappingProxyType({"a": 1})) == {"a": 1}

    def test_markers_pass_through(self) -> None:
        static = CleanPayload({"a": "1"})
        failed = PayloadFailed("ValueError")
        assert snapshot_payload(static) is static
        assert snapshot_payload(failed) is failed
        assert snapshot_payload(None) is None

    def test_a_mapping_that_fails_when_read(self, logged: pytest.LogCaptureFixture) -> None:
        class Broken(Mapping[str, str]):
            def __getitem__(self, key: str) -> str:
                raise KeyError(key)

            def __iter__(self) -> Iterator[str]:
                raise RuntimeError("no")

            def __len__(self) -> int:
                return 1

        snapshot = snapshot_payload(Broken())
        assert isinstance(snapshot, PayloadRefused)
        assert clean_payload("evt", snapshot, Reporter(), strict=False) == {}
        assert logged.messages == [
            "kaibantrace: payload of 'evt' could not be read (RuntimeError); sent without payload"]

    @pytest.mark.parametrize("payload", [
        {"type": "y" * 5_000, "ok": "1"},  # a reserved key is dropped on the worker anyway
        {"": "y" * 5_000, "ok": "1"},
        {1: "y" * 5_000, "ok": "1"},
        {"bad": "\ud800" * 5_000, "ok": "1"},  # not valid Unicode: dropped too
        {"deep": [[1]] * 2_000, "ok": "1"},
        {"n": None, "ok": "y" * 4_000},
    ])
    def test_refused_only_when_what_would_be_kept_cannot_fit(self, payload: Dict[Any, Any]
                                                             ) -> None:
        """Fields the worker drops for their key, type or encoding do not count."""
        snapshot = snapshot_payload(payload)
        assert isinstance(snapshot, dict)
        assert clean_payload("evt", snapshot, Reporter(), strict=False) == clean_payload(
            "evt", payload, Reporter(), strict=False) != {}

    def test_the_bound_is_a_lower_bound(self) -> None:
        """Just under the limit is kept for the exact check; one more byte, refused."""
        text = "y" * (MAX_PAYLOAD_BYTES - len('{"k":""}'))
        assert isinstance(snapshot_payload({"k": text}), dict)
        assert clean_payload("evt", {"k": text}, Reporter(), strict=False) == {"k": text}
        assert isinstance(snapshot_payload({"k": text + "y"}), PayloadRefused)


# -- the snapshot changes nothing that is sent ---------------------------------------

class Recorder(Reporter):
    """A reporter that keeps what it would log."""

    def __init__(self) -> None:
        super().__init__()
        self.said: List[Tuple[str, str, str]] = []

    def problem(self, cause: str, event: str, key: str, message: str, *, strict: bool,
                privacy: bool = False) -> None:
        self.said.append((cause, key, message))


def encoded(payload: Any) -> Tuple[Optional[str], List[Tuple[str, str, str]]]:
    reporter = Recorder()
    ctx = EncodeContext(APP_ID, "", False, False, reporter)
    raw = ("evt", payload, SESSION, None, 1_700_000_000.0, None)
    try:
        return encode_event(raw, ctx), reporter.said
    except DropEvent:
        return None, reporter.said


SESSION = Session()
# Values of 2,100 to 4,100 characters: one alone is near the bound (over it in bytes when
# the characters are not ASCII), two are always over it.
BIG_VALUES = st.one_of(st.text(min_size=2_100, max_size=4_100),
                       st.lists(st.text(min_size=2_100, max_size=4_100), max_size=2))
WITH_BIG_VALUES = st.one_of(*(st.dictionaries(st.text(max_size=10), BIG_VALUES, min_size=size,
                                              max_size=4) for size in (1, 2)))


def assert_sent_and_said_alike(payload: Any) -> None:
    """Encoding the snapshot gives the same signal and the same warnings as encoding the
    payload itself; a payload refused as too big at the call is too big without the fields
    the privacy guard would drop (which it cannot know without running it)."""
    snapshot = snapshot_payload(payload)
    if isinstance(snapshot, PayloadRefused) and snapshot.cause == "size":
        assert encoded(snapshot) == (encoded({})[0], [
            ("size", "", f"payload of 'evt' {OVERSIZED_WARNING}")])
        with mock.patch.object(_payload, "personal_data_kind", lambda text: None):
            text, said = encoded(payload)
        assert text == encoded({})[0] and said[-1][0] == "size"
        return
    assert encoded(snapshot) == encoded(payload)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(payload=PAYLOADS)
def test_the_worker_sends_and_says_the_same_from_the_snapshot(payload: Any) -> None:
    assert_sent_and_said_alike(payload)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(payload=WITH_BIG_VALUES)
def test_the_same_for_payloads_near_and_over_the_bound(payload: Any) -> None:
    assert_sent_and_said_alike(payload)
