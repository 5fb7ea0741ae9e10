#!/usr/bin/env bash
# Creates (or reuses) the project virtualenv with the exact pins of
# deploy/requirements.lock. Safe to run repeatedly: a stamp of the lock file and
# pyproject.toml skips the install when nothing changed.
#
# TFF 0.87 needs Python 3.11. The interpreter is, in order: $PYTHON if set (it
# must be 3.11); the one the venv already has; python3.11 or python3 on PATH;
# otherwise one installed with uv's managed interpreters, uv itself coming from
# the package index into a private venv (one line says so). Without network for
# that, it stops with one line saying why.
set -euo pipefail
shopt -s inherit_errexit  # a failure inside $(...) stops the script too

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FEDCOMPOSE_VENV:-$ROOT/.venv}"
LOCK="$ROOT/deploy/requirements.lock"
TOOLS="${XDG_CACHE_HOME:-$HOME/.cache}/fedcompose"

die() { # exit code, message
  echo "error: $2" >&2
  exit "$1"
}

version_of() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true; }
is_311() { [[ "$(version_of "$1")" == "3.11" ]]; }

# uv from PyPI, in a venv of its own (or a pip --target directory where the
# system Python has no venv module), kept for the next time.
get_uv() {
  if command -v uv >/dev/null 2>&1; then command -v uv; return; fi
  for existing in "$TOOLS/uv-venv/bin/uv" "$TOOLS/uv-pkg/bin/uv"; do
    if [[ -x "$existing" ]]; then echo "$existing"; return; fi
  done
  local base=""
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1; then base="$candidate"; break; fi
  done
  [[ -n "$base" ]] || die 2 "no Python 3.11 and no python3 to install uv with; install Python 3.11 (or uv) and run again"
  mkdir -p "$TOOLS"
  local log="$TOOLS/uv-install.log"
  if "$base" -m venv "$TOOLS/uv-venv" >"$log" 2>&1 \
    && "$TOOLS/uv-venv/bin/python" -m pip install --quiet --progress-bar off uv >>"$log" 2>&1; then
    echo "$TOOLS/uv-venv/bin/uv"; return
  fi
  rm -rf "$TOOLS/uv-venv"
  if "$base" -m pip install --quiet --progress-bar off --target "$TOOLS/uv-pkg" uv >>"$log" 2>&1 \
    && [[ -x "$TOOLS/uv-pkg/bin/uv" ]]; then
    echo "$TOOLS/uv-pkg/bin/uv"; return
  fi
  rm -rf "$TOOLS/uv-pkg"
  die 1 "no Python 3.11 here, and uv (to install one) could not be installed from the package index: $(grep -v '^\s*$' "$log" | tail -1) (full output: $log); install Python 3.11 or set PYTHON=/path/to/python3.11"
}

install_python_with_uv() {
  echo "fedcompose: no Python 3.11 found; getting one with uv (from the package index)" >&2
  local uv found how="found" log="$TOOLS/uv-python.log"
  uv="$(get_uv)"
  # Only uv's own interpreters: not a project's .venv, not one PATH lacks.
  local find=("$uv" python find --managed-python --no-project 3.11)
  if ! found="$("${find[@]}" 2>/dev/null)"; then
    if ! "$uv" python install 3.11 >"$log" 2>&1; then
      die 1 "no Python 3.11 here, and uv could not download one ($(grep -v '^\s*$' "$log" | tail -1 | sed 's/^ *//')); connect to the internet, or install Python 3.11 and set PYTHON=/path/to/python3.11"
    fi
    how="installed"
    found="$("${find[@]}")" || die 1 "uv installed Python 3.11 but cannot find it; see $log"
  fi
  echo "fedcompose: using Python $("$found" -c 'import platform; print(platform.python_version())') that uv $how: $found" >&2
  echo "$found"
}

pick_python() {
  if [[ -n "${PYTHON:-}" ]]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die 2 "PYTHON=$PYTHON is not a program here; unset it or point it at a Python 3.11"
    is_311 "$PYTHON" \
      || die 2 "PYTHON=$PYTHON is Python $(version_of "$PYTHON"); TFF 0.87 needs 3.11 (point PYTHON at a 3.11, or unset it to have one found or installed)"
    echo "$PYTHON"; return
  fi
  if [[ -x "$VENV/bin/python" ]] && is_311 "$VENV/bin/python"; then echo "$VENV/bin/python"; return; fi
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && is_311 "$candidate"; then echo "$candidate"; return; fi
  done
  install_python_with_uv
}

PY="$(pick_python)"

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
if [[ -x "$VENV/bin/python" ]] && ! is_311 "$VENV/bin/python"; then
  die 2 "$VENV has Python $(version_of "$VENV/bin/python"); TFF 0.87 needs 3.11: remove it, or set FEDCOMPOSE_VENV to another path"
fi
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
# --no-deps: the lock is complete, and TFF's own jaxlib==0.4.14 pin cannot be
# resolved from PyPI (docs/install.md).
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
