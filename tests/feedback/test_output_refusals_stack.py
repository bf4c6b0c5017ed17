"""A poison pair whose join entry cannot fit the changelog, on the real stack.

Before: a prediction whose interleave impression holds a ~900 KB item id, then an outcome with
1000 clicks of 256 characters, made a join entry of ~1.16 MB, over the changelog topic's 1 MB;
the broker refused the changelog record, the worker retried it forever on the same producer, no
offset was committed again, and a restart replayed into the same wedge. Now an item id over
MAX_ID_CHARS is refused with the prediction (`out_of_range`), and an outcome that would make an
entry within every per-event bound too large for the changelog's record limit is dead-lettered
(`oversize`); the worker goes on."""

from __future__ import annotations

import re
import time

import orjson
import pytest

from tests.feedback.test_worker_stack import assert_exact, complete, expected_from_topic, make_traffic, send
from tests.feedback.worker_helpers import ROUTES, wait_until
from tests.kafka_helpers import read_topic

pytestmark = pytest.mark.stack

SEARCH = {"name": "search", "policy": "interleave", "k": 2,
          "arms": [{"name": "x", "model": "rank-a", "version": 1}, {"name": "y", "model": "rank-b", "version": 1}]}


def interleave_prediction(request_id: str, items: list[str], now: float) -> bytes:
    return orjson.dumps({"request_id": request_id, "route": "search", "arm": "x", "model": "rank-a",
                         "model_version": 1, "policy": "interleave", "propensity": 1.0,
                         "outputs": {"items": items, "teams": [("x", "y")[i % 2] for i in range(len(items))],
                                     "rankings": {"x": [], "y": []}},
                         "ts_request": now, "ts_predicted": now, "latency_ms": 1.0})


def _request_id(payload: str) -> str:
    """The request id at the start of a dead letter's (cut) payload."""
    found = re.search(r'"request_id": ?"([^"]+)"', payload)
    assert found is not None, payload[:200]
    return found.group(1)


async def test_an_entry_too_large_for_the_changelog_is_dead_lettered_and_the_worker_goes_on(
        stack, topics, redis, redis_prefix, start_worker) -> None:
    # the changelog takes 300 kB records here (kafka.max_message_bytes): an impression of 1000
    # items of 200 characters (~210 kB) fits, the same entry with 1000 clicks of 256 more does not
    worker = start_worker(routes=[*ROUTES, SEARCH], kafka_settings={"max_message_bytes": 300_000})
    await worker.wait_ready()
    now = time.time()
    items = [f"{k:03d}" + "i" * 197 for k in range(1000)]
    clicks = [f"{k:03d}" + "c" * 253 for k in range(1000)]
    poison = [
        # the pair of the review: a ~900 kB item id (refused at the edge now: item ids are ids) ...
        ("predictions", b"huge", interleave_prediction("huge", ["i" * 900_000, "small"], now)),
        ("outcomes", b"huge", orjson.dumps({"request_id": "huge", "clicks": clicks, "ts": now + 1})),
        # ... and one within every per-event bound whose join entry is still too large
        ("predictions", b"big", interleave_prediction("big", items, now)),
        ("outcomes", b"big", orjson.dumps({"request_id": "big", "clicks": clicks, "ts": now + 1})),
    ]
    await send(stack.kafka, topics, poison)
    letters = await read_topic(stack.kafka, topics.topics.deadletter, 2, timeout_s=60, settle_s=1.0)
    # "big": whichever of its two events comes second (the topics are read in no fixed order
    # between them) makes the entry too large, and is the one dead-lettered
    got = sorted((letter["reason"], letter["topic"], _request_id(letter["payload"]))
                 for letter in letters)
    assert got[0] == ("out_of_range", topics.topics.predictions, "huge")
    assert got[1][0] == "oversize" and got[1][1] in (topics.topics.predictions, topics.topics.outcomes)
    assert got[1][2] == "big"

    # the worker is not wedged: what follows is joined exactly, and its offsets move on
    traffic = make_traffic(200, seed=11, now=now, orphan_ts=now - 10_000)
    await send(stack.kafka, topics, traffic.messages)
    traffic = await expected_from_topic(stack.kafka, topics, traffic)
    await wait_until(complete(traffic, redis, redis_prefix), 90, "the traffic after the poison pair joined", worker)
    await assert_exact(redis, redis_prefix, traffic)
    assert "MessageSizeTooLarge" not in worker.output()
    assert worker.stop() == 0
