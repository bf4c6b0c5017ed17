"""The fault suite's own stack, topics, configurations and process handles.

The suite never touches the shared development stack: `OwnStack` starts a Kafka broker and a
Redis on free loopback ports in a folder of its own and purges it at the end, so stopping the
broker or Redis mid-scenario harms no one else. `BANDITGATE_KAFKA` / `BANDITGATE_REDIS` are
removed from this process's environment and from every child's, because both the stack and the
configuration loader honour them and would otherwise point the suite at someone else's servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from banditgate.config import Topics
from banditgate.stack import Addresses, Stack, StackError

SCRUBBED_ENV = ("BANDITGATE_KAFKA", "BANDITGATE_REDIS")
N_FEATURES = 8
ROUTE = "fault"
ARMS = {"a": ("fault-a", 1), "b": ("fault-b", 1)}
CRASHING_MODEL = ("fault-crash", 1)
"""A model that fails at run time on every row whose first feature is negative (a poison model)."""
HANGING_MODEL = ("fault-hang", 1)
"""A model whose run never ends on a batch with a row whose first feature is negative (an ONNX Loop
of 2**62 iterations; ONNX Runtime can terminate it between iterations)."""
FEATURE_RANGE = (-50.0, 50.0)
"""Every model's reference range for each feature: a row outside is rejected (`out_of_range`)."""
REPO = Path(__file__).resolve().parents[2]
FEEDBACK_READY = "feedback worker ready"


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(consecutive: int = 1) -> int:
    """A free loopback port (and its `consecutive - 1` successors) below the ephemeral range, so
    that no client's outgoing connection takes it between now and the server's bind."""
    low, _high = _ephemeral_range()
    top = min(low, 65535) - consecutive
    for _ in range(500):
        port = random.randint(20000, max(20001, top))
        if all(_port_free(port + i) for i in range(consecutive)):
            return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def free_kafka_port() -> int:
    """A free port whose successor (the controller port) is free too."""
    return free_port(consecutive=2)


class OwnStack:
    """A Kafka broker and a Redis of the suite's own, in `root`, on free ports."""

    def __init__(self, root: Path) -> None:
        for name in SCRUBBED_ENV:
            os.environ.pop(name, None)
        self.root = root
        self.stack = Stack(root=root, kafka_port=free_kafka_port(), redis_port=free_port(), start_timeout_s=120.0)
        self.addresses: Addresses | None = None

    @property
    def kafka(self) -> str:
        assert self.addresses is not None  # noqa: S101 - up() first
        return self.addresses.kafka

    @property
    def redis(self) -> str:
        assert self.addresses is not None  # noqa: S101 - up() first
        return self.addresses.redis

    def up(self, say: Any) -> Addresses:
        """Start both servers; on a port someone took meanwhile, try other ports (3 times)."""
        for attempt in range(3):
            try:
                self.addresses = self.stack.up(say)
                return self.addresses
            except StackError as exc:
                if "Address already in use" not in str(exc) or attempt == 2:
                    raise
                say(f"a port was taken meanwhile ({exc}); trying other ports")
                self.stack.down(purge=True)
                self.stack = Stack(root=self.root, kafka_port=free_kafka_port(), redis_port=free_port(),
                                   start_timeout_s=120.0)
        raise AssertionError("unreachable")

    def stop_kafka(self) -> None:
        self.stack.stop_kafka()

    def start_kafka(self) -> None:
        self.stack.start_kafka()

    def stop_redis(self) -> None:
        self.stack.stop_redis()

    def start_redis(self) -> None:
        self.stack.start_redis()

    def down(self) -> None:
        self.stack.down(purge=True)


# ---------------------------------------------------------------------------------------------
# topics


LOG_APPEND_TIME = {"message.timestamp.type": "LogAppendTime"}
"""Output topics keep the broker's append time, so gaps and recovery times come from the log."""


def topic_names(prefix: str) -> dict[str, str]:
    return {name: f"{prefix}.{default.split('.', 1)[1]}" for name, default in Topics().model_dump().items()}


async def create_topics(bootstrap: str, prefix: str, partitions: int = 4) -> dict[str, str]:
    """Create a scenario's topics (outputs with LogAppendTime); return field -> topic name."""
    names = topic_names(prefix)
    outputs = {"predictions", "shadow_predictions", "deadletter", "alerts"}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([
            NewTopic(topic, num_partitions=partitions, replication_factor=1,
                     topic_configs=dict(LOG_APPEND_TIME) if field_name in outputs else {})
            for field_name, topic in names.items()])
    finally:
        await admin.close()
    return names


# ---------------------------------------------------------------------------------------------
# models and configuration


def write_models(root: Path) -> Path:
    """Small MLPs (8 features: two healthy, one poison, one hanging) with a reference range per
    feature in their config.yaml."""
    from loadtests.models import build_mlp

    features = [f"f{i}" for i in range(N_FEATURES)]
    ranges = ", ".join(f"{name}: [{FEATURE_RANGE[0]}, {FEATURE_RANGE[1]}]" for name in features)
    for seed, (model, version) in enumerate([*ARMS.values(), CRASHING_MODEL, HANGING_MODEL], start=1):
        path = root / model / str(version) / "model.onnx"
        if not path.exists():
            build_mlp(path, n_features=N_FEATURES, seed=seed, fail_on_negative_first=(model, version) == CRASHING_MODEL,
                      hang_on_negative_first=(model, version) == HANGING_MODEL)
        (root / model / "config.yaml").write_text(f"features: [{', '.join(features)}]\nranges: {{{ranges}}}\n")
    return root


def route_config() -> dict[str, Any]:
    return {"name": ROUTE, "policy": "thompson", "exploration_floor": 0.1,
            "arms": [{"name": arm, "model": model, "version": version} for arm, (model, version) in ARMS.items()]}


# the admin API is closed without a token: scenarios that drain or inspect arms send this one
ADMIN_TOKEN = "faults-admin-token"  # noqa: S105 - a loopback test gateway's token, not a secret


def gateway_config(*, kafka: str, redis: str, topics: dict[str, str], group: str, redis_prefix: str,
                   models: Path, delivery: str = "at_least_once", http_port: int | None = None,
                   batching: dict[str, Any] | None = None, server: dict[str, Any] | None = None,
                   routes: list[dict[str, Any]] | None = None, models_settings: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    return {
        # a short producer timeout: a broker outage makes publications fail (and be served again by
        # a fresh producer) within seconds, so even the quick run's outage exercises that path
        "kafka": {"bootstrap_servers": kafka, "group_id": group, "topics": topics, "session_timeout_ms": 6000,
                  "max_poll_records": 1024, "request_timeout_ms": 5000},
        "redis": {"url": redis, "key_prefix": redis_prefix, "snapshot_refresh_ms": 250},
        "models": {"repository": str(models), "poll_interval_s": 0, "warmup_rows": 2,
                   "inference_timeout_s": 5.0, **(models_settings or {})},
        "batching": {"max_batch_size": 256, "max_delay_us": 2000, "max_queue_rows": 4096, "inference_threads": 1,
                     "max_in_flight_batches": 4, **(batching or {})},
        "server": {"host": "127.0.0.1", "http_port": http_port or free_port(), "grpc_port": 0, "enable_grpc": False,
                   "admin_tokens": [ADMIN_TOKEN], **(server or {})},
        "drift": {"enabled": False},
        "delivery": delivery,
        "shutdown_grace_s": 10,
        "logging": {"level": "info"},
        "routes": routes or [route_config()],
    }


def feedback_config(*, kafka: str, redis: str, topics: dict[str, str], app_id: str, redis_prefix: str,
                    join_ttl_s: float = 600.0, routes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "kafka": {"bootstrap_servers": kafka, "topics": topics, "session_timeout_ms": 6000},
        "redis": {"url": redis, "key_prefix": redis_prefix},
        "server": {"host": "127.0.0.1"},
        "feedback": {"app_id": app_id, "join_ttl_s": join_ttl_s, "web_port": 0, "flush_interval_s": 0.05,
                     "quality_window_s": 60},
        "drift": {"enabled": False},
        "logging": {"level": "info"},
        "routes": routes or [route_config()],
    }


# ---------------------------------------------------------------------------------------------
# processes


@dataclass
class Proc:
    """One `banditgate` subprocess; remembers whether an exit was ours (a signal we sent)."""

    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen | None = None
    signalled: bool = False
    exits: list[tuple[int, bool]] = field(default_factory=list)  # (code, signalled by us)
    _log_offset: int = 0
    _recorded: bool = False

    def spawn(self) -> "Proc":
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=child_env(),  # noqa: S603
                                        cwd=REPO, start_new_session=True)
        log.close()
        self.signalled = False
        self._recorded = False
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None  # noqa: S101
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[self._log_offset:] if self.log_path.exists() else ""

    def tail(self, chars: int = 1500) -> str:
        return self.output()[-chars:]

    def _reap(self) -> None:
        """Record the exit of the current process once: its code and whether we signalled it."""
        if self.process is not None and not self._recorded and self.process.poll() is not None:
            self._recorded = True
            self.exits.append((int(self.process.returncode), self.signalled))

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        self._reap()
        if self.alive():
            assert self.process is not None  # noqa: S101
            self.signalled = True
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)
            self._reap()

    def terminate(self, timeout_s: float = 30.0) -> tuple[int, float]:
        """SIGTERM and wait; returns (exit code, seconds to exit). SIGKILL after `timeout_s`."""
        self._reap()
        if not self.alive():
            return (self.process.returncode if self.process is not None else 0), 0.0
        assert self.process is not None  # noqa: S101
        self.signalled = True
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        elapsed = time.monotonic() - started
        self._reap()
        return int(self.process.returncode), elapsed

    def crashes(self) -> int:
        """Exits we did not cause (a process that died on its own)."""
        self._reap()
        return sum(1 for _code, ours in self.exits if not ours)

    def unclean_terms(self) -> int:
        """SIGTERMs that did not end in exit code 0 (SIGKILLs are ours and not counted)."""
        self._reap()
        return sum(1 for code, ours in self.exits if ours and code not in (0, -signal.SIGKILL))

    def rss_mb(self) -> float | None:
        if not self.alive():
            return None
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
        except OSError:
            return None
        return None


async def http_status(port: int, path: str, timeout_s: float = 1.0) -> int | None:
    """Status code of GET http://127.0.0.1:port/path, or None if it does not answer."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout_s)
    except (OSError, asyncio.TimeoutError):
        return None
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout_s)
        parts = line.split()
        return int(parts[1]) if len(parts) >= 2 else None
    except (OSError, asyncio.TimeoutError, ValueError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


class GatewayProc(Proc):
    """`banditgate serve -c <config>`; ready when /v2/health/ready answers 200."""

    def __init__(self, name: str, config: dict[str, Any], work: Path) -> None:
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        super().__init__(name, [sys.executable, "-m", "banditgate.cli", "serve", "-c", str(path)], work / f"{name}.log")
        self.config = config
        self.http_port = int(config["server"]["http_port"])

    async def ready(self) -> bool:
        return await http_status(self.http_port, "/v2/health/ready") == 200

    async def wait_ready(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited during start-up: {self.tail()}")
            if await self.ready():
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.name} was not ready within {timeout_s:.0f}s: {self.tail()}")


class FeedbackProc(Proc):
    """`banditgate feedback -c <config>`; ready when it logs that it holds its partitions."""

    def __init__(self, name: str, config: dict[str, Any], work: Path) -> None:
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        super().__init__(name, [sys.executable, "-m", "banditgate.cli", "feedback", "-c", str(path)],
                         work / f"{name}.log")

    async def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited during start-up: {self.tail()}")
            if FEEDBACK_READY in self.output():
                return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"{self.name} was not ready within {timeout_s:.0f}s: {self.tail()}")


@dataclass
class Processes:
    """Every process a scenario started, for crash accounting and cleanup."""

    items: list[Proc] = field(default_factory=list)

    def add(self, proc: Proc) -> Proc:
        self.items.append(proc)
        return proc

    def stop_all(self) -> list[tuple[str, int, float]]:
        """SIGTERM whatever still runs; return (name, code, seconds) per process stopped."""
        out = []
        for proc in self.items:
            if proc.alive():
                code, seconds = proc.terminate()
                out.append((proc.name, code, seconds))
        return out

    def crashes(self) -> int:
        return sum(proc.crashes() for proc in self.items)

    def unclean_terms(self) -> int:
        return sum(proc.unclean_terms() for proc in self.items)

    def kill_all(self) -> None:
        for proc in self.items:
            with contextlib.suppress(Exception):
                proc.kill()
