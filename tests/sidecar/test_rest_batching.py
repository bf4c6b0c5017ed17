"""REST infer requests that arrive in one turn of the event loop share a batch (one ONNX Runtime
run), as the gRPC hand-off's bursts do: each used to be flushed alone on the idle model (an
inline run of one row per request), which was most of a REST request's server CPU under load.
Real ONNX Runtime, the real ASGI app; no Kafka (publish is collected)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import orjson

from banditgate.config import ModelsConfig, parse_config
from gateway.dataplane import Dataplane
from gateway.models.repository import ModelRepository
from gateway.transport.http import SidecarContext, build_app
from loadtests.models import build_mlp

WIDTH = 4
REQUESTS = 8


async def _post(app, path: str, body: bytes) -> tuple[int, bytes]:  # type: ignore[no-untyped-def]
    sent: list[dict] = []
    chunks = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": [(b"content-length", str(len(body)).encode())],
             "scheme": "http", "query_string": b"", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    await app(scope, receive, send)
    return sent[0]["status"], sent[1]["body"]


async def test_requests_started_in_one_loop_turn_share_one_run(tmp_path: Path) -> None:
    root = tmp_path / "models"
    build_mlp(root / "m" / "1" / "model.onnx", n_features=WIDTH, hidden=8, seed=1)
    config = parse_config({
        "models": {"repository": str(root), "poll_interval_s": 0},
        "batching": {"max_batch_size": 64, "max_delay_us": 200, "inference_threads": 1},
        "routes": [{"name": "r", "policy": "fixed", "arms": [{"name": "a", "model": "m", "version": 1}]}]}, env={})
    repo = ModelRepository(root, ModelsConfig(warmup_rows=0, poll_interval_s=0), [("m", 1)])
    repo.load_all()
    batches: list[int] = []
    published: list[tuple[str, list]] = []
    with ThreadPoolExecutor(max_workers=1) as executor:
        dataplane = Dataplane(config, repo, executor, rng=np.random.default_rng(0),
                              on_batch=lambda _model, rows, _waited, _run: batches.append(rows))
        ctx = SidecarContext(config=config, dataplane=dataplane,
                             publish=lambda topic, events, trace=None: published.append((topic, events)),
                             produce_outcomes=None, is_ready=lambda: True)  # type: ignore[arg-type]
        app = build_app(ctx)
        rows = np.random.default_rng(3).standard_normal((REQUESTS, WIDTH)).round(4).tolist()
        bodies = [orjson.dumps({"id": f"q{i}", "inputs": [{"name": "input", "shape": [1, WIDTH], "datatype": "FP32",
                                                           "data": row}]}) for i, row in enumerate(rows)]
        await _post(app, "/v2/models/r/infer", bodies[0])  # alone: a batch of its own
        assert batches == [1]
        answers = await asyncio.wait_for(asyncio.gather(*(_post(app, "/v2/models/r/infer", b) for b in bodies)), 30)
    assert [status for status, _ in answers] == [200] * REQUESTS
    assert [orjson.loads(body)["id"] for _, body in answers] == [f"q{i}" for i in range(REQUESTS)]
    assert batches[1:] == [REQUESTS], batches  # all eight in one run, not eight runs of one row
    # every request's prediction event is still published, under its own id
    ids = [event["request_id"] for _topic, events in published for event in events]
    assert ids == ["q0"] + [f"q{i}" for i in range(REQUESTS)]
    assert ctx.in_flight == 0
