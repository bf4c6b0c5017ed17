"""The gateway's drift watch without Kafka: monitors built from stored thresholds without any
simulation, a profile without them calibrated once per key in the calibration thread (never the
event loop), and a persisting drift giving one `firing` alert and, once quiet, one `resolved`."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from banditgate.config import ModelsConfig
from banditgate.drift import calibration
from banditgate.drift.calibration import calibrations_run, clear_memo
from banditgate.drift.monitor import profile_keys
from banditgate.drift.reference import ReferenceProfile
from gateway.drift_watch import DriftWatch
from gateway.metrics import GatewayMetrics
from gateway.models.model_config import ModelConfig
from gateway.models.onnx_runtime import OnnxModel
from loadtests.models import build_mlp

FEATURES = 4


@pytest.fixture(autouse=True)
def fresh_memo():  # type: ignore[no-untyped-def]
    clear_memo()
    yield
    clear_memo()


def model_with_profile(tmp_path: Path, stored: bool) -> tuple[OnnxModel, ReferenceProfile]:
    path = build_mlp(tmp_path / "m" / "1" / "model.onnx", n_features=FEATURES, hidden=8, seed=3)
    rows = np.random.default_rng(0).normal(size=(3000, FEATURES)).astype(np.float32)
    scores = ort.InferenceSession(str(path)).run(["probability"], {"input": rows})[0][:, 0]
    profile = ReferenceProfile.build(rows, [f"f{i}" for i in range(FEATURES)], scores=scores)
    if stored:  # what `banditgate profile` stores (made-up values: the test is about which are used)
        profile = profile.with_thresholds({key: 12.0 for key in profile_keys(profile, 1000)})
    profile.save(path.parent / "reference.json")
    return OnnxModel.load(path, "m", 1, ModelConfig(), ModelsConfig(repository=tmp_path)), profile


async def built(watch: DriftWatch, model: OnnxModel) -> Any:
    watch.prepare(model)
    for _ in range(500):
        current = watch._watches.get((model.name, model.version, model.mtime_ns))
        if current is not None:
            return current
        await asyncio.sleep(0.02)
    raise AssertionError("the drift monitors were never built")


async def test_stored_thresholds_build_the_monitors_without_simulating(tmp_path: Path) -> None:
    model, _ = model_with_profile(tmp_path, stored=True)
    watch = DriftWatch(1000, GatewayMetrics(CollectorRegistry()), lambda alert: None)
    current = await built(watch, model)
    assert calibrations_run() == 0
    assert list(current.features.threshold) == [12.0] * FEATURES and list(current.score.threshold) == [12.0]


async def test_missing_thresholds_are_calibrated_once_in_the_calibration_thread(tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    model, profile = model_with_profile(tmp_path, stored=False)
    threads: list[str] = []

    def simulate(*args: object) -> float:  # stands in for seconds of simulation (pure unit test)
        threads.append(threading.current_thread().name)
        return 9.0

    monkeypatch.setattr(calibration, "_feature_threshold", simulate)
    watch = DriftWatch(1000, GatewayMetrics(CollectorRegistry()), lambda alert: None)
    current = await built(watch, model)
    assert list(current.score.threshold) == [9.0]
    assert len(threads) == calibrations_run() == len(profile_keys(profile, 1000))  # once per key
    assert threads and all(name.startswith("drift-calibration") for name in threads)


async def test_a_persisting_drift_alerts_once_then_resolves(tmp_path: Path) -> None:
    model, _ = model_with_profile(tmp_path, stored=True)
    now = [100.0]
    alerts: list[dict[str, Any]] = []
    registry = CollectorRegistry()
    watch = DriftWatch(1000, GatewayMetrics(registry), alerts.append, quiet_s=30.0, clock=lambda: now[0])
    await built(watch, model)
    rng = np.random.default_rng(1)
    for _ in range(20):  # f1 shifted by 3 sd for 20 batches, one a second: its CUSUM crosses again and again
        rows = rng.normal(size=(200, FEATURES)).astype(np.float32)
        rows[:, 1] += 3.0
        outputs = {"probability": ort.InferenceSession(str(model.path)).run(["probability"], {"input": rows})[0]}
        watch.observe(model, "r", "a", {"input": rows}, outputs)
        while watch._watches[(model.name, model.version, model.mtime_ns)].pending:
            await asyncio.sleep(0.01)
        now[0] += 1.0
    text = generate_latest(registry).decode()
    crossings = float(next(line.split()[-1] for line in text.splitlines()
                           if line.startswith('banditgate_drift_alarms_total{feature="f1"')))
    firing = [a for a in alerts if a["details"]["feature"] == "f1"]
    assert crossings > 3 and [(a["state"], a["metric"], a["route"], a["arm"]) for a in firing] == [
        ("firing", "feature_drift", "r", "a")]
    assert 'banditgate_drift_episodes_open{feature="f1",model="m",version="1"} 1.0' in text
    stopping = asyncio.Event()
    sweeper = asyncio.get_running_loop().create_task(watch.run(stopping))
    now[0] += 31.0
    for _ in range(300):
        if any(a["state"] == "resolved" for a in alerts):
            break
        await asyncio.sleep(0.01)
    stopping.set()
    await sweeper
    resolved = [a for a in alerts if a["state"] == "resolved" and a["details"]["feature"] == "f1"]
    assert [(a["details"]["alarms"], a["details"]["episode"]) for a in resolved] == [
        (int(crossings), firing[0]["details"]["episode"])]
    assert 'banditgate_drift_episodes_open{feature="f1",model="m",version="1"} 0.0' in generate_latest(registry).decode()
