"""The request timeout: a request the models cannot answer in `server.request_timeout_s` gets 504 on
REST and DEADLINE_EXCEEDED on gRPC (the other limits are in test_tls_http_grpc.py; Kafka's event
size limit dead-letters with reason `oversize` in test_kafka_sasl_ssl.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import orjson
import pytest

from banditgate.config import parse_config
from tests.gateway.support import start_gateway
from tests.security.conftest import N_FEATURES

pytestmark = pytest.mark.stack


async def test_security_limits_request_timeout_is_504_and_deadline_exceeded(stack, topics, security_repository,  # type: ignore[no-untyped-def]
                                                                             redis_prefix) -> None:
    config = parse_config({
        "kafka": {"bootstrap_servers": stack.kafka, "group_id": f"lim-{topics.prefix}", "topics": topics.topics.model_dump()},
        "redis": {"url": stack.redis, "key_prefix": redis_prefix},
        "models": {"repository": str(security_repository), "poll_interval_s": 0, "warmup_rows": 1},
        # a lone row waits up to 0.5 s for company in its batch: far past the 20 ms timeout
        # (idle_flush off: an idle model would otherwise run the lone row at once)
        "batching": {"max_batch_size": 64, "max_delay_us": 500_000, "idle_flush": False},
        "server": {"http_port": 0, "grpc_port": 0, "request_timeout_s": 0.02},
        "routes": [{"name": "churn", "policy": "fixed",
                    "arms": [{"name": "a", "model": "m-a", "version": 1}, {"name": "b", "model": "m-b", "version": 1}]}],
    }, env={})
    running = await start_gateway(config)
    try:
        gateway = running.gateway
        import httpx

        body = orjson.dumps({"inputs": [{"name": "input", "shape": [1, N_FEATURES], "datatype": "FP32",
                                         "data": [0.5] * N_FEATURES}]})
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=10) as client:
            response = await client.post("/v2/models/churn/infer", content=body)
        assert response.status_code == 504 and "0.02" in response.json()["error"], response.text

        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        def grpc_call() -> str:
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{gateway.grpc_port}")
            inputs = [grpcclient.InferInput("input", [1, N_FEATURES], "FP32")]
            inputs[0].set_data_from_numpy(np.full((1, N_FEATURES), 0.5, dtype=np.float32))
            try:
                client.infer("churn", inputs)
            except InferenceServerException as exc:
                return str(exc)
            finally:
                client.close()
            return "answered"

        assert "DEADLINE_EXCEEDED" in await asyncio.to_thread(grpc_call)
    finally:
        assert await running.stop() == 0
