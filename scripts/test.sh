#!/usr/bin/env bash
# Sets up the workspace from the lock file and runs the checks and the test suite.
# This is the README's test command; .ci/run calls it. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v uv >/dev/null 2>&1; then
    uv=(uv)
else
    python3 -m pip install --quiet uv
    uv=(python3 -m uv)
fi
"${uv[@]}" sync --all-packages --locked
"${uv[@]}" run --no-sync ruff check .
"${uv[@]}" run --no-sync ruff format --check .
"${uv[@]}" run --no-sync mypy
"${uv[@]}" run --no-sync pytest "$@"
