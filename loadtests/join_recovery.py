"""How long a feedback worker takes to recover its join table after a restart or a rebalance.

`python -m loadtests.join_recovery OUT.json [N ...] [--rocksdb]` (development; docs/feedback.md
quotes its numbers). On a Kafka and Redis of its own (the fault suite's `OwnStack`), for each N:
N predictions that no outcome answers go to fresh topics, a worker with a budget larger than N
consumes them (its changelog then holds N entries), it is SIGKILLed, and a new worker is timed
from its start to its ready line (logged once faust recovered the changelog and the worker
indexed its partitions). The same is timed on an empty changelog; the difference is the
recovery. With `--rocksdb` the store is on disk: the new worker is timed on the same disk (faust
reads only the changelog after the offset it stored) and on an empty folder (another machine:
everything is read and indexed again), and the folder's size gives the bytes per entry on disk.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from loadtests.faults.harness import FeedbackProc, OwnStack, create_topics, feedback_config
from loadtests.faults.join_memory import PARTITIONS, _committed, _end_offsets, produce


def _say(message: str) -> None:
    print(f"join recovery: {message}", file=sys.stderr, flush=True)


async def _timed_start(proc: FeedbackProc, timeout_s: float = 1800.0) -> float:
    started = time.monotonic()
    proc.spawn()
    await proc.wait_ready(timeout_s)
    return time.monotonic() - started


def _disk_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=False).stdout  # noqa: S603,S607
    return int(out.split()[0]) if out else 0


async def measure(stack: OwnStack, work: Path, n: int, rocksdb: bool) -> dict[str, Any]:
    from aiokafka.admin import AIOKafkaAdminClient

    prefix = f"rec-{n}-{uuid.uuid4().hex[:6]}"
    topics = await create_topics(stack.kafka, prefix, PARTITIONS)
    config = feedback_config(kafka=stack.kafka, redis=stack.redis, topics=topics, app_id=f"{prefix}-fb",
                             redis_prefix=prefix, join_ttl_s=7 * 86400.0)
    config["feedback"].update(join_max_bytes=64 * 2**30, partitions=PARTITIONS)
    if rocksdb:
        config["feedback"].update(join_store="rocksdb", join_store_dir=str(work / f"{prefix}-disk"))
    worker = FeedbackProc(f"{prefix}-worker", config, work)
    result: dict[str, Any] = {"entries": n, "store": "rocksdb" if rocksdb else "memory"}
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.kafka)
    await admin.start()
    try:
        result["first_start_s"] = round(await _timed_start(worker), 2)
        if n:
            result["produce_s"] = round(await produce(stack.kafka, topics["predictions"], n), 1)
            ends = await _end_offsets(stack.kafka, topics["predictions"])
            started = time.monotonic()
            while time.monotonic() - started < 1800:
                committed = await _committed(admin, f"{prefix}-fb", topics["predictions"])
                if all(committed.get(p, 0) >= end for p, end in ends.items()):
                    break
                await asyncio.sleep(1.0)
            result["consume_s"] = round(time.monotonic() - started, 1)
            await asyncio.sleep(3.0)  # the last batch's changelog and the sweep
        result["rss_before_mb"] = worker.rss_mb()
        worker.kill()
        if rocksdb:
            result["disk_bytes"] = _disk_bytes(work / f"{prefix}-disk")
            result["same_disk_start_s"] = round(await _timed_start(worker), 2)
            worker.kill()
            config["feedback"]["join_store_dir"] = str(work / f"{prefix}-disk-2")
            worker = FeedbackProc(f"{prefix}-worker-2", config, work)
        result["restart_s"] = round(await _timed_start(worker), 2)
        result["rss_after_mb"] = worker.rss_mb()
        worker.terminate()
    finally:
        worker.kill()
        await admin.close()
    return result


async def main(out: Path, sizes: list[int], rocksdb: bool) -> None:
    root = Path(tempfile.mkdtemp(prefix="join-recovery-"))
    stack = OwnStack(root / "stack")
    work = root / "work"
    work.mkdir(parents=True)
    results = []
    try:
        await asyncio.to_thread(stack.up, _say)
        for n in [0, *sizes]:
            result = await measure(stack, work, n, rocksdb)
            _say(json.dumps(result))
            results.append(result)
    finally:
        await asyncio.to_thread(stack.down)
        shutil.rmtree(root, ignore_errors=True)
    base = results[0]["restart_s"]
    for result in results:
        result["recovery_s"] = round(result["restart_s"] - base, 2)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    asyncio.run(main(Path(args[0]), [int(a) for a in args[1:]] or [250_000, 1_000_000], "--rocksdb" in sys.argv))
