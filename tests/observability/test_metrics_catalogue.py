"""docs/metrics.md lists exactly the metrics the processes register, with their types, and the
dashboards and alert rules only use catalogued metrics (no servers needed)."""

from __future__ import annotations

import json

import pytest
from prometheus_client import CollectorRegistry

from feedback.metrics import FeedbackMetrics
from gateway.metrics import GatewayMetrics
from tests.observability.support import (alert_rules, base_metric, catalogue, dashboard_files, metrics_in,
                                         panel_queries)

# prometheus_client reports a counter family without its `_total`; the exposed samples have it
_EXPOSED = {"counter": "{}_total", "gauge": "{}", "histogram": "{}", "summary": "{}", "info": "{}_info"}
_UNIT_SUFFIXES = ("_seconds", "_rows", "_messages", "_ratio")


def registered(build) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Exposed metric name -> type, for the metrics object `build(registry)` registers."""
    registry = CollectorRegistry()
    build(registry)
    return {_EXPOSED[family.type].format(family.name): family.type for family in registry.collect()}


PROCESSES = {"Gateway": GatewayMetrics, "Feedback worker": FeedbackMetrics}


@pytest.mark.parametrize("process", sorted(PROCESSES))
def test_catalogue_lists_exactly_what_each_process_registers(process: str) -> None:
    code = registered(PROCESSES[process])
    documented = {name: entry for name, entry in catalogue().items() if entry.process.startswith(process)}
    assert sorted(set(code) - set(documented)) == [], f"registered by the {process} but not in docs/metrics.md"
    assert sorted(set(documented) - set(code)) == [], f"in docs/metrics.md under {process} but not registered"
    assert {name: documented[name].type for name in code} == code


def test_catalogue_follows_the_naming_conventions() -> None:
    for name, entry in catalogue().items():
        assert name.startswith("banditgate_"), name
        assert (entry.type == "counter") == name.endswith("_total"), f"{name}: only counters end in _total"
        if entry.unit == "seconds":
            assert name.endswith("_seconds"), f"{name}: seconds in the name"
        for suffix in _UNIT_SUFFIXES:
            if name.endswith(suffix):
                assert entry.unit in {"seconds", "rows", "messages", "ratio"}, (name, entry.unit)
        assert not {"request_id", "unit_id", "id", "error", "message"} & entry.labels, f"{name}: unbounded label"


def test_dashboards_and_alerts_only_use_catalogued_metrics() -> None:
    known = set(catalogue())
    unknown = {f"{query.where}: {metric}" for query in panel_queries() for metric in metrics_in(query.expr)
               if base_metric(metric, known) is None}
    unknown |= {f"alert {rule['alert']}: {metric}" for rule in alert_rules() for metric in metrics_in(rule["expr"])
                if base_metric(metric, known) is None}
    assert sorted(unknown) == []


def test_dashboards_are_what_the_generator_writes() -> None:
    import importlib.util

    from tests.observability.support import ROOT

    spec = importlib.util.spec_from_file_location("gen_dashboards", ROOT / "scripts" / "gen_dashboards.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rendered = module.render()
    committed = {path.name: path.read_text() for path in dashboard_files()}
    assert committed == rendered, "run `python scripts/gen_dashboards.py` and commit the JSON"


def test_dashboards_have_route_and_arm_variables_and_unique_uids() -> None:
    uids = []
    for path in dashboard_files():
        board = json.loads(path.read_text())
        uids.append(board["uid"])
        names = {variable["name"] for variable in board["templating"]["list"]}
        assert {"route", "arm"} <= names, path.name
        for query in (q for q in panel_queries() if q.dashboard == path.name):
            if any(metric.endswith("_total") for metric in metrics_in(query.expr)):
                assert "rate(" in query.expr or "increase(" in query.expr, f"{query.where}: a raw counter"
    assert len(uids) == len(set(uids)) >= 4
