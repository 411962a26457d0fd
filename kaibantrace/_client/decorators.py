"""``track`` and ``track_cli``: decorators that emit an event when work starts.

Everything that can be wrong with a decorator's arguments is checked here, at
decoration time, where the author sees the traceback: the name, and a static
payload (which is cleaned and privacy-checked once, so calls reuse it).

The decorated callable is replaced by a ``Tracked`` proxy (``_client.wrappers``), which
keeps everything about it (signature, docstring, ``inspect`` answers, pickling,
the caller seen from inside it) and records the event when it is called.
Coroutine functions, generators and async generators return an object of the
same kind that records the event when the work starts (first ``await`` or
``next``), not when the object is created (``_client.firststep``).

A payload callable receives the call's arguments, bound to the function's
parameter names with defaults applied (``self``/``cls`` included for methods),
and runs on the calling thread, because the arguments may change afterwards.
What it returns may change afterwards too (a list the function goes on
filling), so the event keeps a snapshot of it, as ``emit`` does.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, Tuple

from .._encode.identity import project_id
from .._encode.pipeline import (
    CleanPayload,
    PayloadFailed,
    Reporter,
    clean_payload,
    name_problem,
    snapshot_payload,
)
from .._errors import EventError
from .._log import logger
from .clihooks import TrackedCli
from .commands import OWN_COMMANDS, command_argv, command_of, mounted_at
from .firstrun import cli_run_starts
from .firststep import first_step_start
from .routes import encoded_at_call
from .timing import Described, Firing, Timing, timed_start
from .wrappers import Start, Tracked, call_with_caller_globals

if TYPE_CHECKING:
    from .client import Telemetry



def check_name(name: object) -> str:
    """Return ``name`` if it is a valid event name; raise ``TypeError``/``ValueError`` otherwise."""
    problem = name_problem(name)
    if problem is None:
        assert isinstance(name, str)
        return name
    error = TypeError if not isinstance(name, str) else EventError
    raise error(f"kaibantrace: event name {name!r} {problem}")


def _kind(func: Any) -> Optional[str]:
    """What calling ``func`` returns, when the event waits for its first step: decided from
    ``func`` itself (a staticmethod's or classmethod's function), never from what it wraps,
    since a decorator such as ``contextmanager`` makes a generator function something else."""
    func = func.__func__ if isinstance(func, (staticmethod, classmethod)) else func
    if inspect.iscoroutinefunction(func):
        return "coroutine"
    if inspect.isasyncgenfunction(func):
        return "async generator"
    if inspect.isgeneratorfunction(func):
        return "generator"
    return None


def make_decorator(client: Telemetry, name: object, payload: Any, *,
                   cli: bool, parser: Any = None, duration: bool = False) -> Callable[[Any], Any]:
    """The decorator ``track``/``track_cli`` return, after checking its arguments here."""
    event = check_name(name)
    if not isinstance(duration, bool):
        raise TypeError(f"kaibantrace: duration of {event!r} must be True or False, "
                        f"not {type(duration).__name__}")
    static: Optional[Dict[str, str]] = None
    dynamic: Optional[Callable[..., Any]] = None
    if payload is None:
        pass
    elif isinstance(payload, Mapping):
        static = CleanPayload(clean_payload(event, payload, Reporter(), strict=True)) or None
    elif callable(payload):
        dynamic = payload
    else:
        raise TypeError(f"kaibantrace: payload of {event!r} must be a mapping or a callable, "
                        f"not {type(payload).__name__}")
    signatures: Dict[Any, inspect.Signature] = {}

    def payload_for(wrapped: Any, args: Any, kwargs: Any) -> Any:
        assert dynamic is not None
        try:
            target: Any = wrapped
            leading: Tuple[Any, ...] = ()
            bound_self = getattr(wrapped, "__self__", None)
            if bound_self is not None and inspect.ismethod(wrapped):
                target, leading = wrapped.__func__, (bound_self,)
            signature = signatures.get(target)
            if signature is None:
                signature = signatures[target] = inspect.signature(target)
            bound = signature.bind(*leading, *args, **kwargs)
            bound.apply_defaults()
            result = dynamic(dict(bound.arguments))
        except Exception as exc:  # reported by the pipeline, which knows if it is strict
            return PayloadFailed(type(exc).__name__)
        return snapshot_payload(result, refuse_oversized=not encoded_at_call(client))

    def describe(wrapped: Any, args: Any, kwargs: Any) -> Described:
        """This call's payload and CLI identity (telemetry is on), or ``None`` for a call
        that records nothing."""
        if not cli:
            return (static if dynamic is None else payload_for(wrapped, args, kwargs)), None
        command = command_of(wrapped, parser, command_argv(args, kwargs))
        if command == OWN_COMMANDS:
            return None  # the CLI's own ``telemetry`` commands are not a use of the CLI
        # The first-run notice (naming the CLI's own telemetry commands) and the install event.
        cli_run_starts(client, lambda: mounted_at(wrapped, parser))
        data = static if dynamic is None else payload_for(wrapped, args, kwargs)
        return _with_command(client, data, command), project_id()

    def fire(wrapped: Any, args: Any, kwargs: Any) -> None:
        """Record the event; never lets an error reach the decorated call (strict aside)."""
        try:
            accept = client._route()
            if accept is None:
                return  # opted out: not even the command line is looked at
            described = describe(wrapped, args, kwargs)
            if described is not None:
                accept(client._raw(event, *described))
        except EventError:  # only raised in strict mode, which wants it at the call
            raise
        except Exception:
            logger.debug("kaibantrace: could not record %r", event, exc_info=True)

    steps: Any = Firing(fire)
    if duration:  # a static payload and no CLI: nothing to work out per call
        steps = Timing(client, event, None if dynamic is None and not cli else describe, static)

    def decorate(func: Any) -> Any:
        if inspect.isclass(func) or (
                not callable(func) and not isinstance(func, (staticmethod, classmethod))):
            what = "a class (track its __init__, or a function that makes it)" \
                if inspect.isclass(func) else type(func).__name__
            raise TypeError(f"kaibantrace: @track({event!r}) needs a function or method, "
                            f"not {what}")
        kind = _kind(func)
        if kind is not None:
            start = first_step_start(kind, steps)
        elif duration:
            assert isinstance(steps, Timing)
            start = timed_start(client, steps)
        elif dynamic is None and not cli:
            start = _static_start(client, event, static)
        else:
            def start(wrapped: Any, depth: int) -> Any:
                return call_with_caller_globals(fire, wrapped, depth)
        if cli:
            return TrackedCli(func, start, steps)
        return Tracked(func, start)

    return decorate


def _with_command(client: Telemetry, data: Any, command: Optional[str]) -> Any:
    """The payload plus ``command``, the sub-command that runs (not in the KaibanJS profile,
    whose signals carry no payload); the author's own ``command`` field wins."""
    if client.decision().profile == "kaibanjs":
        return data
    if command is None or (isinstance(data, Mapping) and "command" in data):
        return data
    if data is None:
        return {"command": command}
    if isinstance(data, Mapping):
        return {"command": command, **data}
    return data  # a failed payload callable: reported as it is


def _static_start(client: Telemetry, event: str, static: Any) -> Start:
    """The common case, kept short: a static payload and session identity. The event is
    recorded before the function runs, and the function is then called by Python itself."""
    route = client._route
    raw = client._raw

    def start(wrapped: Any, depth: int) -> Any:
        try:
            accept = route()
            if accept is not None:
                accept(raw(event, static))
        except EventError:
            raise
        except Exception:
            logger.debug("kaibantrace: could not record %r", event, exc_info=True)
        return wrapped

    return start
