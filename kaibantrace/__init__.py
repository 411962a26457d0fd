"""kaibantrace: privacy-first, anonymous usage telemetry for Python libraries and CLIs.

    import kaibantrace

    kaibantrace.configure(app_id="YOUR-TELEMETRYDECK-APP-ID")

    @kaibantrace.track("workflow_started")
    def start_workflow(team): ...

Signals go to TelemetryDeck from background threads that start at the first
event (in a browser page, under Pyodide, from the page's event loop with
``fetch``). ``KAIBAN_TELEMETRY_OPT_OUT=1`` or ``DO_NOT_TRACK=1`` switches everything
off: no thread, no file, no socket. Importing this package does nothing but
define names; in particular it opens no socket and loads no HTTP or SQLite code.

The module-level functions act on a default client; a library that ships
telemetry of its own should hold its own ``Telemetry``.
"""

from __future__ import annotations

import _thread

from . import events
from ._errors import ConfigurationError, EventError, KaibanTraceError, PrivacyError
from ._version import __version__

# ``typing.TYPE_CHECKING`` without importing ``typing``: type checkers treat any
# name ``TYPE_CHECKING`` as true, and importing this package stays nearly free.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Mapping, Optional, Sequence

    from typing_extensions import Unpack

    from ._client.client import F, Telemetry
    from ._client.commands import telemetry_commands
    from ._client.delivery import DeliveryStatus
    from ._client.timing import Timer
    from ._encode.identity import Session, SessionScope, project_id
    from ._policy.config import Decision, Options, Settings

# The rest of the public face is loaded at its first use (PEP 562), so that
# ``import kaibantrace`` costs next to nothing: the client, its configuration
# and its identities come in with the first ``configure``, ``track`` or event.
_LAZY = {
    "Telemetry": "_client.client",
    "Decision": "_policy.config",
    "DeliveryStatus": "_client.delivery",
    "Settings": "_policy.config",
    "Session": "_encode.identity",
    "SessionScope": "_encode.identity",
    "project_id": "_encode.identity",
    "telemetry_commands": "_client.commands",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kaibantrace' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f"kaibantrace.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


_default: Optional[Telemetry] = None
_default_lock = _thread.allocate_lock()


def default_client() -> Telemetry:
    """The client the module-level functions use (made at its first use)."""
    global _default
    client = _default
    if client is None:
        from ._client.client import Telemetry

        with _default_lock:
            if _default is None:
                _default = Telemetry()
            client = _default
    return client


def configure(**settings: Unpack[Options]) -> None:
    """Configure the default client; a ``None`` value leaves that setting as it is.

    Settings (typed for type checkers by ``Options``): ``app_id``, ``endpoint``,
    ``namespace``, ``salt``, ``test_mode``, ``opt_out``, ``opt_out_env``, ``debug``,
    ``strict``, ``batch_size``, ``flush_interval``, ``max_queue``, ``timeout``,
    ``exit_timeout``, ``backoff``, ``profile``, ``default_parameters``,
    ``local_secret``, ``detached_delivery``, ``max_per_minute``, ``default_payload``,
    ``tool_name``, ``transport``. Raises
    ``ConfigurationError`` naming a bad value and ``TypeError`` naming an
    unknown setting; see ``Telemetry.configure``.
    """
    default_client().configure(**settings)


def track(name: str, *, payload: Any = None, duration: bool = False) -> Callable[[F], F]:
    """Decorator: emit ``name`` when the decorated function starts its work.

    ``payload`` is a mapping sent with every event, or a callable that receives
    the call's bound arguments as a dict and returns the mapping. With
    ``duration=True`` the event is sent when the work ends, with how long it ran
    and how it ended, plus an error signal when it raised (see ``Telemetry.track``).
    """
    return default_client().track(name, payload=payload, duration=duration)


def track_cli(name: str, *, payload: Any = None, parser: Any = None,
              duration: bool = False) -> Callable[[F], F]:
    """Decorator for CLI entry points: events are identified by the project ID, and carry
    the sub-command that ran (see ``Telemetry.track_cli``)."""
    return default_client().track_cli(name, payload=payload, parser=parser, duration=duration)


def timed(name: str, payload: Optional[Mapping[str, Any]] = None) -> Timer:
    """``with kaibantrace.timed(name):`` times a block as ``track(name, duration=True)``
    times a call (see ``Telemetry.timed``)."""
    return default_client().timed(name, payload)


def session() -> SessionScope:
    """``with kaibantrace.session() as s:`` groups events under one random session ID."""
    return default_client().session()


def emit(name: str, payload: Optional[Mapping[str, Any]] = None, *,
         float_value: Optional[float] = None) -> None:
    """Record one event now, from the default client."""
    (_default or default_client()).emit(name, payload, float_value=float_value)


def flush(timeout: float = 5.0) -> bool:
    """Wait until the default client's earlier events are delivered; ``True`` if they all were."""
    return default_client().flush(timeout)


async def aflush(timeout: float = 5.0) -> bool:
    """``flush`` for async code and browser pages: wait for the default client's earlier
    events without blocking the event loop; ``True`` if they all were delivered."""
    return await default_client().aflush(timeout)


def command_line(argv: Optional[Sequence[str]] = None, *, client: Optional[Telemetry] = None,
                 prog: str = "kaibantrace") -> int:
    """Run a ``kaibantrace`` command (status, enable, disable, reset, log, project-id, flush)
    for ``client`` (default: the default client); the exit status.

    A CLI can mount these under its own name: ``mytool telemetry status`` is
    ``command_line(["status"], client=my_client, prog="mytool telemetry")``.
    """
    from ._cli.command import command_line as run

    return run(argv, client=client, prog=prog)


def shutdown(timeout: float = 1.0) -> None:
    """Send what the default client has queued within ``timeout``, then stop it."""
    default_client().shutdown(timeout)


__all__ = [
    "ConfigurationError",
    "Decision",
    "DeliveryStatus",
    "EventError",
    "KaibanTraceError",
    "PrivacyError",
    "Session",
    "SessionScope",
    "Settings",
    "Telemetry",
    "__version__",
    "aflush",
    "command_line",
    "configure",
    "default_client",
    "emit",
    "events",
    "flush",
    "project_id",
    "session",
    "shutdown",
    "telemetry_commands",
    "timed",
    "track",
    "track_cli",
]
