"""Garbage on the wire: bad request events mixed with good ones, and bad HTTP bodies.

Every bad event must be dead-lettered (matched by its record key, which the dead letter keeps),
every good one answered, and no process may exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import Callable
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from loadtests.faults.context import Context, GatewayScene
from loadtests.faults.harness import FEATURE_RANGE, N_FEATURES, ROUTE
from loadtests.faults.traffic import good_rows, http_post, request_value

FIVE_MB = 5 * 1024 * 1024


def _event(request_id: str, **fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"request_id": request_id, "route": ROUTE, "inputs": {"input": [0.5] * N_FEATURES}}
    doc.update(fields)
    return doc


def _nested(depth: int) -> Any:
    value: Any = 1.0
    for _ in range(depth):
        value = [value]
    return value


def bad_generators() -> list[tuple[str, Callable[[random.Random, str], bytes | None]]]:
    """(kind, make(rng, request_id) -> value bytes, or None for a tombstone)."""
    def dumps(doc: Any) -> bytes:
        return orjson.dumps(doc)

    outside = FEATURE_RANGE[1] * 20
    return [
        ("random_bytes", lambda rng, rid: rng.randbytes(rng.randint(1, 2048))),
        ("truncated_json", lambda rng, rid: (lambda b: b[:rng.randint(1, len(b) - 1)])(
            dumps(_event(rid)))),
        ("deeply_nested_input", lambda rng, rid: dumps(_event(rid, inputs={"input": _nested(rng.randint(6, 60))}))),
        ("deeply_nested_document", lambda rng, rid: b"[" * 5000 + b"]" * 5000),
        ("huge_string_id", lambda rng, rid: dumps(_event("x" * rng.randint(300, 200_000)))),
        ("huge_string_input", lambda rng, rid: dumps(_event(rid, inputs={"input": "y" * rng.randint(1000, 500_000)}))),
        ("nan", lambda rng, rid: dumps(_event(rid)).replace(b"0.5", b"NaN", 1)),
        ("infinity", lambda rng, rid: dumps(_event(rid)).replace(b"0.5", rng.choice([b"Infinity", b"-Infinity", b"1e999"]), 1)),
        ("wrong_type_id", lambda rng, rid: dumps({**_event(rid), "request_id": rng.choice([17, 1.5, True, None, [rid], {"id": rid}])})),
        ("wrong_type_inputs", lambda rng, rid: dumps(_event(rid, inputs=rng.choice([[1, 2, 3], "abc", 5, {}, None])))),
        ("wrong_type_row", lambda rng, rid: dumps(_event(rid, inputs={"input": ["a"] * N_FEATURES}))),
        ("wrong_type_route", lambda rng, rid: dumps(_event(rid, route=rng.choice([1, [ROUTE], {"r": 1}])))),
        ("wrong_row_length", lambda rng, rid: dumps(_event(rid, inputs={"input": [0.1] * rng.choice([0, 1, 7, 9, 64])}))),
        ("unknown_input_name", lambda rng, rid: dumps(_event(rid, inputs={"nope": [0.1] * N_FEATURES}))),
        ("unknown_route", lambda rng, rid: dumps(_event(rid, route=f"no-such-route-{rng.randint(0, 99)}"))),
        ("missing_request_id", lambda rng, rid: dumps({k: v for k, v in _event(rid).items() if k != "request_id"})),
        ("missing_route", lambda rng, rid: dumps({k: v for k, v in _event(rid).items() if k != "route"})),
        ("missing_inputs", lambda rng, rid: dumps({k: v for k, v in _event(rid).items() if k != "inputs"})),
        ("out_of_reference_range", lambda rng, rid: dumps(_event(rid, inputs={"input": [outside] + [0.1] * (N_FEATURES - 1)}))),
        ("not_an_object", lambda rng, rid: dumps(rng.choice([[1, 2], "text", 3.5, None, True]))),
        ("empty_value", lambda rng, rid: b""),
        ("tombstone", lambda rng, rid: None),
        ("bad_utf8", lambda rng, rid: b'{"request_id": "' + rid.encode() + b'\xff\xfe", "route": "fault"}'),
    ]


def bad_events(count: int, huge: int, seed: int) -> list[tuple[str, str, bytes | None]]:
    """(kind, key, value) for `count` bad events, `huge` of them 5 MB payloads."""
    rng = random.Random(seed)
    generators = bad_generators()
    out = []
    for i in range(count - huge):
        kind, make = generators[i % len(generators)]
        key = f"bad-{i}"
        out.append((kind, key, make(rng, key)))
    for j in range(huge):
        key = f"bad-huge-{j}"
        filler = "z" * FIVE_MB
        out.append(("payload_5mb", key, orjson.dumps(_event(key, padding=filler))))
    return out


async def _http_garbage(port: int, count: int, seed: int) -> dict[str, int]:
    """Bad bodies to the REST infer endpoint; counts answers by class."""
    rng = random.Random(seed)
    bodies: list[bytes] = []
    for i in range(count):
        choice = i % 6
        if choice == 0:
            bodies.append(rng.randbytes(rng.randint(1, 4096)))
        elif choice == 1:
            bodies.append(b'{"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [1,2')
        elif choice == 2:
            bodies.append(orjson.dumps({"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32",
                                                    "data": ["x"] * 8}]}))
        elif choice == 3:
            bodies.append(b'{"inputs": ' + b"[" * 3000 + b"]" * 3000 + b"}")
        elif choice == 4:
            bodies.append(orjson.dumps({"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32",
                                                    "data": [1e30] * 8}]}))
        else:
            bodies.append(orjson.dumps({"inputs": [{"name": "input", "shape": [10**9, 8], "datatype": "FP32",
                                                    "data": [0.1] * 8}]}))
    bodies.append(b"{" + b" " * (5 * 1024 * 1024) + b"}")  # over the body limit: 413
    tally = {"sent": 0, "2xx": 0, "4xx": 0, "5xx": 0, "no_answer": 0}
    conn = None
    for body in bodies:
        tally["sent"] += 1
        try:
            if conn is None:
                conn = await asyncio.open_connection("127.0.0.1", port)
            status, headers, _ = await http_post(conn[0], conn[1], f"/v2/models/{ROUTE}/infer", body)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError):
            tally["no_answer"] += 1
            if conn is not None:
                conn[1].close()
            conn = None
            continue
        tally[f"{status // 100}xx"] = tally.get(f"{status // 100}xx", 0) + 1
        if headers.get("connection", "").lower() == "close":
            conn[1].close()
            conn = None
    if conn is not None:
        conn[1].close()
        with contextlib.suppress(Exception):
            await conn[1].wait_closed()
    return tally


async def malformed(ctx: Context) -> dict[str, Any]:
    n_bad, n_good, huge = ctx.pick((1000, 1000, 2), (10_000, 10_000, 5))
    scene = await GatewayScene.create(ctx, "malformed")
    try:
        (gateway,) = await scene.start_replicas(1)
        rng = random.Random(7)
        rows = good_rows(n_good, seed=3)
        good = [("good", f"good-{i}", request_value(f"good-{i}", rows[i])) for i in range(n_good)]
        bad = bad_events(n_bad, huge, seed=11)
        mixed = good + bad
        rng.shuffle(mixed)
        kinds: dict[str, int] = {}
        for kind, _key, _value in bad:
            kinds[kind] = kinds.get(kind, 0) + 1
        producer = AIOKafkaProducer(bootstrap_servers=ctx.kafka, enable_idempotence=True, linger_ms=5,
                                    max_request_size=8 * 1024 * 1024)
        await producer.start()
        try:
            futures = [await producer.send(scene.topics["requests"], key=key.encode(), value=value)
                       for _kind, key, value in mixed]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()
        ctx.say(f"malformed: {len(bad)} bad ({len(kinds)} kinds) and {len(good)} good events sent")
        http = await _http_garbage(gateway.http_port, ctx.pick(60, 300), seed=5)
        good_ids = {key for _k, key, _v in good}
        bad_ids = {key for _k, key, _v in bad}
        drain_s = await scene.drain(good_ids | bad_ids, timeout_s=ctx.pick(90, 240))
        answered = set(scene.predictions.keys)
        dead = scene.dead_keys()
        still_ready = await gateway.ready()
        result = {
            "bad_sent": len(bad), "good_sent": len(good),
            "dead_lettered": len(bad_ids & dead), "good_answered": len(good_ids & answered),
            "bad_answered": len(bad_ids & answered), "good_dead_lettered": len(good_ids & dead),
            "lost": len(good_ids - answered - dead) + len(bad_ids - dead - answered),
            "bad_kinds": kinds, "http_garbage": http, "ready_after": still_ready, "drain_s": round(drain_s, 2),
            "reasons": _reasons(scene),
        }
    finally:
        await scene.close()
    result["crashes"] = scene.procs.crashes()
    result["unclean_exits"] = scene.procs.unclean_terms()
    return result


def _reasons(scene: GatewayScene) -> dict[str, int]:
    out: dict[str, int] = {}
    for rec in scene.deadletter.records:
        if rec.value is None:
            continue
        reason = orjson.loads(rec.value).get("reason", "?")
        out[reason] = out.get(reason, 0) + 1
    return out
