"""The signal names KaibanJS sends, as constants.

Use them when porting KaibanJS behaviour so dashboards built for KaibanJS keep
working: ``@kaibantrace.track(kaibantrace.events.WORKFLOW_STARTED)``.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

INSTALL: Final = "install_kaibanjs"
"""CLI: KaibanJS was not yet installed in the project."""

INIT_BOARD: Final = "init_board"
"""CLI: ``kaiban init``."""

RUN_BOARD: Final = "run_board"
"""CLI: ``kaiban run``."""

DEPLOY_BOARD: Final = "deploy_board"
"""CLI: ``kaiban deploy``."""

WORKFLOW_STARTED: Final = "workflow_started"
"""Library: a team's workflow starts."""

LIBRARY_APP_ID: Final = "15E9347E-9EE5-4971-A8FB-61D91F3EBA12"
"""The TelemetryDeck app ID KaibanJS's library uses."""

CLI_APP_ID: Final = "95BF7A3E-9D86-432D-9633-3526DD3A8977"
"""The TelemetryDeck app ID KaibanJS's CLI uses."""

ALL: Final = (INSTALL, INIT_BOARD, RUN_BOARD, DEPLOY_BOARD, WORKFLOW_STARTED)
"""Every signal name KaibanJS sends."""
