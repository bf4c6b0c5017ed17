"""The compose stack's Grafana finds the dashboards and the datasource they name."""

from __future__ import annotations

import json

import yaml

from tests.observability.support import DASHBOARDS, ROOT, dashboard_files


def test_compose_grafana_provisions_the_dashboards_and_their_datasource() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = dict(volume.rsplit(":", 2)[:2] for volume in compose["services"]["grafana"]["volumes"])
    provisioning = ROOT / "deploy/grafana/provisioning"
    assert mounts[f"./{provisioning.relative_to(ROOT)}"] == "/etc/grafana/provisioning"
    providers = yaml.safe_load((provisioning / "dashboards/banditgate.yml").read_text())["providers"]
    assert [p["options"]["path"] for p in providers] == [mounts[f"./{DASHBOARDS.relative_to(ROOT)}"]]
    datasources = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())["datasources"]
    uids = {d["uid"] for d in datasources if d["type"] == "prometheus"}
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    assert datasources[0]["jsonData"]["timeInterval"] == prometheus["global"]["scrape_interval"]
    assert len(dashboard_files()) >= 4
    for path in dashboard_files():
        board = json.loads(path.read_text())
        used = {target["datasource"]["uid"] for panel in board["panels"] for target in panel.get("targets", [])}
        used |= {v["datasource"]["uid"] for v in board["templating"]["list"] if "datasource" in v}
        assert used <= uids, (path.name, used - uids)
