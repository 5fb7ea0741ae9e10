#!/usr/bin/env bash
# Creates (or reuses) the project virtualenv with the exact pins of
# deploy/requirements.lock. Safe to run repeatedly: a stamp of the lock file and
# pyproject.toml skips the install when nothing changed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FEDCOMPOSE_VENV:-$ROOT/.venv}"
LOCK="$ROOT/deploy/requirements.lock"

pick_python() {
  if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"; return; fi
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then echo "$candidate"; return; fi
  done
  echo "error: no python3 found; install Python 3.11 or set PYTHON=/path/to/python3.11" >&2
  exit 2
}

PY="$(pick_python)"
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)'; then
  echo "error: $PY is Python $("$PY" -c 'import platform; print(platform.python_version())'); TFF 0.87 needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2
  exit 2
fi

STAMP="$VENV/.fedcompose-stamp"
WANT="$(cat "$LOCK" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"

# The loopback shim confines every TFF executor service fedcompose starts to
# loopback (shared/loopback.py). It is compiled here, from source, with this
# machine's C compiler, into the venv; it is rebuilt when its source changes.
build_shim() {
  if ! command -v cc >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
      echo "fedcompose: installing a C compiler for the loopback shim" >&2
      apt-get install -y -qq gcc libc6-dev >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq gcc libc6-dev >/dev/null 2>&1; } \
        || true
    fi
  fi
  (cd "$ROOT" && "$VENV/bin/python" -m shared.loopback --build >/dev/null) \
    || { echo "error: cannot build the loopback shim (see above); install a C compiler (gcc) and run deploy/bootstrap.sh again" >&2; exit 1; }
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/fedcompose" ]]; then
  build_shim
  exit 0
fi

echo "fedcompose: setting up $VENV (first time: a few minutes, about 2.5 GB)" >&2
rm -f "$STAMP"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
# --no-deps: the lock is complete, and TFF's own jaxlib==0.4.14 pin cannot be
# resolved from PyPI (see README, "Install").
pip_install() {
  # Some machines configure extra package locations that do not exist; pip's
  # warning about each is noise, real errors still show.
  "$VENV/bin/python" -m pip install --quiet --progress-bar off "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
pip_install --no-deps -r "$LOCK"
pip_install --no-deps -e "$ROOT"
"$VENV/bin/python" -c 'import tensorflow_federated' 2>/dev/null \
  || { echo "error: tensorflow_federated does not import in $VENV" >&2; exit 1; }
build_shim
echo "$WANT" > "$STAMP"
echo "fedcompose: environment ready" >&2
