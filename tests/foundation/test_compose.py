"""docker-compose.yml and Dockerfile cannot run here (no Docker engine): parse and cross-check them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from banditgate.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def load_compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_has_every_service_with_ports() -> None:
    services = load_compose()["services"]
    assert {"kafka", "redis", "prometheus", "grafana", "gateway", "feedback"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:4.")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    ports = {name: [p.split(":")[-1] for p in s.get("ports", [])] for name, s in services.items()}
    assert ports["kafka"] == ["9092"] and ports["redis"] == ["6379"] and "3000" in ports["grafana"]
    assert "8080" in ports["gateway"] and "8081" in ports["gateway"]


def test_compose_commands_are_real_cli_commands() -> None:
    services = load_compose()["services"]
    parser = build_parser()
    for name in ("gateway", "feedback"):
        command = services[name]["command"]
        assert command[0] == "banditgate"
        args = parser.parse_args(command[1:])
        assert args.command in ("serve", "feedback")
        config_in_container = Path(args.config)
        mount = next(v for v in services[name]["volumes"] if v.endswith(":/etc/banditgate:ro"))
        assert (ROOT / mount.split(":")[0] / config_in_container.name).exists()


def test_grafana_provisioning_and_prometheus_files_exist() -> None:
    services = load_compose()["services"]
    for volume in services["grafana"]["volumes"] + services["prometheus"]["volumes"]:
        assert (ROOT / volume.split(":")[0]).is_dir(), volume
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"] for job in prom["scrape_configs"]}
    assert {"banditgate-gateway", "banditgate-feedback"} <= jobs
    for rules in prom["rule_files"]:
        assert (ROOT / "deploy/prometheus" / Path(rules).name).exists()


def test_compose_config_is_valid_banditgate_config() -> None:
    from banditgate.config import load_config

    config = load_config(ROOT / "deploy/config/banditgate.yaml", env={})
    assert config.server.http_port == 8080 and config.server.grpc_port == 8081


def test_dockerfile_is_multistage_slim_and_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    froms = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert len(froms) >= 2 and all("slim" in line for line in froms)
    users = [line for line in text.splitlines() if line.startswith("USER ")]
    assert users and users[-1].split()[1] not in ("root", "0")
    for package in ("banditgate", "gateway", "router", "feedback", "loadtests"):
        assert f"COPY {package} " in text


def test_compose_gateway_binds_all_interfaces_only_with_an_admin_token() -> None:
    """The container binds 0.0.0.0: compose must refuse to start it without an admin token (the
    admin API would otherwise be closed, or, with admin_open, open to the network)."""
    from banditgate.config import ConfigError, load_config

    gateway = load_compose()["services"]["gateway"]
    reference = gateway["environment"]["BANDITGATE_ADMIN_TOKENS"]
    assert reference.startswith("${BANDITGATE_ADMIN_TOKENS:?"), reference  # compose errors when unset
    config = load_config(ROOT / "deploy/config/banditgate.yaml", env={"BANDITGATE_ADMIN_TOKENS": "t0k3n"})
    assert config.server.host == "0.0.0.0" and not config.server.admin_open  # noqa: S104
    assert [t.get_secret_value() for t in config.server.admin_tokens] == ["t0k3n"]
    assert "gateway" in config.server.allowed_hosts  # other containers reach it by its service name
    with pytest.raises(ConfigError):
        load_config(ROOT / "deploy/config/banditgate.yaml", env={"BANDITGATE_ADMIN_TOKENS": " , "})
