"""Where an event goes once the router (``router.Router.route``) decided: the answers.

``choose`` turns a decision into the function that takes a raw event:

* send: the sender's queue (the thread starts here, at the first event);
* debug: encode and print to stderr now, send nothing, start nothing;
* no app ID: drop (logged once at DEBUG);
* capture: encode now and record in memory (``kaibantrace.testing.capture``);
* after the exit hook, or where no thread can start: save to the outbox directly.

Every answer but a capture stands behind the client's budget (``_client.budget``).
The encoding a client does itself (now, for a capture, debug or strict mode,
or a batch on the sender's thread) is here too, so it is done one way.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from .._delivery.shared import Encoded
from .._encode.pipeline import (
    EncodeContext,
    RawEvent,
    build_signal,
    default_parameters,
    encode_body,
    encode_event,
)
from .._errors import DropEvent
from .._log import logger
from .._policy import prefs as _prefs
from .._policy.config import (
    Decision,
    app_id_of,
    decide,
    in_ci,
    ingest_url,
    keyed_with_local_secret,
    unusable_endpoint,
)
from .._policy.page import in_a_page
from .capture import Capture, captures

if TYPE_CHECKING:
    from .client import Telemetry

Accept = Callable[[RawEvent], None]


def choose(client: Telemetry, decision: Decision) -> Optional[Accept]:
    """The function that takes ``client``'s events now, or ``None`` when they are refused."""
    delivery = client._delivery
    if delivery.exited and decision.enabled and not decision.debug and decision.app_id:
        # An atexit handler that runs after ours (registered before our first
        # event) still emits: saved for the delivery process, never lost.
        return limited(client, delivery.save_after_exit, decision)
    if client._closed:
        return None
    if captures and (decision.enabled or (decision.decided_by != "code"
                                          and not captures[-1].respect_opt_out)):
        # A capture records every event, the budget aside: tests of an author's code
        # want to see each call's event, and a capture holds nothing for long.
        capture = captures[-1]
        if decision.app_id is None:
            # Opted out (the pytest plugin opts the whole run out) yet recorded: the
            # signals show the app they would be sent as, not an empty appID.
            decision = decision._replace(app_id=app_id_of(client._settings, os.environ))
        return lambda raw: _record(client, raw, capture, decision)
    if not decision.enabled:
        delivery.purge_outbox_once()
        return None
    if decision.debug:
        return limited(client, lambda raw: _print_debug(client, raw, decision), decision)
    if decision.app_id is None:
        return limited(client, lambda raw: _no_app_id(client, raw), decision)
    sender = delivery.sender or delivery.start_sender()
    if sender is None:  # the interpreter is exiting, or threads are refused here
        exiting = not threading.main_thread().is_alive()
        return limited(client, delivery.save_after_exit if exiting else delivery.save_directly,
                       decision)
    if client._settings.strict:
        def checked(raw: RawEvent) -> bool:
            try:
                encode_now(client, raw, decision, strict=True)
            except DropEvent as drop:
                client._lose(drop.cause)
                return False
            return True
        return limited(client, sender.accept, decision, checked)
    return limited(client, sender.accept, decision)


def limited(client: Telemetry, accept: Accept, decision: Decision,
            check: Optional[Callable[[RawEvent], bool]] = None) -> Accept:
    """``accept`` behind the client's budget (see ``_client.budget``), unless it has none.

    The budget stands before every way out of the process (the sender, a
    direct save, debug output), so what debug mode prints is what would be
    sent; only captures see every event.
    """
    if not client._settings.max_per_minute:
        if check is None:
            return accept

        def checked_only(raw: RawEvent) -> None:
            if check(raw):
                accept(raw)
        return checked_only
    return client._budget.limit(accept, carry=decision.profile != "kaibanjs", check=check)


def encoded_at_call(client: Telemetry) -> bool:
    """Whether ``client``'s events are encoded at the call (strict mode, a capture), where a
    payload's problems are reported in their usual order rather than refused by size."""
    return bool(client._settings.strict or captures)


# -- encoding ------------------------------------------------------------------

def context(client: Telemetry, decision: Decision, *, strict: bool,
            saves: bool = True) -> EncodeContext:
    """How ``client`` encodes now: its settings, the profile, the secret, the defaults.

    ``saves=False`` (a capture) keys identities without ever writing a secret."""
    s = client._settings
    kaibanjs = decision.profile == "kaibanjs"
    keyed = keyed_with_local_secret(s)
    ci = in_ci(os.environ)
    secret: Optional[Callable[[], bytes]] = None
    if keyed:
        persist = not ci and not in_a_page()  # a page's files go with it: no use saving
        secret = (lambda: _prefs.local_secret(persist=persist)) if saves else _prefs.unsaved_secret
    defaults = default_parameters(ci) if s.default_parameters and not kaibanjs else None
    if s.default_payload:  # the author's own, checked once when configured
        defaults = {**(defaults or {}), **s.default_payload}
    reporter = client._debug_reporter if decision.debug else client._reporter
    return EncodeContext(decision.app_id or "", s.salt, s.test_mode, strict, reporter,
                         secret, defaults, decision.cli_app_id)


def encode_now(client: Telemetry, raw: RawEvent, decision: Decision, *, strict: bool,
               saves: bool = True) -> Dict[str, Any]:
    return build_signal(raw, context(client, decision, strict=strict, saves=saves))


def encode_batch(client: Telemetry, batch: List[RawEvent]) -> Optional[Encoded]:
    """On the sender's thread (or at exit): decide again, then encode the batch."""
    settings = client._settings
    decision = decide(settings, os.environ)
    counters = client._counters
    if not decision.enabled or decision.app_id is None:
        counters.drop("opted_out" if not decision.enabled else "no_app_id", len(batch))
        return None
    url = ingest_url(settings, os.environ)
    if url is None:
        counters.drop("bad_endpoint", len(batch))
        return None
    ctx = context(client, decision, strict=False)
    encoded = []
    for raw in batch:
        try:
            encoded.append((raw[4], encode_event(raw, ctx)))
        except DropEvent as drop:
            counters.drop(drop.cause)
        except Exception:  # one event that cannot be encoded never costs the batch
            logger.debug("kaibantrace: could not encode an event", exc_info=True)
            counters.drop("encode_error")
    if decision.debug:
        for _, text in encoded:
            sys.stderr.write(f"[kaibantrace debug] would send to {url}: [{text}]\n")
        counters.drop("debug", len(encoded))
        return None
    return Encoded(decision.app_id, url, encoded)


# -- the sinks that are not the sender ------------------------------------------

def _print_debug(client: Telemetry, raw: RawEvent, decision: Decision) -> None:
    try:
        signal = encode_now(client, raw, decision, strict=client._settings.strict)
    except DropEvent as drop:
        client._lose(drop.cause)
        return
    url = (ingest_url(client._settings, os.environ)
           or f"no usable endpoint ({unusable_endpoint(os.environ)})")
    note = "" if decision.app_id else " (no app ID configured, so nothing would be sent)"
    sys.stderr.write(f"[kaibantrace debug] would send to {url}{note}: "
                     f"{encode_body([signal]).decode('utf-8')}\n")


def _record(client: Telemetry, raw: RawEvent, capture: Capture, decision: Decision) -> None:
    try:
        capture.signals.append(encode_now(client, raw, decision, strict=capture.strict,
                                          saves=False))
    except DropEvent as drop:
        client._lose(drop.cause)


def _no_app_id(client: Telemetry, raw: RawEvent) -> None:
    client._lose("no_app_id")
    if client._settings.strict:
        encode_now(client, raw, decide(client._settings, os.environ), strict=True)
    if not client._no_app_id_logged:
        client._no_app_id_logged = True
        logger.debug("kaibantrace: no app ID configured; events are not sent")
