"""A client's way out of the process: its sender and its outbox.

``Delivery`` starts the client's ``Sender`` at the first event that is to be
sent, gives it the client's encoder, target and transport, and looks after
the cases a sender cannot take: an opted-out client removes what an earlier
run left unsent; a process that cannot start threads (or is shutting down)
saves events straight to the outbox. (At exit, ``_client.process`` takes over:
it hands what still waits to a delivery process.)

It also answers ``Telemetry.send_waiting``, ``delivery_status`` and ``drain``:
what the ``kaibantrace`` command and the delivery process use to send what
waits and watch it go.
"""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, Callable, Dict, NamedTuple, Optional, Union

from .. import _fork
from .._delivery.outbox import MemoryOutbox, Outbox, open_outbox
from .._delivery.outbox import purge as purge_outbox
from .._delivery.poster import SETUP_DELAY, SETUP_DELAY_WITH_HAND_OFF
from .._delivery.sender import Sender
from .._delivery.shared import Target
from .._delivery.transport import HttpTransport
from .._encode.identity import after_fork_in_child as identity_after_fork
from .._encode.pipeline import RawEvent
from .._log import logger
from .._policy.config import ENV_APP_ID, Settings, canonical_app_id, decide, ingest_url
from .._policy.page import in_a_page
from .._policy.state import state_dir
from . import process
from .routes import encode_batch

if TYPE_CHECKING:
    from .._delivery.page_sender import PageSender
    from .client import Telemetry


class DeliveryStatus(NamedTuple):
    """How sending goes in this process, for a client (``Telemetry.delivery_status()``)."""

    sending: bool
    """A sender runs in this process (telemetry is on and an event, or ``send_waiting``,
    started it)."""
    passes: int
    """Sending passes the sender finished: after one, ``in_outbox`` has been counted."""
    in_outbox: int
    """Signals for this client's app and endpoint in the outbox, as the last pass counted."""
    stopped: bool
    """The sender stopped touching the network (failures in a row, or ``410 Gone``)."""
    problem: str
    """How the last failed request ended (empty when none failed)."""
    backoff_until: float
    """Wall-clock time before which another process's backoff forbids a request (0: none)."""


def app_id_even_if_off(settings: Settings) -> Optional[str]:
    """The app ID given in code or the environment, canonical, read even when opted out."""
    return canonical_app_id(settings.app_id or (os.environ.get(ENV_APP_ID) or "").strip())


class Delivery:
    """One client's sender and outbox (see the module docstring)."""

    def __init__(self, client: Telemetry) -> None:
        self._client = client
        self.sender: Optional[Union[Sender, PageSender]] = None
        self.exited = False  # the exit hook ran: later events are saved for the hand-off
        self.exit_deadline = 0.0  # monotonic: when the exit budget ran out
        self.holding = False  # this run showed the first-run notice: send nothing
        self._purged = False
        self.direct_outbox: Optional[Outbox] = None

    # -- the sender ------------------------------------------------------------

    def start_sender(self) -> Optional[Union[Sender, PageSender]]:
        if not threading.main_thread().is_alive():
            # The main thread has finished: the interpreter is shutting down, and
            # a thread started now may never run (Python 3.12 refuses to start it).
            return None
        client = self._client
        s = client._settings
        if in_a_page():  # no thread, no file, no exit hook: the host's fetch
            from .._delivery.page_sender import PageSender  # asyncio: only in a page

            page = PageSender(encode=lambda batch: encode_batch(client, batch),
                              target=self._target, counters=client._counters,
                              batch_size=s.batch_size, flush_interval=s.flush_interval,
                              max_queue=s.max_queue, timeout=s.timeout, backoff=s.backoff)
            page.holding = self.holding
            self.sender = page
            return page
        sender = Sender(encode=lambda batch: encode_batch(client, batch), target=self._target,
                        open_outbox=self._open_outbox, on_fork=self._forked_from_c,
                        transport=client._transport or HttpTransport(),
                        counters=client._counters, batch_size=s.batch_size,
                        flush_interval=s.flush_interval, max_queue=s.max_queue, timeout=s.timeout,
                        backoff=s.backoff, setup_delay=self._setup_delay)
        sender.holding = self.holding
        if not sender.start():
            return None
        self.sender = sender
        process.register_hooks()
        process.live_clients.add(client)
        return sender

    def retune(self, settings: Settings) -> None:
        """Give a running sender the sender settings of ``settings``."""
        sender = self.sender
        if sender is not None:
            sender.retune(batch_size=settings.batch_size, flush_interval=settings.flush_interval,
                          max_queue=settings.max_queue, timeout=settings.timeout,
                          backoff=settings.backoff)

    def hold(self) -> None:
        """Send nothing in this process (the run showed the first-run notice)."""
        self.holding = True
        if self.sender is not None:
            self.sender.holding = True

    def stop(self, deadline: float) -> None:
        """Stop the sender, sending what it can by ``deadline`` (monotonic)."""
        sender = self.sender
        if sender is None:
            return
        if sender.stop(deadline):
            try:
                sender.transport.close()
            except Exception:
                logger.debug("kaibantrace: closing the transport failed", exc_info=True)
            self.sender = None

    def _target(self) -> Optional[Target]:
        """Where the sender sends now (asked on its thread before each cycle)."""
        settings = self._client._settings
        decision = decide(settings, os.environ)
        app_id = decision.app_id if decision.enabled else app_id_even_if_off(settings)
        if app_id is None:
            return None
        return Target(app_id, ingest_url(settings, os.environ), decision.enabled)

    def _forked_from_c(self, raw: RawEvent) -> None:
        """A child forked without Python's at-fork hooks: start over here, keep this event."""
        if _fork.ensure_fresh_in_child():
            identity_after_fork()
        client = self._client
        if client._delivery is self:  # not yet started over here (by Python's fork hook,
            process.after_fork(client)  # when a route kept from before the fork led here)
        accept = client._route()
        if accept is not None:
            accept(raw)

    # -- the outbox without a sender ---------------------------------------------

    def _open_outbox(self) -> Outbox:
        app_id = app_id_even_if_off(self._client._settings)
        if app_id is None:
            return MemoryOutbox()
        return open_outbox(state_dir(), app_id)

    def purge_outbox_once(self) -> None:
        """Opted out: remove what an earlier run left unsent, without opening it."""
        if self._purged:
            return
        self._purged = True
        app_id = app_id_even_if_off(self._client._settings)
        if app_id is not None and purge_outbox(state_dir(), app_id):
            logger.debug("kaibantrace: opted out; removed signals an earlier run left unsent")

    def save_directly(self, raw: RawEvent, outbox: Optional[Outbox] = None,
                      cause: str = "no_sender") -> None:
        """No sender (interpreter shutdown, or a process that cannot start threads): write
        the event to ``outbox`` (default: one opened here), for the next process that can
        send to deliver; ``cause`` counts it when it cannot be saved."""
        client = self._client
        counters = client._counters
        counters.taken += 1
        client._undelivered_since_flush = True  # saved, not delivered: a flush must not say otherwise
        try:
            encoded = encode_batch(client, [raw])
            if encoded is None or not encoded.signals:
                return
            if outbox is None:
                if self.direct_outbox is None:
                    self.direct_outbox = self._open_outbox()
                outbox = self.direct_outbox
            added = outbox.add(encoded.app_id, encoded.url, encoded.signals)
            counters.in_outbox += len(encoded.signals) - added.full - added.expired
            counters.drop("outbox_full", added.full)
        except Exception:
            logger.debug("kaibantrace: could not save an event without a sender", exc_info=True)
            client._lose(cause)

    def save_after_exit(self, raw: RawEvent) -> None:
        """After the exit hook: save the event (in the sender's outbox file, waiting for another
        process's transaction no longer than the exit budget allows), then start a delivery
        process for it unless one runs (one started at exit looks again before it ends)."""
        sender = self.sender
        outbox = getattr(sender.outbox, "primary", sender.outbox) if sender is not None else None
        setter = getattr(outbox, "set_busy_timeout", None)
        if setter is None:  # no sender here: the first event comes during shutdown
            self.save_directly(raw)
        else:
            try:
                setter(max(0.0, self.exit_deadline - time.monotonic()))
            except Exception:
                logger.debug("kaibantrace: could not bound the wait for the outbox", exc_info=True)
            self.save_directly(raw, outbox, cause="unsaved_at_exit")
        process.hand_off(self._client)

    def _setup_delay(self, outbox: Outbox) -> float:
        """How long the poster waits before setting up HTTP (asked on its thread): a short
        run whose leftovers a delivery process will take need not set it up at all."""
        durable = getattr(outbox, "primary", outbox).durable
        return SETUP_DELAY_WITH_HAND_OFF if durable and process.may_hand_off(self._client) else SETUP_DELAY

    # -- sending what waits, on request -------------------------------------------

    def send_waiting(self, *, stop_after: Optional[float], retry_now: bool) -> bool:
        """Start the sender if telemetry is on, and have it send what waits now."""
        try:
            self._client._route()  # decides opt-out; when on, starts the sender
        except Exception:
            logger.debug("kaibantrace: could not start sending what waits", exc_info=True)
        sender = self.sender
        if sender is None:
            return False
        if stop_after is not None:
            sender.bound(time.monotonic() + stop_after)  # nothing still under way after it
        sender.poke(retry_now=retry_now)
        return True

    def drain(self, timeout: float,
              progress: Optional[Callable[[DeliveryStatus], None]]) -> bool:
        """``send_waiting(retry_now=True)``, then wait up to ``timeout`` seconds until none is
        left or sending stops; ``True`` when none is left."""
        if not self.send_waiting(stop_after=None, retry_now=True):
            return False
        sender = self.sender
        if sender is not None and getattr(sender, "aflush", None) is not None:
            # A page cannot wait: whether anything is left, as it is now.
            if progress is not None:
                progress(self.status())
            return not sender.pending and not sender.in_flight
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if progress is not None:
                progress(status)
            if status.passes and (status.in_outbox == 0 or status.stopped):
                return status.in_outbox == 0
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def flush(self, timeout: float) -> bool:
        """``Telemetry.flush``: wait for the sender; what was lost since the last flush makes
        it ``False``."""
        client = self._client
        lost, client._undelivered_since_flush = client._undelivered_since_flush, False
        sender = self.sender
        try:
            delivered = True if sender is None else sender.flush(timeout)
        except Exception:
            delivered = False
        return delivered and not lost

    async def aflush(self, timeout: float) -> bool:
        """``Telemetry.aflush``: in a page, the page sender's own; elsewhere ``flush`` on a
        worker thread of the loop, so the loop is never blocked."""
        client = self._client
        sender = self.sender
        page_flush = getattr(sender, "aflush", None)  # a page's sender
        if page_flush is not None:
            lost, client._undelivered_since_flush = client._undelivered_since_flush, False
            try:
                done = bool(await page_flush(timeout))
            except Exception:
                logger.debug("kaibantrace: flushing the page failed", exc_info=True)
                done = False
            return done and not lost
        if sender is None:  # nothing to wait for (and a page has no thread to wait on)
            return client.flush(0.0)
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(None, client.flush, timeout)

    def stats(self) -> Dict[str, object]:
        """The client's counts, with what waits in the queue and the request now."""
        sender = self.sender
        if sender is None:
            return self._client._counters.snapshot()
        return self._client._counters.snapshot(sender.pending, sender.in_flight)

    def status(self) -> DeliveryStatus:
        sender = self.sender
        in_outbox = self._client._counters.in_outbox
        if sender is None:
            return DeliveryStatus(False, 0, in_outbox, False, "", 0.0)
        return DeliveryStatus(True, sender.passes, in_outbox, sender.circuit_open,
                              sender.last_problem, sender.shared_floor)

    def waiting(self) -> int:
        sender = self.sender
        try:
            return sender.outbox_count() if sender is not None else 0
        except Exception:  # an outbox that cannot be read: nothing known to wait
            return 0
