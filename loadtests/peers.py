"""Baseline Kafka consumers the gateway is measured against, each run as its own process.

- `passthrough`: the idiomatic aiokafka consume→produce loop (getmany, one `send` per record
  without awaiting each, wait for delivery, commit) with no decoding or inference: the
  client's limit for this message size.
- `naive`: what a hand-written per-message consumer does: decode, `session.run` on one row,
  `send_and_wait`, per message.

- `passthrough_batch`: the passthrough producing through the batch API the gateway itself uses
  (reported beside, not used for the ratio: it is the ceiling of the client, not what users write).
- `relay`: the gateway's Kafka loop with the model taken out, the passthrough that the latency
  at fixed rates is compared with: the gateway's consumer settings (`KafkaConfig` defaults,
  read_committed), the gateway's own producer (`SharedProducer`: same linger, acks, batch size),
  the batch API, the next fetch not waiting for acknowledgements, offsets committed in order at
  most every `kafka.commit_interval_ms`. It forwards each request's bytes, keyed as they came.

Usage: python -m loadtests.peers {passthrough|passthrough_batch|relay|naive} BOOTSTRAP IN_TOPIC OUT_TOPIC GROUP [MODEL]
"""

from __future__ import annotations

import asyncio
import collections
import signal
import sys
import time

import numpy as np
import orjson
import uvloop
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer


async def passthrough(bootstrap: str, in_topic: str, out_topic: str, group: str, stop: asyncio.Event) -> None:
    consumer = AIOKafkaConsumer(in_topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=5,
                                max_partition_fetch_bytes=4 * 1024 * 1024, fetch_max_bytes=32 * 1024 * 1024)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, linger_ms=2,
                                max_batch_size=512 * 1024)
    await consumer.start()
    await producer.start()
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=100, max_records=2048)
            futures = []
            for records in batch.values():
                for record in records:
                    futures.append(await producer.send(out_topic, key=record.key, value=record.value))
            if futures:
                await asyncio.gather(*futures)
                await consumer.commit()
    finally:
        await consumer.stop()
        await producer.stop()


async def passthrough_batch(bootstrap: str, in_topic: str, out_topic: str, group: str, stop: asyncio.Event) -> None:
    """The same loop producing through aiokafka's batch API (what the gateway uses): the client's ceiling."""
    from gateway.transport.kafka_batches import OutboundBatches

    consumer = AIOKafkaConsumer(in_topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=5,
                                max_partition_fetch_bytes=4 * 1024 * 1024, fetch_max_bytes=32 * 1024 * 1024)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, linger_ms=2,
                                max_batch_size=512 * 1024)
    await consumer.start()
    await producer.start()
    partitions = {out_topic: len(await producer.partitions_for(out_topic))}
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=100, max_records=2048)
            out = OutboundBatches(producer, partitions)
            for tp, records in batch.items():
                for record in records:
                    out.add(out_topic, record.key, record.value, tp.partition)
            futures = [sent.future for sent in await out.send()]
            if futures:
                await asyncio.gather(*futures)
                await consumer.commit()
    finally:
        await consumer.stop()
        await producer.stop()


async def relay(bootstrap: str, in_topic: str, out_topic: str, group: str, stop: asyncio.Event) -> None:
    """The gateway's consume -> produce loop (gateway/transport/kafka_loop.py) without decoding or a model."""
    from aiokafka import TopicPartition

    from banditgate.config import KafkaConfig
    from gateway.transport.kafka_batches import OutboundBatches
    from gateway.transport.shared_producer import SharedProducer

    kafka = KafkaConfig(bootstrap_servers=bootstrap, group_id=group)
    consumer = AIOKafkaConsumer(in_topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                                auto_offset_reset="earliest", isolation_level="read_committed",
                                fetch_max_wait_ms=kafka.fetch_max_wait_ms, fetch_min_bytes=kafka.fetch_min_bytes,
                                max_partition_fetch_bytes=4 * 1024 * 1024, fetch_max_bytes=32 * 1024 * 1024,
                                session_timeout_ms=kafka.session_timeout_ms,
                                heartbeat_interval_ms=max(1000, kafka.session_timeout_ms // 4))
    shared = SharedProducer(kafka)
    await shared.discover_limits([out_topic])
    producer = await shared.start()
    partitions = {out_topic: len(await producer.partitions_for(out_topic))}
    await consumer.start()
    in_flight: collections.deque[tuple[asyncio.Future, dict[TopicPartition, int]]] = collections.deque()
    to_commit: dict[TopicPartition, int] = {}
    committer: asyncio.Task | None = None
    last_commit = float("-inf")
    try:
        while not stop.is_set():
            if len(in_flight) >= 8:  # batching.max_in_flight_batches (its default, and what bench kafka gives the gateway)
                await asyncio.wait([in_flight[0][0]])
            fetched = await consumer.getmany(timeout_ms=100, max_records=kafka.max_poll_records)
            if fetched:
                out = OutboundBatches(producer, partitions, shared.limits)
                for tp, records in fetched.items():
                    for record in records:
                        out.add(out_topic, record.key, record.value, tp.partition)
                sent = await out.send()
                in_flight.append((asyncio.gather(*(s.future for s in sent)),
                                  {tp: records[-1].offset + 1 for tp, records in fetched.items()}))
            while in_flight and in_flight[0][0].done():
                done, offsets = in_flight.popleft()
                done.result()  # a failed delivery ends the peer (the bench reports it)
                to_commit.update(offsets)
            now = time.monotonic()
            if to_commit and (committer is None or committer.done()) and now - last_commit >= kafka.commit_interval_ms / 1000:
                committer = asyncio.get_running_loop().create_task(consumer.commit(to_commit))
                to_commit, last_commit = {}, now
        if in_flight:
            await asyncio.gather(*(f for f, _ in in_flight))
    finally:
        await consumer.stop()
        await shared.stop()


async def naive(bootstrap: str, in_topic: str, out_topic: str, group: str, stop: asyncio.Event, model: str) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    consumer = AIOKafkaConsumer(in_topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=True,
                                auto_offset_reset="earliest")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True)
    await consumer.start()
    await producer.start()
    try:
        while not stop.is_set():
            try:
                record = await asyncio.wait_for(consumer.getone(), timeout=0.2)
            except TimeoutError:
                continue
            event = orjson.loads(record.value)
            row = np.asarray([event["inputs"]["input"]], dtype=np.float32)
            probability, label = session.run(None, {input_name: row})
            value = orjson.dumps({"request_id": event["request_id"], "route": event["route"], "arm": "naive",
                                  "outputs": {"probability": probability[0].tolist(), "label": int(label[0])},
                                  "ts_request": event.get("ts", 0.0), "ts_predicted": time.time()})
            await producer.send_and_wait(out_topic, key=record.key, value=value)
    finally:
        await consumer.stop()
        await producer.stop()


async def main(argv: list[str]) -> None:
    kind, bootstrap, in_topic, out_topic, group = argv[:5]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    if kind == "passthrough":
        await passthrough(bootstrap, in_topic, out_topic, group, stop)
    elif kind == "passthrough_batch":
        await passthrough_batch(bootstrap, in_topic, out_topic, group, stop)
    elif kind == "relay":
        await relay(bootstrap, in_topic, out_topic, group, stop)
    elif kind == "naive":
        await naive(bootstrap, in_topic, out_topic, group, stop, argv[5])
    else:
        raise SystemExit(f"unknown peer {kind!r}")


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1:]))
