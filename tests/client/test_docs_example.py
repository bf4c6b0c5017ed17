"""docs/client.md's example service runs as written against the local stack and a real gateway."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kafka_helpers import read_topic

pytestmark = pytest.mark.stack

DOC = Path(__file__).resolve().parents[2] / "docs" / "client.md"


def example() -> str:
    blocks = re.findall(r"```python\n(# example-service\n.*?)```", DOC.read_text(), re.DOTALL)
    assert len(blocks) == 1, "docs/client.md must hold one ```python block starting with # example-service"
    return blocks[0]


async def test_the_example_service_runs(stack, topics, gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import create_topics

    await create_topics(stack.kafka, [f"{topics.prefix}.replies.example"], partitions=1)
    script = tmp_path / "service.py"
    script.write_text(example().replace('"churn"', '"churn"'))
    env = {**os.environ, "BANDITGATE_KAFKA": stack.kafka, "EXAMPLE_TOPIC_PREFIX": topics.prefix}
    # the example as a service runs it: its own process (a thread keeps the test's loop free)
    done = await asyncio.to_thread(subprocess.run, [sys.executable, str(script)], capture_output=True, text=True,
                                   env=env, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "served 10" in done.stdout
    outcomes = await read_topic(stack.kafka, topics.topics.outcomes, 10, timeout_s=30)
    assert len(outcomes) == 10
