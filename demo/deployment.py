"""What the demo deploys: its own topics, Redis prefix, ports and config, and the two processes.

Every run is isolated on a shared development stack: topic names carry a per-run prefix, Redis
keys a per-run prefix, the feedback worker a per-run faust app id, and the ports are free ones.
`banditgate serve` and `banditgate feedback` run as real subprocesses of this interpreter
(`python -m banditgate.cli ...`), their output in the report's `logs/`; they are stopped with
SIGTERM and must exit 0.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from banditgate.config import Topics
from demo.models import RETRAIN_MODEL, ROUTE, SPECS
from demo.scenario import Scenario

PARTITIONS = 4
FEEDBACK_READY_LINE = "feedback worker ready"


class DemoError(Exception):
    """The demo cannot go on; str(self) is one line saying what and where."""

    user_facing = True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Plan:
    """Names, ports and paths of one run."""

    run_id: str
    kafka: str
    redis: str
    report_dir: Path
    bind_host: str
    http_port: int
    grpc_port: int
    feedback_port: int
    topics: Topics
    redis_prefix: str
    app_id: str

    @property
    def repository(self) -> Path:
        return self.report_dir / "models"

    @property
    def config_path(self) -> Path:
        return self.report_dir / "banditgate.yaml"

    @property
    def logs(self) -> Path:
        return self.report_dir / "logs"

    @property
    def workdir(self) -> Path:
        """The feedback worker's working directory (faust keeps `<app id>-data` there)."""
        return self.report_dir / ".work"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def feedback_metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.feedback_port}/metrics"

    @property
    def topic_names(self) -> list[str]:
        return list(self.topics.model_dump().values())


def make_plan(run_id: str, kafka: str, redis: str, report_dir: Path, bind_host: str = "127.0.0.1") -> Plan:
    """Unique names for `run_id` and free ports on `bind_host`."""
    prefix = f"demo-{run_id}"
    topics = Topics(**{name: f"{prefix}.{default.split('.', 1)[1]}" for name, default in Topics().model_dump().items()})
    return Plan(run_id=run_id, kafka=kafka, redis=redis, report_dir=report_dir, bind_host=bind_host,
                http_port=free_port(), grpc_port=free_port(), feedback_port=free_port(), topics=topics,
                redis_prefix=prefix, app_id=f"{prefix}-feedback")


def config_document(plan: Plan, scenario: Scenario) -> dict[str, Any]:
    """The banditgate.yaml the demo runs with (validated by banditgate.config before use)."""
    # the arm with a rollout pins its version: new versions of it go through the rollout
    pinned = RETRAIN_MODEL if scenario.retrain_at_s is not None else None
    arms = [{"name": spec.model, "model": spec.model, "version": 1 if spec.model == pinned else "latest"}
            for spec in SPECS if spec.role == "arm"]
    shadows = [{"name": spec.model, "model": spec.model, "version": "latest"} for spec in SPECS if spec.role == "shadow"]
    return {
        "kafka": {"bootstrap_servers": plan.kafka, "client_id": f"demo-{plan.run_id}",
                  "group_id": f"demo-{plan.run_id}-gateway", "topics": plan.topics.model_dump()},
        "redis": {"url": plan.redis, "key_prefix": plan.redis_prefix, "snapshot_refresh_ms": 200},
        "models": {"repository": str(plan.repository), "providers": ["CPUExecutionProvider"], "poll_interval_s": 1,
                   "warmup_rows": 4, "intra_op_threads": 1, "inter_op_threads": 1},
        "batching": {"max_batch_size": 64, "max_delay_us": 2000},
        "server": {"host": plan.bind_host, "http_port": plan.http_port, "grpc_port": plan.grpc_port},
        "feedback": {"app_id": plan.app_id, "partitions": PARTITIONS, "web_port": plan.feedback_port,
                     "flush_interval_s": 0.1, "quality_window_s": 60 if scenario.name == "quick" else 120,
                     "quality_episode_quiet_s": scenario.episode_quiet_s},
        "logging": {"level": "info"},
        "drift": {"episode_quiet_s": scenario.episode_quiet_s},
        "routes": [{
            "name": ROUTE, "policy": "thompson", "reward": "bernoulli", "half_life": scenario.half_life,
            "exploration_floor": scenario.exploration_floor, "arms": arms, "shadows": shadows,
            **({"rollout": {"model": pinned, "replaces": pinned, "shadow": {"min_outcomes": 100},
                            "canary": {"max_share": 0.2, "min_outcomes": 150, "min_calls": 150},
                            "grace_s": 10}} if pinned else {}),
        }],
    }


def write_config(plan: Plan, scenario: Scenario) -> Path:
    """Write and validate the config; raise DemoError naming the problem if it does not load."""
    from banditgate.config import ConfigError, load_config

    plan.config_path.write_text("# written by `banditgate demo` for this run only\n"
                                + yaml.safe_dump(config_document(plan, scenario), sort_keys=False))
    try:
        load_config(plan.config_path)
    except ConfigError as exc:
        raise DemoError(f"the demo wrote a config banditgate refuses: {exc}") from None
    return plan.config_path


async def create_topics(plan: Plan) -> None:
    """The run's topics, PARTITIONS partitions each. Raises DemoError if Kafka refuses."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import KafkaError, TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(bootstrap_servers=plan.kafka, client_id=f"demo-{plan.run_id}-admin")
    try:
        await admin.start()
        try:
            await admin.create_topics([NewTopic(name, num_partitions=PARTITIONS, replication_factor=1)
                                       for name in plan.topic_names])
        except TopicAlreadyExistsError:
            pass
    except KafkaError as exc:
        raise DemoError(f"cannot create the demo's topics on Kafka at {plan.kafka}: {exc}") from None
    finally:
        await admin.close()


async def delete_run_state(plan: Plan) -> list[str]:
    """Best-effort cleanup of what the run left on the shared stack: its topics (and the feedback
    worker's changelog topics) and its Redis keys. Returns what could not be removed."""
    from aiokafka.admin import AIOKafkaAdminClient

    problems: list[str] = []
    admin = AIOKafkaAdminClient(bootstrap_servers=plan.kafka, client_id=f"demo-{plan.run_id}-admin")
    try:
        await admin.start()
        existing = await admin.list_topics()
        ours = [t for t in existing if t in plan.topic_names or t.startswith(plan.app_id)]
        if ours:
            await admin.delete_topics(ours)
    except Exception as exc:  # noqa: BLE001 - cleanup must not hide the run's result; reported instead
        problems.append(f"kafka topics: {type(exc).__name__}: {exc}")
    finally:
        await admin.close()
    try:
        import redis.asyncio as aredis

        client = aredis.Redis.from_url(plan.redis, socket_timeout=5)
        try:
            keys = [key async for key in client.scan_iter(match=f"{plan.redis_prefix}:*", count=1000)]
            for start in range(0, len(keys), 500):
                await client.delete(*keys[start:start + 500])
        finally:
            await client.aclose()
    except Exception as exc:  # noqa: BLE001
        problems.append(f"redis keys: {type(exc).__name__}: {exc}")
    return problems


def _project_root() -> Path:
    import banditgate

    return Path(banditgate.__file__).resolve().parents[1]


@dataclass
class Process:
    """One `banditgate serve|feedback` subprocess with its log file."""

    name: str
    command: list[str]
    log_path: Path
    cwd: Path
    process: subprocess.Popen[bytes] | None = None
    started_at: float | None = None
    """time.monotonic() just before the process was spawned."""
    ready_after_s: float | None = None
    """Seconds from `started_at` to the first time it was seen ready (set by the demo)."""
    exit_code: int | None = None
    stop_seconds: float | None = None
    killed: bool = False
    _log_handle: Any = field(default=None, repr=False)

    def start(self) -> Process:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.cwd.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        root = str(_project_root())
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._log_handle = self.log_path.open("ab")
        # own session: a Ctrl-C in the terminal reaches the demo only, which then stops these in order
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(self.command, cwd=self.cwd, stdout=self._log_handle,
                                        stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def last_line(self) -> str:
        lines = [line for line in self.log().splitlines() if line.strip()]
        return lines[-1].strip() if lines else "(no output)"

    def note_ready(self, ready: bool) -> bool:
        """Record the first time the process is seen ready; returns `ready`."""
        if ready and self.ready_after_s is None and self.started_at is not None:
            self.ready_after_s = time.monotonic() - self.started_at
        return ready

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check_alive(self) -> None:
        """Raise DemoError when the process has exited."""
        if self.process is not None and self.process.poll() is not None:
            raise DemoError(f"banditgate {self.name} exited with {self.process.returncode}: {self.last_line()} "
                            f"(log: {self.log_path})")

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM and wait (SIGKILL after `timeout_s`). Returns the exit code (None if never started)."""
        if self.process is None:
            return None
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.killed = True
                self.process.kill()
                self.process.wait(timeout=10)
        self.stop_seconds = time.monotonic() - started
        self.exit_code = int(self.process.returncode)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        return self.exit_code


def start_processes(plan: Plan) -> tuple[Process, Process]:
    """Start the gateway and the feedback worker (not yet waiting for either)."""
    config = str(plan.config_path)
    serve = Process("serve", [sys.executable, "-m", "banditgate.cli", "serve", "-c", config],
                    plan.logs / "serve.log", plan.workdir).start()
    feedback = Process("feedback", [sys.executable, "-m", "banditgate.cli", "feedback", "-c", config],
                       plan.logs / "feedback.log", plan.workdir).start()
    return serve, feedback


def gateway_ready(plan: Plan) -> bool:
    """True when the gateway answers ready on its HTTP port."""
    url = f"{plan.gateway_url}/v2/health/ready"
    try:
        with urllib.request.urlopen(url, timeout=1) as response:  # nosec B310: http URL of our own loopback port
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def feedback_ready(process: Process) -> bool:
    """True once the worker logged that it holds its partitions."""
    return FEEDBACK_READY_LINE in process.log()
