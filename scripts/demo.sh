#!/usr/bin/env bash
# Quick start, command 1: run ctid on the embedded defaults (SQLite, no MQTT) with the
# built-in Asterisk simulator as the PBX generating inbound calls. Ctrl-C stops it.
# Extra arguments go to `ctid demo` (e.g. --calls 20 --rate 120).
set -euo pipefail
source "$(dirname "$0")/bootstrap.sh"
ctid_venv ""
cd "$CTID_ROOT"
exec "$CTID_VENV/bin/ctid" demo "$@"
