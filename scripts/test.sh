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
# The service-set tests run a real Redis. Install Debian's when it is missing and we may.
if ! command -v redis-server >/dev/null 2>&1; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
        # Debian starts a system Redis on 6379; the tests start their own on free ports.
        (service redis-server stop || pkill -x redis-server || true) >/dev/null 2>&1
    else
        echo "redis-server is missing: install it (e.g. apt-get install redis-server) to run the tests" >&2
        exit 1
    fi
fi
"${uv[@]}" sync --all-packages --locked
"${uv[@]}" run --no-sync ruff check .
"${uv[@]}" run --no-sync ruff format --check .
"${uv[@]}" run --no-sync mypy
"${uv[@]}" run --no-sync pytest "$@"
