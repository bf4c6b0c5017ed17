"""Configuration: every wrong field is one line naming it; env overrides addresses and secrets."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from banditgate.config import ConfigError, dump_public, load_config, parse_config

GOOD = {
    "routes": [{
        "name": "churn", "policy": "thompson", "reward": "bernoulli", "half_life": 50000,
        "reward_wait_s": 86400, "default_reward": 0, "exploration_floor": 0.02,
        "arms": [{"name": "a", "model": "churn-gbm", "version": 3},
                 {"name": "b", "model": "churn-mlp", "version": 1, "max_share": 0.2}],
        "shadows": [{"name": "c", "model": "churn-gbm", "version": 4}],
        "sticky_key": "unit_id",
    }],
}


def test_design_example_parses() -> None:
    config = parse_config(GOOD, env={})
    route = config.route("churn")
    assert route.arms[1].max_share == 0.2 and route.shadows[0].version == 4
    assert config.delivery == "at_least_once"


def test_every_wrong_field_is_one_line() -> None:
    bad = yaml.safe_load(yaml.safe_dump(GOOD))
    bad["routes"][0]["arms"][1]["max_share"] = 1.5
    bad["routes"][0]["policy"] = "roulette"
    bad["batching"] = {"max_batch_size": 0, "max_dlay_us": 5}
    with pytest.raises(ConfigError) as info:
        parse_config(bad, source="x.yaml", env={})
    lines = str(info.value).splitlines()
    assert any(line.startswith("x.yaml: routes[0].arms[1].max_share:") for line in lines)
    assert any(line.startswith("x.yaml: routes[0].policy:") for line in lines)
    assert any(line.startswith("x.yaml: batching.max_batch_size:") for line in lines)
    assert any("batching.max_dlay_us: unknown field" in line for line in lines)
    assert len(lines) == 4


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda r: r.update(exploration_floor=0.6), "exceeds 1"),
    (lambda r: r["arms"].append({"name": "a", "model": "m", "version": 1}), "repeated: a"),
    (lambda r: r.update(reward_wait_s=None), "go together"),
    (lambda r: [a.update(max_share=0.3) for a in r["arms"]], "add up to"),
    (lambda r: r["arms"][0].update(name="../etc"), "routes[0].arms[0].name"),
])
def test_route_consistency(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    bad = yaml.safe_load(yaml.safe_dump(GOOD))
    mutate(bad["routes"][0])
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        parse_config(bad, env={})


def test_env_overrides_addresses_and_secrets(tmp_path: Path) -> None:
    data = dict(GOOD, kafka={"security": {"protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-256",
                                          "sasl_username": "bg", "sasl_password": "${KPASS}"}})
    env = {"KPASS": "from-yaml-ref", "BANDITGATE_KAFKA": "10.1.1.1:9093", "BANDITGATE_REDIS": "rediss://h:6380/0",
           "BANDITGATE_INFER_TOKENS": "t1, t2"}
    config = parse_config(data, env=env)
    assert config.kafka.bootstrap_servers == "10.1.1.1:9093"
    assert config.redis.url == "rediss://h:6380/0"
    assert config.kafka.security.sasl_password.get_secret_value() == "from-yaml-ref"
    assert [t.get_secret_value() for t in config.server.infer_tokens] == ["t1", "t2"]
    env["BANDITGATE_KAFKA_PASSWORD"] = "from-env"
    assert parse_config(data, env=env).kafka.security.sasl_password.get_secret_value() == "from-env"
    assert "from-env" not in str(dump_public(parse_config(data, env=env)))


def test_unset_env_reference_names_field() -> None:
    data = dict(GOOD, redis={"url": "${NOPE_URL}"})
    with pytest.raises(ConfigError, match=r"redis\.url: environment variable NOPE_URL is not set"):
        parse_config(data, env={})


def test_secret_from_file(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("filepass\n")
    data = dict(GOOD, redis={"password_file": "pw"})
    config = parse_config(data, base=tmp_path, env={})
    assert config.redis.password.get_secret_value() == "filepass"


def test_load_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("routes: [\n  - name: x\n   policy: y\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(dict(GOOD, models={"repository": "repo"})))
    assert load_config(good, env={}).models.repository == (tmp_path / "repo").resolve()
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="routes: required field is missing"):
        load_config(empty, env={})


def test_webhook_urls_are_http_and_masked_for_operators() -> None:
    from banditgate.config import dump_public, url_origin

    route = {"name": "r", "arms": [{"name": "a", "model": "m"}]}
    with pytest.raises(ConfigError, match="webhook_url"):
        parse_config({"routes": [{**route, "webhook_url": "ftp://hooks.example/x"}]}, env={})
    config = parse_config({"routes": [{**route, "webhook_url": "https://u:pw@hooks.example:8443/T0K3N?sig=abc"}]},
                          env={})
    shown = dump_public(config)["routes"][0]["webhook_url"]
    assert "T0K3N" not in shown and "pw" not in shown and "sig" not in shown
    assert shown.startswith("https://hooks.example:8443/")
    assert url_origin("http://hooks.example/path") == "http://hooks.example"


def test_gil_switch_interval_defaults_and_bounds() -> None:
    assert parse_config(GOOD, env={}).feedback.gil_switch_interval_ms == 1.0
    bad = {**yaml.safe_load(yaml.safe_dump(GOOD)), "feedback": {"gil_switch_interval_ms": 0}}
    with pytest.raises(ConfigError) as info:
        parse_config(bad, source="x.yaml", env={})
    assert str(info.value).startswith("x.yaml: feedback.gil_switch_interval_ms:") and "\n" not in str(info.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e16])
def test_a_default_reward_is_bounded_like_an_outcome_reward(value: float) -> None:
    """The default reward goes to the arm statistics and the ledger as an outcome's would
    (banditgate.events.MAX_MAGNITUDE); before, `.nan` in the YAML was taken."""
    bad = yaml.safe_load(yaml.safe_dump(GOOD))
    bad["routes"][0]["default_reward"] = value
    with pytest.raises(ConfigError, match=r"routes\[0\]\.default_reward"):
        parse_config(bad, env={})


@pytest.mark.parametrize(("path", "value"), [(("routes", 0, "half_life"), float("inf")),
                                             (("routes", 0, "half_life"), 1e13),
                                             (("redis", "dedup_ttl_s"), 10**13)])
def test_numbers_the_redis_scripts_would_refuse_are_refused_at_load(path: tuple, value: float) -> None:
    """A half-life or TTL past the ledger scripts' bounds would make them refuse every reward of
    the route (each dead-lettered as redis_refused): refused when the config loads instead."""
    bad = yaml.safe_load(yaml.safe_dump(GOOD))
    node = bad
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(key, str) else node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=str(path[-1])):
        parse_config(bad, source="x.yaml", env={})


def test_tracing_span_caps_default_and_bounds() -> None:
    tracing = parse_config(GOOD, env={}).tracing
    assert (tracing.max_request_spans_per_s, tracing.max_request_spans_per_batch) == (100.0, 16)
    bad = {**GOOD, "tracing": {"max_request_spans_per_s": float("nan"), "max_request_spans_per_batch": -1}}
    with pytest.raises(ConfigError) as info:
        parse_config(bad, source="x.yaml", env={})
    assert "tracing.max_request_spans_per_s" in str(info.value)
    assert "tracing.max_request_spans_per_batch" in str(info.value)
    for over in ({"max_request_spans_per_s": float("inf")}, {"max_request_spans_per_s": 2e6}):
        with pytest.raises(ConfigError, match="tracing.max_request_spans_per_s"):
            parse_config({**GOOD, "tracing": over}, env={})


def test_kafka_cloudevents_is_on_by_default_and_a_checked_switch() -> None:
    assert parse_config(GOOD, env={}).kafka.cloudevents is True
    off = {**yaml.safe_load(yaml.safe_dump(GOOD)), "kafka": {"cloudevents": False}}
    assert parse_config(off, env={}).kafka.cloudevents is False
    bad = {**yaml.safe_load(yaml.safe_dump(GOOD)), "kafka": {"cloudevents": "maybe"}}
    with pytest.raises(ConfigError) as info:
        parse_config(bad, source="x.yaml", env={})
    assert str(info.value).startswith("x.yaml: kafka.cloudevents:") and "\n" not in str(info.value)
