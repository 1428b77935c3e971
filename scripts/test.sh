#!/usr/bin/env bash
# Quick start, command 2: the whole test suite, from a fresh Debian 12.
# Installs mosquitto, postgresql, espeak-ng and sox (for `ctid prompts tts`) when missing,
# creates .venv with the test extras,
# runs ruff, mypy --strict and pytest. The tests start their own PostgreSQL and
# mosquitto on 127.0.0.1 on free ports and stop them at the end (tests/services.py).
# pytest's exit code 5 (no tests collected) is a failure. Extra args go to pytest.
set -euo pipefail
source "$(dirname "$0")/bootstrap.sh"

missing=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
command -v runuser >/dev/null 2>&1 || missing+=(util-linux)
{ command -v espeak-ng && command -v sox; } >/dev/null 2>&1 || missing+=(espeak-ng sox)
ctid_apt "${missing[@]}"
ctid_venv "[test,bench]"
cd "$CTID_ROOT"

echo ">> ruff" >&2
"$CTID_VENV/bin/ruff" check ctid tests bench
echo ">> mypy --strict ctid" >&2
"$CTID_VENV/bin/mypy" --strict ctid
echo ">> pytest" >&2
set +e
"$CTID_VENV/bin/python" -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
    echo "pytest collected no tests: that is a failure" >&2
    exit 1
fi
exit "$rc"
