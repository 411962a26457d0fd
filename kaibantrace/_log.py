"""The ``kaibantrace`` logger, made when the first line is logged.

Importing ``logging`` costs milliseconds, and most runs never log a line from
telemetry. So modules hold this stand-in, and the real logger gets its
``NullHandler`` (a library's logs are the host's to show) at its first use.
Records still name the caller's file and line (``stacklevel``).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging
    from typing import Any, Optional


class _Logger:
    __slots__ = ("_real",)

    def __init__(self) -> None:
        self._real: Optional[logging.Logger] = None

    def _logger(self) -> logging.Logger:
        real = self._real
        if real is None:
            import logging

            real = logging.getLogger("kaibantrace")
            if not any(isinstance(h, logging.NullHandler) for h in real.handlers):
                real.addHandler(logging.NullHandler())
            self._real = real
        return real

    # Logging never raises into the host: at interpreter shutdown even the import of
    # ``logging`` fails (a tracked ``__del__`` may run then), and a line is not worth a
    # traceback on the user's terminal.

    def debug(self, message: str, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stacklevel", 3)
        self._log("debug", message, args, kwargs)

    def warning(self, message: str, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stacklevel", 3)
        self._log("warning", message, args, kwargs)

    def _log(self, level: str, message: str, args: Any, kwargs: Any) -> None:
        try:
            getattr(self._logger(), level)(message, *args, **kwargs)
        except Exception:
            pass


logger = _Logger()
