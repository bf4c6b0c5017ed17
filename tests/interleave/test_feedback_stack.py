"""Interleaving closed on the real stack: ranking requests through `banditgate serve`, merged lists
out, clicks back as outcomes, the feedback worker crediting them; the pair counts in Redis are
exactly the expected ones, redelivered outcomes count once (also after a SIGKILL and a new worker
re-reading what was not committed), the test's verdict is one promote and one reject alert, and
the worker's metrics show the counts."""

from __future__ import annotations

import asyncio
import copy
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import redis.asyncio as aredis

from feedback.ledger import FeedbackKeys, Ledger, LedgerPlanner
from feedback.pairs import Pairs
from feedback.sinks import RedisSink
from loadtests.models import write_repository
from router.stats_store import ArmStatsStore
from tests.conftest import delete_topics
from tests.feedback.worker_helpers import WorkerProcess, wait_until
from tests.kafka_helpers import produce, read_topic
from tests.processes import free_port, start_serve, write_config

pytestmark = pytest.mark.stack

N_FEATURES = 8
N_REQUESTS = 300
K = 5


MODELS = {"x": "m-b", "y": "m-c", "z": "m-a"}


def config_for(stack: Any, topics: Any, repository: Path, redis_prefix: str, unique: str, metrics_port: int,
               method: str, arms: list[str]) -> dict[str, Any]:
    return {
        # the broker's minimum session: a killed worker's partitions move on 6 s later
        "kafka": {"bootstrap_servers": stack.kafka, "group_id": f"il-{unique}", "topics": topics.topics.model_dump(),
                  "session_timeout_ms": 6000},
        "redis": {"url": stack.redis, "key_prefix": redis_prefix, "snapshot_refresh_ms": 200},
        "models": {"repository": str(repository), "poll_interval_s": 0, "warmup_rows": 1},
        "batching": {"max_batch_size": 64, "max_delay_us": 1000},
        "server": {"host": "127.0.0.1"},
        "feedback": {"app_id": f"il-fb-{unique}", "web_port": metrics_port, "flush_interval_s": 0.05,
                     "quality_window_s": 60, "join_ttl_s": 600, "promote_confidence": 0.95},
        "routes": [{"name": "search", "policy": "interleave", "method": method, "k": K,
                    "arms": [{"name": arm, "model": MODELS[arm], "version": 1} for arm in arms]}],
    }


def simulated_clicks(prediction: dict[str, Any], rng: np.random.Generator) -> list[str]:
    """Users like x's results (click chance 0.7) more than y's (0.25); some abandon (no click),
    some click a result twice or an item that was not shown."""
    if rng.random() < 0.15:
        return []
    outputs = prediction["outputs"]
    clicks = [item for item, team in zip(outputs["items"], outputs["teams"])
              if rng.random() < (0.7 if team == "x" else 0.25)]
    if clicks and rng.random() < 0.2:
        clicks.append(clicks[0])
    if rng.random() < 0.1:
        clicks.insert(0, "not-shown")
    return list(rng.permutation(clicks)) if clicks else []


def expected_pairs(predictions: list[dict[str, Any]], clicks: dict[str, list[str]], arms: list[str]
                   ) -> dict[str, float]:
    """The pair hash the worker must build, tallied here independently of feedback/pairs.py."""
    fields: Counter[str] = Counter()
    for prediction in predictions:
        outputs = prediction["outputs"]
        team_of = dict(zip(outputs["items"], outputs["teams"]))
        chosen = clicks[prediction["request_id"]]
        credited = Counter(team_of[item] for item in set(chosen) if item in team_of)
        for i, a in enumerate(arms):
            fields[f"{a}|clicks"] += credited[a]
            for b in arms[i + 1:]:
                fields[f"{a}|{b}|" + ("win" if credited[a] > credited[b] else
                                      "loss" if credited[a] < credited[b] else "tie")] += 1
        fields["clicks_unshown"] += sum(1 for item in chosen if item not in team_of)
        fields["impressions"] += 1
    return {name: float(value) for name, value in fields.items() if value}


async def wait_for_assignment(gateway: Any, topic: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while f"{topic}[" not in gateway.log():
        assert time.monotonic() < deadline, f"no partitions of {topic} assigned:\n{gateway.log()[-2000:]}"
        await asyncio.sleep(0.2)


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:  # noqa: S310 - loopback
        text = response.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("banditgate_interleave_")}


@pytest.mark.parametrize(("method", "arms"), [("team_draft", ["x", "y"]), ("multileave", ["x", "y", "z"])])
async def test_clicks_on_served_lists_become_exact_pair_counts_and_one_verdict(
        stack, topics, redis_prefix, unique, tmp_path: Path, method: str, arms: list[str]) -> None:  # type: ignore[no-untyped-def]
    repository = write_repository(tmp_path / "models", {"m-a": {1: 1}, "m-b": {1: 2}, "m-c": {1: 3}},
                                  n_features=N_FEATURES)
    metrics_port = free_port()
    config = config_for(stack, topics, repository, redis_prefix, unique, metrics_port, method, arms)
    worker_config = write_config(tmp_path / "feedback.yaml", copy.deepcopy(config))
    worker = WorkerProcess(worker_config, tmp_path / "feedback.log").start()
    gateway = None
    client = aredis.Redis.from_url(stack.redis)
    pairs_key = f"{redis_prefix}:{{search}}:fb:pairs"
    rng = np.random.default_rng(11)
    try:
        gateway = start_serve(config, tmp_path)
        await wait_for_assignment(gateway, topics.topics.requests)
        requests = []
        for i in range(N_REQUESTS):
            n = 8 if i % 7 else 3  # some requests have fewer candidates than k
            rows = rng.normal(size=(n, N_FEATURES)).round(4).tolist()
            requests.append((f"q{i}".encode(), orjson.dumps({"request_id": f"q{i}", "route": "search",
                                                             "items": [f"d{i}-{j}" for j in range(n)],
                                                             "inputs": {"input": rows}})))
        await produce(stack.kafka, topics.topics.requests, requests)
        predictions = await read_topic(stack.kafka, topics.topics.predictions, N_REQUESTS, timeout_s=90, settle_s=0.5)
        assert sorted(p["request_id"] for p in predictions) == sorted(f"q{i}" for i in range(N_REQUESTS))
        assert {team for p in predictions for team in p["outputs"]["teams"]} == set(arms)
        assert {p["method"] for p in predictions} == {method}

        clicks = {p["request_id"]: simulated_clicks(p, rng) for p in predictions}
        outcomes = [(rid.encode(), orjson.dumps({"request_id": rid, "clicks": chosen, "ts": time.time()}))
                    for rid, chosen in clicks.items()]
        redelivered = outcomes[::10]  # the same events again, as a producer retry or a replayed source would
        await worker.wait_ready()
        await produce(stack.kafka, topics.topics.outcomes, outcomes[: N_REQUESTS // 2])
        await produce(stack.kafka, topics.topics.outcomes, redelivered[:10] + outcomes[N_REQUESTS // 2:])
        await produce(stack.kafka, topics.topics.outcomes, redelivered)
        expected = expected_pairs(predictions, clicks, arms)
        assert expected["x|y|win"] > 2 * expected.get("x|y|loss", 0) and expected.get("x|y|tie", 0) > 0

        def duplicates_counted(n: int) -> Any:
            async def check() -> bool:
                counts = await client.hgetall(f"{redis_prefix}:{{search}}:fb:counts")
                return counts.get(b"duplicate") == str(n).encode()
            return check

        await wait_until(duplicates_counted(10 + len(redelivered)), 90, "every outcome and redelivery processed",
                         worker, interval_s=0.1)
        worker.kill()  # likely before its next offset commit: the next worker re-reads some events
        raw = await client.hgetall(pairs_key)
        assert {k.decode(): float(v) for k, v in raw.items()} == expected
        worker = WorkerProcess(worker_config, tmp_path / "feedback.log").start()
        await worker.wait_ready()
        await produce(stack.kafka, topics.topics.outcomes, redelivered)
        await wait_until(duplicates_counted(10 + 2 * len(redelivered)), 90, "the second redelivery processed", worker)
        raw = await client.hgetall(pairs_key)
        assert {k.decode(): float(v) for k, v in raw.items()} == expected
        counts = await client.hgetall(f"{redis_prefix}:{{search}}:fb:counts")
        assert counts[b"joined"] == str(N_REQUESTS).encode()

        alerts = await read_topic(stack.kafka, topics.topics.alerts, len(arms), timeout_s=30, settle_s=3.0)
        # x is preferred to every other ranker; the others lose to x (whatever they do between them)
        assert sorted((a["kind"], a["arm"]) for a in alerts) == [("promote", "x")] + [("reject", a) for a in arms[1:]]
        promote = next(a for a in alerts if a["kind"] == "promote")
        assert promote["route"] == "search" and promote["model_version"] == 1 and promote["value"] >= promote["threshold"]
        assert promote["details"]["against"]["y"]["wins"] == expected["x|y|win"]

        metrics = scrape(metrics_port)
        labels = '{arm_a="x",arm_b="y",route="search"}'
        assert metrics[f"banditgate_interleave_pair_wins{labels}"] == expected["x|y|win"]
        assert metrics[f"banditgate_interleave_pair_losses{labels}"] == expected.get("x|y|loss", 0.0)
        assert metrics[f"banditgate_interleave_pair_ties{labels}"] == expected.get("x|y|tie", 0.0)
        assert metrics[f"banditgate_interleave_pair_log_evidence{labels}"] >= \
            metrics[f"banditgate_interleave_pair_evidence_threshold{labels}"] == pytest.approx(np.log(20 * len(arms)
                                                                                                     * (len(arms) - 1) / 2))
        assert metrics['banditgate_interleave_verdict{arm="x",route="search"}'] == 1.0
        assert all(metrics[f'banditgate_interleave_verdict{{arm="{a}",route="search"}}'] == -1.0 for a in arms[1:])
    finally:
        if gateway is not None:
            assert gateway.stop() == 0, gateway.log()[-2000:]
        worker.stop(timeout_s=20)
        await delete_topics(stack.kafka, [f"il-fb-{unique}-join-changelog"])
        keys = [key async for key in client.scan_iter(match=f"{redis_prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def test_a_replayed_batch_of_pair_effects_counts_once(stack, redis_prefix) -> None:  # type: ignore[no-untyped-def]
    """The crash window: effects applied to Redis, the worker dies before it records the join, the
    events are replayed and their effects applied again. The ledger's per-request token makes the
    second application add nothing, also when the first one landed only in part."""
    client = aredis.Redis.from_url(stack.redis)
    keys = FeedbackKeys(redis_prefix)
    sink = RedisSink(ArmStatsStore(client, prefix=redis_prefix), Ledger(client, keys, 3600),
                     LedgerPlanner(keys, 60.0, chunk_items=7))
    effects = [Pairs("search", f"q{i}", {"impressions": 1.0, f"x|y|{('win', 'loss', 'tie')[i % 3]}": 1.0,
                                          "x|clicks": float(i % 2)}, 1.0) for i in range(50)]
    try:
        await sink.apply(effects[:20])
        await sink.apply(effects)
        await sink.apply(effects[::-1])
        raw = await client.hgetall(keys.pairs("search"))
        assert {k.decode(): float(v) for k, v in raw.items()} == {
            "impressions": 50.0, "x|y|win": 17.0, "x|y|loss": 17.0, "x|y|tie": 16.0, "x|clicks": 25.0}
    finally:
        found = [key async for key in client.scan_iter(match=f"{redis_prefix}:*", count=1000)]
        if found:
            await client.delete(*found)
        await client.aclose()
