"""docker-compose.yml and Dockerfile cannot run here (no Docker engine): parse and cross-check them,
so that `docker compose up` from a fresh clone finds every file, model and service it names."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path, PurePosixPath

import pytest
import yaml

from banditgate.cli import build_parser
from banditgate.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def load_compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def mounts(service: dict) -> list[tuple[Path, PurePosixPath]]:
    """(host path in the repository, path in the container) of each bind mount."""
    out = []
    for volume in service.get("volumes", []):
        host, container, *_mode = volume.split(":")
        assert host.startswith("./"), f"{volume}: mount repository paths only (relative, ./...)"
        out.append((ROOT / host, PurePosixPath(container)))
    return out


def host_path(service: dict, container_path: str) -> Path | None:
    """Where `container_path` comes from in the repository, if a mount provides it."""
    path = PurePosixPath(container_path)
    for host, target in mounts(service):
        if path == target or target in path.parents:
            return host / path.relative_to(target)
    return None


def compose_env(service: dict) -> dict[str, str]:
    """The service's environment with `${VAR:-default}` taken at its default (a fresh shell)."""
    env = service.get("environment") or {}
    return {k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(v)) for k, v in env.items()}


def gateway_config():  # type: ignore[no-untyped-def]
    gateway = load_compose()["services"]["gateway"]
    return load_config(ROOT / "deploy/config/banditgate.yaml", env=compose_env(gateway))


def test_compose_has_every_service_published_on_loopback_only() -> None:
    services = load_compose()["services"]
    assert {"kafka", "redis", "prometheus", "grafana", "gateway", "feedback", "traffic"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:4.")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    ports = {name: [p.split(":")[-1] for p in s.get("ports", [])] for name, s in services.items()}
    assert ports["kafka"] == ["9092"] and ports["redis"] == ["6379"] and "3000" in ports["grafana"]
    assert "8080" in ports["gateway"] and "8081" in ports["gateway"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"


def test_every_path_the_compose_file_names_exists_in_the_repository() -> None:
    services = load_compose()["services"]
    for name, service in services.items():
        if "build" in service:
            assert (ROOT / service["build"] / "Dockerfile").is_file(), name
        for host, _target in mounts(service):
            assert host.exists(), f"{name} mounts {host.relative_to(ROOT)}, which the repository lacks"
        # absolute paths on the command line that a mount provides: they must be there too
        for arg in service.get("command", []):
            if isinstance(arg, str) and arg.startswith("/") and (source := host_path(service, arg)) is not None:
                assert source.exists(), f"{name}: {arg} comes from {source.relative_to(ROOT)}, which does not exist"


def test_compose_commands_are_real_commands() -> None:
    from demo.compose_traffic import build_parser as traffic_parser

    services = load_compose()["services"]
    parser = build_parser()
    for name in ("gateway", "feedback"):
        command = services[name]["command"]
        assert command[0] == "banditgate"
        args = parser.parse_args(command[1:])
        assert args.command == {"gateway": "serve", "feedback": "feedback"}[name]
        assert host_path(services[name], args.config) is not None and host_path(services[name], args.config).is_file()
    traffic = services["traffic"]["command"]
    assert traffic[:3] == ["python", "-m", "demo.compose_traffic"]
    args = traffic_parser().parse_args(traffic[3:])
    assert host_path(services["traffic"], args.config).is_file()
    assert host_path(services["traffic"], str(args.rows)).is_file()
    assert args.route in {route.name for route in gateway_config().routes}


def test_compose_config_is_valid_and_every_model_it_names_is_shipped() -> None:
    from banditgate.drift.reference import ReferenceProfile

    config = gateway_config()
    assert config.server.http_port == 8080 and config.server.grpc_port == 8081
    repository = host_path(load_compose()["services"]["gateway"], str(config.models.repository))
    assert repository is not None and repository.is_dir(), "the gateway's model repository is not mounted"
    assert host_path(load_compose()["services"]["feedback"], str(config.models.repository)) == repository
    named = {(arm.model, arm.version) for route in config.routes for arm in route.arms}
    assert named
    for model, version in named:
        folder = repository / model
        versions = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []
        assert versions, f"the compose config names model {model}; {folder.relative_to(ROOT)} has no version"
        chosen = versions[-1] if version == "latest" else int(version)
        assert chosen in versions, f"{model} version {version} is not in {folder.relative_to(ROOT)}"
        model_config = yaml.safe_load((folder / "config.yaml").read_text())
        assert (folder / str(chosen) / "model.onnx").stat().st_size > 0
        profile = ReferenceProfile.load(folder / str(chosen) / "reference.json")
        assert list(profile.feature_names) == model_config["features"]


def test_shipped_models_run_on_the_traffic_rows() -> None:
    """The example models answer the traffic generator's rows, and they differ in quality (so the
    bandit has something to learn): ONNX Runtime on the shipped files, as the gateway runs them."""
    import numpy as np
    import onnxruntime

    from demo.compose_traffic import load_rows

    rows = load_rows(ROOT / "deploy/traffic/pool.csv")
    features = np.asarray(rows.values, dtype=np.float32)
    accuracy = {}
    for path in sorted((ROOT / "deploy/models").glob("*/1/model.onnx")):
        model_config = yaml.safe_load((path.parents[1] / "config.yaml").read_text())
        assert model_config["features"] == rows.feature_names
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        labels = session.run(["label"], {session.get_inputs()[0].name: features})[0]
        accuracy[path.parents[1].name] = float(np.mean(labels == np.asarray(rows.labels)))
    assert set(accuracy) == {"gbm", "stump", "nb"}
    assert accuracy["gbm"] > accuracy["stump"] and accuracy["gbm"] > accuracy["nb"] and min(accuracy.values()) > 0.6


def test_grafana_provisioning_and_prometheus_files_agree_with_compose() -> None:
    services = load_compose()["services"]
    for volume in services["grafana"]["volumes"] + services["prometheus"]["volumes"]:
        assert (ROOT / volume.split(":")[0]).is_dir(), volume
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prom["scrape_configs"]}
    assert {"banditgate-gateway", "banditgate-feedback"} <= set(jobs)
    config = gateway_config()
    expected = {"banditgate-gateway": f"gateway:{config.server.metrics_port or config.server.http_port}",
                "banditgate-feedback": f"feedback:{config.feedback.web_port}"}
    for job, target in expected.items():
        assert jobs[job]["static_configs"][0]["targets"] == [target]
    for rules in prom["rule_files"]:
        assert host_path(services["prometheus"], rules) is not None and host_path(services["prometheus"], rules).is_file()
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/banditgate.yml").read_text())
    dashboards = host_path(services["grafana"], provider["providers"][0]["options"]["path"])
    assert dashboards is not None and len(list(dashboards.glob("*.json"))) >= 4
    for path in dashboards.glob("*.json"):
        json.loads(path.read_text())


def test_traffic_rows_are_the_models_inputs() -> None:
    with (ROOT / "deploy/traffic/pool.csv").open() as handle:
        header = next(csv.reader(handle))
    model_config = yaml.safe_load((ROOT / "deploy/models/gbm/config.yaml").read_text())
    assert header == [*model_config["features"], "label"]


def test_dockerfile_is_multistage_slim_and_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    froms = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert len(froms) >= 2 and all("slim" in line for line in froms)
    users = [line for line in text.splitlines() if line.startswith("USER ")]
    assert users and users[-1].split()[1] not in ("root", "0")
    for package in ("banditgate", "gateway", "router", "feedback", "loadtests", "demo"):
        assert f"COPY {package} " in text


def test_compose_admin_api_is_closed_unless_a_token_is_given() -> None:
    """The container binds 0.0.0.0: its admin API is closed (no token, not admin_open) unless the
    user exports BANDITGATE_ADMIN_TOKENS, so `docker compose up` needs no step and opens nothing."""
    from banditgate.config import ConfigError, load_config

    gateway = load_compose()["services"]["gateway"]
    assert gateway["environment"]["BANDITGATE_ADMIN_TOKENS"] == "${BANDITGATE_ADMIN_TOKENS:-}"
    closed = load_config(ROOT / "deploy/config/banditgate.yaml", env={"BANDITGATE_ADMIN_TOKENS": ""})
    assert closed.server.host == "0.0.0.0" and not closed.server.admin_open  # noqa: S104
    assert closed.server.admin_tokens == []
    config = load_config(ROOT / "deploy/config/banditgate.yaml", env={"BANDITGATE_ADMIN_TOKENS": "t0k3n"})
    assert [t.get_secret_value() for t in config.server.admin_tokens] == ["t0k3n"]
    assert "gateway" in config.server.allowed_hosts  # other containers reach it by its service name
    with pytest.raises(ConfigError):
        load_config(ROOT / "deploy/config/banditgate.yaml", env={"BANDITGATE_ADMIN_TOKENS": " , "})


def test_example_models_store_the_drift_thresholds_compose_needs() -> None:
    """Every shipped reference.json holds the calibrated thresholds for the compose gateway's
    `drift.arl0`, so the compose gateway watches drift at once instead of calibrating at start
    (scripts/build_example_models.py stores them)."""
    from banditgate.drift.monitor import profile_keys
    from banditgate.drift.reference import ReferenceProfile

    arl0 = gateway_config().drift.arl0
    for path in sorted((ROOT / "deploy/models").glob("*/1/reference.json")):
        profile = ReferenceProfile.load(path)
        missing = profile_keys(profile, arl0).keys() - profile.thresholds.keys()
        assert not missing, f"{path}: no stored threshold for {sorted(missing)}"
