"""What an outbox stores and hands back: its records, its bounds, and the check on a row.

Both outboxes (``sqlite_outbox``, ``memory_outbox``) and the contract they share
(``outbox.Outbox``) use these, so they live in a module of their own that imports
none of them: the outbox modules never import one another in a circle.

Rows hold only encoded signals, exactly the bytes that would be sent: hashed
identities and privacy-checked payloads, never raw input. ``row_problem`` is
the poster's check on a claimed row before it is sent.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from .._policy.config import companion_apps

# Both outboxes are bounded: at most ``MAX_SIGNALS`` rows and nothing older than 24
# hours (the ingest clamps older events anyway).
MAX_SIGNALS = 10_000
MAX_AGE = 24 * 3600.0


class Row(NamedTuple):
    id: int
    body: str


class Health(NamedTuple):
    """How the endpoint fared lately, as every process of the app sees it.

    ``failures`` in a row, across processes; no attempt before ``not_before``
    (wall-clock seconds); ``mine`` when this process wrote it.
    """

    failures: int = 0
    not_before: float = 0.0
    mine: bool = False


class Added(NamedTuple):
    """What an ``add`` did: the id of its last row, and rows it pushed out (too many, too old)."""

    last_id: int
    full: int = 0
    expired: int = 0


# A signal kaibantrace writes is at most about 5 KiB (a 4 KiB payload and the fixed
# fields); a row far beyond that was not written by it.
MAX_ROW_CHARS = 16 * 1024


def row_problem(body: str, app_id: str) -> Optional[str]:
    """Why a claimed row must not be sent, or ``None`` when it is a signal of ``app_id``
    (or of its companion app: see ``companion_apps``).

    Rows come from a file others could write to (another program, an older
    version, a damaged disk); one that is not a signal of this app would be
    refused by the ingest with the whole batch, or worse, sent as it is.
    """
    if len(body) > MAX_ROW_CHARS:
        return "too large"
    if not body.isascii():
        try:
            body.encode("utf-8")
        except UnicodeEncodeError:  # bytes that were not UTF-8 in the file
            return "not UTF-8"
    import json

    try:
        signal = json.loads(body)
    except ValueError:
        return "not JSON"
    if not isinstance(signal, dict) or not all(
            isinstance(signal.get(key), str) for key in ("appID", "clientUser", "type")):
        return "not a signal"
    if signal["appID"].lower() not in companion_apps(app_id):
        return "another app's signal"
    return None
