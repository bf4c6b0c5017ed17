"""Run `banditgate feedback -c config.yaml` as a real subprocess against the test's own topics,
Redis prefix and faust app id; build events; read the results back from Redis."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import yaml

REPO = Path(__file__).resolve().parents[2]
READY_LINE = "feedback worker ready"

ROUTES: list[dict[str, Any]] = [
    {"name": "churn", "policy": "thompson",
     "arms": [{"name": "a", "model": "churn-gbm", "version": 3}, {"name": "b", "model": "churn-mlp", "version": 1}],
     "shadows": [{"name": "c", "model": "churn-gbm", "version": 4}]},
    {"name": "clicks", "policy": "fixed", "reward_wait_s": 2, "default_reward": 0,
     "arms": [{"name": "x", "model": "ctr", "version": 1}, {"name": "y", "model": "ctr", "version": 2}]},
]


def write_config(path: Path, *, kafka: str, redis: str, topics: Mapping[str, str], redis_prefix: str, app_id: str,
                 join_ttl_s: float = 600.0, routes: Sequence[Mapping[str, Any]] = ROUTES,
                 kafka_settings: Mapping[str, Any] | None = None, **feedback: Any) -> Path:
    """A worker config YAML for one test: its topics, its Redis prefix, its own app id.
    `kafka_settings` adds to the kafka section (e.g. session_timeout_ms)."""
    data = {
        "kafka": {"bootstrap_servers": kafka, "topics": dict(topics), **(kafka_settings or {})},
        "redis": {"url": redis, "key_prefix": redis_prefix},
        "server": {"host": "127.0.0.1"},
        "feedback": {"app_id": app_id, "join_ttl_s": join_ttl_s, "web_port": 0, "flush_interval_s": 0.05,
                     "quality_window_s": 60, **feedback},
        "logging": {"level": "info"},
        "routes": list(routes),
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class WorkerProcess:
    """One `banditgate feedback` subprocess, its output in a log file."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def start(self) -> WorkerProcess:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        # the config names the servers; BANDITGATE_KAFKA / BANDITGATE_REDIS (set when the stack is
        # external) would override them, e.g. point a test's private Redis back at the shared one
        env = {**{k: v for k, v in os.environ.items() if k not in ("BANDITGATE_KAFKA", "BANDITGATE_REDIS")},
               "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen([sys.executable, "-m", "banditgate.cli", "feedback", "-c", str(self.config)],
                                        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[self._log_offset:] if self.log_path.exists() else ""

    async def wait_for(self, text: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.output():
                return
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"worker exited with {self.process.returncode}:\n{self.output()[-4000:]}")
            await asyncio.sleep(0.2)
        raise AssertionError(f"no {text!r} from the worker within {timeout_s} s:\n{self.output()[-4000:]}")

    async def wait_ready(self, timeout_s: float = 90.0) -> None:
        await self.wait_for(READY_LINE, timeout_s)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not stop in time. Returns the exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return int(self.process.returncode)


# ---------------------------------------------------------------------------------------------
# events


def prediction(request_id: str, route: str, arm: str, model: str, version: int, probability: float,
               ts: float, shadow_of: str | None = None) -> bytes:
    event: dict[str, Any] = {
        "request_id": request_id, "route": route, "arm": arm, "model": model, "model_version": version,
        "policy": "thompson", "propensity": 0.5,
        "outputs": {"probability": [probability], "label": int(probability >= 0.5)},
        "ts_request": ts - 0.01, "ts_predicted": ts, "latency_ms": 3.0,
    }
    if shadow_of is not None:
        event["shadow"] = True
        event["primary_arm"] = shadow_of
    return orjson.dumps(event)


def outcome(request_id: str, ts: float, reward: float | None = None, label: Any = None) -> bytes:
    event: dict[str, Any] = {"request_id": request_id, "ts": ts}
    if reward is not None:
        event["reward"] = reward
    if label is not None:
        event["label"] = label
    return orjson.dumps(event)


# ---------------------------------------------------------------------------------------------
# reading Redis


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


async def counts(client: Any, prefix: str, route: str) -> dict[str, float]:
    raw = await client.hgetall(f"{prefix}:{{{route}}}:fb:counts")
    return {_text(k): float(_text(v)) for k, v in raw.items()}


async def quality_totals(client: Any, prefix: str, route: str) -> dict[str, float]:
    raw = await client.hgetall(f"{prefix}:{{{route}}}:fb:quality")
    return {_text(k): float(_text(v)) for k, v in raw.items()}


async def wait_until(check: Any, timeout_s: float, what: str, worker: WorkerProcess | None = None,
                     interval_s: float = 0.5) -> Any:
    """Poll `await check()` until it returns a truthy value; fail with the last value after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        if worker is not None and worker.process is not None and worker.process.poll() is not None:
            raise AssertionError(f"worker exited with {worker.process.returncode} while waiting for {what}:\n"
                                 f"{worker.output()[-4000:]}")
        await asyncio.sleep(interval_s)
    tail = worker.output()[-3000:] if worker is not None else ""
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; last: {last!r}\n{tail}")
