"""One pass of the poster: claim batches from the outbox, post them, act on each answer.

A 2xx deletes the batch; a refusal (400, 401, 403, 404, 413, 422, 501, 505)
drops it for good; a ``410 Gone`` retires the endpoint on this machine and
drops what waited for it; any other answer leaves the batch for a retry, when
``Backoff`` allows. Each pass ends by answering the ``flush()`` calls whose
signals are all sent, or can no longer be soon.

The thread that runs passes, and decides when, is ``_delivery.poster``.
"""

from __future__ import annotations

import time
from typing import List, Optional

from .._log import logger
from .._policy import prefs
from . import sentlog
from .backoff import Backoff
from .claims import Claims
from .outbox import Outbox, Row, row_problem
from .shared import SenderState, Target
from .transport import Outcome, Result, Transport

_BATCHES_PER_CLAIM = 10  # requests one claim of the outbox may serve when there is a backlog


class Posting:
    """How one sender sends what waits in the outbox, and what it learned doing so."""

    def __init__(self, state: SenderState, *, transport: Transport) -> None:
        self._s = state
        self.transport = transport
        self.backoff = Backoff(state.policy)
        self.claims = Claims()
        self.passes = 0  # sending passes finished (the command line waits for one)
        self.last_problem = ""  # how the last failed request ended, for the command line
        self.in_flight = 0  # signals in the request being sent
        self._ignore_shared = False  # this pass ignores other processes' backoff

    def run_pass(self, outbox: Outbox) -> None:
        """Send batches while allowed, then recount the outbox and answer waiting flushes."""
        s = self._s
        # A retry the user asked for (``send_waiting(retry_now=True)``) is this pass's only.
        self._ignore_shared, s.retry_now = s.retry_now, False
        target = s.target()
        if target is not None and not target.wanted:  # opted out: what waited is dropped unsent
            with s.book_lock:
                s.lose(outbox.drop_app(target.app_id), "opted_out")
        elif target is not None and target.url is not None:
            while self._send_batch(outbox, target):
                pass
        if target is not None and target.url is not None:
            with s.book_lock:
                s.counters.in_outbox = outbox.count(target.app_id, target.url)
        self.resolve_markers(force=False, target=target)
        self.passes += 1

    def _send_batch(self, outbox: Outbox, target: Target) -> bool:
        """Claim and post up to ``_BATCHES_PER_CLAIM`` batches; ``True`` if there may be more.

        With a backlog, one claim serves several requests: the outbox's
        transaction, and the GIL hand-backs it costs the host, is paid once per
        claim rather than once per request. Each batch is deleted as soon as
        its answer arrives, so a process that ends mid-claim (its daemon thread
        simply stops) never leaves accepted signals behind to be sent again.
        At exit, one batch at a time.
        """
        assert target.url is not None
        s = self._s
        if s.policy.circuit_open or s.holding or not self.backoff.may_try_now(
                outbox, target.url, ignore_shared=self._ignore_shared,
                cut_short=bool(s.markers or s.markers_queued), exiting=s.stopping):
            return False
        remaining = None if s.deadline is None else s.deadline - time.monotonic()
        if remaining is not None and (remaining < 0.01 or (
                (s.exiting or s.bounded) and not self.claims.fits(remaining))):
            return False
        timeout = s.timeout if remaining is None else min(s.timeout, remaining / 2)
        batches = 1 if remaining is not None else _BATCHES_PER_CLAIM
        if not self._still_wanted() or self.claims.settled:
            return False  # settled: the exit hook gave back what this process held
        # The lease covers every request of the claim, so no other process takes them
        # meanwhile; a request may take its timeout twice (to connect, then to answer).
        batch_size = s.batch_size
        rows = self._valid(outbox, target, outbox.claim(
            target.app_id, target.url, batch_size * batches, batches * 2 * timeout + 2.0))
        if rows is None:
            return True  # the claim held only rows that must not be sent: claim again
        if not rows:
            return False
        if not self.claims.hold([row.id for row in rows]):  # the exit hook has settled meanwhile
            outbox.release([row.id for row in rows])
            return False
        try:
            for start in range(0, len(rows), batch_size):
                if start and (s.stopping or s.policy.circuit_open or s.holding
                              or not self._still_wanted()):
                    return False
                if not self._post_chunk(outbox, target, rows[start:start + batch_size], timeout):
                    return False
        finally:
            self.claims.finish(outbox)
        return len(rows) == batch_size * batches

    def _valid(self, outbox: Outbox, target: Target, rows: List[Row]) -> Optional[List[Row]]:
        """The claimed rows that are signals of this app; the others are dropped and counted.

        ``None`` when every row claimed was refused, so the caller claims again.
        """
        s = self._s
        bad = [row.id for row in rows if row_problem(row.body, target.app_id) is not None]
        if not bad:
            return rows
        with s.book_lock:
            outbox.delete(bad)
            s.counters.in_outbox -= len(bad)
        s.lose(len(bad), "invalid_row")
        s.log_once("invalid_row", "kaibantrace: the outbox held rows that are not signals of "
                   "this app (written by something else); dropped, never sent")
        doomed = set(bad)
        good = [row for row in rows if row.id not in doomed]
        return good or None

    def _still_wanted(self) -> bool:
        """Whether telemetry is still on: asked before each request, so that an opt-out
        (``kaibantrace disable`` in another terminal) stops sending within one request."""
        now = self._s.target()
        return now is not None and now.wanted

    def _post_chunk(self, outbox: Outbox, target: Target, rows: List[Row], timeout: float) -> bool:
        """Post one batch and forget it once it needs no more sending (sent or refused);
        ``False`` when the rest of the claim must wait."""
        assert target.url is not None
        ids = [row.id for row in rows]
        body = ("[" + ",".join(row.body for row in rows) + "]").encode("utf-8")
        self.claims.sending(ids, timeout)
        try:
            return self._answered(outbox, target, ids, body,
                                  self._post(target.url, body, timeout, len(rows)))
        finally:
            self.claims.sent()  # only once the answer is recorded (the rows deleted)

    def _post(self, url: str, body: bytes, timeout: float, count: int) -> Outcome:
        self._s.counters.requests += 1
        self.in_flight = count
        started = time.monotonic()
        try:
            outcome = self.transport.send(url, body, timeout)
        except Exception as exc:  # a custom transport may raise; treat it as the network
            outcome = Outcome(Result.RETRY, type(exc).__name__)
        finally:
            self.in_flight = 0
        if outcome.result is not Result.RETRY:
            self.claims.latency = time.monotonic() - started
        return outcome

    def _answered(self, outbox: Outbox, target: Target, ids: List[int], body: bytes,
                  outcome: Outcome) -> bool:
        assert target.url is not None
        s = self._s
        if outcome.result is Result.SENT:
            self._forget(outbox, ids)
            s.counters.sent += len(ids)
            self.backoff.succeeded(outbox, target.url)
            try:  # the transparency log gets each request exactly as sent
                sentlog.append(target.app_id, target.url, [(body, len(ids))])
            except Exception:
                logger.debug("kaibantrace: could not record a request in the transparency log",
                             exc_info=True)
            return True
        if outcome.result is Result.REJECTED:
            self._forget(outbox, ids)
            s.policy.rejected()
            s.log_once("rejected", "kaibantrace: the ingest service refused a batch "
                       f"({outcome.detail}); dropped, not retried")
            s.lose(len(ids), "rejected")
            return True
        if outcome.result is Result.RETIRED:
            self._retire(outbox, target)  # drops every other row of this app
            self.claims.drop_all()
            return False
        self.last_problem = outcome.detail
        if self.backoff.failed(outbox, target.url, outcome):
            s.counters.retried += 1
        else:
            s.log_once("circuit", f"kaibantrace: ingest unreachable ({outcome.detail}); not "
                       "sending again in this process, undelivered signals wait in the outbox")
        return False

    def _retire(self, outbox: Outbox, target: Target) -> None:
        """410 Gone: record it for good, drop what waits for this endpoint, never send again."""
        s = self._s
        s.policy.retired()
        self.last_problem = "the endpoint answered 410 Gone: it is retired, and what waited was dropped"
        try:  # this machine never sends this app's signals there again
            if target.url is not None:
                prefs.mark_retired(target.app_id, target.url)
        except Exception:
            logger.debug("kaibantrace: could not record the retired endpoint", exc_info=True)
        with s.book_lock:
            s.lose(outbox.drop_app(target.app_id), "retired")
            s.counters.in_outbox = 0
        s.log_once("retired", "kaibantrace: the ingest endpoint answered 410 Gone: it is "
                   "retired; this machine will not send to it again")

    def _forget(self, outbox: Outbox, ids: List[int]) -> None:
        s = self._s
        with s.book_lock:
            outbox.delete(ids)
            s.counters.in_outbox -= len(ids)
        self.claims.forget(ids)
        s.overfull = False
        s.progress.set()  # the writer may be waiting for room

    def resolve_markers(self, *, force: bool, target: Optional[Target] = None) -> None:
        """Answer the flushes whose events are all delivered, or can no longer be soon;
        and tell the writer whether this poster may send for now (``cannot_send``).

        ``target`` is the one the pass just sent to (the pass looked it up):
        deciding with a newer one could give up on signals an opt-out has not
        yet dropped. Forced, at the poster's end, none is needed.
        """
        s = self._s
        give_up = (force or s.policy.circuit_open
                   or self.backoff.shared_circuit_open(ignore_shared=self._ignore_shared)
                   or s.holding or target is None or not target.wanted)
        s.cannot_send = give_up  # nor does the writer hold events back for it (``Writer``)
        with s.marker_lock:
            markers = list(s.markers)
        if not markers:
            return
        outbox = s.outbox
        answered = []
        for marker in markers:
            try:
                left = outbox.count_mine(marker.upto) if outbox is not None else 0
            except Exception:
                left = 1
            if left == 0 or give_up:
                marker.ok = left == 0 and not s.lost
                marker.done.set()
                answered.append(marker)
        if answered:
            s.lost = False
            with s.marker_lock:
                s.markers = [m for m in s.markers if m not in answered]
