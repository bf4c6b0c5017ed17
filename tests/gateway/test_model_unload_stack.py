"""On a running gateway, a `latest` model's new version takes over and the old one is unloaded: its
batcher is gone and every metric series labelled with it (loaded, queue depth, batch histograms)
disappears from /metrics, while the new version answers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import orjson
import pytest

from loadtests.models import build_mlp
from tests.gateway.support import N_FEATURES, gateway_config, start_gateway

pytestmark = pytest.mark.stack


def _series_of(registry, model: str, version: str) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted({sample.name for family in registry.collect() for sample in family.samples
                   if sample.labels.get("model") == model and sample.labels.get("version") == version})


async def test_superseded_latest_version_is_unloaded_with_its_metrics(stack, topics, repository: Path,
                                                                      redis_prefix) -> None:  # type: ignore[no-untyped-def]
    running = await start_gateway(gateway_config(stack, topics, repository, redis_prefix))
    gateway = running.gateway
    body = orjson.dumps({"inputs": [{"name": "input", "shape": [1, N_FEATURES], "datatype": "FP32",
                                     "data": [0.5] * N_FEATURES}]})
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=10) as http:
            for _ in range(5):  # m-c is the fixed route's shadow at version `latest`
                answer = await http.post("/v2/models/m-c/infer", content=body)
                assert answer.status_code == 200 and answer.json()["model_version"] == "1"
            await asyncio.sleep(1.5)  # the queue-depth gauge is exported every second
            assert "banditgate_batch_size_rows_count" in _series_of(gateway.registry, "m-c", "1")
            assert "banditgate_model_loaded" in _series_of(gateway.registry, "m-c", "1")
            build_mlp(repository / "m-c" / "2" / "model.onnx", n_features=N_FEATURES, seed=7)
            for _ in range(200):  # the repository is polled every 0.2 s
                if "m-c:1" not in gateway.dataplane.batchers and not _series_of(gateway.registry, "m-c", "1"):
                    break
                await asyncio.sleep(0.05)
            assert [m.key for m in gateway.repository.loaded() if m.name == "m-c"] == ["m-c:2"]
            assert "m-c:1" not in gateway.dataplane.batchers
            assert _series_of(gateway.registry, "m-c", "1") == []
            answer = await http.post("/v2/models/m-c/infer", content=body)
            assert answer.status_code == 200 and answer.json()["model_version"] == "2"
            await asyncio.sleep(1.5)
            assert _series_of(gateway.registry, "m-c", "1") == []  # not exported again
            assert "banditgate_model_loaded" in _series_of(gateway.registry, "m-c", "2")
    finally:
        assert await running.stop() == 0
