"""Which sub-command of a CLI ran, named only from the CLI's own list of commands.

``track_cli`` records the sub-command (``"run"``, ``"db migrate"``) so authors
see which commands are used. It never records an argument value: a token of
the command line is recorded only when it is the name of a sub-command that
the CLI itself defines, read from

* an ``argparse`` parser given as ``track_cli(..., parser=...)`` (its
  sub-parsers, nested ones included);
* a ``click`` group or command that ``track_cli`` decorates;
* a ``typer.Typer`` application that ``track_cli`` decorates.

Anything else (an unknown token, a value that happens to come first) ends the
search, and then nothing is recorded. No framework is imported here: the
objects are recognised by what they have.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple


def _children(node: Any) -> Optional[Dict[str, Any]]:
    """The sub-commands of an argparse parser or a click group, by name; ``None`` if none."""
    for action in getattr(node, "_actions", ()):  # argparse: the sub-parsers action
        choices = getattr(action, "choices", None)
        if type(action).__name__ == "_SubParsersAction" and isinstance(choices, dict):
            return choices
    commands = getattr(node, "commands", None)  # click (and typer, once converted)
    return commands if isinstance(commands, dict) and commands else None


def _as_click(target: Any) -> Any:
    """A typer application as the click group it becomes; anything else unchanged."""
    if type(target).__name__ == "Typer" and type(target).__module__.startswith("typer"):
        import typer.main  # type: ignore[import-not-found,unused-ignore]  # already loaded by the CLI

        return typer.main.get_command(target)
    return target


def command_argv(args: Sequence[Any], kwargs: Dict[str, Any]) -> Sequence[str]:
    """The command line the entry point works on: an ``argv``/``args`` it was given, else ``sys.argv``."""
    for key in ("argv", "args"):
        value = kwargs.get(key)
        if isinstance(value, (list, tuple)):
            return [str(item) for item in value]
    if args and isinstance(args[0], (list, tuple)):
        return [str(item) for item in args[0]]
    return sys.argv[1:]


def command_of(target: Any, parser: Any, argv: Sequence[str]) -> Optional[str]:
    """The sub-command path ``argv`` selects in ``parser`` or ``target``, or ``None``."""
    try:
        node = parser() if callable(parser) and not hasattr(parser, "_actions") else parser
        if node is None:
            node = _as_click(target)
        path = []
        for token in argv:
            if token == "--":
                break
            if token.startswith("-"):
                continue
            children = _children(node)
            if children is None or token not in children:
                break
            path.append(token)
            node = _as_click(children[token])
            if _is_ours(node):
                return OWN_COMMANDS
        return " ".join(path) or None
    except Exception:  # naming the command is a nicety; it must never break the CLI
        return None


# -- kaibantrace's own commands, mounted in a CLI -------------------------------------

OWN_COMMANDS = "\0kaibantrace"  # what command_of answers for a path through them
_MARK = "__kaibantrace_commands__"


def telemetry_commands(target: Any) -> Any:
    """Mark ``target`` as the mount point of kaibantrace's commands in a CLI.

    ``target`` is the function of a click or typer command that passes its
    arguments to ``kaibantrace.command_line``, or the argparse sub-parser that
    does. A run of those commands (``mytool telemetry status``) is then no use
    of the tool: ``track_cli`` records nothing for it, not even an install.
    Returns ``target`` itself, so it can be used as a decorator.
    """
    try:
        setattr(target, _MARK, True)
    except (AttributeError, TypeError):
        raise TypeError(f"kaibantrace: telemetry_commands() cannot mark a "
                        f"{type(target).__name__}") from None
    return target


def mounted_at(target: Any, parser: Any) -> Optional[str]:
    """Where the CLI mounted kaibantrace's commands (``"telemetry"``), or ``None``.

    Looked for breadth first, at most three levels down, so the notice can say
    ``mytool telemetry disable``. Never raises: finding it is a nicety.
    """
    try:
        root = parser() if callable(parser) and not hasattr(parser, "_actions") else parser
        level: List[Tuple[Tuple[str, ...], Any]] = [
            ((), root if root is not None else _as_click(target))]
        for _ in range(3):
            deeper: List[Tuple[Tuple[str, ...], Any]] = []
            for path, node in level:
                for name, child in (_children(node) or {}).items():
                    child = _as_click(child)
                    if _is_ours(child):
                        return " ".join((*path, name))
                    deeper.append(((*path, name), child))
            level = deeper
    except Exception:
        pass
    return None


def _is_ours(node: Any) -> bool:
    if getattr(node, _MARK, False) is True:
        return True
    callback = getattr(node, "callback", None)  # click; typer's copies the function's attributes
    return callback is not None and getattr(callback, _MARK, False) is True
