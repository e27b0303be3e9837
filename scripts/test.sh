#!/usr/bin/env bash
# The project's one test command (what CI runs): set up .venv, run the checks, run the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k stream -x`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh
bash scripts/check.sh
echo "[test] pytest $*"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
