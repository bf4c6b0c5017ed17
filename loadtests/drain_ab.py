"""Drain throughput A/B between source trees: `python -m loadtests.drain_ab N ROUNDS ROOT[+noce] ...`

Each run starts `banditgate serve` (`python -m banditgate.cli serve` with PYTHONPATH=ROOT, so any
checkout or worktree can be compared) on a fresh topic set holding N preloaded requests (the
`bench kafka` route: two arms, one shadow) and reports requests/s from the outputs' broker
timestamps; the roots alternate (A B, then B A, ...) so that they meet the same machine. `+noce`
sets `kafka.cloudevents: false`. Starts (or reuses) the local stack."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import yaml

from banditgate.stack import Stack
from loadtests.bench_kafka import N_FEATURES, ROUTE, _gateway_config
from loadtests.kafka_harness import (
    create_topics,
    delete_topics,
    output_timestamps,
    preload,
    progress,
    request_payloads,
    throughput_from_stamps,
    topic_names,
)
from loadtests.models import build_mlp


async def _one(root: str, n: int, work: Path, bootstrap: str, redis_url: str, cloudevents: bool) -> float:
    prefix = f"ab-{uuid.uuid4().hex[:6]}"
    topics = topic_names(prefix)
    await create_topics(bootstrap, list(topics.values()))
    try:
        await preload(bootstrap, topics["requests"], request_payloads(n, N_FEATURES, ROUTE, prefix="p"))
        path = _gateway_config(work, bootstrap, redis_url, topics, f"{prefix}-g", name=f"{prefix}.yaml")
        config = yaml.safe_load(path.read_text())
        if not cloudevents:  # (older trees know no such setting: they had no CloudEvents headers)
            config["kafka"]["cloudevents"] = False
        path.write_text(yaml.safe_dump(config))
        with open(work / f"{prefix}.log", "wb") as log:
            process = subprocess.Popen([sys.executable, "-m", "banditgate.cli", "serve", "-c", str(path)],  # noqa: S603
                                       cwd=root, env={**os.environ, "PYTHONPATH": root}, stdout=log,
                                       stderr=subprocess.STDOUT)
        try:
            stamps = await output_timestamps(bootstrap, topics["predictions"], n, timeout_s=max(60.0, n / 500))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
        return throughput_from_stamps(stamps)
    finally:
        await delete_topics(bootstrap, list(topics.values()))


async def _main(n: int, rounds: int, roots: list[str]) -> None:
    addresses = Stack.default().up(progress)
    work = Path(tempfile.mkdtemp(prefix="drain-ab-"))
    for name, seed in (("bench-a", 1), ("bench-b", 2), ("bench-c", 3)):
        build_mlp(work / "models" / name / "1" / "model.onnx", n_features=N_FEATURES, hidden=64, seed=seed)
    results: dict[str, list[float]] = {root: [] for root in roots}
    for i in range(rounds):
        for entry in roots if i % 2 == 0 else roots[::-1]:
            root, _, options = entry.partition("+")
            rps = await _one(str(Path(root).resolve()), n, work, addresses.kafka, addresses.redis,
                             cloudevents="noce" not in options)
            results[entry].append(rps)
            progress(f"{entry}: {rps:,.0f} requests/s (load {os.getloadavg()[0]:.2f})")
    for entry, values in results.items():
        print(f"{entry}: median {statistics.median(values):,.0f} requests/s, runs {[round(v) for v in values]}")


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit("usage: python -m loadtests.drain_ab N ROUNDS ROOT[+noce] [ROOT[+noce] ...]")
    asyncio.run(_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]))
