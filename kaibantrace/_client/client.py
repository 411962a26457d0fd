"""``Telemetry``: one independent client, the face of everything below it.

Each job a client does has a module of its own beside this one:

* ``router``: the hot path, which decides again only when something changed;
* ``routes``: the answers it can give (the queue, debug output, a capture, ...);
* ``delivery``: the sender and the outbox, sending on request;
* ``process``: the exit and the hand-off to a delivery process, ``fork``, and putting
  a client back as new;
* ``firstrun``: a CLI's first-run notice and install event;
* ``capture``: what ``kaibantrace.testing.capture`` installs;
* ``budget``: how many signals of a name a minute may leave.

``Telemetry`` holds the client's settings and state and offers the public
methods; only the modules of ``_client`` (these, the decorators and timing)
touch that state.
"""

from __future__ import annotations

import contextvars
import itertools
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, TypeVar

from .._delivery.shared import Counters
from .._delivery.transport import Transport
from .._encode.default_payload import checked_default_payload
from .._encode.identity import Session, SessionNode, SessionScope
from .._encode.pipeline import FloatValue, RawEvent, Reporter, float_value_of, snapshot_payload
from .._errors import EventError
from .._log import logger
from .._policy.config import Decision, Options, Settings, decide
from . import process
from .budget import Budget
from .capture import Capture, captures
from .delivery import Delivery, DeliveryStatus, app_id_even_if_off
from .router import bump_generation, make_router
from .routes import encoded_at_call

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .timing import Timer

F = TypeVar("F")

_Timer: Any = None  # timing.Timer, once timed() is first used

def install_capture(capture: Capture) -> None:
    """Record every client's events in ``capture`` (the latest installed wins) until it is
    removed; each client decides again at its next event."""
    captures.append(capture)
    bump_generation()


def remove_capture(capture: Capture) -> None:
    """Stop recording in ``capture``; each client decides again at its next event."""
    captures.remove(capture)
    bump_generation()


def restore(client: Telemetry, settings: Optional[Settings] = None) -> None:
    """Put ``client`` back as new, with ``settings`` if given: its sender stopped, its
    counters and sessions forgotten (``kaibantrace.testing.reset``)."""
    process.reset(client, settings)


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
        self._settings = _with_checked_payload(Settings().replace(
            app_id=app_id, endpoint=endpoint, namespace=namespace, salt=salt,
            test_mode=test_mode, opt_out=opt_out, opt_out_env=opt_out_env, debug=debug,
            strict=strict, batch_size=batch_size, flush_interval=flush_interval,
            max_queue=max_queue, timeout=timeout, exit_timeout=exit_timeout,
            backoff=backoff, profile=profile, default_parameters=default_parameters,
            local_secret=local_secret, detached_delivery=detached_delivery,
            max_per_minute=max_per_minute, default_payload=default_payload, tool_name=tool_name),
            default_payload)
        self._transport = transport
        self._session_var: contextvars.ContextVar[Optional[SessionNode]] = contextvars.ContextVar(
            f"kaibantrace_session_{next(_client_ids)}", default=None)
        self._reporter = Reporter()
        self._debug_reporter = Reporter(echo=True)  # debug mode: warnings on stderr too
        self._router = make_router(self)
        self._route = self._router.route  # the hot path, bound once: decorators keep it
        self._reset_state()

    def _reset_state(self) -> None:
        self._process_session = Session()
        self._counters = Counters()
        self._budget = Budget(self._settings.max_per_minute)
        self._delivery = Delivery(self)
        self._router.reset(self._settings.opt_out_env)
        self._closed = False
        self._no_app_id_logged = False
        self._undelivered_since_flush = False  # dropped, or saved without a sender, since a flush
        self._cli_seen = False  # the first track_cli call of this process was handled
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
        new = _with_checked_payload(self._settings.replace(**settings),
                                    settings.get("default_payload"))
        with self._router.lock:
            self._settings = new
            late = (transport is not None and transport is not self._transport
                    and self._delivery.sender is not None)
            self._transport = self._transport if transport is None else transport
            self._delivery.retune(new)
            self._budget.set_rate(new.max_per_minute)
            self._router.watch(new.opt_out_env)
        bump_generation()
        if late:  # once all is applied: a warning turned into an error leaves no half-change
            _warn_late_transport(self)

    @property
    def settings(self) -> Settings:
        """The settings given in code (environment values are applied when deciding)."""
        return self._settings

    @property
    def app_id(self) -> Optional[str]:
        """The app ID this client's signals are for, canonical: given in code, else
        ``KAIBAN_TELEMETRY_APP_ID``; read even when telemetry is off (``None``: none given)."""
        return app_id_even_if_off(self._settings)

    @property
    def transport(self) -> Optional[Transport]:
        """The transport given in code, or ``None`` for the default HTTP transport."""
        return self._transport

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
        stats = self._delivery.stats()
        stats["held_back"] = self._budget.held_back
        return stats

    # -- what the other modules of the client use ------------------------------

    def _session(self) -> Session:
        node = self._session_var.get()
        return self._process_session if node is None else node[0]

    def _raw(self, name: str, payload: Any, identifier: Optional[str] = None,
             float_value: FloatValue = None) -> RawEvent:
        return (name, payload, self._session(), identifier, time.time(), float_value)

    def _lose(self, cause: str) -> None:
        """Count an event dropped before reaching a sender; the next flush reports it."""
        self._counters.drop(cause)
        self._undelivered_since_flush = True

    # -- public API ------------------------------------------------------------

    def emit(self, name: str, payload: Optional[Mapping[str, Any]] = None, *,
             float_value: Optional[float] = None) -> None:
        """Record one event now. Never raises at run time, except in strict mode."""
        try:
            accept = self._route()
            if accept is not None:
                if payload is not None:  # what will be sent, as it is now; never too much of it
                    payload = snapshot_payload(payload, refuse_oversized=not encoded_at_call(self))
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
        unreachable endpoint) make it ``False``. Debug mode counts as delivered. In a
        browser page (Pyodide) it cannot wait: it starts the send and answers at once.
        """
        return self._delivery.flush(timeout)

    async def aflush(self, timeout: float = 5.0) -> bool:
        """``flush()`` for async code, without blocking the event loop; in a browser page
        (Pyodide), where ``flush()`` cannot wait, the way to wait for delivery."""
        return await self._delivery.aflush(timeout)

    def shutdown(self, timeout: float = 1.0) -> None:
        """Send what is queued within ``timeout`` seconds, then stop; later events are ignored."""
        self._delivery.stop(time.monotonic() + timeout)
        with self._router.lock:
            self._closed = True
            self._router.forget()
        bump_generation()

    # -- sending what waits in the outbox ------------------------------------

    def send_waiting(self, *, retry_now: bool = False, stop_after: Optional[float] = None
                     ) -> bool:
        """Send what waits in this machine's outbox for this client's app now, not at the
        next event; ``False`` when nothing can send (opted out, no app ID, debug mode).

        It is decided as for an event, and the sender starts if it has not. ``retry_now``:
        try at once even while another process's failures hold the endpoint back (as
        ``kaibantrace flush`` does). ``stop_after`` (seconds), for a client that ends then
        (as the delivery process does): no request starts, or is under way, after it.
        """
        return self._delivery.send_waiting(stop_after=stop_after, retry_now=retry_now)

    def delivery_status(self) -> DeliveryStatus:
        """How sending goes in this process: passes made, what waits, why it stopped."""
        return self._delivery.status()

    def waiting(self) -> int:
        """Signals in the outbox for this app and endpoint, read now (0 without a sender)."""
        return self._delivery.waiting()

    def drain(self, timeout: float = 5.0, *,
              progress: Optional[Callable[[DeliveryStatus], None]] = None) -> bool:
        """``send_waiting(retry_now=True)``, then wait up to ``timeout`` seconds until none is
        left (``True``) or sending stops; ``progress`` gets the status as it goes."""
        return self._delivery.drain(timeout, progress)

    def __repr__(self) -> str:
        return f"<kaibantrace.Telemetry app_id={self._settings.app_id!r}>"


def _with_checked_payload(settings: Settings, given: Optional[Mapping[str, Any]]) -> Settings:
    """``settings`` with ``given`` as its default payload, checked and cleaned (raises
    ``ConfigurationError``); the settings layer cannot clean a payload itself."""
    if given is None:
        return settings
    return settings._replace(default_payload=checked_default_payload(given))


def _warn_late_transport(client: Telemetry) -> None:
    """Say once that a transport came too late. A warning rather than the logger: this is
    the author's mistake, and the ``kaibantrace`` logger prints nothing unless the host
    configured logging, which an author trying things out has not."""
    if client._late_transport_warned:
        return
    client._late_transport_warned = True
    import warnings

    warnings.warn("kaibantrace: a transport given after the first event is not used by the "
                  "running sender; give it to Telemetry() or configure() before the first "
                  "event", RuntimeWarning, stacklevel=_caller_outside_kaibantrace())


def _caller_outside_kaibantrace() -> int:
    """The ``stacklevel`` that names the first caller outside this package."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and str(frame.f_globals.get("__name__", "")).startswith("kaibantrace"):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level
