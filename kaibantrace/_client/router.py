"""The hot path: where a client's event goes now, decided again only when something changed.

``Router.route()`` reads the raw environment values that decide (the client's
opt-out variable, ``KAIBAN_TELEMETRY_OPT_OUT``, ``DO_NOT_TRACK``, debug, app
ID, profile) straight from ``os.environ``'s storage and compares them, by
identity, with what it saw last time; only when something changed, or the
*generation* moved (``configure()``, a capture installed, a fork), does it call
``_policy.config.decide`` again and ask ``routes.choose`` where events go. So
opt-out is honoured whenever it is set, at the cost of a few dictionary
look-ups per event.

A client's ``_route`` is its router's ``route``, bound once: decorated
functions keep it, so the router lives as long as its client. In a browser page
(Pyodide) the client's router is a ``PageRouter``, which also watches the page's
opt-outs.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import TYPE_CHECKING, Any, Optional, Tuple

from .._policy.config import ENV_APP_ID, ENV_DEBUG, ENV_DO_NOT_TRACK, ENV_OPT_OUT, ENV_PROFILE, decide
from .._policy.page import in_a_page, page_opt_out
from .capture import captures
from .routes import Accept, choose

if TYPE_CHECKING:
    from .client import Telemetry

_generation = 0
"""Bumped by anything that must make every client decide again."""


def bump_generation() -> None:
    global _generation
    _generation += 1


def after_fork_in_child() -> None:
    """A fork may have split a thread that held a router's lock (deciding, or starting a
    sender): every client's router gets a new one in the child, running sender or not."""
    for router in list(routers):
        router.lock = threading.RLock()


def _encoded_key(name: str) -> Any:
    encode = getattr(os.environ, "encodekey", None)
    return encode(name) if encode is not None else name


_ENV_KEYS = (_encoded_key(ENV_DO_NOT_TRACK), _encoded_key(ENV_DEBUG), _encoded_key(ENV_APP_ID),
             _encoded_key(ENV_PROFILE), _encoded_key(ENV_OPT_OUT))


routers: weakref.WeakSet[Router] = weakref.WeakSet()
"""Every client's router (``after_fork_in_child``)."""


class Router:
    """What one client saw when it last decided, and the answer it got."""

    def __init__(self, client: Telemetry) -> None:
        self._client = client
        # Reentrant: an event emitted from a signal handler that interrupted
        # this thread inside the lock must not deadlock the host.
        self.lock = threading.RLock()
        self.reset(client._settings.opt_out_env)
        routers.add(self)

    def reset(self, opt_out_env: str) -> None:
        """Forget what was seen: the next event decides again."""
        self._opt_key = _encoded_key(opt_out_env)
        self._seen_generation = -1
        self._seen_opt_out: Any = None
        self._seen_env: Tuple[Any, ...] = ()
        self._off_by_opt_out = False
        self._accept: Optional[Accept] = None

    def watch(self, opt_out_env: str) -> None:
        """The client's own opt-out variable is now ``opt_out_env``."""
        self._opt_key = _encoded_key(opt_out_env)

    def forget(self) -> None:
        """Decide again at the next event (this client only)."""
        self._seen_generation = -1

    def route(self) -> Optional[Accept]:
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
        client = self._client
        with self.lock:
            generation = _generation
            data = getattr(os.environ, "_data", {})
            self._seen_opt_out = data.get(self._opt_key)
            self._seen_env = tuple(data.get(key) for key in _ENV_KEYS)
            settings = client._settings
            decision = decide(settings, os.environ)
            accept = choose(client, decision)
            self._accept = accept
            # When code or the client's own variable opted out, that alone decides.
            self._off_by_opt_out = accept is None and decision.decided_by in (
                "code", settings.opt_out_env) and not captures
            self._seen_generation = generation
            self.saw_page()
            return accept

    def saw_page(self) -> None:
        """What the page's opt-outs were when deciding (a page's router keeps it)."""


class PageRouter(Router):
    """A page's router: the page's opt-outs too are looked at for every event, as a page
    may set its variable at any time (a consent banner, say), and then no event is even
    queued. One call into the JavaScript host per event (``page_opt_out``); only pages pay
    it."""

    def reset(self, opt_out_env: str) -> None:
        super().reset(opt_out_env)
        self._seen_page: Optional[str] = None

    def route(self) -> Optional[Accept]:
        # Off by code or by the client's own variable, the page cannot turn it on.
        if not self._off_by_opt_out and page_opt_out() != self._seen_page:
            self._seen_generation = -1
        return super().route()

    def saw_page(self) -> None:
        self._seen_page = page_opt_out()


def make_router(client: Telemetry) -> Router:
    """The router for ``client``: a page's own under Pyodide."""
    return PageRouter(client) if in_a_page() else Router(client)
