"""A route's shadows run beside its primaries, not after them (real ONNX Runtime sessions in a real
thread pool, no Kafka): the answers wait for both anyway (they are published together), so running
one after the other only added the shadow's queueing and inference to every answer's latency."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from banditgate.config import ModelsConfig, parse_config
from gateway.dataplane import Dataplane
from gateway.models.repository import ModelRepository
from gateway.serving import Pending
from loadtests.models import build_mlp

WIDTH = 4
SLOW_S = 1.0  # the primary's inference timeout: its hanging batch ends after this


async def test_a_shadow_is_served_while_its_primary_still_runs(tmp_path: Path) -> None:
    root = tmp_path / "models"
    build_mlp(root / "slow" / "1" / "model.onnx", n_features=WIDTH, hidden=8, seed=1, hang_on_negative_first=True)
    build_mlp(root / "quick" / "1" / "model.onnx", n_features=WIDTH, hidden=8, seed=2)
    config = parse_config({
        "models": {"repository": str(root), "poll_interval_s": 0, "inference_timeout_s": SLOW_S},
        "batching": {"max_batch_size": 8, "max_delay_us": 0, "inline_max_us": 0, "inference_threads": 2},
        "routes": [{"name": "r", "policy": "fixed", "arms": [{"name": "a", "model": "slow", "version": 1}],
                    "shadows": [{"name": "s", "model": "quick", "version": 1}]}]}, env={})
    repo = ModelRepository(root, ModelsConfig(warmup_rows=0, poll_interval_s=0), [("slow", 1), ("quick", 1)])
    repo.load_all()
    with ThreadPoolExecutor(max_workers=2) as executor:
        dataplane = Dataplane(config, repo, executor, rng=np.random.default_rng(0))
        started = time.monotonic()
        served: dict[str, float] = {}
        dataplane.on_served = lambda model, _route, arm, _feeds, _outputs: served.setdefault(arm, time.monotonic() - started)
        hangs = {"input": [-1.0, 0.5, 0.5, 0.5]}  # a negative first feature: the primary's run hangs until its timeout
        answers = await asyncio.wait_for(
            dataplane.serve("r", [Pending("q1", hangs, None, time.time(), time.monotonic())]), 30)
        elapsed = time.monotonic() - started
    assert answers[0].error is not None and answers[0].error[0] == "model_unavailable"  # the primary timed out
    assert elapsed >= SLOW_S
    # the shadow answered long before the primary's timeout (after it, when it ran second)
    assert "s" in served and served["s"] < SLOW_S / 2, served


async def test_cancelling_a_served_batch_leaves_no_unretrieved_shadow_errors(tmp_path: Path) -> None:
    """A batch cancelled while its primary runs (close_now at the end of the shutdown grace) cancels
    its shadows too, and nothing is logged as "exception was never retrieved" about them."""
    import gc

    root = tmp_path / "models"
    build_mlp(root / "slow" / "1" / "model.onnx", n_features=WIDTH, hidden=8, seed=1, hang_on_negative_first=True)
    build_mlp(root / "quick" / "1" / "model.onnx", n_features=WIDTH, hidden=8, seed=2, hang_on_negative_first=True)
    config = parse_config({
        "models": {"repository": str(root), "poll_interval_s": 0, "inference_timeout_s": SLOW_S},
        "batching": {"max_batch_size": 8, "max_delay_us": 0, "inline_max_us": 0, "inference_threads": 2},
        "routes": [{"name": "r", "policy": "fixed", "arms": [{"name": "a", "model": "slow", "version": 1}],
                    "shadows": [{"name": "s", "model": "quick", "version": 1}]}]}, env={})
    repo = ModelRepository(root, ModelsConfig(warmup_rows=0, poll_interval_s=0), [("slow", 1), ("quick", 1)])
    repo.load_all()
    loop = asyncio.get_running_loop()
    reported: list[str] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(str(context.get("message"))))
    try:
        with ThreadPoolExecutor(max_workers=2) as executor:
            dataplane = Dataplane(config, repo, executor, rng=np.random.default_rng(0))
            hangs = {"input": [-1.0, 0.5, 0.5, 0.5]}
            task = loop.create_task(dataplane.serve("r", [Pending("q1", hangs, None, time.time(), time.monotonic())]))
            await asyncio.sleep(0.2)  # the primary and the shadow both hang (the same row)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            await asyncio.sleep(SLOW_S + 0.2)  # the hung run times out; everything settles
            del task
            gc.collect()
            await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert not [m for m in reported if "never retrieved" in m], reported
