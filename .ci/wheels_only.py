"""Fail unless an install needs no compiler: every package pip would download is a wheel.

    python wheels_only.py REPORT.json

REPORT.json is what ``pip install --dry-run --ignore-installed --report REPORT.json ...``
wrote, so the check covers exactly what that command would install, resolved as the
command resolves it (plain pip picks an sdist when a newer release has no wheel for this
Python). The project itself, a local directory, is the one thing built, and it is pure
Python.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    with open(sys.argv[1], encoding="utf-8") as handle:
        report = json.load(handle)
    wheels, built = [], []
    for item in report["install"]:
        name = f"{item['metadata']['name']} {item['metadata']['version']}"
        info = item["download_info"]
        if "dir_info" in info:  # the local project
            continue
        (wheels if info.get("url", "").endswith(".whl") else built).append(name)
    if built:
        sys.exit("these would be built from source (no wheel for this Python): "
                 + ", ".join(built))
    print(f"all {len(wheels)} dependencies come as wheels")


if __name__ == "__main__":
    main()
