"""Publication refused or transactions broken: outputs too large for their topic, exactly-once
through a broker restart, exactly-once with transactions aborted under it.

* `oversize_output`: the predictions topic takes 64 KiB batches (an operator's setting, made
  here from outside with AlterConfigs); among steady traffic, ranking requests with long item
  ids make predictions of ~90 kB (the shown list and each arm's ranking: about 3x the request's
  item ids). Those requests must be dead-lettered (`output_too_large`, the request as payload),
  every other one answered exactly once: before, the broker refused the batch and the loop
  rewound forever, republishing the batch's other predictions every cycle.
* `eos_broker_restart`: `broker_restart` (outages.py) with `delivery: exactly_once`.
* `eos_txn_abort`: exactly-once under load while the transaction coordinator aborts the
  gateway's open transactions and fences its producers, again and again. The mechanism is
  Kafka's own, from outside the process: an InitProducerId for one of the gateway's
  transactional ids (what a new owner of the partition, or a zombie, sends) makes the
  coordinator abort the open transaction and bump the epoch, exactly as a transaction timeout
  does. The gateway still owns the partition: it must re-acquire its producer, seek back and
  serve the batch again, with nothing lost or repeated (read_committed), and never stall.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from loadtests.faults import outages
from loadtests.faults.context import Context, GatewayScene
from loadtests.faults.harness import ARMS, FEATURE_RANGE, N_FEATURES, route_config
from loadtests.faults.readback import delivery
from loadtests.faults.traffic import SteadyLoad

RANK_ROUTE = "rank"
TOPIC_LIMIT = 64 * 1024
"""max.message.bytes of the oversize scenario's predictions topic."""


def rank_route(k: int) -> dict[str, Any]:
    return {"name": RANK_ROUTE, "policy": "interleave", "method": "team_draft", "k": k,
            "arms": [{"name": arm, "model": model, "version": version} for arm, (model, version) in ARMS.items()]}


def ranking_request(request_id: str, items: list[str], rng: np.random.Generator) -> bytes:
    rows = rng.uniform(FEATURE_RANGE[0] / 10, FEATURE_RANGE[1] / 10, (len(items), N_FEATURES)).round(3).tolist()
    return orjson.dumps({"request_id": request_id, "route": RANK_ROUTE, "items": items, "inputs": {"input": rows}})


async def set_topic_config(bootstrap: str, topic: str, configs: dict[str, str]) -> None:
    """Change a topic's configuration as an operator would, and wait until the broker reports it."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs)])
        for _ in range(100):
            (response,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic,
                                                                       dict.fromkeys(configs))])
            reported = {entry[0]: entry[1] for entry in response.resources[0][4]}
            if all(reported.get(k) == v for k, v in configs.items()):
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{topic}: the broker never reported {configs}")
    finally:
        await admin.close()


async def _send_ranking(bootstrap: str, topic: str, requests: list[tuple[str, bytes]], spread_s: float) -> None:
    """Send the ranking requests spread over `spread_s` seconds (among the steady load)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, linger_ms=2,
                                max_request_size=8 * 1024 * 1024)
    await producer.start()
    try:
        pause = spread_s / max(1, len(requests))
        futures = []
        for request_id, value in requests:
            futures.append(await producer.send(topic, key=request_id.encode(), value=value))
            await asyncio.sleep(pause)
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def oversize_output(ctx: Context) -> dict[str, Any]:
    n, rate, oversize, small = ctx.pick((4000, 800, 40, 100), (20_000, 1500, 200, 500))
    k = 200
    scene = await GatewayScene.create(ctx, "oversize_output", routes=[route_config(), rank_route(k)])
    await set_topic_config(ctx.kafka, scene.topics["predictions"], {"max.message.bytes": str(TOPIC_LIMIT)})
    rng = np.random.default_rng(11)
    ranking: list[tuple[str, bytes]] = []
    for i in range(oversize):  # 200 ids of 150 characters: the prediction holds them ~3 times (~90 kB)
        ranking.append((f"big-{i}", ranking_request(f"big-{i}", [f"{i}-{j}-" + "i" * 150 for j in range(k)], rng)))
    for i in range(small):
        ranking.append((f"rank-{i}", ranking_request(f"rank-{i}", [f"r{i}-{j}" for j in range(30)], rng)))
    order = rng.permutation(len(ranking))
    ranking = [ranking[i] for i in order]
    big = {f"big-{i}" for i in range(oversize)}
    ranked = {f"rank-{i}" for i in range(small)}
    try:
        (gateway,) = await scene.start_replicas(1)
        load = SteadyLoad(ctx.kafka, scene.topics["requests"], tag="oversize", n=n, rate_rps=rate)
        sending = asyncio.get_running_loop().create_task(load.run())
        await _send_ranking(ctx.kafka, scene.topics["requests"], ranking, spread_s=0.8 * n / rate)
        await sending
        drain_s = await scene.drain(set(load.ids()) | big | ranked, timeout_s=ctx.pick(120, 300))
        result = delivery(load.order, scene.predictions.records, scene.dead_keys())
        per_id = collections.Counter(rec.key for rec in scene.predictions.records)
        reasons = {}
        for rec in scene.deadletter.records:
            if rec.value is not None:
                reasons[rec.key] = orjson.loads(rec.value)["reason"]
        ranked_lost = sum(1 for rid in ranked if rid not in per_id and rid not in reasons)
        big_lost = sum(1 for rid in big if rid not in reasons and rid not in per_id)
        good_dead = sum(1 for rid in reasons if rid not in big)
        result.update(
            sent=result["sent"] + len(ranking),
            answered=result["answered"] + sum(1 for rid in ranked if rid in per_id),
            lost=result["lost"] + ranked_lost + big_lost,
            duplicates=sum(c - 1 for c in per_id.values()),  # among every answered request, good ones all
            oversize_sent=len(big),
            oversize_dead_lettered=sum(1 for rid in big if reasons.get(rid) == "output_too_large"),
            oversize_answered=sum(1 for rid in big if rid in per_id),
            client_errors=good_dead,  # a request that fits, dead-lettered
            dead_lettered=len(reasons),
            topic_max_message_bytes=TOPIC_LIMIT,
            rewinds=gateway.output().count("could not be published"),
            drain_s=round(drain_s, 2),
        )
    finally:
        await scene.close()
    result.update(crashes=scene.procs.crashes(), unclean_exits=scene.procs.unclean_terms())
    return result


async def eos_broker_restart(ctx: Context) -> dict[str, Any]:
    return await outages.broker_restart(ctx, mode="exactly_once", name="eos_broker_restart")


async def _fence(bootstrap: str, transactional_id: str) -> None:
    """One InitProducerId with `transactional_id`: the coordinator aborts that id's open
    transaction and bumps its epoch (the owner's producer is fenced)."""
    intruder = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=transactional_id,
                                enable_idempotence=True)
    await intruder.start()
    await intruder.stop()


async def eos_txn_abort(ctx: Context) -> dict[str, Any]:
    n, rate, every_s = ctx.pick((5000, 800, 0.1), (30_000, 1500, 0.1))
    partitions = 4
    scene = await GatewayScene.create(ctx, "eos_txn_abort", partitions=partitions, delivery="exactly_once")
    intrusions = 0
    try:
        (gateway,) = await scene.start_replicas(1)
        group = gateway.config["kafka"]["group_id"]
        ids = [f"{group}.{scene.topics['requests']}.{p}" for p in range(partitions)]
        load = SteadyLoad(ctx.kafka, scene.topics["requests"], tag="abort", n=n, rate_rps=rate)
        sending = asyncio.get_running_loop().create_task(load.run())
        while not load.started_s:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        ctx.say(f"eos_txn_abort: aborting the gateway's transactions every {every_s}s while requests arrive")
        while not sending.done():
            await _fence(ctx.kafka, ids[intrusions % partitions])
            intrusions += 1
            await asyncio.sleep(every_s)
        await sending
        drain_s = await scene.drain(set(load.ids()), timeout_s=ctx.pick(120, 300))
        result = delivery(load.order, scene.predictions.records, scene.dead_keys())
        log = gateway.output()
        result.update(
            intrusions=intrusions,
            transactions_redone=log.count("exactly-once: transaction for"),
            fenced=log.count(" fenced ("),
            dead_lettered=len(scene.dead_keys()),
            stalled=bool(set(load.ids()).difference(scene.predictions.keys, scene.dead_keys())),
            drain_s=round(drain_s, 2),
            rate_rps=rate,
        )
    finally:
        await scene.close()
    result.update(crashes=scene.procs.crashes(), unclean_exits=scene.procs.unclean_terms())
    return result
