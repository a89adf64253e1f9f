"""Renders the README's picture of Pendra's metrics: the compose processes (real Redis, fetcher,
inference, api) with the real Gemma model, real Prometheus with the repo's config and rules, a
minute of chat traffic, then Prometheus's graph page of output tokens/s in headless Chromium.

    uv run --no-sync python scripts/screenshot_prometheus.py [docs/images/prometheus-tokens.png]

Needs redis-server, prometheus and chromium (Debian's packages) and the test model cache
(`~/.cache/pendra-tests`, filled by the test suite)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.engines import RedisServer  # noqa: E402
from tests.support.prometheus import Prometheus  # noqa: E402
from tests.support.stack import ComposeStack  # noqa: E402

QUERY = "model_name:pendra_generation_tokens:rate1m"


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "docs" / "images" / "prometheus-tokens.png")
    gemma = Path.home() / ".cache" / "pendra-tests" / "gemma-3-270m-q4_k_m.gguf"
    work = Path(tempfile.mkdtemp(prefix="pendra-shot-"))
    redis = RedisServer(work / "redis").start()
    stack = ComposeStack(work / "stack", redis, None, extra_env={"PENDRA_KEEP_ALIVE": "-1"})
    (stack.store).mkdir(parents=True)
    subprocess.run(
        [sys.executable, "-m", "pendra", "models", "import", str(gemma), "--name", "gemma3:270m"],
        env={"PENDRA_MODELS_DIR": str(stack.store), "PATH": "/usr/bin:/bin", "HOME": str(work)},
        check=True,
    )
    stack.start()
    targets = {
        "api": f"127.0.0.1:{stack.api_port}",
        "inference": f"127.0.0.1:{stack.inference_port}",
        "fetcher": f"127.0.0.1:{stack.fetcher_port}",
    }
    prometheus = Prometheus(work / "prometheus", targets, interval_s=2).start()
    stop = threading.Event()
    runners = [threading.Thread(target=chat, args=(stack.api_url, stop), daemon=True) for _ in range(2)]
    try:
        for runner in runners:
            runner.start()
        time.sleep(150)
        url = f"{prometheus.url}/graph?" + urllib.parse.urlencode(
            {"g0.expr": QUERY, "g0.tab": "0", "g0.range_input": "3m", "g0.stacked": "0"}
        )
        browser = shutil.which("chromium") or "chromium"
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--virtual-time-budget=8000", "--window-size=1280,720", f"--screenshot={out}", url],
            check=True, capture_output=True,
        )  # fmt: skip
        print(out)
    finally:
        stop.set()
        prometheus.stop()
        stack.stop()
        redis.stop()


def chat(base: str, stop: threading.Event) -> None:
    import openai

    with openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=2, timeout=120) as client:
        while not stop.is_set():
            client.chat.completions.create(
                model="gemma3:270m", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=48
            )


if __name__ == "__main__":
    main()
