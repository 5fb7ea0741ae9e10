#!/usr/bin/env bash
# One command: set up the environment (first time only) and run the default
# federation on this machine. Extra arguments go to `fedcompose run`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/deploy/bootstrap.sh"
exec "${FEDCOMPOSE_VENV:-$ROOT/.venv}/bin/fedcompose" run "$@"
