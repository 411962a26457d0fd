"""The signal budget: at most N signals of each event name a minute, per client.

A tracked function called in a tight loop (a library's test suite, a hot code
path) would otherwise queue an event per call: millions of calls fill the
queue, drop what overflows, hold megabytes while they wait, and spend an
author's monthly TelemetryDeck allowance in one run. Nobody reads a million
identical signals; they want to know the function ran, and roughly how often.

So each client keeps a token bucket per event name, checked on the calling
thread before an event is queued: ``max_per_minute`` tokens at most (the burst),
refilled at ``max_per_minute`` a minute. An event that finds no token is held
back: nothing of it is kept but a count. The next signal of that name that gets
through carries the count (``kaibantrace.held_back`` in its payload, as text),
so the dashboard can still add up the calls; ``stats()["held_back"]`` has the
total. A CLI run, which sends a handful of signals, never meets the limit.

The check costs a dictionary look-up and some arithmetic, with no lock: under
the GIL two threads may now and then both take the last token or miss each
other's count, which only makes the limit and the counts approximate. (A
free-threaded build would want a lock per bucket, or a bucket per thread.)
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional

from .._encode.outcome import Failure, Measured
from .._encode.pipeline import CleanPayload, RawEvent

HELD_BACK_KEY = "kaibantrace.held_back"
"""The payload field that carries how many signals of the name were held back before this one."""

MAX_NAMES = 1024
"""Event names with a bucket of their own; further names share one, so a program that
makes names up as it goes cannot grow this table without bound."""

_OTHER_NAMES = "\x00other"  # never a valid event name

Accept = Callable[[RawEvent], None]


class Budget:
    """A token bucket per event name, and the count of what it held back."""

    __slots__ = ("_buckets", "_burst", "_rate", "held_back")

    def __init__(self, per_minute: int) -> None:
        # name -> [tokens, time of the last look, held back since the last signal let through]
        self._buckets: Dict[str, List[float]] = {}
        self._burst = 0.0
        self._rate = 0.0
        self.held_back = 0
        self.set_rate(per_minute)

    def set_rate(self, per_minute: int) -> None:
        """A new limit (``configure``); buckets keep their tokens, up to the new burst."""
        self._burst = float(per_minute)
        self._rate = per_minute / 60.0
        for bucket in list(self._buckets.values()):
            bucket[0] = min(bucket[0], self._burst)

    def limit(self, accept: Accept, *, carry: bool,
              check: Optional[Callable[[RawEvent], bool]] = None) -> Accept:
        """``accept`` (where a client's events go) behind this budget.

        An event takes a token of its name at its own time stamp, or is held
        back and counted. One that goes after a hold carries the count, unless
        ``carry`` is false (the KaibanJS profile, whose signals carry nothing
        kaibantrace adds: there the count is in ``stats()`` only). ``check``, in
        strict mode, runs first and says whether the event may go on, so every
        event is checked even when the budget then holds it back.

        The clock may jump: a step back refills nothing and refilling starts
        again from the new time; a step forward refills at most the burst.
        One closure, the bucket arithmetic written out in it: this runs for
        every event, and a method call more would cost as much as the rest.
        """
        buckets = self._buckets

        def limited(raw: RawEvent) -> None:
            if check is not None and not check(raw):
                return
            name = raw[0]
            now = raw[4]
            try:
                bucket = buckets.get(name) or self._bucket(name, now)
            except TypeError:  # an unhashable "name": let the pipeline refuse and count it
                accept(raw)
                return
            tokens = bucket[0]
            elapsed = now - bucket[1]
            bucket[1] = now
            if elapsed > 0.0:
                tokens += elapsed * self._rate
                if tokens > self._burst:
                    tokens = self._burst
            if tokens < 1.0:
                bucket[0] = tokens
                bucket[2] += 1
                self.held_back += 1
                return
            bucket[0] = tokens - 1.0
            if bucket[2]:
                held = int(bucket[2])
                bucket[2] = 0
                carrying = with_held_back(raw, held) if carry else raw
                if carrying is None:  # its payload will not be sent: the next one carries it
                    bucket[2] += held
                else:
                    raw = carrying
            accept(raw)

        return limited

    def grant(self, name: str, now: float) -> None:
        """One token more for ``name``: the next event of that name goes, whatever the
        budget (the CLI's install event, sent once per project, is never held back)."""
        bucket = self._buckets.get(name) or self._bucket(name, now)
        bucket[0] = max(bucket[0], 0.0) + 1.0

    def _bucket(self, name: str, now: float) -> List[float]:
        if len(self._buckets) >= MAX_NAMES:
            shared = self._buckets.get(_OTHER_NAMES)
            if shared is not None:
                return shared
            name = _OTHER_NAMES
        bucket = self._buckets[name] = [self._burst, now, 0]
        return bucket


def with_held_back(raw: RawEvent, held: int) -> Optional[RawEvent]:
    """``raw`` with ``held`` in its payload, or ``None`` when its payload will not be sent
    (a payload callable failed, or the payload was refused at the call).

    A new payload every time, never the one given: a decorator's static payload
    is shared by every call, and a caller's mapping is the caller's. Only the
    signals let through after a hold pay for it, at most one a token.
    """
    name, payload, session, identifier, timestamp, float_value = raw
    if type(payload) in (Measured, Failure):  # a timed event or an error: its inner payload
        inner = with_held_back((name, payload.payload, session, identifier, timestamp,
                                float_value), held)
        if inner is None:
            return None
        return (name, payload.with_payload(inner[1]), session, identifier, timestamp,
                float_value)
    text = str(held)
    fields: Any
    if payload is None:
        fields = {HELD_BACK_KEY: text}
    elif type(payload) is CleanPayload:  # cleaned already; the field added is clean too
        fields = CleanPayload({**payload, HELD_BACK_KEY: text})
    elif isinstance(payload, Mapping):
        fields = {**payload, HELD_BACK_KEY: text}
    else:
        return None
    return (name, fields, session, identifier, timestamp, float_value)
