"""The micro-batcher: its pure flush policy (hypothesis) and ModelBatcher on a real ONNX model.

No Kafka here: the batcher is shared by every entry point and is tested on its own, with a real
ONNX Runtime session in a real thread pool.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from banditgate.config import ModelsConfig
from gateway.batching.batcher import ModelBatcher, RowsResult
from gateway.batching.merge import concat_feeds, split_results
from gateway.batching.policy import BatchPolicy
from gateway.errors import Overloaded
from gateway.models.model_config import ModelConfig
from gateway.models.onnx_runtime import OnnxModel
from loadtests.models import build_mlp

# -- the pure policy ---------------------------------------------------------------------------


@given(size=st.integers(1, 512), delay=st.integers(0, 10_000), queue=st.integers(1, 10_000),
       pending=st.integers(0, 1024), waited_us=st.integers(0, 20_000))
def test_flush_now_is_size_or_deadline(size: int, delay: int, queue: int, pending: int, waited_us: int) -> None:
    policy = BatchPolicy(size, delay, queue)
    now = 100.0
    flush = policy.flush_now(pending, now - waited_us / 1e6, now)
    if pending == 0:
        assert not flush
    elif pending >= size or delay == 0 or waited_us >= delay + 1:  # 1 us of float slack
        assert flush
    elif waited_us < delay - 1:
        assert not flush


@given(size=st.integers(1, 512), delay=st.integers(0, 10_000), pending=st.integers(0, 1024),
       waited_us=st.integers(0, 20_000), idle_flush=st.booleans(), busy=st.booleans())
def test_an_idle_model_flushes_at_once_a_busy_one_waits_as_before(size: int, delay: int, pending: int, waited_us: int,
                                                                   idle_flush: bool, busy: bool) -> None:
    policy = BatchPolicy(size, delay, 100, idle_flush)
    now = 100.0
    flush = policy.flush_now(pending, now - waited_us / 1e6, now, busy)
    if pending > 0 and idle_flush and not busy:
        assert flush  # nothing running: waiting for company would only add latency
    else:  # the size-or-deadline rule, unchanged
        assert flush == BatchPolicy(size, delay, 100, idle_flush=False).flush_now(pending, now - waited_us / 1e6, now)


@given(size=st.integers(1, 300), total=st.integers(0, 5000))
def test_slices_cover_the_rows_in_order_and_respect_the_size(size: int, total: int) -> None:
    slices = BatchPolicy(size, 0, 1).slices(total)
    assert sum(b - a for a, b in slices) == total
    assert all(0 < b - a <= size for a, b in slices)
    assert all(slices[i][1] == slices[i + 1][0] for i in range(len(slices) - 1))
    assert not slices or (slices[0][0] == 0 and slices[-1][1] == total)


@given(queue=st.integers(1, 1000), queued=st.integers(0, 2000), new=st.integers(0, 2000))
def test_admission_bound(queue: int, queued: int, new: int) -> None:
    admits = BatchPolicy(8, 0, queue).admits(queued, new)
    assert admits == (queued == 0 or queued + new <= queue)


@given(sizes=st.lists(st.integers(0, 6), min_size=1, max_size=8), data=st.data())
@settings(max_examples=200)
def test_split_results_gives_each_item_its_own_rows(sizes: list[int], data: st.DataObject) -> None:
    total = sum(sizes)
    ok = np.array(data.draw(st.lists(st.booleans(), min_size=total, max_size=total)), dtype=bool)
    rows = np.arange(total, dtype=np.int64)
    outputs = {"y": rows[ok]}  # output rows exist only for ok input rows, in order
    start = 0
    for size, (piece, mask) in zip(sizes, split_results(outputs, ok, sizes)):
        expected = rows[start:start + size][ok[start:start + size]]
        assert np.array_equal(piece["y"], expected)
        assert np.array_equal(mask, ok[start:start + size])
        start += size


def test_invalid_policy_is_refused() -> None:
    with pytest.raises(ValueError):
        BatchPolicy(0, 10, 10)


# -- ModelBatcher on a real model --------------------------------------------------------------


def _model(tmp_path: Path, name: str = "m", poison: bool = False) -> OnnxModel:
    path = build_mlp(tmp_path / name / "1" / "model.onnx", n_features=4, hidden=8, seed=3,
                     fail_on_negative_first=poison)
    return OnnxModel.load(path, name, 1, ModelConfig(), ModelsConfig(repository=tmp_path))


def _rows(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(seed).uniform(0.1, 1.0, (n, 4)).astype(np.float32)}


@pytest.fixture()
def pool():  # noqa: ANN201
    executor = ThreadPoolExecutor(2)
    yield executor
    executor.shutdown(wait=True)


def test_rows_of_several_submissions_share_one_batch_and_come_back_to_their_owner(tmp_path: Path, pool) -> None:  # noqa: ANN001
    model = _model(tmp_path)
    batches: list[int] = []

    async def run() -> list[RowsResult]:
        # idle_flush off: the first submission would otherwise go alone (see the next test)
        batcher = ModelBatcher(model, pool, BatchPolicy(64, 50_000, 1000, idle_flush=False), timeout_s=5,
                               observe=lambda _m, rows, _q, _i: batches.append(rows))
        feeds = [_rows(n, seed=n) for n in (1, 3, 2)]
        futures = [batcher.submit(f, len(f["input"])) for f in feeds]
        results = await asyncio.gather(*futures)
        assert batcher.queued_rows == 0
        for f, result in zip(feeds, results):
            assert np.allclose(result.outputs["probability"], model.run(f)["probability"], atol=1e-6)
            assert result.ok.all() and not result.errors and result.batch_rows == 6
        return results

    asyncio.run(run())
    assert batches == [6]  # one flush, by the 50 ms delay, holding all three submissions


def test_an_idle_model_runs_a_lone_row_at_once_and_rows_queued_behind_it_together(tmp_path: Path, pool) -> None:  # noqa: ANN001
    model = _model(tmp_path)
    batches: list[int] = []

    async def run() -> None:
        # a 10 s delay: only the idle flush can answer within the 5 s bound below
        batcher = ModelBatcher(model, pool, BatchPolicy(64, 10_000_000, 1000), timeout_s=5,
                               observe=lambda _m, rows, _q, _i: batches.append(rows))
        feeds = [_rows(n, seed=n) for n in (1, 3, 2)]
        futures = [batcher.submit(f, len(f["input"])) for f in feeds]  # the first finds the model idle
        results = await asyncio.wait_for(asyncio.gather(*futures), 5)
        for f, result in zip(feeds, results):
            assert np.allclose(result.outputs["probability"], model.run(f)["probability"], atol=1e-6)
        assert [r.batch_rows for r in results] == [1, 5, 5]
        assert batcher.queued_rows == 0

    asyncio.run(run())
    assert batches == [1, 5]  # the lone row at once; the rows queued while it ran, together when it came back


def test_a_full_batch_flushes_at_once_and_large_ones_are_sliced(tmp_path: Path, pool) -> None:  # noqa: ANN001
    model = _model(tmp_path)
    batches: list[int] = []

    async def run() -> None:
        batcher = ModelBatcher(model, pool, BatchPolicy(4, 10_000_000, 1000), timeout_s=5,
                               observe=lambda _m, rows, _q, _i: batches.append(rows))
        started = time.monotonic()
        result = await batcher.submit(_rows(10), 10)
        assert time.monotonic() - started < 5  # flushed by size, not by the 10 s delay
        assert result.outputs["probability"].shape == (10, 1) and result.ok.all()

    asyncio.run(run())
    assert batches == [10]  # one batch of 10 rows, run as slices of at most 4


def test_a_poison_row_fails_alone(tmp_path: Path, pool) -> None:  # noqa: ANN001
    model = _model(tmp_path, poison=True)

    async def run() -> RowsResult:
        batcher = ModelBatcher(model, pool, BatchPolicy(64, 0, 1000), timeout_s=5)
        feeds = _rows(8)
        feeds["input"][5, 0] = -1.0  # the graph fails for a batch holding this row
        return await batcher.submit(feeds, 8)

    result = asyncio.run(run())
    assert list(np.flatnonzero(~result.ok)) == [5] and set(result.errors) == {5}
    assert result.outputs["probability"].shape == (7, 1)


def test_the_queue_is_bounded(tmp_path: Path, pool) -> None:  # noqa: ANN001
    model = _model(tmp_path)

    async def run() -> None:
        # rows held in the queue (10 s delay, no idle flush) until the test flushes them
        batcher = ModelBatcher(model, pool, BatchPolicy(64, 10_000_000, 10, idle_flush=False), timeout_s=5)
        first = batcher.submit(_rows(8), 8, reject_when_full=True)
        assert not batcher.admits(3)
        with pytest.raises(Overloaded):
            batcher.submit(_rows(3), 3, reject_when_full=True)
        waiter = asyncio.ensure_future(batcher.wait_for_capacity(3))
        await asyncio.sleep(0.01)
        assert not waiter.done()  # Kafka's backpressure: waits while the queue is full
        batcher._flush()
        await first
        await asyncio.wait_for(waiter, 5)

    asyncio.run(run())


def test_a_batch_waiting_for_a_busy_pool_is_not_taken_for_a_hung_model(tmp_path: Path) -> None:
    """The timeout counts a run, not its wait for a thread: a batch stuck behind other work in
    the pool says nothing about its own model (a hung model is tests/gateway/test_hung_model.py)."""
    model = _model(tmp_path)
    gate = threading.Event()
    executor = ThreadPoolExecutor(1)
    executor.submit(gate.wait)  # the only worker is busy: the batch cannot start

    async def run() -> None:
        batcher = ModelBatcher(model, executor, BatchPolicy(64, 0, 100), timeout_s=0.05)
        future = batcher.submit(_rows(2), 2)
        await asyncio.sleep(0.3)  # six timeouts long
        assert not future.done() and batcher.healthy and batcher.circuit.timeouts == 0
        gate.set()
        result = await asyncio.wait_for(future, 10)
        assert result.ok.all() and batcher.queued_rows == 0 and batcher.healthy

    try:
        asyncio.run(run())
    finally:
        gate.set()
        executor.shutdown(wait=True)


def test_a_hot_swapped_model_serves_the_next_flush(tmp_path: Path, pool) -> None:  # noqa: ANN001
    old, new = _model(tmp_path, "old"), _model(tmp_path, "new")

    async def run() -> tuple[list[str], RowsResult]:
        seen: list[str] = []
        batcher = ModelBatcher(old, pool, BatchPolicy(64, 0, 100), timeout_s=5,
                               observe=lambda m, *_: seen.append(m.name))
        await batcher.submit(_rows(1), 1)
        batcher.model = new
        result = await batcher.submit(_rows(1), 1)
        return seen, result

    seen, result = asyncio.run(run())
    assert seen == ["old", "new"] and result.ok.all()


def test_concat_of_one_item_is_that_item() -> None:
    feeds = _rows(3)
    assert concat_feeds([feeds]) is feeds


def test_small_batches_of_a_fast_model_run_inline_and_a_slow_model_goes_back_to_the_pool(tmp_path: Path, pool) -> None:  # noqa: ANN001
    model = _model(tmp_path)
    loop_thread: list[bool] = []
    original = model.run

    def spy(feeds, options=None):  # noqa: ANN001, ANN202
        loop_thread.append(threading.current_thread() is threading.main_thread())
        return original(feeds, options)

    object.__setattr__(model, "run", spy)

    async def run(batcher: ModelBatcher, n: int, rows: int = 1) -> None:
        for i in range(n):
            result = await batcher.submit(_rows(rows, seed=i), rows)
            assert result.ok.all()

    fast = ModelBatcher(model, pool, BatchPolicy(64, 0, 100), timeout_s=5, inline_max_us=1000)
    asyncio.run(run(fast, 5))
    assert loop_thread[0] is False and all(loop_thread[1:])  # measured once in the pool, then inline
    loop_thread.clear()
    asyncio.run(run(fast, 2, rows=16))
    assert loop_thread == [False, False]  # larger batches always go to the pool

    loop_thread.clear()
    never = ModelBatcher(model, pool, BatchPolicy(64, 0, 100), timeout_s=5, inline_max_us=0)
    asyncio.run(run(never, 3))
    assert loop_thread == [False, False, False]

    loop_thread.clear()
    slow = ModelBatcher(model, pool, BatchPolicy(64, 0, 100), timeout_s=5, inline_max_us=1000)
    asyncio.run(run(slow, 2))
    assert loop_thread == [False, True]
    slow._small_batch_us = 5000.0  # the model got slow (as a bigger one hot-swapped in would be)
    loop_thread.clear()
    asyncio.run(run(slow, 2))
    assert loop_thread[0] is False


def test_inline_runs_by_default_only_on_a_single_cpu(tmp_path: Path, pool, monkeypatch) -> None:  # noqa: ANN001
    from banditgate.config import parse_config
    from gateway import dataplane as dp
    from gateway.models.repository import ModelRepository

    _model(tmp_path)
    base = {"models": {"repository": str(tmp_path), "poll_interval_s": 0},
            "routes": [{"name": "r", "arms": [{"name": "a", "model": "m", "version": 1}]}]}
    repository = ModelRepository(tmp_path, parse_config(base, env={}).models, [("m", 1)])
    for cpus, configured, expected in ((1.0, None, 100), (2.0, None, 0), (0.5, None, 100), (4.0, 30, 30), (1.0, 0, 0)):
        monkeypatch.setattr(dp, "usable_cpus", lambda cpus=cpus: cpus)
        config = parse_config({**base, "batching": {} if configured is None else {"inline_max_us": configured}}, env={})
        assert dp.Dataplane(config, repository, pool).inline_max_us == expected


def test_usable_cpus_is_positive() -> None:
    from gateway.dataplane import usable_cpus

    assert 0 < usable_cpus() <= (len(__import__("os").sched_getaffinity(0)))


def test_inline_never_runs_more_rows_than_max_batch_size(tmp_path: Path, pool) -> None:  # noqa: ANN001
    model = _model(tmp_path)
    sizes: list[int] = []
    original = model.run

    def spy(feeds, options=None):  # noqa: ANN001, ANN202
        sizes.append(len(feeds["input"]))
        return original(feeds, options)

    object.__setattr__(model, "run", spy)

    async def run() -> None:
        batcher = ModelBatcher(model, pool, BatchPolicy(2, 0, 100), timeout_s=5, inline_max_us=1000)
        await batcher.submit(_rows(1), 1)  # measured in the pool; small batches may now run inline
        result = await batcher.submit(_rows(6), 6)
        assert result.ok.all() and result.outputs["probability"].shape == (6, 1)

    asyncio.run(run())
    assert max(sizes) <= 2
