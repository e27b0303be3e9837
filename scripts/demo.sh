#!/usr/bin/env bash
# The whole stack on this machine: a real FastChat controller, this worker on a tiny random-weight
# LLaVA-1.5, and one image request whose streamed answer is printed. Options go to scripts/demo.py
# (see `bash scripts/demo.sh --help`).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh
exec "$ROOT/.venv/bin/python" scripts/demo.py "$@"
