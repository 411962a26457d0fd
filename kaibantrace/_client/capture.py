"""The in-memory sink of ``kaibantrace.testing.capture``: every client's events, recorded.

A capture replaces every way out of the process while it is installed: no
queue, no debug output, no file. Installing or removing one makes each client
decide again at its next event (``_client.client.install_capture``).
"""

from __future__ import annotations

from typing import Any, Dict, List


class Capture:
    """An in-memory sink installed by ``kaibantrace.testing.capture``."""

    def __init__(self, *, strict: bool, respect_opt_out: bool) -> None:
        self.strict = strict
        self.respect_opt_out = respect_opt_out
        self.signals: List[Dict[str, Any]] = []


captures: List[Capture] = []
"""The installed captures, the latest last (the one that records)."""
