#!/usr/bin/env bash
# Sourced by scripts/demo and scripts/test: make .venv (once) and install the project into it.
# Re-runs pip only when pyproject.toml changed, so the second run starts in a second.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo/.venv"
python=${PYTHON:-python3}

ensure_venv() {
  local extra=$1
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "error: $python is not Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
    exit 1
  fi
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  local stamp="$venv/.installed-$extra"
  if [ ! -f "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ]; then
    # pip's and the build backend's chatter goes to a log, shown only if the install fails.
    local log="$venv/pip.log"
    echo "installing the project and its ${extra} dependencies into $venv (when pyproject.toml changed; ~1 min)" >&2
    if ! { "$venv/bin/python" -m pip install --quiet --upgrade pip \
      && "$venv/bin/python" -m pip install --quiet -e "${repo}[${extra}]"; } >"$log" 2>&1; then
      cat "$log" >&2
      echo "error: installing the project into $venv failed (log above, kept in $log)" >&2
      exit 1
    fi
    touch "$stamp"
  fi
}
