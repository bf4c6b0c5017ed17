"""A model that hangs, on a real ONNX Runtime session in a real thread pool (no Kafka here).

The hanging model is a real ONNX graph: a Loop of 2**62 iterations whenever a batch holds a row
whose first feature is negative (loadtests/models.py). Before isolation, its run kept its pool
thread for good; two such batches took a two-thread pool and every other model's batches waited
behind them, while its own rows kept queueing.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from banditgate.config import ModelsConfig
from gateway.batching.batcher import ModelBatcher
from gateway.batching.circuit import CircuitPolicy
from gateway.batching.policy import BatchPolicy
from gateway.errors import ModelUnavailable
from gateway.models.model_config import ModelConfig
from gateway.models.onnx_runtime import OnnxModel
from loadtests.models import build_mlp

ONE_THREAD = CircuitPolicy(max_threads=1, retry_s=60.0, retry_max_s=60.0)


def _model(tmp_path: Path, name: str, hangs: bool = False) -> OnnxModel:
    path = build_mlp(tmp_path / name / "1" / "model.onnx", n_features=4, hidden=8, seed=3,
                     hang_on_negative_first=hangs)
    return OnnxModel.load(path, name, 1, ModelConfig(), ModelsConfig(repository=tmp_path))


def _rows(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(seed).uniform(0.1, 1.0, (n, 4)).astype(np.float32)}


def _hanging_rows(n: int) -> dict[str, np.ndarray]:
    rows = _rows(n, seed=9)
    rows["input"][:, 0] = -1.0
    return rows


async def _until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


@pytest.fixture()
def pool() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(2)
    yield executor
    executor.shutdown(wait=True)  # hangs here if a hung run kept its thread


def test_the_hanging_model_answers_like_the_mlp_until_a_row_is_negative(tmp_path: Path) -> None:
    plain, hanging = _model(tmp_path, "plain"), _model(tmp_path, "hangs", hangs=True)
    feeds = _rows(6)
    for name, values in plain.run(feeds).items():
        assert np.allclose(values, hanging.run(feeds)[name])


def test_a_hung_model_keeps_one_thread_and_fails_fast_while_another_model_answers(
        tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    hanging, healthy = _model(tmp_path, "hangs", hangs=True), _model(tmp_path, "ok")

    async def run() -> None:
        hung = ModelBatcher(hanging, pool, BatchPolicy(64, 0, 1000), timeout_s=2.0, circuit=ONE_THREAD)
        other = ModelBatcher(healthy, pool, BatchPolicy(64, 0, 1000), timeout_s=5.0, circuit=ONE_THREAD)
        first = hung.submit(_hanging_rows(2), 2)
        second = hung.submit(_hanging_rows(3), 3)  # waits in the model's queue: it holds its one thread
        assert hung.circuit.running == 1
        for seed in range(5):  # the other model answers on the thread the hung one cannot take
            result = await asyncio.wait_for(other.submit(_rows(4, seed), 4), 10)
            assert result.ok.all()
        assert not first.done()  # ...while the hung batch is still running
        with pytest.raises(ModelUnavailable, match="longer than"):
            await first
        with pytest.raises(ModelUnavailable):
            await second  # failed when the model became unavailable, never run
        assert not hung.healthy and hung.queued_rows == 0
        with pytest.raises(ModelUnavailable):
            hung.submit(_rows(1), 1)  # refused at once: nothing queues for a model that cannot run
        await _until(lambda: hung.circuit.running == 0)  # the terminated run gave its thread back
        assert other.healthy

    asyncio.run(run())


def test_one_probe_after_the_backoff_closes_the_circuit_only_when_it_answers(
        tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    hanging = _model(tmp_path, "hangs", hangs=True)
    policy = CircuitPolicy(max_threads=1, retry_s=0.2, retry_max_s=0.4)

    async def run() -> None:
        hung = ModelBatcher(hanging, pool, BatchPolicy(64, 0, 1000), timeout_s=0.3, circuit=policy)
        with pytest.raises(ModelUnavailable):
            await hung.submit(_hanging_rows(2), 2)
        await _until(lambda: hung.circuit.accepts(hung.clock()))
        # the probe runs these inputs (they hang), while the rows themselves fail at once
        with pytest.raises(ModelUnavailable):
            await hung.submit(_hanging_rows(1), 1)
        assert hung.circuit.state == "half_open" and hung.circuit.probes == 1
        with pytest.raises(ModelUnavailable, match="being probed"):
            hung.submit(_rows(1), 1)  # no second probe while one runs
        await _until(lambda: hung.circuit.state == "open")  # the probe timed out
        assert hung.circuit.backoff_s == pytest.approx(0.4)  # the wait doubled (capped at 0.4)
        await _until(lambda: hung.circuit.accepts(hung.clock()) and hung.circuit.running == 0)
        with pytest.raises(ModelUnavailable):
            await hung.submit(_rows(2), 2)  # these inputs do not hang: the probe answers
        await _until(lambda: hung.healthy)
        result = await hung.submit(_rows(3), 3)
        assert result.ok.all() and hung.circuit.probes == 2

    asyncio.run(run())


def test_a_batch_of_many_slices_never_takes_more_threads_than_the_cap(tmp_path: Path,
                                                                       pool: ThreadPoolExecutor) -> None:
    model = _model(tmp_path, "ok")
    original = model.run
    running, most = [0], [0]
    lock = threading.Lock()

    def spy(feeds, options=None):  # noqa: ANN001, ANN202
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(0.01)  # long enough for two slices in two threads to overlap
            return original(feeds, options)
        finally:
            with lock:
                running[0] -= 1

    object.__setattr__(model, "run", spy)

    async def run(policy: CircuitPolicy) -> None:
        batcher = ModelBatcher(model, pool, BatchPolicy(4, 0, 1000), timeout_s=5.0, circuit=policy)
        result = await batcher.submit(_rows(20), 20)  # 5 slices of 4 rows
        assert result.ok.all() and result.outputs["probability"].shape == (20, 1)

    asyncio.run(run(ONE_THREAD))
    assert most[0] == 1
    asyncio.run(run(CircuitPolicy(max_threads=2)))
    assert most[0] == 2  # the same batch with a share of two threads


def test_a_small_batch_hung_on_the_event_loop_is_ended_and_the_model_leaves_the_loop(
        tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    hanging = _model(tmp_path, "hangs", hangs=True)
    original = hanging.run
    on_loop: list[bool] = []

    def spy(feeds, options=None):  # noqa: ANN001, ANN202
        on_loop.append(threading.current_thread() is threading.main_thread())
        return original(feeds, options)

    object.__setattr__(hanging, "run", spy)

    async def run() -> ModelBatcher:
        batcher = ModelBatcher(hanging, pool, BatchPolicy(64, 0, 100), timeout_s=0.3, inline_max_us=1000,
                               circuit=CircuitPolicy(max_threads=1, retry_s=0.1, retry_max_s=0.1))
        for seed in range(3):
            assert (await batcher.submit(_rows(1, seed), 1)).ok.all()
        assert on_loop[1:] == [True, True]  # fast: it runs on the loop
        with pytest.raises(ModelUnavailable, match="longer than"):
            await batcher.submit(_hanging_rows(1), 1)  # blocked the loop until the watch ended it
        assert on_loop[-1] is True
        await _until(lambda: batcher.circuit.accepts(batcher.clock()))
        with pytest.raises(ModelUnavailable):
            await batcher.submit(_rows(1), 1)  # the probe
        await _until(lambda: batcher.healthy)
        assert (await batcher.submit(_rows(1), 1)).ok.all()
        return batcher

    asyncio.run(run())
    assert on_loop[-2:] == [False, False]  # the probe and what followed ran in the pool
