"""Helpers for the observability tests: the metrics catalogue, dashboard queries, a real Prometheus."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CATALOGUE = ROOT / "docs" / "metrics.md"
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "unit-tests.yml"

# how the test stands in for Grafana's variables: every route / arm / model, concrete windows. `.+`,
# not Grafana's "All" value `.*`: a matcher on a label the series lack matches `.*` but not `.+`, so a
# mislabelled panel shows up as empty here (in Grafana it would show nothing once one arm is picked).
SUBSTITUTIONS = {"$__rate_interval": "30s", "$__interval": "5s", "$__range": "5m", "$route": ".+", "$arm": ".+",
                 "$model": ".+"}
_METRIC = re.compile(r"\bbanditgate_[a-z0-9_]+")
_ROW = re.compile(r"^\|\s*`(banditgate_[a-z0-9_]+)`\s*\|\s*(\w+)\s*\|\s*([^|]*)\|\s*([^|]*)\|")


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    type: str
    unit: str
    labels: frozenset[str]
    process: str


def catalogue() -> dict[str, CatalogueEntry]:
    """docs/metrics.md's tables: `| \\`name\\` | type | unit | labels | meaning |`, one table per process
    under a `## ...` heading. Raises AssertionError for a metric listed twice."""
    entries: dict[str, CatalogueEntry] = {}
    process = ""
    for line in CATALOGUE.read_text().splitlines():
        if line.startswith("## "):
            process = line[3:].strip()
        match = _ROW.match(line)
        if match is None:
            continue
        name, kind, unit, labels = (group.strip() for group in match.groups())
        assert name not in entries, f"docs/metrics.md lists {name} twice"
        label_set = frozenset(re.findall(r"`([a-z_]+)`", labels))
        entries[name] = CatalogueEntry(name, kind, unit, label_set, process)
    return entries


def base_metric(sample_name: str, catalogued: set[str]) -> str | None:
    """The catalogue name a sample or series name belongs to (`x_bucket` -> `x`, `x_created` -> `x_total`)."""
    if sample_name in catalogued:
        return sample_name
    for suffix, replacement in (("_bucket", ""), ("_count", ""), ("_sum", ""), ("_created", "_total"),
                                ("_created", "")):
        if sample_name.endswith(suffix):
            candidate = sample_name[: -len(suffix)] + replacement
            if candidate in catalogued:
                return candidate
    return None


def metrics_in(expr: str) -> set[str]:
    return set(_METRIC.findall(expr))


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref: str
    expr: str

    @property
    def where(self) -> str:
        return f"{self.dashboard} / {self.panel} / {self.ref}"

    def promql(self) -> str:
        text = self.expr
        for variable in sorted(SUBSTITUTIONS, key=len, reverse=True):
            text = text.replace(variable, SUBSTITUTIONS[variable])
        assert "$" not in text, f"{self.where}: unknown variable left in {text!r}"
        return text


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def panel_queries() -> list[PanelQuery]:
    """Every panel target's expr, and every query variable as `count by (label) (selector)`."""
    out: list[PanelQuery] = []
    for path in dashboard_files():
        board = json.loads(path.read_text())
        for variable in board.get("templating", {}).get("list", []):
            if variable.get("type") != "query":
                continue
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"label_values\((.+),\s*([a-z_]+)\)", query.strip())
            assert match, f"{path.name}: variable {variable['name']}: only label_values(selector, label) is supported"
            out.append(PanelQuery(path.name, f"variable {variable['name']}", "-",
                                  f"count by ({match.group(2)}) ({match.group(1)})"))
        for panel in _panels(board["panels"]):
            for item in panel.get("targets", []):
                out.append(PanelQuery(path.name, panel["title"], item.get("refId", "?"), item["expr"]))
    return out


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


class Prometheus:
    """A real `prometheus` on loopback with its own config and storage under `workdir`."""

    def __init__(self, workdir: Path, port: int, targets: dict[str, str], rule_files: list[Path]) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.workdir = workdir
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [address]}]}
                               for job, address in targets.items()],
        }
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        binary = shutil.which("prometheus")
        assert binary is not None
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
                stdout=log, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=5) as response:  # noqa: S310 - loopback
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        return self.get("/api/v1/query", query=promql)["result"]

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:  # noqa: S310
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"prometheus not ready within {timeout_s} s:\n{self.log()}")

    def wait_for_targets(self, jobs: set[str], timeout_s: float = 30.0) -> None:
        """Until every job's target is up and has been scraped."""
        deadline = time.monotonic() + timeout_s
        up: set[str] = set()
        while time.monotonic() < deadline:
            targets = self.get("/api/v1/targets")["activeTargets"]
            up = {t["labels"]["job"] for t in targets if t["health"] == "up"}
            if jobs <= up:
                return
            time.sleep(0.5)
        raise AssertionError(f"targets not up within {timeout_s} s: {sorted(jobs - up)}\n{self.log()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
