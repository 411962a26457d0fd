"""``python -m kaibantrace``: the same as the ``kaibantrace`` command."""

import sys

from ._cli.command import command_line

if __name__ == "__main__":
    sys.exit(command_line())
