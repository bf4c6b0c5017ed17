"""The feedback worker's liveness and readiness (pure: a snapshot in, an answer out).

The worker's event loop takes a `Probe` every `HEALTH_INTERVAL_S` (feedback/app.py) and puts it on
a `HealthBoard`; the web server's threads answer ``/health/live`` and ``/health/ready`` from the
last one (feedback/web.py), so a probe never waits on the loop, and a loop that stops reporting
is itself the failure a probe must see.

* **live**: the loop reported within `STALL_S` and no fatal error is stopping the worker. Before
  its first report the worker is starting (503): a Kubernetes startup probe on the same path
  waits for it. A long recovery is live (the loop keeps reporting), so it is not restarted.
* **ready**: live enough (a report within `STALE_S`), the worker's clients are up, no rebalance or
  changelog recovery is going on (faust's recovery of every assigned partition has completed) and
  Redis answered the last ping. A worker with no partitions assigned (more workers than
  partitions) is ready: it idles as a standby, and a rolling update must not wait for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

HEALTH_INTERVAL_S = 1.0
"""How often the loop takes a probe (a Redis PING and a few attribute reads)."""
STALE_S = 10.0
"""Readiness needs a probe younger than this: a loop that stopped reporting serves nothing."""
STALL_S = 60.0
"""Liveness fails once the loop has not reported for this long (a blocked or dead loop): far above
the loop's longest expected pause (a full garbage collection of a large join table, tens of
milliseconds: feedback/consumer.py; a readiness ping, at most `REDIS_PING_TIMEOUT_S`)."""
REDIS_PING_TIMEOUT_S = 2.0
"""A readiness ping that takes longer counts as Redis not answering."""


@dataclass(frozen=True)
class Probe:
    """What the worker's loop saw at `at` (monotonic seconds)."""

    at: float
    started: bool
    """The worker's clients and batch handler are up (FeedbackRuntime started)."""
    rebalancing: bool
    recovered: bool
    """faust's changelog recovery of the assigned partitions has completed (and none is running)."""
    redis_ok: bool
    partitions: tuple[int, ...] = ()
    """The source topics' partitions assigned to this worker."""
    fatal: bool = False
    """A fatal error is stopping the worker (it exits with code 1)."""


@dataclass(frozen=True)
class Answer:
    """A probe's answer: `ok` is HTTP 200 (else 503), `reason` one line for the operator."""

    ok: bool
    reason: str
    partitions: tuple[int, ...] | None = None

    def document(self, key: str) -> dict[str, object]:
        """The JSON body: ``{key: ok, "reason": ...}`` (with "partitions" when known)."""
        body: dict[str, object] = {key: self.ok, "reason": self.reason}
        if self.partitions is not None:
            body["partitions"] = list(self.partitions)
        return body


def liveness(probe: Probe | None, now: float, stall_s: float = STALL_S) -> Answer:
    """Live unless the loop has not reported yet, stopped reporting for `stall_s`, or is failing."""
    if probe is None:
        return Answer(False, "starting: the worker's event loop has not reported yet")
    age = now - probe.at
    if age > stall_s:
        return Answer(False, f"the worker's event loop has not reported for {age:.0f} s")
    if probe.fatal:
        return Answer(False, "stopping after a fatal error")
    return Answer(True, "live")


def readiness(probe: Probe | None, now: float, stale_s: float = STALE_S) -> Answer:
    """Ready once the assigned partitions are recovered and Redis answers (module docstring)."""
    if probe is None:
        return Answer(False, "starting: the worker's event loop has not reported yet")
    age = now - probe.at
    if age > stale_s:
        return Answer(False, f"the worker's event loop has not reported for {age:.0f} s")
    if probe.fatal:
        return Answer(False, "stopping after a fatal error")
    if not probe.started:
        return Answer(False, "starting: connecting to Kafka and Redis")
    if probe.rebalancing or not probe.recovered:
        return Answer(False, "rebalancing or recovering the assigned partitions' join state", probe.partitions)
    if not probe.redis_ok:
        return Answer(False, "Redis does not answer", probe.partitions)
    if not probe.partitions:
        return Answer(True, "ready: no partitions assigned (more workers than partitions: idle)", ())
    return Answer(True, "ready", probe.partitions)


@dataclass
class HealthBoard:
    """The last `Probe`, written by the worker's loop and read by the web server's threads (one
    reference swap, atomic under the GIL: no lock)."""

    clock: Callable[[], float] = time.monotonic
    probe: Probe | None = field(default=None)

    def record(self, probe: Probe) -> None:
        self.probe = probe

    def live(self) -> Answer:
        return liveness(self.probe, self.clock())

    def ready(self) -> Answer:
        return readiness(self.probe, self.clock())
