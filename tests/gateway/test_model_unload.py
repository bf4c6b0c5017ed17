"""A `latest` version superseded by a newer one is unloaded: the repository forgets it once the new
one serves (unless a route pins it), and the dataplane drops its batcher - the last reference to
its ONNX Runtime session - only after the rows queued or running on it are answered."""

from __future__ import annotations

import asyncio
import gc
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from banditgate.config import ModelsConfig, parse_config
from gateway.dataplane import Dataplane
from gateway.models.onnx_runtime import OnnxModel
from gateway.models.repository import ModelRepository
from loadtests.models import build_mlp, write_repository

SETTINGS = ModelsConfig(warmup_rows=1, poll_interval_s=0)
WIDTH = 4


def _config(repository: Path, versions: list[object], delay_us: int = 0):  # type: ignore[no-untyped-def]
    return parse_config({
        "models": {"repository": str(repository), "poll_interval_s": 0},
        "batching": {"max_batch_size": 64, "max_delay_us": delay_us, "inline_max_us": 0,
                     "idle_flush": delay_us == 0},  # a delay given is one a lone row must wait
        "routes": [{"name": f"r{i}", "policy": "fixed", "arms": [{"name": "a", "model": "m", "version": v}]}
                   for i, v in enumerate(versions)]}, env={})


def test_scan_forgets_a_superseded_latest_unless_a_route_pins_it(tmp_path: Path) -> None:
    repository = write_repository(tmp_path / "models", {"m": {1: 1}}, n_features=WIDTH)
    repo = ModelRepository(repository, SETTINGS, [("m", "latest")])
    repo.load_all()
    first = repo.get("m", "latest")
    build_mlp(repository / "m" / "2" / "model.onnx", n_features=WIDTH, seed=2)
    repo.scan()
    assert [m.key for m in repo.loaded()] == ["m:2"]
    assert repo.take_retired() == [first] and repo.take_retired() == []
    build_mlp(repository / "m" / "3" / "model.onnx", n_features=WIDTH, seed=3)
    pinned = ModelRepository(repository, SETTINGS, [("m", "latest"), ("m", 2)])
    pinned.load_all()
    assert sorted(m.key for m in pinned.loaded()) == ["m:2", "m:3"]
    build_mlp(repository / "m" / "4" / "model.onnx", n_features=WIDTH, seed=4)
    pinned.scan()
    assert sorted(m.key for m in pinned.loaded()) == ["m:2", "m:4"]  # 2 is pinned by a route: kept
    assert [m.key for m in pinned.take_retired()] == ["m:3"]
    pinned.scan()
    assert pinned.take_retired() == []  # nothing flaps back and forth


async def test_superseded_version_freed_only_after_its_in_flight_rows_are_answered(tmp_path: Path) -> None:
    repository = write_repository(tmp_path / "models", {"m": {1: 1}}, n_features=WIDTH)
    config = _config(repository, ["latest"], delay_us=300_000)  # a lone row waits 0.3 s for company
    repo = ModelRepository(repository, SETTINGS, [("m", "latest")])
    repo.load_all()
    with ThreadPoolExecutor(max_workers=1) as executor:
        dataplane = Dataplane(config, repo, executor)
        retired: list[str] = []
        dataplane.on_retired.append(lambda model: retired.append(model.key))
        old = repo.get("m", "latest")
        old_ref: weakref.ref[OnnxModel] = weakref.ref(old)
        pending = dataplane.batcher(old).submit({"input": np.zeros((1, WIDTH), dtype=np.float32)}, 1)
        del old
        build_mlp(repository / "m" / "2" / "model.onnx", n_features=WIDTH, seed=2)
        await asyncio.to_thread(repo.scan)
        assert dataplane.collect_retired() == 1
        await asyncio.sleep(0.1)
        assert "m:1" in dataplane.batchers and retired == []  # its row is still queued
        result = await pending
        assert result.ok.all()  # answered by version 1, which it was sent to
        for _ in range(100):
            if retired:
                break
            await asyncio.sleep(0.05)
        assert retired == ["m:1"] and "m:1" not in dataplane.batchers
        del pending, result
        gc.collect()
        assert old_ref() is None  # nothing refers to version 1 any more: its session is freed
        assert repo.get("m", "latest").version == 2
