"""The chart lints, and renders (defaults, every optional part on, and variants) into manifests
that validate against the Kubernetes 1.30 schemas offline (kubernetes-validate), with probes on
every container, the drain within terminationGracePeriodSeconds, and KEDA bounded by partitions."""

from __future__ import annotations

import math
import subprocess
from typing import Any

import pytest

from tests.deploy.support import (
    CHART,
    RELEASE,
    check_chart,
    find,
    helm,
    optional_parts_on,
    template,
    template_fails,
)

CUSTOM_KINDS = check_chart.CUSTOM_KINDS  # CRDs (Prometheus Operator, KEDA): not Kubernetes' own schemas


def _validate(docs: list[dict[str, Any]]) -> set[str]:
    assert check_chart.validate(docs, "1.30") == []
    return {doc["kind"] for doc in docs}


def _pod(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    return find(docs, "Deployment", f"{RELEASE}-banditgate-{component}")["spec"]["template"]["spec"]


def test_helm_lint() -> None:
    for sets in ([], optional_parts_on()):
        command = [helm(), "lint", str(CHART)] + [arg for item in sets for arg in ("--set", item)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("sets", [(), tuple(optional_parts_on()),
                                  ("secrets.adminTokens=a", "secrets.redisPassword=b", "gateway.probes.readinessVia=http",
                                   "config.server.metrics_port=9090", "models.persistence.existingClaim=models"),
                                  ("secrets.existingSecret=banditgate", "config.server.tls_cert_file=/tls/tls.crt",
                                   "config.server.tls_key_file=/tls/tls.key", "serviceMonitor.enabled=true")],
                         ids=["defaults", "all-optional-on", "secrets-http-readiness", "existing-secret-tls"])
def test_manifests_validate_against_kubernetes_1_30(sets: tuple[str, ...]) -> None:
    docs = template(*sets)
    kinds = _validate(docs)
    assert {"Deployment", "ConfigMap", "Service", "PodDisruptionBudget", "ServiceAccount"} <= kinds
    for component in ("gateway", "feedback"):
        pod = _pod(docs, component)
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"] + pod.get("initContainers", []):
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
        for container in pod["containers"]:
            assert {"startupProbe", "livenessProbe", "readinessProbe"} <= set(container), container["name"]


def test_every_optional_part_renders() -> None:
    docs = template(*optional_parts_on())
    kinds = {doc["kind"] for doc in docs}
    assert CUSTOM_KINDS <= kinds
    rules = find(docs, "PrometheusRule", f"{RELEASE}-banditgate")["spec"]["groups"]
    assert any(rule.get("alert") == "BanditgateProcessDown" for group in rules for rule in group["rules"])
    dashboards = [doc for doc in docs if doc["kind"] == "ConfigMap" and "dashboard" in doc["metadata"]["name"]]
    assert len(dashboards) == len(list((CHART / "files" / "dashboards").glob("*.json"))) and all(doc["metadata"]["labels"]["grafana_dashboard"] == "1" for doc in dashboards)
    # the init container fills an emptyDir: no PVC then
    assert "PersistentVolumeClaim" not in kinds
    assert _pod(docs, "gateway")["initContainers"][0]["volumeMounts"][0]["mountPath"] == "/srv/models"
    # KEDA owns the replica count
    assert "replicas" not in find(docs, "Deployment", f"{RELEASE}-banditgate-gateway")["spec"]


def test_probes_point_at_the_health_endpoints() -> None:
    docs = template()
    gateway = _pod(docs, "gateway")["containers"][0]
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert gateway["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert gateway["readinessProbe"]["grpc"] == {"port": 8081, "service": ""}  # grpc.health.v1.Health
    feedback = _pod(docs, "feedback")["containers"][0]
    assert feedback["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "metrics"}
    assert feedback["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "metrics"}
    assert {"name": "metrics", "containerPort": 6066, "protocol": "TCP"} in feedback["ports"]
    # Kubernetes' gRPC probe has no TLS: with TLS on, readiness asks REST
    tls = _pod(template("config.server.tls_cert_file=/t/c", "config.server.tls_key_file=/t/k"), "gateway")["containers"][0]
    assert tls["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert tls["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"


@pytest.mark.parametrize("grace_s", [10, 12.5, 60])
def test_termination_grace_covers_the_configured_drain(grace_s: float) -> None:
    docs = template(f"config.shutdown_grace_s={grace_s}", "terminationGraceMarginSeconds=7")
    assert _pod(docs, "gateway")["terminationGracePeriodSeconds"] == math.ceil(grace_s) + 7 + 5  # + preStop sleep
    assert _pod(docs, "feedback")["terminationGracePeriodSeconds"] == math.ceil(grace_s) + 7
    assert _pod(docs, "gateway")["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"] == 5


def test_keda_scales_on_lag_within_the_partition_count() -> None:
    docs = template("keda.enabled=true", "keda.gateway.maxReplicas=10", "kafka.requestPartitions=6",
                    "keda.feedback.maxReplicas=9", "keda.feedback.minReplicas=12", "config.feedback.partitions=3",
                    "config.kafka.group_id=gw", "config.feedback.app_id=fb")
    gateway = find(docs, "ScaledObject", f"{RELEASE}-banditgate-gateway")["spec"]
    assert (gateway["minReplicaCount"], gateway["maxReplicaCount"]) == (1, 6)
    assert [(t["type"], t["metadata"]["topic"], t["metadata"]["consumerGroup"]) for t in gateway["triggers"]] == \
        [("kafka", "bg.requests", "gw")]
    feedback = find(docs, "ScaledObject", f"{RELEASE}-banditgate-feedback")["spec"]
    assert (feedback["minReplicaCount"], feedback["maxReplicaCount"]) == (3, 3)
    assert sorted(t["metadata"]["topic"] for t in feedback["triggers"]) == ["bg.outcomes", "bg.predictions"]
    assert {t["metadata"]["consumerGroup"] for t in feedback["triggers"]} == {"fb"}  # faust's group is its app id


def test_secrets_come_from_the_chart_or_an_existing_secret() -> None:
    assert not [doc for doc in template() if doc["kind"] == "Secret"]  # nothing to keep secret
    docs = template("secrets.adminTokens=t1", "secrets.redisPassword=pw")
    secret = find(docs, "Secret", f"{RELEASE}-banditgate-secrets")
    assert secret["stringData"] == {"BANDITGATE_ADMIN_TOKENS": "t1", "BANDITGATE_REDIS_PASSWORD": "pw"}
    env = {item["name"]: item for item in _pod(docs, "gateway")["containers"][0]["env"]}
    assert env["BANDITGATE_ADMIN_TOKENS"]["valueFrom"]["secretKeyRef"]["name"] == f"{RELEASE}-banditgate-secrets"
    assert "BANDITGATE_INFER_TOKENS" not in env
    existing = template("secrets.existingSecret=mine", "secrets.adminTokens=ignored")
    assert not [doc for doc in existing if doc["kind"] == "Secret"]
    names = {item["name"]: item["valueFrom"]["secretKeyRef"] for item in _pod(existing, "gateway")["containers"][0]["env"]
             if "valueFrom" in item}
    assert set(names) == {"BANDITGATE_ADMIN_TOKENS", "BANDITGATE_INFER_TOKENS", "BANDITGATE_KAFKA_PASSWORD",
                          "BANDITGATE_REDIS_PASSWORD"}
    assert all(ref["name"] == "mine" and ref["optional"] for ref in names.values())


def test_a_loopback_host_is_refused() -> None:
    assert "loopback" in template_fails("config.server.host=127.0.0.1")
