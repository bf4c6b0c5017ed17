"""Request-reply over Kafka (as Spring's ReplyingKafkaTemplate does): each request carries
``reply_to``, the gateway also publishes the prediction there keyed by request_id, and one
consumer of the reply topic (and of the dead-letter topic, for refusals) resolves the waiting
futures by request_id.

Defined behaviour:
- no prediction within ``timeout_s``: :class:`PredictionTimeout` (the future is dropped; a late
  prediction is ignored);
- the request dead-lettered by the gateway: :class:`GatewayRejected` with the gateway's reason;
- the gateway restarts (or is down) while a request waits: the gateway serves at least once from
  its committed offsets, so the prediction arrives once a gateway is back - within the timeout the
  call simply returns, later it raises PredictionTimeout. A prediction delivered twice resolves
  the call once.

Trace context: every record the client sends carries a W3C ``traceparent`` header (the caller's,
when it passes a valid one - an invalid one is ignored - else a fresh one), and ``tracestate``
when given; the gateway carries it onto the prediction, whose ``Prediction.traceparent`` is what
came back on the reply topic.
"""

from __future__ import annotations

import asyncio
import binascii
import itertools
import os
import time
from collections.abc import Container, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Self

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from banditgate import cloudevents
from banditgate.client.errors import ClientError, GatewayRejected, InvalidRequest, PredictionTimeout
from banditgate.client.sending import BatchSender
from banditgate.client.types import Prediction
from banditgate.client.validation import encode, fast_request, outcome_event, request_event
from banditgate.cloudevents import EventHeaders
from banditgate.events import KNOWN_SCHEMA_VERSIONS
from banditgate.jsontypes import JSONValue
from banditgate.tracecontext import TRACEPARENT, new_traceparent, parse_traceparent, trace_context

if TYPE_CHECKING:
    from aiokafka.structs import ConsumerRecord

DEFAULT_TIMEOUT_S = 10.0
_ZERO_IDS = (b"0" * 32, b"0" * 16)


class _FastIds:
    """Request ids and fresh trace contexts for `send`, cheaper than a uuid4 and two os.urandom
    calls per request (together they cost more than the rest of a send here): ids are a random
    per-client prefix and a counter (unique without coordination); trace and span ids are cut
    from one os.urandom draw per 4096 requests."""

    _BATCH = 4096

    def __init__(self) -> None:
        self.prefix = os.urandom(8).hex() + "-"
        self._counter = itertools.count(1)
        self._pool = b""
        self._offset = 0

    def request_id(self) -> str:
        return f"{self.prefix}{next(self._counter):x}"

    def traceparent(self) -> list[tuple[str, bytes]]:
        offset = self._offset
        if offset >= len(self._pool):
            self._pool, offset = binascii.hexlify(os.urandom(24 * self._BATCH)), 0
        self._offset = offset + 48
        trace, span = self._pool[offset:offset + 32], self._pool[offset + 32:offset + 48]
        if trace == _ZERO_IDS[0] or span == _ZERO_IDS[1]:  # pragma: no cover - 2**-64
            return [(TRACEPARENT, new_traceparent().encode())]
        return [(TRACEPARENT, b"00-%s-%s-01" % (trace, span))]


class KafkaClient:
    """Async Kafka client (``async with KafkaClient(...) as client``)."""

    def __init__(self, bootstrap_servers: str, *, reply_topic: str | None = None, requests_topic: str = "bg.requests",
                 outcomes_topic: str = "bg.outcomes", deadletter_topic: str = "bg.deadletter",
                 routes: Container[str] | None = None, metadata: Mapping[str, Mapping[str, JSONValue]] | None = None,
                 max_in_flight: int = 10_000, linger_ms: int = 5, max_queued: int = 100_000,
                 cloudevents: bool = True,
                 **kafka_kwargs: Any) -> None:  # Any: keywords of aiokafka's (untyped) producer and consumer
        """`reply_topic`: this service's reply topic (it must exist and match the gateway's
        kafka.reply_topics); None: `predict` is unavailable, `send` and `report_outcome` work.
        `routes` / `metadata` (route -> OIP model metadata): checked before sending when given.
        `max_queued`: requests `send` lets wait for the broker's acknowledgement before it waits.
        `cloudevents`: put CloudEvents headers on requests and outcomes (as the gateway's
        ``kafka.cloudevents``); False: the trace context only.
        `kafka_kwargs` go to aiokafka (security_protocol, ssl_context, sasl_*; max_batch_size,
        256 KiB unless given: the bytes of one batch `send` fills)."""
        self.bootstrap_servers = bootstrap_servers
        self.reply_topic = reply_topic
        self.requests_topic = requests_topic
        self.outcomes_topic = outcomes_topic
        self.deadletter_topic = deadletter_topic
        self.routes = routes
        self.metadata = dict(metadata or {})
        self.max_in_flight = max_in_flight
        self._linger_ms = linger_ms
        self.max_queued = max_queued
        self.cloudevents = cloudevents
        # the producer's batch size is its own; everything else (security) the consumer shares
        self._batch_bytes = int(kafka_kwargs.pop("max_batch_size", 256 * 1024))
        self._kwargs = kafka_kwargs
        self._ids = _FastIds()
        self._ce_request: dict[str, EventHeaders] = {}
        """route -> its requests' CloudEvents header builder (send's hot path looks it up once per route)."""
        self._sender: BatchSender | None = None
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[str, tuple[asyncio.Future[Prediction], float]] = {}

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap_servers, linger_ms=self._linger_ms,
                                          acks="all", enable_idempotence=True, max_batch_size=self._batch_bytes,
                                          **self._kwargs)
        await self._producer.start()
        if self.reply_topic is None:
            return
        # assigned (no group) and positioned at the end before any request is sent: nothing this
        # client asks for can be answered before the consumer's position is fixed
        partitions = []
        for topic in (self.reply_topic, self.deadletter_topic):
            found = await self._producer.partitions_for(topic)
            partitions += [TopicPartition(topic, p) for p in sorted(found)]
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap_servers, group_id=None,
                                          enable_auto_commit=False, isolation_level="read_committed",
                                          fetch_max_wait_ms=100, **self._kwargs)
        await self._consumer.start()
        self._consumer.assign(partitions)
        await self._consumer.seek_to_end(*partitions)
        for tp in partitions:
            await self._consumer.position(tp)
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def close(self) -> None:
        """Deliver what `send` queued, then stop; a ClientError (``send_failed``) after stopping
        when some of it was lost."""
        lost: ClientError | None = None
        if self._sender is not None:
            try:
                await self._sender.flush()
            except ClientError as exc:
                lost = exc
            self._sender.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        for future, _ in self._waiting.values():
            if not future.done():
                future.set_exception(ClientError("closed", "the client was closed while the request waited"))
        self._waiting.clear()
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()
        if lost is not None:
            raise lost

    # -- requests --------------------------------------------------------------------------------

    async def predict(self, route: str, inputs: Mapping[str, JSONValue], *, unit: str | None = None,
                      request_id: str | None = None, items: list[str] | None = None,
                      timeout_s: float = DEFAULT_TIMEOUT_S, traceparent: str | None = None,
                      tracestate: str | None = None) -> Prediction:
        """Send one request and wait for its prediction (see the module docstring for failures and
        the trace context)."""
        if self.reply_topic is None or self._producer is None:
            raise ClientError("not_started", "predict needs a started client with a reply_topic")
        event = request_event(route, inputs, unit=unit, request_id=request_id, reply_to=self.reply_topic,
                              items=items, routes=self.routes, metadata=self.metadata.get(route))
        rid = event["request_id"]
        if rid in self._waiting:
            raise InvalidRequest("bad_id", f"request {rid!r} is already waiting for its prediction")
        if len(self._waiting) >= self.max_in_flight:
            raise ClientError("overloaded", f"{self.max_in_flight} requests are already waiting (max_in_flight)")
        future: asyncio.Future[Prediction] = asyncio.get_running_loop().create_future()
        started = time.monotonic()
        self._waiting[rid] = (future, started)
        try:
            await (await self._producer.send(self.requests_topic, encode(event), key=rid.encode(),
                                             headers=_request_headers(route, rid, traceparent, tracestate,
                                                                      self.cloudevents)))
            return await asyncio.wait_for(asyncio.shield(future), timeout_s - (time.monotonic() - started))
        except TimeoutError:
            raise PredictionTimeout(f"no prediction for request {rid!r} within {timeout_s}s") from None
        finally:
            self._waiting.pop(rid, None)

    async def send(self, route: str, inputs: Mapping[str, JSONValue], *, unit: str | None = None,
                   request_id: str | None = None, items: list[str] | None = None, traceparent: str | None = None,
                   tracestate: str | None = None) -> str:
        """Fire and forget: check and queue one request; returns its request_id. Requests are
        appended to batches (banditgate/client/sending.py), so this waits only when `max_queued`
        requests are unacknowledged. `flush()` waits until everything queued is acknowledged and
        raises ClientError (``send_failed``) if some of it was lost."""
        sender = self._sender
        if sender is None:
            if self._producer is None:
                raise ClientError("not_started", "start the client first")
            sender = await self._open_sender()
        rid = request_id or self._ids.request_id()
        value = None
        if items is None and route not in self.metadata:
            value = fast_request(route, inputs, unit, rid, self.routes)
        if value is None:
            value = encode(request_event(route, inputs, unit=unit, request_id=rid, reply_to=None, items=items,
                                         routes=self.routes, metadata=self.metadata.get(route)))
        trace = self._ids.traceparent() if traceparent is None else trace_context(traceparent, tracestate)
        key = rid.encode()
        ce = self._ce_request.get(route)
        if ce is None:  # one per route name (checked above); bounded like cloudevents' own cache
            if len(self._ce_request) >= cloudevents.MAX_SOURCES:
                self._ce_request.clear()
            ce = self._ce_request[route] = cloudevents.headers_for("request", cloudevents.source("client", route),
                                                                   self.cloudevents)
        headers = ce(key, cloudevents.ce_time(), trace)
        if not sender.try_add(key, value, headers):
            await sender.add(key, value, headers)
        return rid

    def send_stats(self) -> dict[str, int]:
        """`send`'s requests: queued (unacknowledged), delivered (acknowledged), failed (lost)."""
        sender = self._sender
        if sender is None:
            return {"queued": 0, "delivered": 0, "failed": 0}
        return {"queued": sender.queued, "delivered": sender.delivered, "failed": sender.failed}

    async def _open_sender(self) -> BatchSender:
        assert self._producer is not None  # noqa: S101 - send checked it
        partitions = sorted(await self._producer.partitions_for(self.requests_topic))
        if self._sender is None:  # another send may have opened it meanwhile
            self._sender = BatchSender(self._producer, self.requests_topic, partitions,
                                       linger_s=self._linger_ms / 1000.0, max_queued=self.max_queued)
        return self._sender

    async def flush(self) -> None:
        """Wait until every request sent so far is acknowledged (ClientError ``send_failed`` if
        some were lost)."""
        if self._sender is not None:
            await self._sender.flush()
        if self._producer is not None:
            await self._producer.flush()

    async def report_outcome(self, request_id: str, *, reward: float | None = None, label: JSONValue = None,
                             clicks: list[str] | None = None, ts: float | None = None, traceparent: str | None = None,
                             tracestate: str | None = None) -> None:
        """Publish an outcome for `request_id` and wait for the broker's acknowledgement. Pass the
        prediction's `traceparent` to continue its trace (else the outcome starts a new one)."""
        if self._producer is None:
            raise ClientError("not_started", "start the client first")
        event = outcome_event(request_id, reward, label, clicks, ts)
        key, value = request_id.encode(), orjson.dumps(event)
        await (await self._producer.send(self.outcomes_topic, value, key=key, headers=cloudevents.headers(
            "outcome", _CLIENT, cloudevents.content_id(self.outcomes_topic, key, value),
            trace_context(traceparent, tracestate), self.cloudevents)))

    # -- replies ---------------------------------------------------------------------------------

    async def _read(self) -> None:
        assert self._consumer is not None  # noqa: S101 - started before the task
        while True:
            batches = await self._consumer.getmany(timeout_ms=200, max_records=1000)
            if not self._waiting:
                continue
            for records in batches.values():
                for record in records:
                    self._resolve(record)

    def _resolve(self, record: ConsumerRecord) -> None:
        if record.topic == self.deadletter_topic:
            rid = record.key.decode("utf-8", "replace") if record.key else None
            slot = self._waiting.get(rid) if rid else None
            if slot is None or slot[0].done():
                return
            try:
                letter = orjson.loads(record.value)
                reason, error = str(letter.get("reason", "bad_input")), str(letter.get("error", ""))
            except (orjson.JSONDecodeError, AttributeError):
                reason, error = "bad_input", "the gateway dead-lettered the request"
            slot[0].set_exception(GatewayRejected(reason, error))
            return
        try:
            event = orjson.loads(record.value)
            rid = event["request_id"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        slot = self._waiting.get(rid)
        if slot is None or slot[0].done():
            return  # not ours, timed out, or delivered twice
        if event.get("schema_version", 1) not in KNOWN_SCHEMA_VERSIONS:
            slot[0].set_exception(ClientError("unknown_version", f"prediction for {rid!r} has schema_version "
                                                                 f"{event.get('schema_version')!r}; upgrade the client"))
            return
        slot[0].set_result(Prediction.from_event(event, (time.monotonic() - slot[1]) * 1000.0,
                                                 _traceparent(record.headers)))


def _traceparent(headers: Sequence[tuple[str, bytes]] | None) -> str | None:
    for name, value in headers or ():
        if name == TRACEPARENT:
            return parse_traceparent(value)
    return None


_CLIENT = cloudevents.source("client")


def _request_headers(route: str, request_id: str, traceparent: str | None,
                     tracestate: str | None, enabled: bool = True) -> list[tuple[str, bytes]]:
    """A request record's headers: its trace context and its CloudEvents attributes (id:
    ``request:<request_id>``, so the producer's retries and a resend of the same request share it)."""
    return cloudevents.headers_for("request", cloudevents.source("client", route), enabled)(
        request_id.encode(), cloudevents.ce_time(), trace_context(traceparent, tracestate))
