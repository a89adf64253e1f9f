"""A real Prometheus (Debian's `prometheus` package; scripts/test.sh installs it) on a free
loopback port, configured from the repo's deploy/prometheus files with the targets and intervals
of a test; and the dashboard's queries, with Grafana's variables filled in as Grafana would."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.server import free_port, stop_process

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
RULES = ROOT / "deploy" / "prometheus" / "rules"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "pendra.json"


def binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (apt-get install prometheus; scripts/test.sh does it)")
    return found


@dataclass
class Prometheus:
    directory: Path
    targets: dict[str, str]  # job name: host:port
    interval_s: int = 1
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self) -> Path:
        """The repo's config with this test's intervals and targets (every job it scrapes must be
        one the repo's config names), and the repo's rule files."""
        config = yaml.safe_load(CONFIG.read_text())
        config["global"].update(
            scrape_interval=f"{self.interval_s}s", evaluation_interval=f"{self.interval_s}s"
        )
        jobs = {job["job_name"]: job for job in config["scrape_configs"]}
        assert set(self.targets) == set(jobs), f"the repo scrapes {sorted(jobs)}"
        for name, target in self.targets.items():
            jobs[name]["static_configs"] = [{"targets": [target]}]
        config["rule_files"] = [str(RULES / "*.yml")]
        path = self.directory / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        return path

    def start(self) -> Prometheus:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.write_config()
        with (self.directory / "prometheus.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    binary("prometheus"),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--web.enable-lifecycle",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None, self.log()
            time.sleep(0.1)
        raise RuntimeError(f"prometheus did not start:\n{self.log()}")

    def log(self) -> str:
        return (self.directory / "prometheus.log").read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def targets_up(self) -> dict[str, bool]:
        return {r["metric"]["job"]: r["value"][1] == "1" for r in self.query("up")}


def values(result: list[dict[str, Any]]) -> list[float]:
    return [float(r["value"][1]) for r in result]


def finite(result: list[dict[str, Any]]) -> bool:
    return bool(result) and all(math.isfinite(v) for v in values(result))


# -- the dashboard -----------------------------------------------------------------------------

GRAFANA_VARIABLES = {"$__rate_interval": "15s", "$__range": "1h", "$model_name": ".*"}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panel_queries(board: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables filled in) for every target of every panel."""
    out = []
    for panel in (board or dashboard())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"{panel['title']}: a variable the tests do not fill: {expr}"
            out.append((panel["title"], expr))
    return out


_WORD = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_NOT_METRICS = re.compile(r"\{[^}]*\}|\"[^\"]*\"|\[[^\]]*\]")


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads (words that name a Pendra series or a recording
    rule), leaving out label matchers, strings and ranges."""
    stripped = _NOT_METRICS.sub(" ", expr)
    return {
        w for w in _WORD.findall(stripped) if w.startswith(("pendra_", "model_name:", "status:", ":pendra"))
    }
