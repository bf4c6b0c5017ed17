"""Typed configuration: one YAML file, validated at start-up (pure: imports nothing of ours).

Every wrong field is reported as one line naming the field path and the problem
(``routes[0].arms[1].max_share: must be <= 1 (got 1.5)``), all of them at once.

Strings of the form ``${NAME}`` are replaced by the environment variable NAME (an unset one is
an error). Environment variables override addresses and secrets:

==============================  ======================================
``BANDITGATE_KAFKA``            ``kafka.bootstrap_servers``
``BANDITGATE_REDIS``            ``redis.url``
``BANDITGATE_KAFKA_PASSWORD``   ``kafka.security.sasl_password``
``BANDITGATE_REDIS_PASSWORD``   ``redis.password``
``BANDITGATE_INFER_TOKENS``     ``server.infer_tokens`` (comma-separated)
``BANDITGATE_ADMIN_TOKENS``     ``server.admin_tokens`` (comma-separated)
==============================  ======================================

Secret fields also accept ``*_file`` siblings (read and stripped at load), so secrets can come
from mounted files and never sit in the YAML itself.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ConfigError(Exception):
    """The configuration is wrong; str(self) has one line per problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Topics(_Strict):
    """Kafka topic names (all configurable so several deployments can share a cluster)."""

    requests: str = "bg.requests"
    predictions: str = "bg.predictions"
    shadow_predictions: str = "bg.shadow-predictions"
    outcomes: str = "bg.outcomes"
    deadletter: str = "bg.deadletter"
    alerts: str = "bg.alerts"
    routing_changes: str = "bg.routing-changes"


class KafkaSecurity(_Strict):
    """Connection security, passed through to aiokafka (gateway) and faust (feedback)."""

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None  # client certificate for mTLS
    key_file: Path | None = None
    key_password: SecretStr | None = None
    check_hostname: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> "KafkaSecurity":
        if self.protocol.startswith("SASL"):
            if not self.sasl_mechanism:
                raise ValueError(f"protocol {self.protocol} needs sasl_mechanism (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)")
            if not self.sasl_username or self.sasl_password is None:
                raise ValueError(f"protocol {self.protocol} needs sasl_username and sasl_password (or BANDITGATE_KAFKA_PASSWORD)")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (client certificate for mTLS)")
        return self


class KafkaConfig(_Strict):
    """Where Kafka is and how the gateway's consumer and producer behave."""

    bootstrap_servers: str = "127.0.0.1:19092"
    client_id: str = "banditgate"
    group_id: str = "banditgate-gateway"
    topics: Topics = Topics()
    security: KafkaSecurity = KafkaSecurity()
    max_poll_records: int = Field(2048, ge=1, le=100_000)
    """Most records one `getmany` returns."""
    fetch_max_wait_ms: int = Field(5, ge=0, le=10_000)
    """How long the broker may wait to fill a fetch."""
    linger_ms: int = Field(2, ge=0, le=1000)
    """Producer batching delay."""
    max_request_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    session_timeout_ms: int = Field(10_000, ge=1000)
    transaction_timeout_ms: int = Field(60_000, ge=1000)


class RedisConfig(_Strict):
    """Arm statistics store."""

    url: str = "redis://127.0.0.1:16379/0"
    password: SecretStr | None = None
    ca_file: Path | None = None
    key_prefix: str = "bg"
    snapshot_refresh_ms: int = Field(250, ge=10, le=60_000)
    """How often gateways re-read arm posteriors (never per request)."""
    dedup_ttl_s: int = Field(8 * 86400, ge=60)
    """How long a request_id is remembered so a redelivered outcome never counts twice."""

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value


class ModelsConfig(_Strict):
    """Model repository and ONNX Runtime session settings."""

    repository: Path = Path("models")
    providers: list[str] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    """Tried in order; those onnxruntime does not offer are skipped (the choice is logged once)."""
    intra_op_threads: int = Field(1, ge=0, le=256)
    inter_op_threads: int = Field(1, ge=0, le=256)
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    poll_interval_s: float = Field(2.0, ge=0, le=3600)
    """How often the repository is scanned for new versions (0: only on admin reload)."""
    warmup_rows: int = Field(8, ge=0)
    inference_timeout_s: float = Field(10.0, gt=0)
    """A batch taking longer marks the model unhealthy."""


class BatchingConfig(_Strict):
    """Dynamic micro-batching, shared by Kafka, HTTP and gRPC."""

    max_batch_size: int = Field(256, ge=1, le=65_536)
    max_delay_us: int = Field(2000, ge=0, le=10_000_000)
    """A partly filled batch is flushed after this many microseconds."""
    max_queue_rows: int = Field(8192, ge=1)
    """Per model: more queued rows than this pauses Kafka fetching and rejects HTTP/gRPC with 503."""
    inference_threads: int = Field(2, ge=1, le=256)
    max_in_flight_batches: int = Field(8, ge=1, le=1024)
    """Kafka batches (getmany results) being processed at once before fetching pauses."""


class ServerConfig(_Strict):
    """HTTP/gRPC sidecar and metrics."""

    host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=0, le=65535)
    grpc_port: int = Field(8081, ge=0, le=65535)
    metrics_port: int | None = Field(None, ge=0, le=65535)
    """Separate port for /metrics (default: served on the HTTP port)."""
    infer_tokens: list[SecretStr] = []
    admin_tokens: list[SecretStr] = []
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_tensor_elements: int = Field(4_000_000, ge=1)
    max_inputs: int = Field(64, ge=1)
    request_timeout_s: float = Field(10.0, gt=0)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    client_ca_file: Path | None = None
    grpc_max_concurrent_streams: int = Field(256, ge=1)
    enable_http: bool = True
    enable_grpc: bool = True


class FeedbackConfig(_Strict):
    """The feedback worker (faust)."""

    app_id: str = "banditgate-feedback"
    join_ttl_s: float = Field(7 * 86400, gt=0)
    """A prediction or outcome waits this long for its partner before it expires."""
    partitions: int = Field(4, ge=1)
    web_port: int = Field(6066, ge=0, le=65535)
    flush_interval_s: float = Field(0.2, gt=0)
    """How often batched Redis updates are flushed."""
    quality_window_s: float = Field(3600, gt=0)
    drift_arl0: float = Field(10_000, gt=10)
    """Average run length between false drift alarms, in observations per feature."""
    promote_margin: float = Field(0.0, ge=0)
    promote_confidence: float = Field(0.95, gt=0.5, lt=1)


class Arm(_Strict):
    """A deployed model variant a route can send requests to."""

    name: str = Field(pattern=NAME_PATTERN)
    model: str = Field(pattern=NAME_PATTERN)
    version: int | Literal["latest"] = "latest"
    """A version number, or `latest`: the highest version in the repository (new ones swap in)."""
    weight: float = Field(1.0, ge=0)
    """Share under `policy: fixed` (normalised over the arms)."""
    max_share: float | None = Field(None, gt=0, le=1)
    """Canary ceiling: this arm never gets more than this share of traffic."""


    @field_validator("version")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be >= 1 or 'latest'")
        return value


class Guardrail(_Strict):
    """Drain an arm that is significantly worse than the best one."""

    enabled: bool = True
    min_outcomes: int = Field(200, ge=10)
    confidence: float = Field(0.999, gt=0.5, lt=1)
    """One-sided confidence of the test that the arm is worse than the best arm by `margin`."""
    margin: float = Field(0.0, ge=0)
    max_error_rate: float = Field(0.05, gt=0, le=1)


class Route(_Strict):
    """One route: a name requests carry, a policy, and the arms it chooses among."""

    name: str = Field(pattern=NAME_PATTERN)
    policy: Literal["thompson", "fixed", "shadow", "interleave"] = "thompson"
    reward: Literal["bernoulli", "gaussian"] = "bernoulli"
    half_life: float | None = Field(None, gt=0)
    """Discounting for non-stationary arms, in outcomes."""
    reward_wait_s: float | None = Field(None, gt=0)
    default_reward: float | None = None
    exploration_floor: float = Field(0.0, ge=0, lt=1)
    arms: list[Arm] = Field(min_length=1)
    shadows: list[Arm] = []
    shadow_fraction: float = Field(1.0, ge=0, le=1)
    sticky_key: str | None = None
    guardrail: Guardrail = Guardrail()
    webhook_url: str | None = None
    method: Literal["team_draft", "multileave"] | None = None
    k: int = Field(10, ge=1, le=1000)

    @model_validator(mode="after")
    def _consistent(self) -> "Route":
        names = [a.name for a in self.arms] + [s.name for s in self.shadows]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"arm names must be unique within a route; repeated: {', '.join(dupes)}")
        n = len(self.arms)
        if self.exploration_floor * n > 1:
            raise ValueError(f"exploration_floor {self.exploration_floor} x {n} arms exceeds 1")
        caps = [a.max_share if a.max_share is not None else 1.0 for a in self.arms]
        if sum(caps) < 1 - 1e-9:
            raise ValueError(f"the arms' max_share values add up to {sum(caps):.3g} < 1: no split can serve every request")
        for arm, cap in zip(self.arms, caps):
            if cap < self.exploration_floor:
                raise ValueError(f"arm {arm.name!r} max_share {cap} is below exploration_floor {self.exploration_floor}")
        if self.policy == "fixed" and sum(a.weight for a in self.arms) <= 0:
            raise ValueError("policy fixed needs at least one arm with weight > 0")
        if self.policy == "shadow" and not self.shadows:
            raise ValueError("policy shadow needs at least one entry under 'shadows'")
        if (self.reward_wait_s is None) != (self.default_reward is None):
            raise ValueError("reward_wait_s and default_reward go together")
        if self.policy == "interleave" and n < 2:
            raise ValueError("policy interleave needs at least two arms (rankers)")
        return self


class DriftConfig(_Strict):
    """Input and prediction-score drift monitors in the gateway (models with a reference.json)."""

    enabled: bool = True
    arl0: float = Field(10_000, gt=10)
    """Average run length between false alarms: per observation, for a model's whole feature family."""


class LoggingConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    json_format: bool = Field(False, alias="json")


class Config(_Strict):
    """The whole configuration file."""

    kafka: KafkaConfig = KafkaConfig()
    redis: RedisConfig = RedisConfig()
    models: ModelsConfig = ModelsConfig()
    batching: BatchingConfig = BatchingConfig()
    server: ServerConfig = ServerConfig()
    feedback: FeedbackConfig = FeedbackConfig()
    logging: LoggingConfig = LoggingConfig()
    drift: DriftConfig = DriftConfig()
    delivery: Literal["at_least_once", "exactly_once"] = "at_least_once"
    shutdown_grace_s: float = Field(10.0, gt=0, le=600)
    max_event_bytes: int = Field(1_048_576, ge=256)
    routes: list[Route] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_routes(self) -> "Config":
        names = [r.name for r in self.routes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"route names must be unique; repeated: {', '.join(dupes)}")
        return self

    def route(self, name: str) -> Route:
        for route in self.routes:
            if route.name == name:
                return route
        raise KeyError(name)


# ---------------------------------------------------------------------------------------------
# loading


def _interpolate(value: Any, path: str, problems: list[str], env: dict[str, str]) -> Any:
    if isinstance(value, str):
        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in env:
                problems.append(f"{path}: environment variable {name} is not set")
                return ""
            return env[name]
        return _ENV_REF.sub(sub, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, f"{path}.{k}" if path else str(k), problems, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{path}[{i}]", problems, env) for i, v in enumerate(value)]
    return value


_SECRET_FILE_FIELDS = {
    ("kafka", "security"): ("sasl_password", "key_password"),
    ("redis",): ("password",),
}


def _read_secret_files(data: dict[str, Any], base: Path, problems: list[str]) -> None:
    for section_path, fields in _SECRET_FILE_FIELDS.items():
        section: Any = data
        for key in section_path:
            section = section.get(key) if isinstance(section, dict) else None
        if not isinstance(section, dict):
            continue
        for name in fields:
            file_key = f"{name}_file"
            if file_key in section:
                path = Path(str(section.pop(file_key)))
                path = path if path.is_absolute() else base / path
                try:
                    section[name] = path.read_text().strip()
                except OSError as exc:
                    problems.append(f"{'.'.join(section_path)}.{file_key}: cannot read {path}: {exc.strerror}")
    server = data.get("server")
    if isinstance(server, dict):
        for name in ("infer_tokens", "admin_tokens"):
            file_key = f"{name}_file"
            if file_key in server:
                path = Path(str(server.pop(file_key)))
                path = path if path.is_absolute() else base / path
                try:
                    server[name] = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
                except OSError as exc:
                    problems.append(f"server.{file_key}: cannot read {path}: {exc.strerror}")


def _apply_env(data: dict[str, Any], env: dict[str, str]) -> None:
    def section(*keys: str) -> dict[str, Any]:
        node = data
        for key in keys:
            node = node.setdefault(key, {})
        return node

    if v := env.get("BANDITGATE_KAFKA"):
        section("kafka")["bootstrap_servers"] = v
    if v := env.get("BANDITGATE_REDIS"):
        section("redis")["url"] = v
    if v := env.get("BANDITGATE_KAFKA_PASSWORD"):
        section("kafka", "security")["sasl_password"] = v
    if v := env.get("BANDITGATE_REDIS_PASSWORD"):
        section("redis")["password"] = v
    if v := env.get("BANDITGATE_INFER_TOKENS"):
        section("server")["infer_tokens"] = [t.strip() for t in v.split(",") if t.strip()]
    if v := env.get("BANDITGATE_ADMIN_TOKENS"):
        section("server")["admin_tokens"] = [t.strip() for t in v.split(",") if t.strip()]


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _format_error(err: dict[str, Any]) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-after")))
    msg = err["msg"]
    msg = msg.removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field (check the spelling)"
    elif err["type"] == "missing":
        msg = "required field is missing"
    inp = err.get("input")
    shown = "" if err["type"] in ("missing", "extra_forbidden") or isinstance(inp, (dict, list)) else f" (got {inp!r})"
    if isinstance(inp, str) and len(inp) > 60:
        shown = ""
    return f"{_format_loc(loc)}: {msg}{shown}"


def parse_config(data: Any, source: str = "config", base: Path | None = None,
                 env: dict[str, str] | None = None) -> Config:
    """Validate a decoded YAML document; raise ConfigError listing every wrong field, one per line."""
    env = dict(os.environ) if env is None else env
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    problems: list[str] = []
    data = _interpolate(data, "", problems, env)
    _read_secret_files(data, base or Path.cwd(), problems)
    _apply_env(data, env)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems.extend(_format_error(e) for e in exc.errors())  # type: ignore[arg-type]
        config = None
    if problems:
        raise ConfigError("\n".join(f"{source}: {p}" for p in problems))
    assert config is not None  # noqa: S101 - problems is empty only when validation succeeded
    if not config.models.repository.is_absolute() and base is not None:
        config = config.model_copy(update={"models": config.models.model_copy(
            update={"repository": (base / config.models.repository).resolve()})})
    return config


def load_config(path: str | Path, env: dict[str, str] | None = None) -> Config:
    """Read and validate a YAML config file; relative paths in it are relative to its folder."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    return parse_config(data, source=str(path), base=path.parent.resolve(), env=env)


def dump_public(config: Config) -> dict[str, Any]:
    """The configuration as served to operators: every secret replaced by '***'."""
    return config.model_dump(mode="json", by_alias=True)
