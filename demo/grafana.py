"""`banditgate demo --grafana`: watch the same numbers on the compose stack's Prometheus and Grafana.

The compose stack's Prometheus scrapes the compose gateway and feedback worker by service name.
For a demo run it needs the demo's processes instead, which run on the host: the demo writes a
scrape config naming them (same job names, so dashboards and alert rules apply unchanged) and a
compose override that mounts it and lets the container reach the host; with `--grafana` the
demo's processes listen on all interfaces so the container can scrape them.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from demo.deployment import Plan
from demo.models import ROUTE

DASHBOARDS = (  # deploy/grafana/dashboards/*.json: title, uid
    ("Routing & bandit", "banditgate-routing"),
    ("Quality & drift", "banditgate-quality-drift"),
    ("Overview", "banditgate-overview"),
    ("Kafka & feedback pipeline", "banditgate-pipeline"),
)
QUERIES = {
    "traffic share per arm": f'banditgate_arm_traffic_share{{route="{ROUTE}"}}',
    "posterior mean per arm": f'banditgate_arm_posterior_mean{{route="{ROUTE}"}}',
    "reward rate per arm": f'banditgate_quality_reward_mean{{route="{ROUTE}"}}',
    "requests/s per arm": f'sum by (arm) (rate(banditgate_requests_total{{route="{ROUTE}"}}[30s]))',
    "p99 latency": "histogram_quantile(0.99, sum by (le) "
                   f'(rate(banditgate_end_to_end_seconds_bucket{{route="{ROUTE}"}}[1m])))',
    "shadow agreement and F1": f'banditgate_quality_agreement_ratio{{route="{ROUTE}"}}, '
                               f'banditgate_quality_f1_ratio{{route="{ROUTE}"}}',
    "drift statistic / threshold": "banditgate_drift_statistic / banditgate_drift_threshold",
}


def write_files(plan: Plan) -> tuple[Path, Path]:
    """The scrape config and the compose override, under `<report>/grafana/`."""
    folder = plan.report_dir / "grafana"
    folder.mkdir(parents=True, exist_ok=True)
    prometheus = folder / "prometheus.yml"
    prometheus.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "2s", "evaluation_interval": "5s"},
        "rule_files": ["/etc/prometheus/alerts.yml"],
        "scrape_configs": [
            {"job_name": "banditgate-gateway", "static_configs": [{"targets": [f"host.docker.internal:{plan.http_port}"]}]},
            {"job_name": "banditgate-feedback",
             "static_configs": [{"targets": [f"host.docker.internal:{plan.feedback_port}"]}]},
        ],
    }, sort_keys=False))
    override = folder / "docker-compose.demo.yml"
    override.write_text(yaml.safe_dump({"services": {"prometheus": {
        "volumes": [f"{prometheus}:/etc/prometheus/prometheus.yml:ro"],
        "extra_hosts": ["host.docker.internal:host-gateway"],
    }}}, sort_keys=False))
    return prometheus, override


def grafana_instructions(plan: Plan) -> list[str]:
    """Write the files and return the lines to print."""
    _prometheus, override = write_files(plan)
    lines = [
        f"grafana: this run's gateway (:{plan.http_port}/metrics) and feedback worker (:{plan.feedback_port}/metrics) "
        "listen on all interfaces so the compose Prometheus can scrape them",
        f"grafana: from the project folder: docker compose -f docker-compose.yml -f {override} up -d prometheus grafana",
        "grafana: then open the dashboards (Prometheus itself is on http://localhost:9090):",
    ]
    lines += [f"grafana:   {title}: http://localhost:3000/d/{uid}?var-route={ROUTE}&from=now-15m&to=now&refresh=5s"
              for title, uid in DASHBOARDS]
    lines += ["grafana: what the live view shows is there as:"]
    lines += [f"grafana:   {name}: {query}" for name, query in QUERIES.items()]
    return lines
