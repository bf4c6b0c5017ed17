"""The retrain export in a process of its own, under a lease: the feedback worker's event loop only
waits on a pipe, so it keeps joining outcomes at full speed while days of topics are read.

Parent (:func:`run_export_job`, in the worker): starts ``python -m feedback.export_job``, sends the
job as one JSON line on its stdin, and reads JSON lines back from its stdout: progress events, one
``commit?`` question and the result. While the child runs, the parent extends its
:class:`ExportLease` every third of the lease's time (compare-and-extend, one Lua script); before
the child writes its manifest the parent extends it once more and answers ``commit`` only if the
lease is still its own. A lease found lost (expired during a Redis outage, or taken over) stops the
child (``abort``), which deletes what it wrote, and the call raises :class:`LeaseLost` - so a slow
export is never run twice at once, and the one that lost its lease writes no manifest.

Child (:func:`main`): runs feedback.export_cli.export_window on its own event loop. A thread reads
its stdin: ``commit`` / ``abort`` answer the question; ``abort`` or end of input (the worker is
gone) stops the export at the next batch or row group, cleanly.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import queue
import resource
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import BinaryIO

import orjson
from redis import asyncio as aredis
from redis.exceptions import RedisError

from banditgate.config import Config, KafkaConfig
from banditgate.jsontypes import JSONObject, JSONValue
from feedback.export import ExportAborted, ExportError

log = logging.getLogger("banditgate.lifecycle")

_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaseLost(ExportAborted):
    """The export's lease is no longer this worker's; the export was stopped and wrote no manifest."""


class ExportLease:
    """One worker's right to run an export (a Redis key holding a random token, with a TTL).
    Extending and releasing compare the token in the same script, so a lease that expired and was
    taken by another worker is never extended or deleted by the first one."""

    def __init__(self, redis: aredis.Redis, key: str, ttl_ms: int) -> None:
        if ttl_ms < 100:
            raise ValueError(f"ttl_ms must be >= 100, got {ttl_ms}")
        self.redis, self.key, self.ttl_ms = redis, key, int(ttl_ms)
        self.token = uuid.uuid4().hex
        self._extend = redis.register_script(_EXTEND)
        self._release = redis.register_script(_RELEASE)

    async def acquire(self) -> bool:
        """Take the lease if nobody holds it."""
        return bool(await self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms))

    async def extend(self) -> bool:
        """Reset the lease's time to live if it is still ours; False when it is not (lost)."""
        return bool(await self._extend(keys=[self.key], args=[self.token, self.ttl_ms]))

    async def release(self) -> bool:
        """Delete the lease if it is still ours."""
        return bool(await self._release(keys=[self.key], args=[self.token]))


def job_spec(config: Config, route: str, window: tuple[float, float], destination: str, reason: str,
             options: Mapping[str, JSONValue] | None = None) -> JSONObject:
    """What the child needs, as JSON (the Kafka secrets included: it goes down a pipe, never argv)."""
    kafka = config.kafka.model_dump(mode="json")
    security = config.kafka.security
    for name in ("sasl_password", "key_password"):
        secret = getattr(security, name)
        kafka["security"][name] = secret.get_secret_value() if secret is not None else None
    return {"kafka": kafka, "join_ttl_s": config.feedback.join_ttl_s, "route": route, "window": list(window),
            "destination": destination, "reason": reason, "options": dict(options or {})}


async def run_export_job(spec: Mapping[str, JSONValue], lease: ExportLease,
                         on_event: Callable[[JSONObject], Awaitable[None]] | None = None,
                         stop_grace_s: float = 10.0) -> JSONObject:
    """Run the export `spec` (from job_spec) in a child process while holding `lease` (already
    acquired); returns the child's ``done`` message (``manifest``, ``rows``, ``bytes``, ``files``,
    ``max_rss_mb``: the export process's peak resident memory).

    `on_event` is awaited with every message of the child (progress, ``commit?``) before the
    parent acts on it. Raises LeaseLost when the lease was lost (the child is stopped first),
    ExportError when the export failed (its one-line reason). Cancelling the call stops the child.
    """
    # the child imports this very tree, wherever the worker was started from
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "feedback.export_job", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    assert process.stdin is not None and process.stdout is not None and process.stderr is not None  # noqa: S101 - PIPE
    stdin, stdout, stderr = process.stdin, process.stdout, process.stderr
    last_errors: collections.deque[str] = collections.deque(maxlen=5)
    lost = asyncio.Event()

    async def keep_stderr() -> None:  # drained so the child never blocks on a full pipe
        async for line in stderr:
            text = line.decode(errors="replace").strip()
            if text:
                last_errors.append(text)

    async def keep_lease() -> None:
        confirmed = time.monotonic()
        while True:
            await asyncio.sleep(lease.ttl_ms / 3000)
            try:
                held = await lease.extend()
            except (OSError, RedisError):
                # Redis away for now: still ours until its time to live has passed
                held = time.monotonic() - confirmed < lease.ttl_ms / 1000
            else:
                confirmed = time.monotonic() if held else confirmed
            if not held:
                lost.set()
                return

    async def answer(text: str) -> None:
        with contextlib.suppress(ConnectionError, BrokenPipeError):
            stdin.write(text.encode() + b"\n")
            await stdin.drain()

    helpers: list[asyncio.Task[object]] = [asyncio.create_task(keep_stderr()), asyncio.create_task(keep_lease())]
    result: JSONObject | None = None
    committed = False
    """Told the child to write its manifest (the lease was confirmed ours just before): from then on
    a lost lease no longer stops it; the rev compare-and-set keeps its alert single."""
    try:
        stdin.write(orjson.dumps(dict(spec)) + b"\n")
        await stdin.drain()
        waiting_lost = asyncio.create_task(lost.wait())
        helpers.append(waiting_lost)
        while result is None:
            reading = asyncio.create_task(stdout.readline())
            await asyncio.wait({reading, waiting_lost} if not committed else {reading},
                               return_when=asyncio.FIRST_COMPLETED)
            if lost.is_set() and not committed:
                reading.cancel()
                break
            line = reading.result()
            if not line:
                break  # the child ended without a result
            try:
                message = orjson.loads(line)
            except orjson.JSONDecodeError:
                last_errors.append(line.decode(errors="replace").strip())
                continue
            if on_event is not None:
                await on_event(message)
            kind = message.get("kind")
            if kind == "commit?":
                try:
                    held = not lost.is_set() and await lease.extend()
                except (OSError, RedisError):
                    held = False  # cannot confirm it is ours: do not publish an export that may be a second one
                if not held:
                    lost.set()
                committed = held
                await answer("commit" if held else "abort")
            elif kind == "done":
                result = message
            elif kind in ("error", "aborted"):
                if lost.is_set() and not committed:
                    break
                raise ExportError(str(message.get("message")))
        if lost.is_set() and not committed:
            raise LeaseLost(f"lease {lease.key} was lost during the export; stopped it, nothing written")
        if result is None:
            code = await process.wait()
            detail = last_errors[-1] if last_errors else "no message"
            raise ExportError(f"the export process ended with exit code {code} and no result: {detail}")
        return result
    finally:
        if process.returncode is None:
            await _stop(process, answer, stop_grace_s)
        for helper in helpers:
            helper.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)


async def _stop(process: asyncio.subprocess.Process, answer: Callable[[str], Awaitable[None]], grace_s: float) -> None:
    """Ask the child to stop (it deletes what it wrote); kill it after `grace_s` or when cancelled."""
    try:
        await answer("abort")
        with contextlib.suppress(OSError):
            if process.stdin is not None:  # a PIPE (run_export_job)
                process.stdin.close()
        await asyncio.wait_for(process.wait(), grace_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        raise


# -- the child -----------------------------------------------------------------------------------


class _Control:
    """The parent's answers on stdin, read by a thread so the export never blocks on them."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stopped = threading.Event()
        self.answers: queue.Queue[bool] = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), name="export-control", daemon=True).start()

    def _read(self, stream: BinaryIO) -> None:
        for line in stream:
            word = line.strip()
            if word == b"commit":
                self.answers.put(True)
            elif word == b"abort":
                self.stopped.set()
                self.answers.put(False)
        self.stopped.set()  # end of input: the worker is gone
        self.answers.put(False)

    def check(self) -> None:
        if self.stopped.is_set():
            raise ExportAborted("the export was stopped by its worker")

    def may_commit(self) -> bool:
        _emit({"kind": "commit?"})
        return self.answers.get()


def _emit(message: Mapping[str, JSONValue]) -> None:
    sys.stdout.buffer.write(orjson.dumps(dict(message)) + b"\n")
    sys.stdout.buffer.flush()


def main() -> int:
    """The child: one job from stdin, messages to stdout (see the module docstring)."""
    from feedback.export_cli import ExportOptions, export_window

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        spec = orjson.loads(sys.stdin.buffer.readline())
        kafka = KafkaConfig.model_validate(spec["kafka"])
        options = ExportOptions(**spec.get("options", {}))
        since, until = float(spec["window"][0]), float(spec["window"][1])
    except (ValueError, KeyError, TypeError) as exc:
        _emit({"kind": "error", "message": f"the export job is malformed: {type(exc).__name__}: {exc}"})
        return 2
    control = _Control(sys.stdin.buffer)
    try:
        manifest = asyncio.run(export_window(kafka, float(spec["join_ttl_s"]), str(spec["route"]), since, until,
                                             str(spec["destination"]), str(spec.get("reason", "retrain")), options,
                                             progress=_emit, check=control.check, may_commit=control.may_commit))
    except ExportAborted as exc:
        _emit({"kind": "aborted", "message": str(exc)})
        return 3
    except ExportError as exc:
        _emit({"kind": "error", "message": str(exc)})
        return 1
    except Exception as exc:  # noqa: BLE001 - a defect: its one line goes to the parent, which logs it
        _emit({"kind": "error", "message": f"the export failed: {type(exc).__name__}: {exc}"})
        return 1
    _emit({"kind": "done", "manifest": f"{manifest.path}/manifest.json", "rows": manifest.rows,
           "bytes": sum(int(f["bytes"] or 0) for f in manifest.files), "files": len(manifest.files),
           "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
