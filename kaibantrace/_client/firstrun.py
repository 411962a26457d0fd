"""A CLI's first run: the notice that says what is collected, then the install event.

Both happen at the first ``track_cli`` call of a process, only while telemetry
is on and outside CI. The notice goes to a terminal only; a run that showed it
sends nothing (its events wait in the outbox, so opting out before the next
run means they are never sent). The install event is recorded once per
project and machine.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Callable, Optional

from .. import events
from .._encode.identity import project_id
from .._log import logger
from .._policy import prefs as _prefs
from .._policy.config import Settings, decide, in_ci
from .._policy.page import in_a_page
from .capture import captures

if TYPE_CHECKING:
    from .client import Telemetry


def cli_run_starts(client: Telemetry, mounted_at: Callable[[], Optional[str]] = lambda: None
                   ) -> None:
    """At the first ``track_cli`` call of ``client``: the first-run notice, then the install
    event. ``mounted_at`` finds where the CLI mounted kaibantrace's commands, asked only
    when the notice is shown, so it can name them."""
    # A capture records events, nothing on disk; a browser page keeps nothing from one
    # load to the next, so a marker there would make every load a first run.
    if client._cli_seen or captures or in_a_page():
        return
    client._cli_seen = True
    try:
        decision = decide(client._settings, os.environ)
        app_id = decision.cli_app_id or decision.app_id  # the app CLI events go to
        if not decision.enabled or decision.debug or app_id is None or in_ci(os.environ):
            return
        if not _prefs.notice_shown(app_id) and _stderr_is_terminal():
            # Hold first: whatever happens below, this run sends nothing. The
            # marker is written before the notice is printed and removed if
            # printing fails, so the notice is marked seen only when shown,
            # and a config directory that cannot be written means no notice
            # and a run that holds, never a run that sends unannounced.
            client._delivery.hold()
            if _prefs.mark_notice_shown(app_id) and not _show_notice(
                    notice(client._settings, mounted_at)):
                _prefs.forget_notice(app_id)
        project = project_id()
        if not _prefs.install_recorded(app_id, project):
            accept = client._route()
            # The marker first: a run that cannot record it sends no install
            # event, so an unwritable directory never makes every run an install.
            if accept is not None and _prefs.mark_install(app_id, project):
                name = events.INSTALL if decision.profile == "kaibanjs" else "install"
                raw = client._raw(name, None, project)
                client._budget.grant(name, raw[4])  # once per project: never held back
                accept(raw)
    except Exception:
        logger.debug("kaibantrace: first-run handling failed", exc_info=True)


def notice(settings: Settings, mounted_at: Callable[[], Optional[str]]) -> str:
    """The first-run notice: what is collected, and how to turn it off, in the tool's words.

    It names the tool (``tool_name``, else the script's name) and, when the CLI
    mounted kaibantrace's commands, the tool's own ``telemetry disable`` rather
    than the ``kaibantrace`` command, which a user of the tool may not know.
    """
    tool = settings.tool_name or _program_name()
    where = mounted_at() if tool else None
    if tool and where:
        off = f"or with `{tool} {where} disable`."
        log = f"`{tool} {where} log` shows what was sent."
    else:
        off = "or for every tool that uses kaibantrace with `kaibantrace disable`."
        log = "`kaibantrace log` shows what was sent."
    import textwrap

    return textwrap.fill(
        f"{tool or 'This program'} collects anonymous usage data: which commands run, never "
        f"their arguments, file contents, paths or anything that identifies you. Nothing was "
        f"sent this time. Turn it off with {settings.opt_out_env}=1 (or DO_NOT_TRACK=1), "
        f"{off} {log}", width=79, break_on_hyphens=False, break_long_words=False) + "\n"


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except Exception:  # a replaced or closed stream
        return False


def _program_name() -> Optional[str]:
    """What the user typed to run this program: the script's name, or the package's for
    ``python -m package``; ``None`` for ``python -c``, a REPL or an embedded interpreter."""
    path = sys.argv[0] if sys.argv and isinstance(sys.argv[0], str) else ""
    name = os.path.basename(path)
    if name == "__main__.py":
        name = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return name if name and not name.startswith("-") else None


def _show_notice(text: str) -> bool:
    """Print the first-run notice on stderr (the caller found it a terminal); whether it
    was written."""
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
        return True
    except Exception:
        return False
