"""The chart's ConfigMap is a banditgate config: rendered by `helm template` and loaded by the
project's own parser (banditgate.config) with the environment the Deployments give the processes,
and it runs the same image, command and schema as docker-compose."""

from __future__ import annotations

from typing import Any

import yaml

from banditgate.config import Config, parse_config
from tests.deploy.support import RELEASE, ROOT, find, optional_parts_on, template

SECRET_VALUE = "rendered-secret-token"


def _environment(deployment: dict[str, Any]) -> dict[str, str]:
    """The container's environment: plain values as they are, secrets as a stand-in token."""
    env = {}
    for item in deployment["spec"]["template"]["spec"]["containers"][0]["env"]:
        env[item["name"]] = item.get("value", SECRET_VALUE)
    return env


def _loaded(docs: list[dict[str, Any]], component: str) -> Config:
    text = find(docs, "ConfigMap", f"{RELEASE}-banditgate-config")["data"]["banditgate.yaml"]
    deployment = find(docs, "Deployment", f"{RELEASE}-banditgate-{component}")
    return parse_config(yaml.safe_load(text), source="chart ConfigMap", env=_environment(deployment))


def test_default_configmap_loads_with_the_config_parser() -> None:
    docs = template()
    for component in ("gateway", "feedback"):
        config = _loaded(docs, component)
        assert config.kafka.bootstrap_servers == "kafka:9092"  # kafka.bootstrapServers, through BANDITGATE_KAFKA
        assert config.redis.url == "redis://redis:6379/0"
        assert config.server.host == "0.0.0.0"
        # admin requests through the Service carry its name as Host
        assert "bg-banditgate-gateway.serving.svc" in config.server.allowed_hosts
        assert [route.name for route in config.routes] == ["diagnosis"]


def test_every_optional_part_on_and_secrets_set_still_load() -> None:
    docs = template(*optional_parts_on(), "secrets.adminTokens=one", "secrets.kafkaPassword=pw",
                    "config.shutdown_grace_s=25", "config.feedback.join_max_bytes=2147483648")
    gateway = _loaded(docs, "gateway")
    assert [token.get_secret_value() for token in gateway.server.admin_tokens] == [SECRET_VALUE]
    assert gateway.shutdown_grace_s == 25
    assert gateway.feedback.join_max_bytes == 2147483648  # large integers survive Helm's float64 values
    feedback = _loaded(docs, "feedback")
    assert feedback.server.admin_tokens == []  # the worker is not given the gateway's tokens


def test_chart_and_compose_run_the_same_command_and_example_config() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    docs = template()
    for component, service in (("gateway", "gateway"), ("feedback", "feedback")):
        container = find(docs, "Deployment", f"{RELEASE}-banditgate-{component}")["spec"]["template"]["spec"][
            "containers"][0]
        assert container["command"] == compose[service]["command"], component
        mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
        assert "/etc/banditgate" in mounts  # the config file's folder, as in compose
    compose_config = yaml.safe_load((ROOT / "deploy" / "config" / "banditgate.yaml").read_text())
    chart_config = yaml.safe_load(find(docs, "ConfigMap", f"{RELEASE}-banditgate-config")["data"]["banditgate.yaml"])
    for section in ("models", "routes"):
        assert chart_config[section] == compose_config[section], section
