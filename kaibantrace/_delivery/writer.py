"""The writer thread: from the queue in memory to the outbox, before anything is sent.

It encodes what is queued and writes it to the outbox in batches, so a killed
process loses only what it had not yet written. It never touches the network,
so the queue keeps draining into the outbox while a request hangs: the queue is
only a staging area, and overflows only when the host emits faster than signals
can be encoded. When the outbox is full it waits for the poster while the queue
has room (see ``Writer._wait_for_poster``).
"""

from __future__ import annotations

import time
from typing import List, Optional, Tuple

from .._encode.pipeline import RawEvent
from .._fork import guard as fork_guard
from .._log import logger
from .fallback import FallbackOutbox
from .outbox import Added, MemoryOutbox, Outbox
from .shared import FlushMarker, SenderState, Target

_WRITE_CHUNK = 5_000  # events the writer encodes and stores in one transaction, at most
_LOOK_AGAIN = 0.02  # seconds between looks at the queue, for a writer waiting for the poster

# The standard modules the worker threads use, which their users import only when
# first needed so that ``import kaibantrace`` and opted-out processes stay light.
# The writer imports them all as it starts, under the fork guard: an import that
# a fork split would leave the child's next import of that module hanging.
_WORKER_MODULES = ("json", "sqlite3", "hashlib", "hmac", "random", "getpass", "socket",
                   "ipaddress", "urllib.parse")


def _load_worker_modules() -> None:
    import importlib

    for name in _WORKER_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # e.g. a Python built without sqlite3: its user copes
            pass


class Writer:
    """The writer thread's work for one sender (``run`` is the thread's target)."""

    def __init__(self, state: SenderState) -> None:
        self._s = state

    def run(self) -> None:
        s = self._s
        try:
            with fork_guard("setup"):  # a fork mid-import would leave the child a held import lock
                _load_worker_modules()
            try:
                opened = s.open_outbox()
                # A file that fails later (a full disk) hands its work to memory.
                s.outbox = FallbackOutbox(opened) if opened.durable else opened
            except Exception:
                logger.debug("kaibantrace: outbox unavailable; keeping signals in memory",
                             exc_info=True)
                s.outbox = MemoryOutbox()
            s.outbox_ready.set()
            while not s.stopping:
                self._write_queued(s.outbox)
                if not s.queue:
                    self._sleep(None)
                if s.queue and len(s.queue) < s.batch_size and not (
                        s.flush_requested or s.stopping):
                    self._sleep(s.interval)  # let a batch fill up
            self._write_queued(s.outbox)  # stopping: what is left (empty at exit)
        except BaseException:  # the host must never see this thread's trouble
            logger.debug("kaibantrace: writer stopped unexpectedly", exc_info=True)
        finally:
            s.outbox_ready.set()
            s.post_wake.set()

    def _sleep(self, timeout: Optional[float]) -> None:
        if not self._s.stopping:
            self._s.wake.wait(timeout)
        self._s.wake.clear()

    def _write_queued(self, outbox: Outbox) -> None:
        """Move the queue into the outbox, a batch per transaction, and tell the poster."""
        s = self._s
        s.armed = False
        s.hurried = False
        s.flush_requested = False
        target: Optional[Target] = None
        decided = False
        while True:
            self._wait_for_poster()
            with s.take_lock:
                raws, markers = self._take_batch()
            if not raws and not markers:
                break
            if raws:
                if not decided:  # once a pass: each decision costs a look at two files
                    target, decided = s.target(), True
                if target is None or not target.wanted:
                    s.lose(len(raws), "opted_out" if target else "no_app_id")
                else:
                    self.persist(outbox, raws, exiting=False)
            if markers:
                with s.marker_lock:
                    for marker in markers:
                        marker.upto = s.last_added
                        s.markers.append(marker)
            s.post_wake.set()

    def _wait_for_poster(self) -> None:
        """Move the queue into the outbox while it has room; past that, wait for the poster.

        The outbox is where signals are safe (and what exit need not save
        again), so the writer moves events there as fast as it can. But it
        holds at most 10,000 signals and drops the oldest beyond that. Once it
        is full, the rest of a burst stays in memory while the poster makes
        room, however slowly (a far endpoint may take a second per request):
        nothing need be lost yet. The outbox takes everything, dropping its
        oldest, only when something must be lost: the poster cannot send (its
        circuit is open, every process's failures stop it for now, or it holds
        back), or the queue is three quarters full.
        The oldest signals are the ones to lose then, not the newest, which the
        full queue would refuse.
        """
        s = self._s
        queue = s.queue
        while s.outbox_room() <= 0 and not s.overfull and not s.stopping:
            try:
                head = queue[0]
            except IndexError:  # nothing to move: the writer sleeps until events arrive
                return
            if isinstance(head, FlushMarker):  # needs no room: the flush reaches the poster
                return
            if (s.cannot_send or s.holding or s.policy.circuit_open
                    or len(queue) * 4 >= s.max_queue * 3):
                s.overfull = True
                break
            s.progress.clear()
            if s.outbox_room() > 0:
                break
            s.progress.wait(_LOOK_AGAIN)

    def _take_batch(self) -> Tuple[List[RawEvent], List[FlushMarker]]:
        s = self._s
        raws: List[RawEvent] = []
        markers: List[FlushMarker] = []
        queue = s.queue
        # A backlog goes in large transactions: each one costs the host a few
        # hand-backs of the GIL, whatever its size. No more than the outbox has
        # room for (a flush at the head needs none), unless it must take
        # everything or is stopping.
        limit = (_WRITE_CHUNK if s.overfull or s.stopping
                 else min(_WRITE_CHUNK, max(s.outbox_room(), 0)))
        while queue:
            item = queue[0]
            if isinstance(item, FlushMarker):
                queue.popleft()
                with s.marker_lock:
                    s.markers_queued -= 1
                markers.append(item)
                break
            if len(raws) >= limit:
                break
            queue.popleft()  # ``item``: only this thread takes from the queue (under take_lock)
            raws.append(item)
        s.counters.taken += len(raws)
        return raws, markers

    def persist(self, outbox: Outbox, raws: List[RawEvent], *, exiting: bool) -> None:
        """Encode ``raws`` and add them to ``outbox``; what cannot be is counted as lost.

        Also called by the exit hook, on the main thread, with ``exiting=True``.
        """
        s = self._s
        try:
            encoded = s.encode(raws)
        except Exception:
            logger.debug("kaibantrace: could not encode a batch", exc_info=True)
            encoded = None
            s.counters.drop("encode_error", len(raws))
        if encoded is None or not encoded.signals:
            s.lost = s.lost or encoded is None or len(raws) > 0
            return
        if len(encoded.signals) < len(raws):  # the encoder refused some (counted there)
            s.lost = True
        try:
            if exiting and hasattr(outbox, "set_busy_timeout"):
                # Another process's transaction may hold the file: wait for it only as
                # long as the exit budget allows. What cannot be saved then stays in
                # memory and is counted when the process ends (``settle_at_exit``).
                left = (s.deadline or 0) - time.monotonic()
                outbox.set_busy_timeout(max(left, 0.0))
            with s.book_lock:
                added: Added = outbox.add(encoded.app_id, encoded.url, encoded.signals)
                s.counters.in_outbox += len(encoded.signals) - added.full - added.expired
        except Exception:
            logger.debug("kaibantrace: could not write to the outbox", exc_info=True)
            s.lose(len(encoded.signals), "outbox_error")
            return
        if not exiting:
            s.last_added = added.last_id
        s.lose(added.full, "outbox_full")
        s.lose(added.expired, "expired")
