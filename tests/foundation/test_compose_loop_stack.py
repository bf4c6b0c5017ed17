"""What `docker compose up` runs, on the local stack instead of containers: the gateway with the
compose config serving the shipped example models, and the compose traffic generator sending
requests and an outcome for every prediction."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from banditgate.config import parse_config
from demo.compose_traffic import load_rows, run
from tests.processes import start_serve

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[2]
REQUESTS = 200


async def test_compose_config_serves_the_example_models_and_the_traffic_loop_closes(
        stack, topics, redis_prefix, tmp_path: Path) -> None:
    document = yaml.safe_load((ROOT / "deploy/config/banditgate.yaml").read_text())
    document["models"]["repository"] = str(ROOT / "deploy/models")
    document["server"] = {"host": "127.0.0.1"}  # start_serve picks free ports
    document["kafka"] = {"bootstrap_servers": stack.kafka, "group_id": f"{topics.prefix}-gateway",
                         "topics": topics.topics.model_dump()}
    document["redis"] = {"url": stack.redis, "key_prefix": redis_prefix}
    serve = start_serve(document, tmp_path, timeout_s=300)
    try:
        config = parse_config(document, env={})
        rows = load_rows(ROOT / "deploy/traffic/pool.csv")
        lines: list[str] = []
        counts = await run(config, rows, route="diagnosis", input_name="features", rate_rps=100.0, duration_s=60.0,
                           count=REQUESTS, outcome_delay_s=0.05, seed=3, say=lines.append)
    finally:
        # not asserting the exit status: the gateway's shutdown has its own tests, and today a
        # drift calibration still running in a worker thread can hold the exit back past the grace
        serve.stop(timeout_s=10)
    assert (counts.sent, counts.predictions, counts.outcomes, counts.forgotten) == (REQUESTS, REQUESTS, REQUESTS, 0)
    # three arms that are right on most held-out rows (the gradient boosting on ~95%)
    assert counts.rewarded > REQUESTS // 2
    assert lines[-1].endswith("(done)")
