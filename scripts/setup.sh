#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv at the repository root.
#
# Idempotent: a second run only checks that everything is in place. torch and torchvision are
# installed first, pinned, because an unpinned `torch` would make pip download a multi-GB build;
# then the project itself, editable, with its test tools (`.[test]`).
#
# Environment: PYTHON=/path/to/python overrides the interpreter used to create .venv.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
VENV="$ROOT/.venv"
VENV_PY="$VENV/bin/python"
STAMP="$VENV/.llava-worker-setup"

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
if [[ -n "${CI:-}" || ! -t 1 ]]; then
    export PIP_PROGRESS_BAR=off
fi

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

# pip, quietly: its output (build back-end chatter included) is shown only when it fails.
pip_quiet() {
    local log status=0
    log="$(mktemp)"
    "$VENV_PY" -m pip install -q "$@" >"$log" 2>&1 || status=$?
    if ((status != 0)); then
        cat "$log" >&2
        rm -f "$log"
        die "pip install $* failed (status $status); its output is above"
    fi
    rm -f "$log"
}

pick_python() {
    if [[ -n "${PYTHON:-}" ]]; then
        printf '%s\n' "$PYTHON"
    elif command -v python3.11 >/dev/null 2>&1; then
        printf 'python3.11\n'
    elif command -v python3 >/dev/null 2>&1; then
        printf 'python3\n'
    else
        die "no python3 found; install Python 3.11 or newer (or set PYTHON=/path/to/python)"
    fi
}

if [[ -x "$VENV_PY" ]] && ! "$VENV_PY" -c '' >/dev/null 2>&1; then
    say ".venv exists but its python does not run; recreating it"
    rm -rf "$VENV"
fi

if [[ ! -x "$VENV_PY" ]]; then
    PY="$(pick_python)"
    "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
        || die "$("$PY" -V 2>&1) is too old: llava-worker needs Python 3.11 or newer (set PYTHON=...)"
    say "creating .venv with $("$PY" -V 2>&1)"
    "$PY" -m venv "$VENV" \
        || die "'$PY -m venv' failed; on Debian/Ubuntu install the venv module: apt-get install python3-venv"
    rm -f "$STAMP"
fi

# What the installed state depends on: the project's metadata and the interpreter.
want_stamp="$("$VENV_PY" - <<'PY'
import hashlib
import sys

digest = hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest()
print(f"{sys.version.split()[0]} {digest}")
PY
)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want_stamp" ]] \
    && "$VENV_PY" -c 'import torch, torchvision, llava_worker' >/dev/null 2>&1; then
    say ".venv is up to date"
    exit 0
fi

say "upgrading pip"
pip_quiet --upgrade pip

if "$VENV_PY" -c 'import torch, torchvision' >/dev/null 2>&1; then
    say "torch and torchvision are already installed"
else
    say "installing ${TORCH_PINS[*]} (large; this takes a few minutes)"
    pip_quiet "${TORCH_PINS[@]}"
fi

say "installing llava-worker (editable) with its test tools"
pip_quiet -e '.[test]'

"$VENV_PY" -c 'import torch, torchvision, llava_worker' \
    || die "the environment was installed but does not import; see the messages above"
printf '%s\n' "$want_stamp" >"$STAMP"
say "done: $("$VENV_PY" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")')"
