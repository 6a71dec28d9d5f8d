#!/usr/bin/env bash
# Set-up (a few seconds when warm), then the whole test suite; extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m "not slow"` for the fast subset.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
exec python -m pytest "$@"
