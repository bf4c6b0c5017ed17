"""The chart carries copies of the project's alert rules and Grafana dashboards (Helm reads only
files inside the chart); they must stay the files the compose stack and the tests use."""

from __future__ import annotations

from tests.deploy.support import CHART, ROOT


def test_alert_rules_are_the_projects() -> None:
    assert (CHART / "files" / "alerts.yml").read_bytes() == (ROOT / "deploy" / "prometheus" / "alerts.yml").read_bytes(), \
        "copy deploy/prometheus/alerts.yml to deploy/helm/banditgate/files/alerts.yml"


def test_dashboards_are_the_projects() -> None:
    ours = {path.name: path.read_bytes() for path in (ROOT / "deploy" / "grafana" / "dashboards").glob("*.json")}
    chart = {path.name: path.read_bytes() for path in (CHART / "files" / "dashboards").glob("*.json")}
    assert ours, "no dashboards in deploy/grafana/dashboards"
    assert sorted(chart) == sorted(ours), "copy deploy/grafana/dashboards/*.json to deploy/helm/banditgate/files/dashboards/"
    changed = sorted(name for name in ours if chart[name] != ours[name])
    assert not changed, f"deploy/helm/banditgate/files/dashboards differs from deploy/grafana/dashboards: {changed}"
