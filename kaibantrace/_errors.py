"""The exceptions kaibantrace raises.

    KaibanTraceError
    ├── ConfigurationError (ValueError)  a bad argument to configure() or Telemetry()
    └── EventError (ValueError)          a bad event name or payload
        └── PrivacyError                 a payload value that looks like personal data

Authors meet these at decoration or configuration time, where they can fix the
cause. At run time kaibantrace raises nothing into the host program: problems
become one WARNING per cause, unless the client is in strict mode (tests), where
``EventError`` and ``PrivacyError`` are raised at the call so a test fails.

``DropEvent`` is internal: a pipeline step raises it to refuse a whole event.
"""

from __future__ import annotations


class KaibanTraceError(Exception):
    """Base class of every exception kaibantrace raises on purpose."""


class ConfigurationError(KaibanTraceError, ValueError):
    """A configuration value is invalid; the message names the setting."""


class EventError(KaibanTraceError, ValueError):
    """An event name or payload cannot be sent as it is."""


class PrivacyError(EventError):
    """A payload field looks like personal data; the message names the key, never the value."""


class DropEvent(Exception):
    """Internal: raised by a pipeline step to refuse a whole event."""

    def __init__(self, cause: str, message: str) -> None:
        super().__init__(message)
        self.cause = cause
