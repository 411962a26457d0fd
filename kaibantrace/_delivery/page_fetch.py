"""A browser page's side of a request (Pyodide): ``fetch``, its limits, and the page's
own end.

Everything here speaks to the JavaScript host through Pyodide's ``js`` module, imported
when first needed, so that outside a page nothing of it is loaded. A request is made in
two steps: ``begin`` calls ``fetch`` at once, in the caller's own turn of the page (which
matters when the page is being closed, as the loop may never run again), and ``answer``
awaits what it brings. Neither ever raises: every way a request can end is an
``Outcome``.
"""

from __future__ import annotations

import asyncio
import importlib
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from .._log import logger
from .transport import Outcome, Result, outcome_for_status

KEEPALIVE_BODY_LIMIT = 60_000
"""Bytes of JSON per request at most. Browsers refuse a ``keepalive`` request once the
bodies of those in flight pass 64 KiB (Chromium fails it as a network error), so a
batch of large signals goes out in several requests (one at a time) rather than never."""

Started = Union[Tuple[Any, Any], Outcome]
"""A request on its way (``fetch``'s promise, and the controller that can abort it), or
the outcome of one that could not even start."""


def within_keepalive_limit(texts: List[str]) -> List[List[str]]:
    """``texts`` in runs whose JSON array stays within ``KEEPALIVE_BODY_LIMIT`` bytes (one
    signal, at most a few KiB, always fits)."""
    runs: List[List[str]] = [[]]
    size = 2  # the brackets
    for text in texts:
        length = len(text.encode("utf-8")) + 1  # and its comma
        if runs[-1] and size + length > KEEPALIVE_BODY_LIMIT:
            runs.append([])
            size = 2
        runs[-1].append(text)
        size += length
    return runs


def begin(url: str, body: str) -> Started:
    """Call the host's ``fetch`` now: a POST of ``body``, ``keepalive`` so that it may
    finish after the page is closed, with an ``AbortController`` where the host has one."""
    try:
        js = importlib.import_module("js")
        ffi = importlib.import_module("pyodide.ffi")
        init: Dict[str, Any] = {"method": "POST", "body": body, "keepalive": True,
                                "headers": {"Content-Type": "application/json"}}
        controller = None
        if getattr(js, "AbortController", None) is not None:
            controller = js.AbortController.new()
            init["signal"] = controller.signal
        options = ffi.to_js(init, dict_converter=js.Object.fromEntries)
        return js.fetch(url, options), controller
    except Exception as exc:  # no fetch in this host, or one that refused at once
        return Outcome(Result.RETRY, type(exc).__name__)


async def answer(started: Started, timeout: float) -> Outcome:
    """What a request brought, waiting at most ``timeout`` seconds. One that outlives it
    is aborted, so that it cannot still arrive beside its retry."""
    if isinstance(started, Outcome):
        return started
    promise, controller = started
    try:
        response = await asyncio.wait_for(promise, timeout)
        status = int(response.status)
        retry_after = response.headers.get("Retry-After")
        return outcome_for_status(status, None if retry_after is None else str(retry_after))
    except asyncio.TimeoutError:
        _abort(controller)
        return Outcome(Result.RETRY, "timed out")
    except Exception as exc:  # a refused request: fetch's TypeError, or anything else
        return Outcome(Result.RETRY, type(exc).__name__)


def _abort(controller: Any) -> None:
    try:
        if controller is not None:
            controller.abort()
    except Exception:
        logger.debug("kaibantrace: aborting a request failed", exc_info=True)


def watch_hiding(on_hide: Callable[[], None]) -> Optional[Any]:
    """Call ``on_hide`` when the page is hidden or closed (``visibilitychange`` to hidden,
    ``pagehide``), the last moments a page surely has to send. Returns the listener, to
    keep it alive; ``None`` where there is no document (a worker, Node.js)."""
    try:
        js = importlib.import_module("js")
        ffi = importlib.import_module("pyodide.ffi")
        document = getattr(js, "document", None)
        if document is None or getattr(js, "addEventListener", None) is None:
            return None

        def listener(event: Any) -> None:
            try:
                if str(event.type) == "pagehide" or str(document.visibilityState) == "hidden":
                    on_hide()
            except Exception:  # never an error into the page's event dispatch
                logger.debug("kaibantrace: sending as the page hides failed", exc_info=True)

        proxy = ffi.create_proxy(listener)
        js.addEventListener("pagehide", proxy)
        document.addEventListener("visibilitychange", proxy)
        return proxy
    except Exception:
        logger.debug("kaibantrace: could not watch the page's end", exc_info=True)
        return None


def unwatch_hiding(listener: Optional[Any]) -> None:
    """Stop calling what ``watch_hiding`` registered, and free its proxy."""
    if listener is None:
        return
    try:
        js = importlib.import_module("js")
        js.removeEventListener("pagehide", listener)
        js.document.removeEventListener("visibilitychange", listener)
        listener.destroy()
    except Exception:
        logger.debug("kaibantrace: could not stop watching the page's end", exc_info=True)
