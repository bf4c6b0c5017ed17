"""Typed configuration: one YAML file, validated at start-up (pure: of ours, imports only the events contract).

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
from mounted files and never sit in the YAML itself. Error messages never show the value of a
secret field, and URLs are shown with their password replaced by ``***`` (docs/security.md).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from banditgate.events import (  # one definition each: events are checked with them too
    MAX_MAGNITUDE,
    MAX_RANKERS,
    NAME_PATTERN,
)
from banditgate.jsontypes import JSONObject, JSONValue
from banditgate.redaction import redact_url

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
    def _consistent(self) -> KafkaSecurity:
        if self.protocol.startswith("SASL"):
            if not self.sasl_mechanism:
                raise ValueError(f"protocol {self.protocol} needs sasl_mechanism (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)")
            if not self.sasl_username or self.sasl_password is None:
                raise ValueError(f"protocol {self.protocol} needs sasl_username and sasl_password (or BANDITGATE_KAFKA_PASSWORD)")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (client certificate for mTLS)")
        if self.protocol in ("PLAINTEXT", "SASL_PLAINTEXT") and (self.ca_file or self.cert_file):
            raise ValueError(f"ca_file and cert_file need protocol SSL or SASL_SSL, not {self.protocol}")
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
    fetch_min_bytes: int = Field(1, ge=1, le=64 * 1024 * 1024)
    fetch_max_wait_ms: int = Field(500, ge=0, le=10_000)
    """How long the broker may hold a fetch while the topic is empty. The broker answers as soon as
    any record arrives (fetch.min.bytes is 1), so this adds no latency; a short wait only makes an
    idle consumer poll the broker hundreds of times a second."""
    linger_ms: int = Field(2, ge=0, le=1000)
    """Producer batching delay."""
    commit_interval_ms: int = Field(100, ge=0, le=60_000)
    """Least time between two offset commits of the gateway's consumer (0: commit after every
    batch). Offsets are still committed only after everything before them is delivered; a longer
    interval means fewer commit round trips for the gateway and the broker, and at most this much
    more work served again after a crash (at-least-once)."""
    max_request_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_message_bytes: int | None = Field(None, ge=1024)
    """The largest record batch the output topics accept (their `max.message.bytes`). Unset: the
    gateway asks the broker for each topic at start. An output larger than its topic accepts is
    dead-lettered (`output_too_large`) before it is sent."""
    session_timeout_ms: int = Field(10_000, ge=1000)
    request_timeout_ms: int = Field(30_000, ge=1000)
    """How long the gateway's producer waits for a broker's answer before a publication fails
    (the batch is then served again from the committed offsets, by a fresh producer)."""
    transaction_timeout_ms: int = Field(60_000, ge=1000)
    cloudevents: bool = True
    """Put CloudEvents 1.0 binary-mode headers (``ce_specversion``, ``ce_id``, ``ce_type``,
    ``ce_source``, ``ce_time``; banditgate.cloudevents) on every event the gateway and the feedback
    worker produce. false: records carry the trace context only (banditgate's own consumers never
    read these headers; turn them off to save ~200 bytes a record when nothing downstream does)."""
    reply_topics: list[str] = Field(default_factory=list)
    """Topic-name patterns (shell-style: ``bg.replies.*``) a request's ``reply_to`` may name; the
    gateway also publishes the prediction there, keyed by request_id. Default: none (a request
    with ``reply_to`` is dead-lettered, reason reply_refused). Name long-lived topics (one per
    service): a reply topic deleted while requests still name it stalls publication until the
    producer's request timeout."""


class RedisConfig(_Strict):
    """Arm statistics store."""

    url: str = "redis://127.0.0.1:16379/0"
    """``redis://[user@]host:port/db``, ``rediss://`` for TLS; an ACL user goes in the URL, its
    password in `password` (or ``password_file`` / BANDITGATE_REDIS_PASSWORD), not in the URL."""
    password: SecretStr | None = None
    ca_file: Path | None = None
    """CA bundle that signed the server's certificate (rediss:// only; default: the system's CAs)."""
    cert_file: Path | None = None
    """Client certificate, for servers with ``tls-auth-clients yes`` (rediss:// only)."""
    key_file: Path | None = None
    key_prefix: str = "bg"
    snapshot_refresh_ms: int = Field(250, ge=10, le=60_000)
    """How often gateways re-read arm posteriors (never per request)."""
    dedup_ttl_s: int = Field(8 * 86400, ge=60, le=10**12)  # the ledger scripts refuse a TTL past 1e12 s
    """How long a request_id is remembered so a redelivered outcome never counts twice."""

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @model_validator(mode="after")
    def _tls(self) -> RedisConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (client certificate for TLS)")
        if (self.ca_file or self.cert_file) and not self.url.startswith("rediss://"):
            raise ValueError("ca_file and cert_file need a rediss:// url (TLS)")
        return self


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
    """A batch taking longer is ended (ONNX Runtime's terminate flag), its rows fail with
    `model_unavailable`, and the model is unavailable: its batches fail at once until a probe
    answers in time (docs/gateway.md, Isolating a hung model)."""
    unavailable_retry_s: float = Field(1.0, gt=0, le=3600)
    """How long a model stays unavailable after a timeout before one batch's inputs probe it."""
    unavailable_retry_max_s: float = Field(60.0, gt=0, le=86_400)
    """The wait between probes doubles after every probe that times out, up to this."""

    @model_validator(mode="after")
    def _retry_order(self) -> ModelsConfig:
        if self.unavailable_retry_s > self.unavailable_retry_max_s:
            raise ValueError("unavailable_retry_s must not exceed unavailable_retry_max_s")
        return self


class BatchingConfig(_Strict):
    """Dynamic micro-batching, shared by Kafka, HTTP and gRPC."""

    max_batch_size: int = Field(256, ge=1, le=65_536)
    max_delay_us: int = Field(2000, ge=0, le=10_000_000)
    """A partly filled batch is flushed after this many microseconds (while the model is busy; see
    `idle_flush`)."""
    idle_flush: bool = True
    """Flush a model's queue at once while none of its batches is running (an idle gateway answers
    a lone request without waiting `max_delay_us` for a batch that will not fill). False: always
    wait up to `max_delay_us` for company."""
    max_queue_rows: int = Field(8192, ge=1)
    """Per model: more queued rows than this pauses Kafka fetching and rejects HTTP/gRPC with 503."""
    inference_threads: int = Field(2, ge=1, le=256)
    inline_max_us: int | None = Field(None, ge=0, le=1000)
    """A batch of up to 8 rows of a model whose recent small batches ran in under this many
    microseconds runs on the event loop instead of the pool (a thread round trip costs more than
    such a model; the loop is never held longer than this measured time). 0: always the pool.
    Default (unset): 100 when the process can use a single CPU (affinity or cgroup quota), where
    the pool cannot run beside the loop and only adds its round trip; 0 with more CPUs, where
    the pool's inference runs in parallel with the loop's Python work."""
    max_in_flight_batches: int = Field(8, ge=1, le=1024)
    """Kafka batches (getmany results) being processed at once before fetching pauses."""
    model_max_threads: int | None = Field(None, ge=1, le=256)
    """At most this many of `inference_threads` run one model version's batches at once (more of
    its rows wait in its queue), so a model that hangs holds no more. Default: half the pool,
    at least 1."""

    @model_validator(mode="after")
    def _thread_share(self) -> BatchingConfig:
        if self.model_max_threads is not None and self.model_max_threads > self.inference_threads:
            raise ValueError(f"model_max_threads ({self.model_max_threads}) exceeds inference_threads "
                             f"({self.inference_threads})")
        return self


def _check_token(token: SecretStr) -> SecretStr:
    """A bearer token is visible ASCII, nothing else: an unset ``${VAR}`` interpolated to '', a
    blank line or a token with a space, a non-breaking space or a control character would match
    (or never match) what an HTTP client sends in `Authorization: Bearer <token>`."""
    value = token.get_secret_value()
    if not value.strip():
        raise ValueError("a token must not be empty or blank (an environment variable set to ''?)")
    if not all("!" <= c <= "~" for c in value):
        raise ValueError("a token may hold visible ASCII characters only (no spaces, control or non-ASCII "
                         "characters)")
    return token


BearerToken = Annotated[SecretStr, AfterValidator(_check_token)]
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class ServerConfig(_Strict):
    """HTTP/gRPC sidecar and metrics."""

    host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=0, le=65535)
    grpc_port: int = Field(8081, ge=0, le=65535)
    metrics_port: int | None = Field(None, ge=0, le=65535)
    """Separate port for /metrics (default: served on the HTTP port)."""
    infer_tokens: list[BearerToken] = []
    """Bearer tokens for inference, metadata and outcomes (several: rotation); none: open."""
    admin_tokens: list[BearerToken] = []
    """Bearer tokens for /v2/admin (separate from infer_tokens); none: the admin API is closed
    (every request 403) unless `admin_open` is set."""
    admin_open: bool = False
    """Serve /v2/admin without a token. Only with a loopback `host` (a gateway nobody else can
    reach); a warning at start. Host, Origin and Content-Type checks still apply."""
    allowed_hosts: list[str] = []
    """Host names an admin request's `Host` header may carry (port ignored), against DNS
    rebinding; empty: `host` itself (unless a wildcard address), localhost, 127.0.0.1 and ::1.
    `"*"` allows any (a gateway behind a proxy that checks Host itself)."""
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    """REST body and gRPC message size limit (413 / RESOURCE_EXHAUSTED)."""
    max_header_bytes: int = Field(16 * 1024, ge=1024, le=1024 * 1024)
    """Total size of a REST request's headers (431) and of gRPC metadata."""
    max_tensor_elements: int = Field(4_000_000, ge=1)
    max_inputs: int = Field(64, ge=1)
    request_timeout_s: float = Field(10.0, gt=0)
    publish_interval_ms: int = Field(20, ge=1, le=10_000)
    """How often the prediction events of REST/gRPC requests are sent to Kafka, in one batch (off
    the request path: callers never wait for it; a longer interval means fewer, larger produce
    requests)."""
    max_in_flight_requests: int = Field(256, ge=1)
    """Inference requests (REST and gRPC together) being served at once; beyond it 429 /
    RESOURCE_EXHAUSTED with Retry-After, so an overloaded gateway sheds load instead of queueing it."""
    tls_cert_file: Path | None = None
    """Server certificate (chain) for HTTPS and gRPC over TLS; with tls_key_file, TLS is on."""
    tls_key_file: Path | None = None
    client_ca_file: Path | None = None
    """When set, clients must present a certificate signed by this CA (mTLS) on HTTP and gRPC."""
    grpc_max_concurrent_streams: int = Field(256, ge=1)
    enable_http: bool = True
    enable_grpc: bool = True

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        for name in value:
            if name != "*" and not re.fullmatch(r"[A-Za-z0-9.\-_]+|\[?[0-9A-Fa-f:.]+\]?", name):
                raise ValueError(f"{name!r} is not a host name or address (no scheme, port or path)")
        return [name.lower().strip("[]") for name in value]

    @model_validator(mode="after")
    def _admin(self) -> ServerConfig:
        if self.admin_open and self.admin_tokens:
            raise ValueError("admin_open and admin_tokens contradict each other: remove admin_open (the tokens "
                             "guard the admin API)")
        if self.admin_open and "*" in self.allowed_hosts:
            raise ValueError("admin_open with allowed_hosts ['*'] would let any web page reach the admin API "
                             "through DNS rebinding: name the hosts, or use admin_tokens")
        if self.admin_open and self.host not in LOOPBACK_HOSTS:
            raise ValueError(f"admin_open needs a loopback host ({', '.join(LOOPBACK_HOSTS)}), not {self.host!r}: "
                             "a gateway other machines can reach needs admin_tokens")
        return self

    @model_validator(mode="after")
    def _tls(self) -> ServerConfig:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("client_ca_file (client certificates) needs tls_cert_file and tls_key_file")
        return self


class FeedbackConfig(_Strict):
    """The feedback worker (faust)."""

    app_id: str = "banditgate-feedback"
    join_ttl_s: float = Field(7 * 86400, gt=0)
    """A prediction or outcome waits this long for its partner before it expires."""
    join_max_bytes: int | None = Field(1 << 30, ge=1 << 20)
    """Budget of the whole join table (all partitions; a worker holds its partitions' share), in
    estimated bytes: with `join_store: memory` the entries' Python objects, with `rocksdb` their
    keys and values on disk before compression. Over it the oldest entries are evicted (counted;
    see docs/feedback.md). null: no byte budget."""
    join_max_entries: int | None = Field(None, ge=1)
    """Optional budget of the whole join table in entries (as join_max_bytes, both apply)."""
    join_store: Literal["memory", "rocksdb"] = "memory"
    """Where the join table lives: `memory` (fastest; about 0.7 KB per pending request) or
    `rocksdb` (faust's RocksDB store through `rocksdict`, on disk: the `[rocksdb]` extra)."""
    join_store_dir: str | None = None
    """Folder of the rocksdb store's files (default: the worker's cache folder)."""
    partitions: int = Field(4, ge=1)
    web_port: int = Field(6066, ge=0, le=65535)
    flush_interval_s: float = Field(0.2, gt=0)
    """Not used since the worker applies each fetched batch at once (kept so configs that set it
    still load)."""
    quality_window_s: float = Field(3600, gt=0)
    drift_arl0: float = Field(10_000, gt=10)
    """Not used by the worker: feature and score drift are watched by the gateways (`drift.arl0`);
    quality drift has `quality_drift_arl0` (kept so configs that set it still load)."""
    promote_margin: float = Field(0.0, ge=0)
    promote_confidence: float = Field(0.95, gt=0.5, lt=1)
    quality_drift_arl0: float = Field(1_000_000, ge=10)
    """Quality drift: joined outcomes between false alarms of one series (route, role, arm, model
    version, signal) - an in-control series alarms about once per this many outcomes, so a busy
    route needs a large value."""
    quality_drift_reference: int = Field(1000, ge=20)
    """Quality drift: a model version's first this many joined outcomes (per worker) set its
    in-control error rate; monitoring starts after them."""
    quality_episode_quiet_s: float = Field(600, gt=0, le=7 * 86400)
    """Quality drift: an alarm opens an episode (one `firing` alert, across workers); it closes
    with a `resolved` alert after this many seconds without an alarm."""
    fetch_max_wait_ms: int = Field(50, ge=1, le=10_000)
    """How long the broker may hold the worker's fetch when the partitions it asks for have nothing
    new. aiokafka has one fetch in flight per broker, so while an idle topic's fetch is held no
    other partition is fetched: keep this short (faust's own 1500 ms starved the worker of records;
    50 ms costs an idle worker 20 small fetches a second)."""
    gil_switch_interval_ms: float = Field(1.0, gt=0, le=100)
    """How long a thread may hold the GIL while another waits for it (Python's default is 5 ms).
    faust fetches in its own thread: with 5 ms the worker's main thread often waited for records
    that thread could not hand over (measured: 1 ms drained 7 % more outcomes per second)."""


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


class ShadowStage(_Strict):
    """Rollout stage 1: the new version only mirrors traffic; labels decide promote or reject."""

    min_outcomes: int = Field(100, ge=1)
    """Labelled (shadow, primary) pairs before a `promote` verdict is acted on (a `reject` acts at once)."""
    confidence: float = Field(0.95, gt=0.5, lt=1)
    """Of the always-valid confidence sequence on loss(primary) - loss(shadow) (feedback.outcome_metrics)."""
    margin: float = Field(0.0, ge=0, lt=1)
    """Promote only when the shadow's advantage is surely above this (loss units)."""


class CanaryStage(_Strict):
    """Rollout stage 2: the new version serves at most `max_share` of traffic under the bandit."""

    max_share: float = Field(0.1, gt=0, lt=1)
    """Traffic ceiling of the canary arm."""
    min_share: float | None = Field(None, ge=0, lt=1)
    """Traffic the canary keeps even when the bandit would starve it, so its evidence keeps coming
    (default: max_share / 2)."""
    min_outcomes: int = Field(300, ge=1)
    """The canary's own rewarded outcomes before it may join the bandit as a full arm."""
    min_duration_s: float = Field(0.0, ge=0)
    """And at least this long in the stage."""
    confidence: float = Field(0.95, gt=0.5, lt=1)
    """Of the sequential (mSPRT) tests of the canary's reward against the arms it replaces."""
    margin: float = Field(0.01, ge=0)
    """Non-inferiority margin in reward units: "not worse" means not worse by more than this."""
    mixing_sd: float | None = Field(None, gt=0)
    """The mSPRT's tau (default: max(margin, 0.05)); any value keeps the error guarantee."""
    max_error_rate: float = Field(0.02, gt=0, le=1)
    """A canary or full arm failing more calls than this (after `min_calls`) is rolled back."""
    max_p99_latency_ms: float | None = Field(None, gt=0)
    """A canary or full arm with a p99 latency above this (after `min_calls`) is rolled back."""
    min_calls: int = Field(200, ge=1)
    """Calls before the error rate and p99 are judged."""

    @model_validator(mode="after")
    def _shares(self) -> CanaryStage:
        if self.min_share is not None and self.min_share > self.max_share:
            raise ValueError(f"min_share {self.min_share} is above max_share {self.max_share}")
        return self

    @property
    def floor(self) -> float:
        """The canary's guaranteed share."""
        return self.max_share / 2 if self.min_share is None else self.min_share


class Admission(_Strict):
    """Rollout stage 0: before a new version may shadow, it is benchmarked beside the arm it would
    replace (same process, same rows) and refused when over these budgets (docs/lifecycle.md)."""

    max_latency_p99_ratio: float = Field(2.0, gt=0, le=1000)
    """Candidate p99 / incumbent p99, at batch 1 and at the max batch (each must hold)."""
    max_memory_ratio: float = Field(1.5, gt=0, le=1000)
    """Resident memory the candidate adds when loaded / what the incumbent adds."""
    min_throughput_ratio: float = Field(0.5, gt=0, le=1000)
    """Candidate rows/s / incumbent rows/s at the max batch."""
    max_size_mb: float | None = Field(None, gt=0)
    """Largest model file accepted (MB), whatever the incumbent's."""
    latency_floor_ms: float = Field(0.2, ge=0, le=10_000)
    """Latencies below this count as this in the ratios (microsecond noise decides nothing)."""
    memory_floor_mb: float = Field(8.0, ge=0, le=1_000_000)
    """Memory figures below this count as this in the ratio (allocator noise decides nothing)."""
    timeout_s: float = Field(300.0, gt=0, le=86_400)
    """The benchmark is killed after this long; the version is then refused (`timeout`)."""
    max_batch: int | None = Field(None, ge=1, le=65_536)
    """Batch size of the large-batch figures (default: batching.max_batch_size)."""
    samples: int = Field(200, ge=10, le=1_000_000)
    """Timed runs per model at batch 1."""
    batch_samples: int = Field(50, ge=3, le=100_000)
    """Timed runs per model at the max batch."""
    threads: int = Field(1, ge=1, le=256)
    """ONNX Runtime intra-op threads of the benchmark's sessions (its own, in its own process)."""
    busy_fraction: float = Field(0.1, gt=0, le=1)
    """The benchmark rests between runs so it keeps one core busy at most this share of the time."""
    nice: int = Field(10, ge=0, le=19)
    """Scheduling niceness of the benchmark process (serving threads win the CPU)."""


class Rollout(_Strict):
    """Progressive rollout of new versions of one model of a route: shadow -> canary -> full arm."""

    enabled: bool = True
    model: str | None = Field(None, pattern=NAME_PATTERN)
    """Whose new versions are rolled out (default: the model of the route's first arm)."""
    replaces: str | None = Field(None, pattern=NAME_PATTERN)
    """The arm a promoted version replaces (default: the one arm serving `model`)."""
    shadow: ShadowStage = ShadowStage()
    canary: CanaryStage = CanaryStage()
    grace_s: float = Field(600.0, ge=0)
    """After the new version becomes a full arm, the replaced one is drained, then unloaded after this."""
    admission: Admission | None = None
    """Benchmark each new version against the incumbent before it may shadow; off when absent."""


class Retrain(_Strict):
    """When to ask for a new version of the route's model, and where its training data goes."""

    every_s: float | None = Field(None, gt=0)
    """Schedule: a trigger at least this often."""
    new_labels: int | None = Field(None, ge=1)
    """A trigger once this many joined outcomes arrived since the last one."""
    quality: bool = False
    """A trigger on the quality-drift alarm (Bernoulli CUSUM on the error rate)."""
    drift: bool = False
    """A trigger on a feature or score drift alarm."""
    cooldown_s: float = Field(3600.0, ge=0)
    """At most one trigger per this many seconds, whatever fires."""
    export_path: str | None = None
    """Folder (or s3:// / gs:// path) the window's joined rows are written to as Parquet."""

    @model_validator(mode="after")
    def _some_trigger(self) -> Retrain:
        if self.every_s is None and self.new_labels is None and not self.quality and not self.drift:
            raise ValueError("retrain needs at least one trigger: every_s, new_labels, quality or drift")
        return self


class Route(_Strict):
    """One route: a name requests carry, a policy, and the arms it chooses among."""

    name: str = Field(pattern=NAME_PATTERN)
    policy: Literal["thompson", "fixed", "shadow", "interleave"] = "thompson"
    reward: Literal["bernoulli", "gaussian"] = "bernoulli"
    half_life: float | None = Field(None, gt=0, le=1e12, allow_inf_nan=False)  # the arm script's bound
    """Discounting for non-stationary arms, in outcomes."""
    reward_wait_s: float | None = Field(None, gt=0)
    default_reward: float | None = Field(None, ge=-MAX_MAGNITUDE, le=MAX_MAGNITUDE)  # as outcomes' rewards
    exploration_floor: float = Field(0.0, ge=0, lt=1)
    arms: list[Arm] = Field(min_length=1)
    shadows: list[Arm] = []
    shadow_fraction: float = Field(1.0, ge=0, le=1)
    sticky_key: str | None = None
    guardrail: Guardrail = Guardrail()
    webhook_url: str | None = None
    """http(s) URL that receives, as a JSON POST, every alert the feedback worker publishes for this
    route (promote/reject, quality drift, retrain, rollout). Often carries a token: it is masked in
    `GET /v2/admin/config` and in logs (only scheme and host are shown)."""
    method: Literal["team_draft", "multileave"] | None = None
    """Interleave routes: how the arms' rankings are merged (multileave for 3 or more rankers)."""
    k: int = Field(10, ge=1, le=1000)
    """Interleave routes: length of the merged list shown to the user."""
    rollout: Rollout | None = None
    """Progressive rollout of new versions (see docs/lifecycle.md); off when absent."""
    retrain: Retrain | None = None
    """Retraining triggers and training-data export; off when absent."""

    @field_validator("webhook_url")
    @classmethod
    def _webhook_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Route:
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
        if self.policy == "interleave" and n > MAX_RANKERS:
            raise ValueError(f"policy interleave takes at most {MAX_RANKERS} arms (rankers), got {n}")
        if self.rollout is not None:
            self._check_rollout(self.rollout)
        return self

    def _check_rollout(self, rollout: Rollout) -> None:
        if self.policy not in ("thompson", "fixed"):
            raise ValueError(f"rollout works on thompson and fixed routes, not policy {self.policy}")
        model = rollout.model or self.arms[0].model
        serving = [a.name for a in self.arms if a.model == model]
        if rollout.replaces is not None:
            if rollout.replaces not in [a.name for a in self.arms]:
                raise ValueError(f"rollout.replaces names no arm of the route: {rollout.replaces!r}")
        elif len(serving) != 1:
            raise ValueError(f"rollout.replaces is needed: {len(serving)} arms serve model {model!r}")
        floating = [a.name for a in self.arms if a.model == model and a.version == "latest"]
        if floating:
            raise ValueError(f"rollout: arm {floating[0]!r} serves model {model!r} as 'latest'; pin its version "
                             "(with a rollout, the rollout decides when a new version serves)")
        if rollout.canary.max_share < self.exploration_floor:
            raise ValueError(f"rollout.canary.max_share {rollout.canary.max_share} is below "
                             f"exploration_floor {self.exploration_floor}")

    def rollout_model(self) -> str | None:
        """The model whose new versions this route rolls out (None without `rollout`)."""
        if self.rollout is None:
            return None
        return self.rollout.model or self.arms[0].model

    def rollout_replaces(self) -> str | None:
        """The arm a promoted version replaces (None without `rollout`)."""
        if self.rollout is None:
            return None
        model = self.rollout_model()
        return self.rollout.replaces or next(a.name for a in self.arms if a.model == model)


class DriftConfig(_Strict):
    """Input and prediction-score drift monitors in the gateway (models with a reference.json)."""

    enabled: bool = True
    arl0: float = Field(10_000, gt=10)
    """Average run length between false alarms: per observation, for a model's whole feature family."""
    episode_quiet_s: float = Field(600, gt=0, le=7 * 86400)
    """A drift alarm opens an episode (one `firing` alert, across replicas); it closes with a
    `resolved` alert after this many seconds without an alarm (see docs/drift.md)."""


class LoggingConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    json_format: bool = Field(False, alias="json")


class TracingConfig(_Strict):
    """OpenTelemetry tracing (the optional extra ``banditgate[otel]``); off unless enabled. The
    W3C trace context travels on Kafka headers whether or not this is on (docs/deploy.md)."""

    enabled: bool = False
    endpoint: str = "http://127.0.0.1:4318/v1/traces"
    """Where spans go: an OTLP/HTTP traces endpoint (a collector's port 4318)."""
    sample_ratio: float = Field(0.01, ge=0.0, le=1.0)
    """Share of traces recorded, decided by trace id (so the gateway and the feedback worker
    record the same traces): 1.0 records every request carrying a traceparent and every batch."""
    service_name: str | None = None
    """The ``service.name`` resource; default ``banditgate-gateway`` / ``banditgate-feedback``."""
    max_request_spans_per_s: float = Field(100.0, ge=0, le=1_000_000, allow_inf_nan=False)
    """Most per-request spans a process starts per second (a token bucket holding one second's
    worth): the gateway's ``gateway.request`` and REST / gRPC server spans, the feedback worker's
    ``feedback.prediction`` / ``feedback.outcome``, each with its stage children. A caller picks
    its own trace ids, so the ratio alone does not bound them; a request over the cap keeps its
    trace context but gets no span (``banditgate_trace_spans_dropped_total``). 0: none."""
    max_request_spans_per_batch: int = Field(16, ge=0, le=10_000)
    """Most per-request spans one fetched batch makes (the gateway's Kafka batches, the feedback
    worker's batches); the rest are dropped as above."""

    @field_validator("endpoint")
    @classmethod
    def _http_endpoint(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"endpoint {value!r} is not an http:// or https:// URL (OTLP/HTTP)")
        return value


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
    tracing: TracingConfig = TracingConfig()
    delivery: Literal["at_least_once", "exactly_once"] = "at_least_once"
    shutdown_grace_s: float = Field(10.0, gt=0, le=600)
    max_event_bytes: int = Field(1_048_576, ge=256)
    routes: list[Route] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_routes(self) -> Config:
        names = [r.name for r in self.routes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"route names must be unique; repeated: {', '.join(dupes)}")
        self._check_admission_gated_models()
        return self

    def _check_admission_gated_models(self) -> None:
        """A model rolled out through an admission gate must reach traffic only through it: no arm
        or shadow of any route may serve it as `latest` (a new version would serve unbenchmarked),
        and no second route may roll it out (it would start that version without the gate)."""
        gated = {r.rollout_model(): r.name for r in self.routes if r.rollout is not None and r.rollout.admission is not None}
        for route in self.routes:
            model = route.rollout_model()
            if model in gated and gated[model] != route.name:
                raise ValueError(f"model {model!r} is rolled out by route {gated[model]!r} with rollout.admission "
                                 f"and by route {route.name!r} too; only one route may roll a gated model out")
            for arm in [*route.arms, *route.shadows]:
                if arm.model in gated and arm.version == "latest":
                    raise ValueError(f"route {route.name!r}: {arm.name!r} uses model {arm.model!r} as 'latest', but "
                                     f"route {gated[arm.model]!r} admits its new versions through rollout.admission; "
                                     "pin a version")

    def route(self, name: str) -> Route:
        for route in self.routes:
            if route.name == name:
                return route
        raise KeyError(name)


# ---------------------------------------------------------------------------------------------
# loading


def _interpolate(value: JSONValue, path: str, problems: list[str], env: dict[str, str]) -> JSONValue:
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


_SECRET_WORDS = ("password", "token", "secret")


_SECRET_FILE_FIELDS = {
    ("kafka", "security"): ("sasl_password", "key_password"),
    ("redis",): ("password",),
}


def _read_secret_files(data: JSONObject, base: Path, problems: list[str]) -> None:
    for section_path, fields in _SECRET_FILE_FIELDS.items():
        section: JSONValue = data
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


def _apply_env(data: JSONObject, env: dict[str, str]) -> None:
    def section(*keys: str) -> JSONObject:
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
    # a blank item ("a,,b", "a, ") is kept: the token check refuses it rather than dropping it quietly
    if v := env.get("BANDITGATE_INFER_TOKENS"):
        section("server")["infer_tokens"] = [t.strip() for t in v.split(",")]
    if v := env.get("BANDITGATE_ADMIN_TOKENS"):
        section("server")["admin_tokens"] = [t.strip() for t in v.split(",")]


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _format_error(err: ErrorDetails) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-after")))
    msg = err["msg"]
    msg = msg.removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field (check the spelling)"
    elif err["type"] == "missing":
        msg = "required field is missing"
    inp = err.get("input")
    secret = any(word in str(part).lower() for part in loc for word in _SECRET_WORDS)
    if isinstance(inp, str):
        inp = redact_url(inp)
    shown = "" if err["type"] in ("missing", "extra_forbidden") or isinstance(inp, (dict, list)) or secret \
        else f" (got {inp!r})"
    if isinstance(inp, str) and len(inp) > 60:
        shown = ""
    return f"{_format_loc(loc)}: {msg}{shown}"


def parse_config(data: JSONValue, source: str = "config", base: Path | None = None,
                 env: dict[str, str] | None = None) -> Config:
    """Validate a decoded YAML document; raise ConfigError listing every wrong field, one per line."""
    env = dict(os.environ) if env is None else env
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    problems: list[str] = []
    data = _interpolate(data, "", problems, env)
    unset = {problem.split(": ", 1)[0] for problem in problems}  # fields already reported as unset
    _read_secret_files(data, base or Path.cwd(), problems)
    _apply_env(data, env)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            line = _format_error(error)
            if line.split(": ", 1)[0] not in unset:  # an unset ${VAR} is one line, not two
                problems.append(line)
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


def dump_public(config: Config) -> JSONObject:
    """The configuration as served to operators: every secret replaced by '**********', and any
    password inside the Redis URL by '***'."""
    data = config.model_dump(mode="json", by_alias=True)
    data["redis"]["url"] = redact_url(data["redis"]["url"])
    for route in data.get("routes", []):
        if route.get("webhook_url"):
            route["webhook_url"] = url_origin(route["webhook_url"]) + "/**********"
    return data


def url_origin(url: str) -> str:
    """Scheme and host of a URL, without credentials, path or query (safe to log)."""
    scheme, _, rest = url.partition("://")
    host = rest.split("/", 1)[0].split("?", 1)[0].rsplit("@", 1)[-1]
    return f"{scheme}://{host}"
