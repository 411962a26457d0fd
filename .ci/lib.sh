# Helpers shared by the CI scripts (sourced, not run).

step() { printf '\n== %s\n' "$*"; }

find_python() {
  # A working interpreter for version $1: on PATH, or one pyenv has installed.
  local version=$1 candidate
  if "python$version" -c 'pass' >/dev/null 2>&1; then
    command -v "python$version"
    return 0
  fi
  if command -v pyenv >/dev/null 2>&1; then
    for candidate in "$(pyenv root)"/versions/"$version".*/bin/python"$version"; do
      if [ -x "$candidate" ]; then
        echo "$candidate"
        return 0
      fi
    done
  fi
  return 1
}

missing_python() {
  # Python $1 is not installed: in CI, fail (every supported version must be tested);
  # elsewhere, say that it is skipped.
  if [ "${CI:-}" = "true" ]; then
    echo "Python $1 is not installed; CI must test every supported version" >&2
    exit 1
  fi
  echo "skipping Python $1: not installed"
}
