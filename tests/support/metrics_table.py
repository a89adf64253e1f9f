"""The README's metrics table, read as data, and a service's `/metrics` read the same way, so a
test can hold the two together."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

README = Path(__file__).resolve().parents[2] / "README.md"
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


@dataclass(frozen=True)
class Documented:
    name: str  # as exposed: counters with `_total`
    type: str
    labels: frozenset[str]
    services: frozenset[str]  # api, inference, fetcher
    gateway_only: bool
    meaning: str

    @property
    def family(self) -> str:
        """The name prometheus-client's parser gives the family (counters without `_total`)."""
        return self.name.removesuffix("_total") if self.type == "counter" else self.name


def documented_metrics(readme: Path = README) -> dict[str, Documented]:
    text = readme.read_text(encoding="utf-8")
    start = text.index("<!-- metrics-table")
    end = text.index("<!-- end metrics-table -->")
    rows = [line for line in text[start:end].splitlines() if line.startswith("| `")]
    out = {}
    for row in rows:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        name, kind, labels, exposed, meaning = cells
        out[name.strip("`")] = Documented(
            name=name.strip("`"),
            type=kind,
            labels=frozenset(re.findall(r"`([a-z_]+)`", labels)),
            services=frozenset(re.findall(r"api|inference|fetcher", exposed)),
            gateway_only="gateway only" in exposed,
            meaning=meaning,
        )
    return out


@dataclass
class Exposed:
    type: str
    help: str
    labels: set[str]  # label names seen on samples (histograms: without `le`)


def exposed_metrics(url: str) -> dict[str, Exposed]:
    """The `pendra_` families a `/metrics` endpoint exposes, by family name."""
    response = httpx.get(f"{url}/metrics", timeout=10)
    response.raise_for_status()
    out = {}
    for family in text_string_to_metric_families(response.text):
        if not family.name.startswith("pendra_"):
            continue
        labels: set[str] = set()
        for sample in family.samples:
            labels.update(k for k in sample.labels if k != "le")
        out[family.name] = Exposed(family.type, family.documentation, labels)
    return out


def compare(documented: list[Documented], exposed: dict[str, Exposed], where: str) -> list[str]:
    """What differs between the table's rows for one service and what it exposes."""
    problems = []
    by_family = {d.family: d for d in documented}
    for family, seen in exposed.items():
        d = by_family.get(family)
        if d is None:
            problems.append(f"{where} exposes {family} ({seen.type}), which the README's table does not list")
            continue
        if seen.type != d.type:
            problems.append(f"{where}: {d.name} is a {seen.type}, the table says {d.type}")
        if seen.help != d.meaning:
            problems.append(f"{where}: {d.name}'s help is {seen.help!r}, the table says {d.meaning!r}")
        if seen.labels and seen.labels != d.labels:
            labels, said = sorted(seen.labels), sorted(d.labels)
            problems.append(f"{where}: {d.name} has labels {labels}, the table says {said}")
    for d in documented:
        if d.family not in exposed:
            problems.append(f"{where} does not expose {d.name}, which the table lists")
    return problems
