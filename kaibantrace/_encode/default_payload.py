"""The author's ``default_payload``: checked once, where the client is made or configured.

Every event carries it, so a mistake in it would be a mistake in every signal:
it is cleaned here with the same rules as an event's payload, and anything the
author can fix raises ``ConfigurationError`` at once, on every machine alike.
"""

from __future__ import annotations

from typing import Mapping

from .._errors import ConfigurationError
from .checks import Reporter
from .payload import CleanPayload, clean_payload


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigurationError(f"kaibantrace: {message}")


# What the privacy guard finds only by looking at the machine it runs on.
_OF_THIS_MACHINE = ("the user name", "the host name", "the home directory")


def checked_default_payload(payload: object) -> Mapping[str, str]:
    """The payload every event carries, as text, checked here once.

    A mistake in the code (a key that is reserved or not text, a value that cannot be
    sent, more than 1 KiB) raises, on every machine alike. A value the privacy guard
    refuses on *this* machine (it names this user, host or home) is dropped with a
    warning instead: it may pass on the author's machine and must not stop a user's
    program."""
    _expect(isinstance(payload, Mapping), "default_payload must be a mapping of field names "
            f"to values, not {type(payload).__name__}")
    assert isinstance(payload, Mapping)
    for key in payload:
        _expect(not (isinstance(key, str) and key.lower().startswith("kaibantrace.")),
                f"default_payload key {key!r} uses the prefix kaibantrace adds its own fields "
                "with")

    class _Checker(Reporter):
        def problem(self, cause: str, event: str, key: str, message: str, *, strict: bool,
                    privacy: bool = False) -> None:
            if privacy and any(kind in message for kind in _OF_THIS_MACHINE):
                super().problem(cause, event, key, message, strict=False)
            else:
                raise ConfigurationError("kaibantrace: default_payload: " + message.replace(
                    " of 'default_payload'", "").replace("; field dropped", "").replace(
                    "; sent without payload", ""))

    cleaned = CleanPayload(clean_payload("default_payload", payload, _Checker(), strict=False))
    size = sum(len(key) + len(value) + 6 for key, value in cleaned.items())
    _expect(size <= 1024, "default_payload must be at most 1 KiB as JSON, leaving room for each "
            "event's own fields")
    return cleaned
