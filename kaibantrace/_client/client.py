"""``Telemetry``: one independent client, and the machinery every client shares.

The hot path is ``Telemetry._route()``. It reads the raw environment values
that decide (the client's opt-out variable, ``KAIBAN_TELEMETRY_OPT_OUT``,
``DO_NOT_TRACK``, debug, app ID, profile) straight from ``os.environ``'s
storage and compares them, by identity, with what it saw last time; only when
something changed, or ``configure()``/``testing.capture()`` ran, does it call
``_policy.config.decide`` again. So opt-out is honoured whenever it is set, at the
cost of a few dictionary look-ups per event.

``_route()`` answers with the function that takes a raw event, or ``None``
when the client is opted out. The answers are:

* send: append to the background ``Sender``'s queue (the thread starts here,
  at the first event, never at import);
* debug: encode and print to stderr now, send nothing, start nothing;
* no app ID: drop (logged once at DEBUG);
* capture: encode now and record in memory (``kaibantrace.testing.capture``).

Every answer but a capture stands behind the client's budget (``_client.budget``):
at most ``max_per_minute`` signals of each event name a minute, the rest
counted rather than queued, so a tracked function in a tight loop costs a
dictionary look-up per call, not a queued event.

Process-wide duties (exit flush, fork) are registered once, when the first
sender starts, so an opted-out process registers nothing either.
"""

from __future__ import annotations

import atexit
import contextvars
import itertools
import os
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Tuple, TypeVar

from .. import _fork, events
from .._delivery import handoff as _handoff
from .._delivery import sentlog as _sentlog
from .._delivery.outbox import MemoryOutbox, Outbox, open_outbox
from .._delivery.outbox import purge as purge_outbox
from .._delivery.poster import SETUP_DELAY, SETUP_DELAY_WITH_HAND_OFF
from .._delivery.sender import Sender
from .._delivery.shared import Counters, Encoded, Target
from .._delivery.transport import HttpTransport, Transport
from .._encode.identity import Session, SessionNode, SessionScope, project_id
from .._encode.identity import after_fork_in_child as identity_after_fork
from .._encode.pipeline import (
    EncodeContext,
    FloatValue,
    RawEvent,
    Reporter,
    build_signal,
    default_parameters,
    encode_body,
    encode_event,
    float_value_of,
    snapshot_payload,
)
from .._errors import DropEvent, EventError
from .._log import logger
from .._policy import prefs as _prefs
from .._policy.config import (
    ENV_APP_ID,
    ENV_DEBUG,
    ENV_DO_NOT_TRACK,
    ENV_OPT_OUT,
    ENV_PROFILE,
    Decision,
    Options,
    Settings,
    app_id_of,
    canonical_app_id,
    decide,
    in_ci,
    ingest_url,
    keyed_with_local_secret,
    unusable_endpoint,
)
from .._policy.state import state_dir
from .budget import Budget

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .timing import Timer

Accept = Callable[[RawEvent], None]
F = TypeVar("F")

_Timer: Any = None  # _timing.Timer, once timed() is first used

_generation = 0
"""Bumped by anything that must make every client decide again."""


def bump_generation() -> None:
    global _generation
    _generation += 1


class Capture:
    """An in-memory sink installed by ``kaibantrace.testing.capture``."""

    def __init__(self, *, strict: bool, respect_opt_out: bool) -> None:
        self.strict = strict
        self.respect_opt_out = respect_opt_out
        self.signals: List[Dict[str, Any]] = []


_captures: List[Capture] = []


def install_capture(capture: Capture) -> None:
    """Record every client's events in ``capture`` (the latest installed wins) until it is
    removed; each client decides again at its next event."""
    _captures.append(capture)
    bump_generation()


def remove_capture(capture: Capture) -> None:
    """Stop recording in ``capture``; each client decides again at its next event."""
    _captures.remove(capture)
    bump_generation()


def restore(client: Telemetry, settings: Settings) -> None:
    """Put ``client`` back as new, with ``settings``: its sender stopped, its counters and
    sessions forgotten (``kaibantrace.testing.reset``)."""
    client._reset(settings)


def _encoded_key(name: str) -> Any:
    encode = getattr(os.environ, "encodekey", None)
    return encode(name) if encode is not None else name


_ENV_KEYS = (_encoded_key(ENV_DO_NOT_TRACK), _encoded_key(ENV_DEBUG), _encoded_key(ENV_APP_ID),
             _encoded_key(ENV_PROFILE), _encoded_key(ENV_OPT_OUT))
_client_ids = itertools.count(1)


class Telemetry:
    """An independent telemetry client with its own app ID, settings and sender.

    Libraries that ship telemetry should each hold their own ``Telemetry``, so
    two of them in one process never share an app ID, an opt-out variable, a
    session or a queue. The module-level functions use a default client.
    """

    def __init__(self, app_id: Optional[str] = None, *, endpoint: Optional[str] = None,
                 namespace: Optional[str] = None, salt: Optional[str] = None,
                 test_mode: Optional[bool] = None, opt_out: Optional[bool] = None,
                 opt_out_env: Optional[str] = None, debug: Optional[bool] = None,
                 strict: Optional[bool] = None, batch_size: Optional[int] = None,
                 flush_interval: Optional[float] = None, max_queue: Optional[int] = None,
                 timeout: Optional[float] = None, exit_timeout: Optional[float] = None,
                 backoff: Optional[float] = None, profile: Optional[str] = None,
                 default_parameters: Optional[bool] = None, local_secret: Optional[bool] = None,
                 detached_delivery: Optional[bool] = None, max_per_minute: Optional[int] = None,
                 default_payload: Optional[Mapping[str, Any]] = None,
                 tool_name: Optional[str] = None,
                 transport: Optional[Transport] = None) -> None:
        self._settings = Settings().replace(
            app_id=app_id, endpoint=endpoint, namespace=namespace, salt=salt,
            test_mode=test_mode, opt_out=opt_out, opt_out_env=opt_out_env, debug=debug,
            strict=strict, batch_size=batch_size, flush_interval=flush_interval,
            max_queue=max_queue, timeout=timeout, exit_timeout=exit_timeout,
            backoff=backoff, profile=profile, default_parameters=default_parameters,
            local_secret=local_secret, detached_delivery=detached_delivery,
            max_per_minute=max_per_minute, default_payload=default_payload, tool_name=tool_name)
        self._transport = transport
        self._number = next(_client_ids)
        self._session_var: contextvars.ContextVar[Optional[SessionNode]] = contextvars.ContextVar(
            f"kaibantrace_session_{self._number}", default=None)
        # Reentrant: an event emitted from a signal handler that interrupted
        # this thread inside the lock must not deadlock the host.
        self._lock = threading.RLock()
        self._reporter = Reporter()
        self._debug_reporter = Reporter(echo=True)  # debug mode: warnings on stderr too
        self._reset_state()

    def _reset_state(self) -> None:
        self._process_session = Session()
        self._counters = Counters()
        self._budget = Budget(self._settings.max_per_minute)
        self._sender: Optional[Sender] = None
        self._closed = False
        self._seen_generation = -1
        self._seen_opt_out: Any = None
        self._seen_env: Tuple[Any, ...] = ()
        self._off_by_opt_out = False
        self._accept: Optional[Accept] = None
        self._no_app_id_logged = False
        self._purged = False
        self._direct_outbox: Optional[Outbox] = None
        self._undelivered_since_flush = False  # dropped, or saved without a sender, since a flush
        self._cli_seen = False  # the first track_cli call of this process was handled
        self._exited = False  # the exit hook ran: later events are saved for the hand-off
        self._exit_deadline = 0.0  # monotonic: when the exit budget ran out
        self._holding = False  # this run showed the first-run notice: send nothing
        self._opt_key = _encoded_key(self._settings.opt_out_env)
        self._late_transport_warned = False

    # -- configuration -----------------------------------------------------

    def configure(self, **settings: Unpack[Options]) -> None:
        """Change settings; a ``None`` value leaves that setting as it is.

        Raises ``ConfigurationError`` (a ``ValueError``) naming a bad value, and
        ``TypeError`` naming an unknown setting. A running sender takes new
        ``batch_size``, ``flush_interval``, ``max_queue``, ``timeout`` and
        ``backoff`` from its next batch, wait or request. A ``transport`` is
        read when the sender starts, at the first event: one given later is
        not used, and says so once with a ``RuntimeWarning``.
        """
        transport = settings.pop("transport", None)
        new = self._settings.replace(**settings)
        with self._lock:
            self._settings = new
            sender = self._sender
            if transport is not None:
                if sender is not None and transport is not self._transport:
                    self._warn_late_transport()
                self._transport = transport
            if sender is not None:
                _retune(sender, new)
            self._budget.set_rate(new.max_per_minute)
            self._opt_key = _encoded_key(new.opt_out_env)
        bump_generation()

    def _warn_late_transport(self) -> None:
        """Say once that a transport came too late. A warning rather than the logger: this
        is the author's mistake, and the ``kaibantrace`` logger prints nothing unless the
        host configured logging, which an author trying things out has not."""
        if self._late_transport_warned:
            return
        self._late_transport_warned = True
        import warnings

        warnings.warn("kaibantrace: a transport given after the first event is not used by the "
                      "running sender; give it to Telemetry() or configure() before the first "
                      "event", RuntimeWarning, stacklevel=_caller_outside_kaibantrace())

    @property
    def settings(self) -> Settings:
        """The settings given in code (environment values are applied when deciding)."""
        return self._settings

    @property
    def enabled(self) -> bool:
        """Whether telemetry is on: not opted out by any source and not shut down.

        Debug mode counts as on (events are printed instead of sent).
        """
        return not self._closed and decide(self._settings, os.environ).enabled

    def decision(self) -> Decision:
        """Whether this client sends, and which source decided (for status output)."""
        return decide(self._settings, os.environ)

    def stats(self) -> Dict[str, object]:
        """What happened to accepted events.

        ``queued`` (accepted so far), ``pending`` (waiting in the queue),
        ``in_flight`` (in the request being sent), ``sent``, ``retried``,
        ``requests``, ``dropped`` by cause, and ``held_back``: events the
        budget (``max_per_minute``) kept from being sent, which are not lost
        so much as counted, on the next signal of their name.
        """
        sender = self._sender
        if sender is None:
            stats = self._counters.snapshot()
        else:
            stats = self._counters.snapshot(sender.pending, sender.in_flight)
        stats["held_back"] = self._budget.held_back
        return stats

    # -- the hot path --------------------------------------------------------

    def _route(self) -> Optional[Accept]:
        """Where an event goes now, or ``None`` when opted out. Cheap when nothing changed."""
        if _generation == self._seen_generation:
            try:
                data = os.environ._data  # type: ignore[attr-defined]
            except AttributeError:  # os.environ replaced by a plain mapping: decide every time
                return self._reroute()
            if data.get(self._opt_key) is self._seen_opt_out:
                if self._off_by_opt_out:
                    return None
                keys, seen = _ENV_KEYS, self._seen_env
                if (data.get(keys[0]) is seen[0] and data.get(keys[1]) is seen[1]
                        and data.get(keys[2]) is seen[2] and data.get(keys[3]) is seen[3]
                        and data.get(keys[4]) is seen[4]):
                    return self._accept
        return self._reroute()

    def _reroute(self) -> Optional[Accept]:
        with self._lock:
            generation = _generation
            data = getattr(os.environ, "_data", {})
            self._seen_opt_out = data.get(self._opt_key)
            self._seen_env = tuple(data.get(key) for key in _ENV_KEYS)
            decision = decide(self._settings, os.environ)
            accept = self._choose(decision)
            self._accept = accept
            # When code or the client's own variable opted out, that alone decides.
            self._off_by_opt_out = accept is None and decision.decided_by in (
                "code", self._settings.opt_out_env) and not _captures
            self._seen_generation = generation
            return accept

    def _choose(self, decision: Decision) -> Optional[Accept]:
        if self._exited and decision.enabled and not decision.debug and decision.app_id:
            # An atexit handler that runs after ours (registered before our first
            # event) still emits: saved for the delivery process, never lost.
            return self._limited(self._save_after_exit, decision)
        if self._closed:
            return None
        if _captures and (decision.enabled or (decision.decided_by != "code"
                                               and not _captures[-1].respect_opt_out)):
            # A capture records every event, the budget aside: tests of an author's code
            # want to see each call's event, and a capture holds nothing for long.
            capture = _captures[-1]
            if decision.app_id is None:
                # Opted out (the pytest plugin opts the whole run out) yet recorded: the
                # signals show the app they would be sent as, not an empty appID.
                decision = decision._replace(app_id=app_id_of(self._settings, os.environ))
            return lambda raw: self._record(raw, capture, decision)
        if not decision.enabled:
            self._purge_outbox_once()
            return None
        if decision.debug:
            return self._limited(lambda raw: self._print_debug(raw, decision), decision)
        if decision.app_id is None:
            return self._limited(self._no_app_id, decision)
        sender = self._sender or self._start_sender()
        if sender is None:  # the interpreter is exiting, or threads are refused here
            exiting = not threading.main_thread().is_alive()
            return self._limited(self._save_after_exit if exiting else self._save_directly,
                                 decision)
        if self._settings.strict:
            def checked(raw: RawEvent) -> bool:
                try:
                    self._encode_now(raw, decision, strict=True)
                except DropEvent as drop:
                    self._lose(drop.cause)
                    return False
                return True
            return self._limited(sender.accept, decision, checked)
        return self._limited(sender.accept, decision)

    def _limited(self, accept: Accept, decision: Decision,
                 check: Optional[Callable[[RawEvent], bool]] = None) -> Accept:
        """``accept`` behind this client's budget (see ``_client.budget``), unless it has none.

        The budget stands before every way out of the process (the sender, a
        direct save, debug output), so what debug mode prints is what would be
        sent; only captures see every event.
        """
        if not self._settings.max_per_minute:
            if check is None:
                return accept

            def checked_only(raw: RawEvent) -> None:
                if check(raw):
                    accept(raw)
            return checked_only
        return self._budget.limit(accept, carry=decision.profile != "kaibanjs", check=check)

    def _encoded_at_call(self) -> bool:
        """Whether events are encoded at the call (strict mode, a capture), where a payload's
        problems are reported in their usual order rather than refused by size."""
        return bool(self._settings.strict or _captures)

    def _session(self) -> Session:
        node = self._session_var.get()
        return self._process_session if node is None else node[0]

    def _raw(self, name: str, payload: Any, identifier: Optional[str] = None,
             float_value: FloatValue = None) -> RawEvent:
        return (name, payload, self._session(), identifier, time.time(), float_value)

    # -- the sinks ----------------------------------------------------------

    def _start_sender(self) -> Optional[Sender]:
        if not threading.main_thread().is_alive():
            # The main thread has finished: the interpreter is shutting down, and
            # a thread started now may never run (Python 3.12 refuses to start it).
            return None
        s = self._settings
        sender = Sender(encode=self._encode_batch, target=self._target,
                        open_outbox=self._open_outbox, on_fork=self._forked_from_c,
                        on_sent=_record_sent, on_retired=_record_retired,
                        transport=self._transport or HttpTransport(),
                        counters=self._counters, batch_size=s.batch_size,
                        flush_interval=s.flush_interval, max_queue=s.max_queue, timeout=s.timeout,
                        backoff=s.backoff,
                        setup_delay=self._setup_delay)
        sender.holding = self._holding
        if not sender.start():
            return None
        self._sender = sender
        _register_process_hooks()
        _live_clients.add(self)
        return sender

    def _target(self) -> Optional[Target]:
        """Where the sender sends now (asked on its thread before each cycle)."""
        decision = decide(self._settings, os.environ)
        app_id = decision.app_id if decision.enabled else self._app_id_even_if_off()
        if app_id is None:
            return None
        return Target(app_id, ingest_url(self._settings, os.environ), decision.enabled)

    def _app_id_even_if_off(self) -> Optional[str]:
        """The app ID given in code or the environment, canonical, read even when opted out
        (to find the outbox to purge, or to name the app in ``status``)."""
        return canonical_app_id(self._settings.app_id or (os.environ.get(ENV_APP_ID) or "").strip())

    def _open_outbox(self) -> Outbox:
        app_id = self._app_id_even_if_off()
        if app_id is None:
            return MemoryOutbox()
        return open_outbox(state_dir(), app_id)

    def _purge_outbox_once(self) -> None:
        """Opted out: remove what an earlier run left unsent, without opening it."""
        if self._purged:
            return
        self._purged = True
        app_id = self._app_id_even_if_off()
        if app_id is not None and purge_outbox(state_dir(), app_id):
            logger.debug("kaibantrace: opted out; removed signals an earlier run left unsent")

    def _cli_run_starts(self, mounted_at: Callable[[], Optional[str]] = lambda: None) -> None:
        """At the first ``track_cli`` call: the first-run notice, then the install event.

        Both only while telemetry is on and outside CI. The notice goes to a
        terminal only; when it was shown, this run sends nothing (its events
        wait in the outbox, so opting out before the next run means they are
        never sent). ``mounted_at`` finds where the CLI mounted kaibantrace's
        commands, asked only when the notice is shown, so it can name them.
        """
        if self._cli_seen or _captures:  # a capture records events, nothing on disk
            return
        self._cli_seen = True
        try:
            decision = decide(self._settings, os.environ)
            app_id = decision.cli_app_id or decision.app_id  # the app CLI events go to
            if not decision.enabled or decision.debug or app_id is None or in_ci(os.environ):
                return
            if not _prefs.notice_shown(app_id) and _stderr_is_terminal():
                # Hold first: whatever happens below, this run sends nothing. The
                # marker is written before the notice is printed and removed if
                # printing fails, so the notice is marked seen only when shown,
                # and a config directory that cannot be written means no notice
                # and a run that holds, never a run that sends unannounced.
                self._hold()
                if _prefs.mark_notice_shown(app_id) and not _show_notice(
                        notice(self._settings, mounted_at)):
                    _prefs.forget_notice(app_id)
            project = project_id()
            if not _prefs.install_recorded(app_id, project):
                accept = self._route()
                # The marker first: a run that cannot record it sends no install
                # event, so an unwritable directory never makes every run an install.
                if accept is not None and _prefs.mark_install(app_id, project):
                    name = events.INSTALL if decision.profile == "kaibanjs" else "install"
                    raw = self._raw(name, None, project)
                    self._budget.grant(name, raw[4])  # once per project: never held back
                    accept(raw)
        except Exception:
            logger.debug("kaibantrace: first-run handling failed", exc_info=True)

    def _hold(self) -> None:
        self._holding = True
        if self._sender is not None:
            self._sender.holding = True

    def _forked_from_c(self, raw: RawEvent) -> None:
        """A child forked without Python's at-fork hooks: start over here, keep this event."""
        if _fork.ensure_fresh_in_child():
            identity_after_fork()
        self._after_fork()
        bump_generation()
        accept = self._route()
        if accept is not None:
            accept(raw)

    def _lose(self, cause: str) -> None:
        """Count an event dropped before reaching a sender; the next flush reports it."""
        self._counters.drop(cause)
        self._undelivered_since_flush = True

    def _save_directly(self, raw: RawEvent, outbox: Optional[Outbox] = None,
                       cause: str = "no_sender") -> None:
        """No sender (interpreter shutdown, or a process that cannot start threads): write
        the event to ``outbox`` (default: one opened here), for the next process that can
        send to deliver; ``cause`` counts it when it cannot be saved."""
        counters = self._counters
        counters.taken += 1
        self._undelivered_since_flush = True  # saved, not delivered: a flush must not say otherwise
        try:
            encoded = self._encode_batch([raw])
            if encoded is None or not encoded.signals:
                return
            if outbox is None:
                if self._direct_outbox is None:
                    self._direct_outbox = self._open_outbox()
                outbox = self._direct_outbox
            added = outbox.add(encoded.app_id, encoded.url, encoded.signals)
            counters.in_outbox += len(encoded.signals) - added.full - added.expired
            counters.drop("outbox_full", added.full)
        except Exception:
            logger.debug("kaibantrace: could not save an event without a sender", exc_info=True)
            self._lose(cause)

    def _save_after_exit(self, raw: RawEvent) -> None:
        """After the exit hook: save the event (in the sender's outbox file, waiting for another
        process's transaction no longer than the exit budget allows), then start a delivery
        process for it unless one runs (one started at exit looks again before it ends)."""
        sender = self._sender
        outbox = getattr(sender.outbox, "primary", sender.outbox) if sender is not None else None
        setter = getattr(outbox, "set_busy_timeout", None)
        if setter is None:  # no sender here: the first event comes during shutdown
            self._save_directly(raw)
        else:
            try:
                setter(max(0.0, self._exit_deadline - time.monotonic()))
            except Exception:
                logger.debug("kaibantrace: could not bound the wait for the outbox", exc_info=True)
            self._save_directly(raw, outbox, cause="unsaved_at_exit")
        self._hand_off()

    def _may_hand_off(self) -> bool:
        """Whether what is left at exit may go to a delivery process (decided again at exit)."""
        s = self._settings
        return (s.detached_delivery and not self._holding and self._transport is None
                and not _handoff.in_delivery_process and _handoff.allowed(os.environ)
                and _handoff.interpreter() is not None)

    def _setup_delay(self, outbox: Outbox) -> float:
        """How long the poster waits before setting up HTTP (asked on its thread): a short
        run whose leftovers a delivery process will take need not set it up at all."""
        durable = getattr(outbox, "primary", outbox).durable
        return SETUP_DELAY_WITH_HAND_OFF if durable and self._may_hand_off() else SETUP_DELAY

    def _hand_off(self) -> Optional[int]:
        """At exit: start a delivery process when signals wait for this client's app and
        endpoint and one could send them (see ``_delivery.handoff``); its process ID, if started."""
        s = self._settings
        if not self._may_hand_off():
            return None
        decision = decide(s, os.environ)
        if not decision.enabled or decision.debug or decision.app_id is None:
            return None
        url = ingest_url(s, os.environ)
        sender = self._sender
        outbox = sender.outbox if sender is not None else self._direct_outbox
        outbox = getattr(outbox, "primary", outbox)  # the file: memory dies with this process
        if url is None or outbox is None or not outbox.durable:
            return None
        try:
            if not outbox.count(decision.app_id, url):
                return None
            health = outbox.health(url)
        except Exception:
            return None
        if health.not_before - time.time() > _handoff.DELIVERY_BOUND / 2:
            return None  # the endpoint is failing: it would only wait, and a later run will try
        arguments = ["--opt-out-env", s.opt_out_env, "--timeout", repr(s.timeout),
                     "--backoff", repr(s.backoff)]
        if s.profile is not None:
            arguments += ["--profile", s.profile]
        # The outbox's own directory: the environment may name another one by now.
        directory = os.path.dirname(getattr(outbox, "path", "")) or state_dir()
        return _handoff.hand_off(directory, decision.app_id, url, arguments)

    def _no_app_id(self, raw: RawEvent) -> None:
        self._lose("no_app_id")
        if self._settings.strict:
            self._encode_now(raw, decide(self._settings, os.environ), strict=True)
        if not self._no_app_id_logged:
            self._no_app_id_logged = True
            logger.debug("kaibantrace: no app ID configured; events are not sent")

    def _context(self, decision: Decision, *, strict: bool, saves: bool = True) -> EncodeContext:
        """How this client encodes now: its settings, the profile, the secret, the defaults.

        ``saves=False`` (a capture) keys identities without ever writing a secret."""
        s = self._settings
        kaibanjs = decision.profile == "kaibanjs"
        keyed = keyed_with_local_secret(s)
        ci = in_ci(os.environ)
        secret: Optional[Callable[[], bytes]] = None
        if keyed:
            secret = (lambda: _prefs.local_secret(persist=not ci)) if saves else _prefs.unsaved_secret
        defaults = default_parameters(ci) if s.default_parameters and not kaibanjs else None
        if s.default_payload:  # the author's own, checked once when configured
            defaults = {**(defaults or {}), **s.default_payload}
        reporter = self._debug_reporter if decision.debug else self._reporter
        return EncodeContext(decision.app_id or "", s.salt, s.test_mode, strict, reporter,
                             secret, defaults, decision.cli_app_id)

    def _encode_now(self, raw: RawEvent, decision: Decision, *, strict: bool,
                    saves: bool = True) -> Dict[str, Any]:
        return build_signal(raw, self._context(decision, strict=strict, saves=saves))

    def _print_debug(self, raw: RawEvent, decision: Decision) -> None:
        try:
            signal = self._encode_now(raw, decision, strict=self._settings.strict)
        except DropEvent as drop:
            self._lose(drop.cause)
            return
        url = (ingest_url(self._settings, os.environ)
               or f"no usable endpoint ({unusable_endpoint(os.environ)})")
        note = "" if decision.app_id else " (no app ID configured, so nothing would be sent)"
        sys.stderr.write(f"[kaibantrace debug] would send to {url}{note}: "
                         f"{encode_body([signal]).decode('utf-8')}\n")

    def _record(self, raw: RawEvent, capture: Capture, decision: Decision) -> None:
        try:
            capture.signals.append(self._encode_now(raw, decision, strict=capture.strict,
                                                    saves=False))
        except DropEvent as drop:
            self._lose(drop.cause)

    def _encode_batch(self, batch: List[RawEvent]) -> Optional[Encoded]:
        """Runs on the sender's thread (or at exit): decide again, then encode the batch."""
        decision = decide(self._settings, os.environ)
        counters = self._counters
        if not decision.enabled or decision.app_id is None:
            counters.drop("opted_out" if not decision.enabled else "no_app_id", len(batch))
            return None
        url = ingest_url(self._settings, os.environ)
        if url is None:
            counters.drop("bad_endpoint", len(batch))
            return None
        ctx = self._context(decision, strict=False)
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

    # -- public API ------------------------------------------------------------

    def emit(self, name: str, payload: Optional[Mapping[str, Any]] = None, *,
             float_value: Optional[float] = None) -> None:
        """Record one event now. Never raises at run time, except in strict mode."""
        try:
            accept = self._route()
            if accept is not None:
                if payload is not None:  # what will be sent, as it is now; never too much of it
                    payload = snapshot_payload(payload, refuse_oversized=not self._encoded_at_call())
                accept(self._raw(name, payload, None, float_value_of(float_value)))
        except EventError:
            raise
        except Exception:
            logger.debug("kaibantrace: emit failed", exc_info=True)

    def session(self) -> SessionScope:
        """A block whose events share one new, random session ID (``with`` or ``async with``)."""
        return SessionScope(self._session_var)

    def track(self, name: str, *, payload: Any = None, duration: bool = False
              ) -> Callable[[F], F]:
        """Decorator: emit ``name`` each time the decorated callable starts its work.

        With ``duration=True``, emit it when the work ends instead (a call returns
        or raises; a coroutine completes; a generator is exhausted or closed),
        with ``TelemetryDeck.Signal.durationInSeconds`` and ``kaibantrace.outcome``
        (``success``, ``error``, ``cancelled`` or ``closed``); when the work
        raised, also a ``TelemetryDeck.Error.occurred`` signal naming the
        exception's class. The exception itself passes through untouched.
        """
        from .decorators import make_decorator

        return make_decorator(self, name, payload, cli=False, duration=duration)

    def track_cli(self, name: str, *, payload: Any = None, parser: Any = None,
                  duration: bool = False) -> Callable[[F], F]:
        """Decorator for a CLI entry point: like ``track``, identified by the project ID.

        Also records ``command``, the sub-command that ran, when it can be named
        from the CLI's own definition: a decorated click command or group, a
        decorated typer app, or an argparse ``parser`` given here (or a function
        that builds it). The first run on a machine shows a notice on a
        terminal and sends nothing; the first run in a project records an
        ``install`` event. ``duration=True`` times the run, as for ``track``
        (``sys.exit(0)``, as click ends a command, counts as success).
        """
        from .decorators import make_decorator

        return make_decorator(self, name, payload, cli=True, parser=parser, duration=duration)

    def timed(self, name: str, payload: Optional[Mapping[str, Any]] = None) -> Timer:
        """``with client.timed(name):`` (or ``async with``): when the block ends, emit
        ``name`` with its duration and outcome, as ``track(name, duration=True)`` does
        for a call; a block that raises also sends the error signal, and the exception
        passes through. Never raises at run time, except in strict mode."""
        global _Timer
        if _Timer is None:  # imported at the first use: it brings wrapt in
            from .timing import Timer as _Timer
        timer: Timer = _Timer(self, name, payload)
        return timer

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait up to ``timeout`` seconds; ``True`` when every earlier event was delivered.

        Events refused by opt-out were never accepted and do not count; events
        dropped since the previous flush (no app ID, a rejected batch, an
        unreachable endpoint) make it ``False``. Debug mode counts as delivered.
        """
        lost, self._undelivered_since_flush = self._undelivered_since_flush, False
        sender = self._sender
        try:
            delivered = True if sender is None else sender.flush(timeout)
        except Exception:
            delivered = False
        return delivered and not lost

    def shutdown(self, timeout: float = 1.0) -> None:
        """Send what is queued within ``timeout`` seconds, then stop; later events are ignored."""
        self._shutdown(time.monotonic() + timeout)
        with self._lock:
            self._closed = True
            self._seen_generation = -1
        bump_generation()

    def _shutdown(self, deadline: float) -> None:
        sender = self._sender
        if sender is None:
            return
        if sender.stop(deadline):
            try:
                sender.transport.close()
            except Exception:
                logger.debug("kaibantrace: closing the transport failed", exc_info=True)
            self._sender = None

    def _reset(self, settings: Optional[Settings] = None) -> None:
        """Back to a fresh client: stop the sender, forget counters and sessions."""
        self._shutdown(time.monotonic() + self._settings.exit_timeout)
        with self._lock:
            if settings is not None:
                self._settings = settings
                self._transport = None
            self._reset_state()
        _live_clients.discard(self)
        bump_generation()

    def _after_fork(self) -> None:
        """In a forked child: the parent's thread, queue and locks do not exist here."""
        self._lock = threading.RLock()
        after_fork = getattr(self._transport, "after_fork", None)
        if after_fork is not None:  # a transport given in code, shared with the parent
            try:
                after_fork()
            except Exception:
                logger.debug("kaibantrace: the transport failed to reset after fork", exc_info=True)
        # A client shut down in the parent stays shut down; a run that showed the
        # notice keeps holding in its children; the first-run work is not redone.
        kept = (self._closed, self._holding, self._cli_seen)
        self._reset_state()
        self._closed, self._holding, self._cli_seen = kept

    def __repr__(self) -> str:
        return f"<kaibantrace.Telemetry app_id={self._settings.app_id!r}>"


def notice(settings: Settings, mounted_at: Callable[[], Optional[str]]) -> str:
    """The first-run notice: what is collected, and how to turn it off, in the tool's words.

    It names the tool (``tool_name``, else the script's name) and, when the CLI
    mounted kaibantrace's commands, the tool's own ``telemetry disable`` rather
    than the ``kaibantrace`` command, which a user of the tool may not know.
    """
    tool = settings.tool_name or _program_name()
    where = mounted_at() if tool else None
    if tool and where:
        off = f"or with `{tool} {where} disable`."
        log = f"`{tool} {where} log` shows what was sent."
    else:
        off = "or for every tool that uses kaibantrace with `kaibantrace disable`."
        log = "`kaibantrace log` shows what was sent."
    import textwrap

    return textwrap.fill(
        f"{tool or 'This program'} collects anonymous usage data: which commands run, never "
        f"their arguments, file contents, paths or anything that identifies you. Nothing was "
        f"sent this time. Turn it off with {settings.opt_out_env}=1 (or DO_NOT_TRACK=1), "
        f"{off} {log}", width=79, break_on_hyphens=False, break_long_words=False) + "\n"


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except Exception:  # a replaced or closed stream
        return False


def _program_name() -> Optional[str]:
    """What the user typed to run this program: the script's name, or the package's for
    ``python -m package``; ``None`` for ``python -c``, a REPL or an embedded interpreter."""
    path = sys.argv[0] if sys.argv and isinstance(sys.argv[0], str) else ""
    name = os.path.basename(path)
    if name == "__main__.py":
        name = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return name if name and not name.startswith("-") else None


def _show_notice(text: str) -> bool:
    """Print the first-run notice on stderr (the caller found it a terminal); whether it
    was written."""
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
        return True
    except Exception:
        return False


def _record_sent(target: Target, requests: List[Tuple[bytes, int]]) -> None:
    """After 2xx answers: the transparency log gets each request exactly as sent."""
    _sentlog.append(target.app_id, target.url or "", requests)


def _record_retired(target: Target) -> None:
    """After a 410 Gone: this machine never sends this app's signals there again."""
    if target.url is not None:
        _prefs.mark_retired(target.app_id, target.url)


def _retune(sender: Sender, settings: Settings) -> None:
    """Give a running sender the sender settings of ``settings``."""
    sender.retune(batch_size=settings.batch_size, flush_interval=settings.flush_interval,
                  max_queue=settings.max_queue, timeout=settings.timeout,
                  backoff=settings.backoff)


def _caller_outside_kaibantrace() -> int:
    """The ``stacklevel`` that names the first caller outside this package."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and str(frame.f_globals.get("__name__", "")).startswith("kaibantrace"):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level


# -- process-wide hooks, registered at the first sender start ----------------

_live_clients: weakref.WeakSet[Telemetry] = weakref.WeakSet()
_hooks_registered = False
_hooks_lock = threading.Lock()


def _register_process_hooks() -> None:
    global _hooks_registered
    with _hooks_lock:
        if _hooks_registered:
            return
        _hooks_registered = True
    atexit.register(_at_exit)
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(before=_fork.before_fork, after_in_parent=_fork.after_fork_in_parent,
                            after_in_child=_after_fork_in_child)
    _exit_with_the_worker(None)


# A process that multiprocessing forked (a Pool or ProcessPoolExecutor worker) ends with
# os._exit(), so atexit hooks never run there: what its tracked functions recorded would
# be lost. multiprocessing runs its own "finalizers" just before that exit; the exit hook
# becomes one of them. Its registry is emptied when a forked worker starts, after the fork
# hooks ran, so a fork asks to be called again once the worker has started.
_mp_marker = type("_WorkerExit", (), {})()  # what multiprocessing keeps a weak reference to
_exit_done = False


def _exit_with_the_worker(_: object) -> None:
    util = sys.modules.get("multiprocessing.util")
    process = sys.modules.get("multiprocessing.process")
    if util is None or process is None:
        return  # not a multiprocessing worker: nothing else ends it with os._exit()
    try:
        if process.parent_process() is not None:  # a worker (the main process has atexit)
            util.Finalize(None, _at_exit, exitpriority=0)
    except Exception:
        logger.debug("kaibantrace: could not join the worker's exit", exc_info=True)


def _at_exit() -> None:
    """Save what is queued, let each sender use what is left of its exit budget (100 ms by
    default, all clients in parallel), then hand what still waits to a delivery process.
    Once per process, whether atexit or multiprocessing's worker exit calls it."""
    global _exit_done
    if _exit_done:
        return
    _exit_done = True
    start = time.monotonic()
    clients = list(_live_clients)
    for client in clients:
        client._closed = True
        client._exited = True
        client._exit_deadline = start + client._settings.exit_timeout
        client._seen_generation = -1
        sender = client._sender
        if sender is not None:
            try:
                sender.begin_exit(start + client._settings.exit_timeout)
            except Exception:
                logger.debug("kaibantrace: could not save queued signals at exit", exc_info=True)
    for client in clients:
        sender = client._sender
        if sender is not None:
            sender.join(start + client._settings.exit_timeout)
            try:
                sender.settle_at_exit(grace=client._settings.exit_timeout)
                client._hand_off()
            except Exception:
                logger.debug("kaibantrace: could not hand off at exit", exc_info=True)


def _after_fork_in_child() -> None:
    global _hooks_lock, _exit_done
    _exit_done = False
    util = sys.modules.get("multiprocessing.util")
    if util is not None:  # perhaps a multiprocessing worker: see _exit_with_the_worker
        try:
            util.register_after_fork(_mp_marker, _exit_with_the_worker)
        except Exception:
            logger.debug("kaibantrace: could not join the worker's exit", exc_info=True)
    _fork.after_fork_in_child()
    identity_after_fork()
    _hooks_lock = threading.Lock()
    for client in list(_live_clients):
        client._after_fork()
    bump_generation()
