"""The feedback worker: a faust app that joins outcomes to predictions and closes the loop.

What faust provides here: the consumer group over the three co-partitioned source topics
(predictions, shadow-predictions, outcomes; faust's assignor gives one worker the same partition
numbers of all of them and of the table), the join table (in-memory store, or RocksDB on disk,
recovered from its compacted changelog topic on start and on every rebalance; bounded by
`feedback.join_max_bytes`), offset commits of acknowledged
events only, timers, and the worker lifecycle (signals, graceful stop). What it does not: no
stream-stream join (faust-streaming has none; ``Table.join`` raises NotImplementedError) — the
join is a table keyed by request_id; no windowed-table expiry (the join's own timer index does
it); no ``processing_guarantee="exactly_once"`` (open bugs) — effects are idempotent instead.
See docs/feedback.md.

Everything here is assembly: the logic is in join / reward / quality (pure), agents and sinks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import faust
import mode
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry
from redis.exceptions import RedisError

from banditgate.config import Config, KafkaConfig
from banditgate.connections import check_kafka, check_redis, kafka_client_kwargs, kafka_ssl_context, redis_client
from banditgate.drift.episodes import EpisodeBook
from banditgate.episode_store import EpisodeClaims, Episodes
from banditgate.kafka_delivery import DEFAULT_MAX_MESSAGE_BYTES, record_limit
from banditgate.logs import setup_logging
from banditgate.tracing import Tracing
from feedback.agents import JoinProcessor
from feedback.consumer import BatchSource, FeedbackApp
from feedback.disk_store import ROCKSDB_OPTIONS, DiskJoinTable, IndexedRocksStore, JoinCollection, rocksdict_missing
from feedback.health import HEALTH_INTERVAL_S, REDIS_PING_TIMEOUT_S, HealthBoard, Probe
from feedback.interleave_monitor import InterleaveMonitor
from feedback.join import JoinRules, RouteRules
from feedback.ledger import FeedbackKeys, Ledger, LedgerPlanner
from feedback.metrics import FeedbackMetrics
from feedback.producer import ReplaceableProducer
from feedback.quality_drift_tracker import QualityDriftTracker
from feedback.quality_drift_watch import QualityDriftWatch, ThresholdCache
from feedback.sinks import KafkaOut, QualityMonitor, RedisSink
from feedback.state import JoinBudget, JoinTable, apply_changelog_records
from feedback.web import start_web_server
from feedback.webhooks import WebhookNotifier
from router.stats_store import ArmStatsStore

if TYPE_CHECKING:
    from redis import asyncio as aredis

log = logging.getLogger("banditgate.feedback")

BATCH_EVENTS = 8000
"""Most events joined and applied per batch (one Redis round trip, one changelog write)."""
SWEEP_INTERVAL_S = 0.5
"""How often due default rewards and expiries are applied."""
CHANGELOG_TOPIC_CONFIG = {
    # segments roll at least hourly, so the log cleaner can compact them (Kafka only compacts
    # closed segments; the broker default is 1 GiB or 7 days) ...
    "segment.ms": str(3600 * 1000),
    "segment.bytes": str(64 * 1024 * 1024),
    # ... and keeps tombstones (expired and evicted entries) for an hour instead of a day: a
    # recovery reads the live entries plus about an hour of changes, not a day's deletions
    "delete.retention.ms": str(3600 * 1000),
}
"""Topic settings of the join changelog, applied when faust creates it (an existing topic keeps
its own: see docs/feedback.md)."""


def changelog_record_limit(kafka: KafkaConfig) -> int:
    """The largest join entry (key + encoded value) the changelog takes: what `kafka.max_message_bytes`
    says the topics accept (Kafka's default 1 MB when unset), within the producer's request size."""
    return record_limit(kafka.max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES, kafka.max_request_bytes)


class JoinStoreUnavailable(Exception):
    """`feedback.join_store: rocksdb` without rocksdict installed (one line for the CLI)."""

    user_facing = True


def join_rules(config: Config) -> JoinRules:
    """The join's view of the configuration."""
    return JoinRules(ttl_s=config.feedback.join_ttl_s, routes={
        route.name: RouteRules(reward=route.reward, reward_wait_s=route.reward_wait_s,
                               default_reward=route.default_reward) for route in config.routes})


def quality_refresh_s(config: Config) -> float:
    """How often quality gauges and the promote/reject test are refreshed (60 steps per window,
    between 0.5 and 10 s)."""
    return min(10.0, max(0.5, config.feedback.quality_window_s / 60.0))


def data_dir(app_id: str) -> Path:
    """faust's local folder for this app (it keeps little there unless the join table is on disk
    and `feedback.join_store_dir` is not set): ``$XDG_CACHE_HOME/banditgate/feedback/<app_id>``
    (default ``~/.cache/...``), never the current directory."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "banditgate" / "feedback" / app_id


async def check_connections(config: Config) -> None:
    """Log in to Kafka and Redis as the worker will, before faust starts. Raises
    ConnectionCheckError (one line, no secret) for what the configuration must fix: refused
    credentials, untrusted certificates, missing permissions. An unreachable Redis is only a
    warning: the worker retries its writes until Redis is back."""
    await check_kafka(config.kafka)
    client = redis_client(config.redis)
    try:
        problem = await check_redis(client, config.redis)
    finally:
        await client.aclose()
    if problem is not None:
        log.warning("%s; starting anyway, writes are retried until it answers", problem)


def _credentials(config: Config) -> faust.SSLCredentials | faust.SASLCredentials | None:
    security = config.kafka.security
    if security.protocol == "PLAINTEXT":
        return None
    context = kafka_ssl_context(config.kafka)
    if security.protocol == "SSL":
        return faust.SSLCredentials(context)
    return faust.SASLCredentials(username=security.sasl_username,
                                 password=security.sasl_password.get_secret_value() if security.sasl_password else None,
                                 ssl_context=context, mechanism=security.sasl_mechanism)


class FeedbackRuntime(mode.Service):
    """Clients and processors the agent and timers use; started and stopped with the worker."""

    def __init__(self, config: Config, app: FeedbackApp, table: JoinCollection, metrics: FeedbackMetrics, *,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(loop=loop)
        self.config = config
        self.app = app
        self.table = table
        self.metrics = metrics
        self.source: BatchSource = app.batch_source
        self.ready = asyncio.Event()
        self.processor: JoinProcessor | None = None
        self.monitor: QualityMonitor | None = None
        self.interleave: InterleaveMonitor | None = None
        self.fatal: BaseException | None = None
        self.metrics_port: int | None = None
        self.announced = False
        self._redis: aredis.Redis | None = None
        self._producer: ReplaceableProducer | None = None
        self.webhooks: WebhookNotifier | None = None
        self.drift_thresholds: ThresholdCache | None = None
        """Alerts to per-route webhooks; every KafkaOut of the worker should carry it."""
        self.health = HealthBoard()
        """What /health/live and /health/ready answer (feedback/health.py, feedback/web.py)."""
        self._redis_answered = True

    async def on_start(self) -> None:
        config = self.config
        self._redis = redis_client(config.redis)
        self._producer = ReplaceableProducer(
            lambda: AIOKafkaProducer(**kafka_client_kwargs(config.kafka), enable_idempotence=True, acks="all",
                                     linger_ms=config.kafka.linger_ms, max_batch_size=1024 * 1024,
                                     max_request_size=config.kafka.max_request_bytes),
            on_replaced=self.metrics.producer_replacements.inc)
        await self._producer.start()
        keys = FeedbackKeys(config.redis.key_prefix)
        store = ArmStatsStore(self._redis, prefix=config.redis.key_prefix, dedup_ttl_s=config.redis.dedup_ttl_s,
                              half_lives={route.name: route.half_life for route in config.routes})
        sink = RedisSink(store, Ledger(self._redis, keys, config.redis.dedup_ttl_s),
                         LedgerPlanner(keys, config.feedback.quality_window_s))
        self.webhooks = WebhookNotifier({route.name: route.webhook_url for route in config.routes if route.webhook_url},
                                        self.metrics)
        self.webhooks.start()
        out = KafkaOut(self._producer, config.kafka.topics.deadletter, config.kafka.topics.alerts, self.webhooks,
                       self.metrics, cloudevents=config.kafka.cloudevents)
        rules = join_rules(config)
        budget = JoinBudget(max_bytes=config.feedback.join_max_bytes, max_entries=config.feedback.join_max_entries,
                            partitions=config.feedback.partitions)
        self.metrics.join_budget_bytes.set(budget.max_bytes or 0)
        changelog = self.table.changelog_topic.get_topic_name()
        table: JoinTable | DiskJoinTable
        if config.feedback.join_store == "rocksdb":
            rocks = self.table.data
            if not isinstance(rocks, IndexedRocksStore):  # JoinCollection makes one for rocksdb:// URLs
                raise RuntimeError(f"the join table's rocksdb store is a {type(rocks).__name__}, not an IndexedRocksStore")
            table = DiskJoinTable(rocks, self._producer, changelog, rules, budget=budget)
        else:
            table = JoinTable(self.table.data, self._producer, changelog, rules, budget=budget)
        self.drift_thresholds = ThresholdCache()
        episodes = Episodes("quality", EpisodeBook(config.feedback.quality_episode_quiet_s),
                            EpisodeClaims(self._redis, config.redis.key_prefix, "quality"))
        drift = QualityDriftWatch(QualityDriftTracker(arl0=config.feedback.quality_drift_arl0,
                                                      reference_outcomes=config.feedback.quality_drift_reference,
                                                      threshold=self.drift_thresholds),
                                  {route.name: route.reward for route in config.routes}, self.metrics,
                                  episodes=episodes)
        self.quality_drift = drift  # its alarms feed the routes' `quality` retraining triggers (feedback.lifecycle)
        self.processor = JoinProcessor(table=table, redis=sink, out=out, rules=rules, topics=config.kafka.topics,
                                       metrics=self.metrics, max_event_bytes=config.max_event_bytes, drift=drift,
                                       producer=self._producer, max_entry_bytes=changelog_record_limit(config.kafka),
                                       tracing=Tracing.from_config(config.tracing, "banditgate-feedback"))
        self.monitor = QualityMonitor(self._redis, keys, config.routes, config.feedback.quality_window_s,
                                      config.feedback.promote_confidence, config.feedback.promote_margin, out,
                                      self.metrics)
        self.interleave = InterleaveMonitor(self._redis, keys, config.routes, config.feedback.promote_confidence, out,
                                            self.metrics)
        self.source.on_failure = self.fail
        self.source.start(self.processor.submit)
        self.ready.set()

    async def on_stop(self) -> None:
        try:
            if self.drift_thresholds is not None:
                self.drift_thresholds.close()
            if getattr(self, "quality_drift", None) is not None:
                self.quality_drift.close()
            if self.webhooks is not None:
                await self.webhooks.stop()
            if self._producer is not None:
                await self._producer.stop()
            if self._redis is not None:
                await self._redis.aclose()
        finally:
            if self.processor is not None and self.processor.tracing.enabled:
                # the last spans, off the loop, bounded (the collector may be away), even when a
                # client above failed to close
                await self.processor.tracing.stop()

    @mode.Service.task
    async def _report_health(self) -> None:
        """A health probe every HEALTH_INTERVAL_S, from the start of the runtime (faust's own timers
        start only after the first recovery, which a liveness probe must not wait for)."""
        while not self.should_stop:
            self.health.record(await self._probe())
            await self.sleep(HEALTH_INTERVAL_S)

    async def _probe(self) -> Probe:
        app = self.app
        started = self.ready.is_set()
        rebalancing = bool(app.rebalancing or getattr(app, "in_recovery", False))
        topics = self.source.topics
        partitions = tuple(sorted({tp.partition for tp in app.assignor.assigned_actives() if tp.topic in topics}))
        recovered = app.tables.recovery.completed.is_set()  # type: ignore[attr-defined] # TableManagerT omits it
        return Probe(at=time.monotonic(), started=started, rebalancing=rebalancing,
                     recovered=recovered, redis_ok=await self._redis_answers(),
                     partitions=partitions, fatal=self.fatal is not None)

    async def _redis_answers(self) -> bool:
        """One PING within REDIS_PING_TIMEOUT_S (readiness); a log line when the answer changes."""
        if self._redis is None:
            return False
        try:
            await asyncio.wait_for(self._redis.ping(), timeout=REDIS_PING_TIMEOUT_S)
        except (RedisError, OSError, TimeoutError) as exc:
            if self._redis_answered:
                log.warning("Redis does not answer the readiness ping (%s: %s); not ready until it does",
                            type(exc).__name__, str(exc)[:200])
            self._redis_answered = False
            return False
        if not self._redis_answered:
            log.info("Redis answers the readiness ping again")
        self._redis_answered = True
        return True

    def fail(self, exc: BaseException) -> None:
        """A bug, not an outage: stop the worker (exit code 1); unacked events are replayed on restart."""
        if self.fatal is None:
            self.fatal = exc
            log.critical("feedback worker stopping after an unexpected error: %s: %s", type(exc).__name__, exc,
                         exc_info=exc)
            os.kill(os.getpid(), signal.SIGTERM)


def build_app(config: Config, registry: CollectorRegistry | None = None) -> tuple[faust.App, FeedbackRuntime]:
    """The faust app with its topics, table, agent and timers, and the runtime they use."""
    feedback = config.feedback
    topics = config.kafka.topics
    datadir = data_dir(feedback.app_id)
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = FeedbackApp(
        feedback.app_id,
        datadir=str(datadir),
        broker=[f"kafka://{server.strip()}" for server in config.kafka.bootstrap_servers.split(",") if server.strip()],
        broker_credentials=_credentials(config),
        broker_client_id=config.kafka.client_id,
        # the join table's store (the app has no other table)
        store="rocksdb://" if feedback.join_store == "rocksdb" else "memory://",
        topic_partitions=feedback.partitions,
        web_enabled=False,
        autodiscover=False,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        broker_session_timeout=config.kafka.session_timeout_ms / 1000.0,
        broker_heartbeat_interval=min(3.0, config.kafka.session_timeout_ms / 3000.0),
        broker_max_poll_records=BATCH_EVENTS,
        producer_acks=-1,
        tabledir=feedback.join_store_dir,  # None: faust's default, under datadir
    )
    source_topics = frozenset({topics.predictions, topics.shadow_predictions, topics.outcomes})
    # the consumer group subscribes to the three source topics; their records are not streamed
    # through faust's per-message path but drained in batches (feedback/consumer.py)
    app.batch_source = BatchSource(source_topics, feedback.fetch_max_wait_ms)
    app.topics.add(app.topic(*sorted(source_topics), key_serializer="raw", value_serializer="raw"))
    # bytes keys and values: faust then uses the "raw" codec for the changelog (entries are
    # encoded by feedback.join.encode_entry)
    on_disk = feedback.join_store == "rocksdb"
    table = JoinCollection(app, name="join", partitions=feedback.partitions, key_type=bytes, value_type=bytes,
                           help="join entries by request_id (see feedback/join.py)", beacon=app.tables.beacon,
                           options=dict(ROCKSDB_OPTIONS) if on_disk else None,
                           extra_topic_configs=CHANGELOG_TOPIC_CONFIG)
    table.join_rules = join_rules(config)  # the rocksdb store indexes entries as it writes them
    app.tables.add(table)
    # its changelog is recovered in bulk by the batch consumer, not record by record by faust
    app.batch_source.changelog_topic = table.changelog_topic.get_topic_name()
    app.batch_source.apply_changelog = lambda partition, records: apply_changelog_records(table.data, partition,
                                                                                          records)
    metrics = FeedbackMetrics(registry or CollectorRegistry())
    runtime = FeedbackRuntime(config, app, table, metrics)
    async def sweep() -> None:
        if not runtime.ready.is_set() or app.rebalancing or getattr(app, "in_recovery", False):
            return
        if not app.tables.recovery.completed.is_set():  # type: ignore[attr-defined] # TableManagerT omits it
            return
        assigned = {tp.partition for tp in app.assignor.assigned_actives() if tp.topic in source_topics}
        processor = runtime.processor
        assert processor is not None  # noqa: S101 - set before `ready`
        try:
            await processor.sweep(assigned)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            runtime.fail(exc)
            return
        if assigned and not runtime.announced:
            runtime.announced = True
            log.info("feedback worker ready: app %s, partitions %s of %s; metrics on port %s",
                     feedback.app_id, sorted(assigned), ", ".join(sorted(source_topics)), runtime.metrics_port)

    async def refresh(attribute: str, what: str) -> None:
        """One refresh of a best-effort monitor (quality, interleave): on failure keep the last
        gauges and try again next time."""
        monitor = getattr(runtime, attribute)
        if monitor is None:
            return
        try:
            await monitor.refresh()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - best effort by design
            log.warning("%s refresh failed (%s: %s); keeping the last values", what, type(exc).__name__, exc)

    async def refresh_quality() -> None:
        await refresh("monitor", "quality")

    async def refresh_interleave() -> None:
        await refresh("interleave", "interleave")

    app.timer(interval=SWEEP_INTERVAL_S, name="join-sweep")(sweep)
    app.timer(interval=quality_refresh_s(config), name="quality-refresh")(refresh_quality)
    if any(route.policy == "interleave" for route in config.routes):
        app.timer(interval=quality_refresh_s(config), name="interleave-refresh")(refresh_interleave)
    from feedback.lifecycle import install as install_lifecycle

    install_lifecycle(app, runtime, config)  # rollout steps and retraining triggers (docs/lifecycle.md)
    return app, runtime


def run_feedback(config: Config, log_level: str | None = None, json_logs: bool | None = None) -> int:
    """Run the feedback worker until SIGTERM/SIGINT; return the exit code (1 after a fatal error).
    Raises ConnectionCheckError (user-facing, one line) when Kafka or Redis refuse the configured
    credentials or certificates."""
    if config.feedback.join_store == "rocksdb" and (missing := rocksdict_missing()) is not None:
        raise JoinStoreUnavailable(missing)
    level = log_level or config.logging.level
    setup_logging(level, config.logging.json_format if json_logs is None else json_logs)
    # wrong credentials are one line here, not a client's traceback or retry loop (a loop of
    # its own: faust's worker takes the default loop later)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(check_connections(config))
    finally:
        loop.close()
    registry = CollectorRegistry()
    app, runtime = build_app(config, registry)
    server, _thread = start_web_server(config.server.host, config.feedback.web_port, registry, runtime.health)
    runtime.metrics_port = server.server_port
    log.info("feedback worker starting: app %s, broker %s, redis prefix %s, metrics on http://%s:%d/metrics, "
             "probes on /health/live and /health/ready",
             config.feedback.app_id, config.kafka.bootstrap_servers, config.redis.key_prefix, config.server.host,
             server.server_port)
    worker = faust.Worker(app, runtime, loglevel=level.upper() if level != "warning" else "WARN",
                          override_logging=False, redirect_stdouts=False, quiet=True)
    started = time.monotonic()
    sys.setswitchinterval(config.feedback.gil_switch_interval_ms / 1000.0)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    else:
        code = 0
    finally:
        server.shutdown()
    log.info("feedback worker stopped after %.0f s", time.monotonic() - started)
    return 1 if runtime.fatal is not None else code
