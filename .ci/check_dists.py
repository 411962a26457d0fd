"""Check what the built distributions contain, for .ci/package.

    python check_dists.py DIST_DIR

DIST_DIR holds exactly one wheel and one sdist, as ``python -m build`` leaves them.

* The wheel holds the kaibantrace package (its modules and py.typed), its metadata with the
  license, and nothing else: no tests, no examples. Its file list is printed and compared with
  the expected one, made from the package's modules in this source tree; anything unexpected
  or missing fails.
* The sdist, of the same version, holds a complete, runnable test suite (conftest and
  tests/__init__.py included), the examples it runs, and no byte code.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tarfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "kaibantrace"

# Metadata that every wheel of ours has, and what setuptools may add besides.
REQUIRED_METADATA = ["METADATA", "WHEEL", "RECORD", "entry_points.txt", "licenses/LICENSE"]
OPTIONAL_METADATA = ["top_level.txt"]

# Files an sdist must hold for its suite to run from the unpacked tree.
SDIST_REQUIRED = ["LICENSE", "README.md", "SECURITY.md", "setup.cfg", "pyproject.toml",
                  "MANIFEST.in", "PKG-INFO", "tests/__init__.py", "tests/conftest.py",
                  "tests/js/json_table.js", "tests/pyodide/driver.mjs", "tests/browser/page.html",
                  "tests/browser/page.mjs", "examples/quickstart.py",
                  "kaibantrace/py.typed"]
# Present in the sdist only when they exist in the tree.
SDIST_IF_PRESENT = ["CHANGELOG.md", "mkdocs.yml"]


def package_files() -> list[str]:
    """The package's files as the wheel must hold them: the tracked ones in a git checkout,
    else those on disk (byte code aside)."""
    try:
        listed = subprocess.run(["git", "ls-files", "--", PACKAGE], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        listed = []
    if not listed:
        listed = [os.path.relpath(path, ROOT).replace(os.sep, "/")
                  for path in glob.glob(os.path.join(ROOT, PACKAGE, "**", "*"), recursive=True)
                  if os.path.isfile(path)]
    return sorted(name for name in listed
                  if name.endswith(".py") or name == f"{PACKAGE}/py.typed")


def only(pattern: str) -> str:
    found = glob.glob(pattern)
    if len(found) != 1:
        sys.exit(f"expected one file matching {os.path.basename(pattern)}, found {found}")
    return found[0]


def check_wheel(wheel: str) -> str:
    name, version = os.path.basename(wheel).split("-")[:2]
    dist_info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(wheel) as archive:
        members = sorted(archive.namelist())
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode() \
            if f"{dist_info}/entry_points.txt" in members else ""
    print(f"{os.path.basename(wheel)}:")
    for member in members:
        print(f"  {member}")

    expected = set(package_files()) | {f"{dist_info}/{m}" for m in REQUIRED_METADATA}
    allowed = expected | {f"{dist_info}/{m}" for m in OPTIONAL_METADATA}
    problems = [f"unexpected in the wheel: {m}" for m in members if m not in allowed]
    problems += [f"missing from the wheel: {m}" for m in sorted(expected - set(members))]
    for line in ["kaibantrace = kaibantrace._cli.command:main",
                 "kaibantrace = kaibantrace.pytest_plugin"]:
        if line not in entry_points:
            problems.append(f"entry_points.txt lacks {line!r}")
    if problems:
        sys.exit("\n".join(["the wheel's file list is wrong:", *problems]))
    print(f"wheel file list: as expected ({len(members)} files: {len(expected) - len(REQUIRED_METADATA)}"
          f" in the package, the rest metadata)")
    return version


def check_sdist(sdist: str, version: str) -> None:
    top = os.path.basename(sdist)[:-len(".tar.gz")]
    if not top.endswith(f"-{version}"):
        sys.exit(f"the sdist {top} and the wheel ({version}) have different versions")
    with tarfile.open(sdist) as archive:
        members = {m.name[len(top) + 1:] for m in archive.getmembers()
                   if m.isfile() and m.name.startswith(top + "/")}
    required = SDIST_REQUIRED + [name for name in SDIST_IF_PRESENT
                                 if os.path.exists(os.path.join(ROOT, name))]
    if os.path.isdir(os.path.join(ROOT, "docs")):
        required.append("docs/")
    problems = [f"missing from the sdist: {name}" for name in required
                if not (name in members or (name.endswith("/")
                                            and any(m.startswith(name) for m in members)))]
    problems += [f"byte code in the sdist: {m}" for m in sorted(members)
                 if "__pycache__/" in m or m.endswith((".pyc", ".pyo"))]
    problems += [f"missing from the sdist: {m}" for m in package_files() if m not in members]
    if problems:
        sys.exit("\n".join(["the sdist is incomplete:", *problems]))
    tests = sorted(m for m in members if m.startswith("tests/"))
    print(f"{os.path.basename(sdist)}: {len(members)} files, {len(tests)} under tests/, "
          "with tests/__init__.py, tests/conftest.py and examples/quickstart.py")


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    dist_dir = sys.argv[1]
    version = check_wheel(only(os.path.join(dist_dir, "*.whl")))
    check_sdist(only(os.path.join(dist_dir, "*.tar.gz")), version)


if __name__ == "__main__":
    main()
