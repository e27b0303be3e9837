#!/usr/bin/env bash
# Formatting, lint (with the complexity check) and strict type checks: ruff format, ruff check, mypy.
# Runs all three and fails if any of them fails. Settings live in pyproject.toml.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

BIN="$ROOT/.venv/bin"
if [[ ! -x "$BIN/ruff" || ! -x "$BIN/mypy" ]]; then
    bash "$ROOT/scripts/setup.sh"
fi

failed=()
echo "[check] ruff format --check"
"$BIN/ruff" format --check . || failed+=("ruff format (run: .venv/bin/ruff format .)")
echo "[check] ruff check"
"$BIN/ruff" check . || failed+=("ruff check")
echo "[check] mypy"
"$BIN/mypy" || failed+=("mypy")

if ((${#failed[@]})); then
    printf '[check] FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "[check] all checks passed"
