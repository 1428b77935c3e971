#!/usr/bin/env bash
# Shared set-up for scripts/demo.sh and scripts/test.sh on a fresh Debian 12:
# installs missing Debian packages (as root, or through sudo) and creates .venv.
# Usage: source scripts/bootstrap.sh; ctid_apt PKG...; ctid_venv EXTRAS
set -euo pipefail

CTID_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CTID_VENV="${CTID_VENV:-$CTID_ROOT/.venv}"

ctid_apt() {
    [ $# -gt 0 ] || return 0
    local sudo=()
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || { echo "need root or sudo to install: $*" >&2; return 1; }
        sudo=(sudo)
    fi
    echo ">> installing Debian packages: $*" >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

ctid_venv() {
    local extras="${1:-}"
    local py="${PYTHON:-python3}"
    if ! command -v "$py" >/dev/null; then ctid_apt python3; fi
    if [ ! -x "$CTID_VENV/bin/python" ]; then
        if ! "$py" -m venv --help >/dev/null 2>&1 || ! "$py" -c 'import ensurepip' 2>/dev/null; then
            ctid_apt python3-venv
        fi
        "$py" -m venv "$CTID_VENV"
    fi
    local stamp="$CTID_VENV/.ctid-installed$extras"
    if [ ! -f "$stamp" ] || [ "$CTID_ROOT/pyproject.toml" -nt "$stamp" ]; then
        echo ">> installing ctid${extras} into $CTID_VENV" >&2
        "$CTID_VENV/bin/python" -m pip install -q --upgrade pip >&2
        "$CTID_VENV/bin/python" -m pip install -q -e "$CTID_ROOT$extras" >&2
        touch "$stamp"
    fi
}
