#!/usr/bin/env bash
# One command: set up the environment (first time only) and run the whole test
# suite. Extra arguments go to pytest (e.g. -m "not slow" for the quick subset).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/deploy/bootstrap.sh"

# The data-locality test traces the coordinator's file-system calls.
if ! command -v strace >/dev/null 2>&1; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "fedcompose: installing strace for the data-locality test" >&2
    apt-get install -y -qq strace >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq strace >/dev/null 2>&1; } \
      || true
  fi
  command -v strace >/dev/null 2>&1 \
    || { echo "error: the tests need strace (apt-get install strace)" >&2; exit 2; }
fi

cd "$ROOT"
# pytest exits 5 when it collects no tests; with `set -e` that fails too.
exec "${FEDCOMPOSE_VENV:-$ROOT/.venv}/bin/python" -m pytest "$@"
