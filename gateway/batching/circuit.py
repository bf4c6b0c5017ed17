"""Isolating a hung or very slow model (pure: no clock of its own, no asyncio, no threads).

Every model version shares the gateway's one inference pool. Two rules keep a model that stops
answering from taking the others down with it:

* **A thread cap.** At most `max_threads` of the pool's threads run one model's batches at once;
  more of its rows wait in its own queue. A run that ONNX Runtime cannot interrupt keeps its
  thread, so a model that hangs that way holds at most its cap, never the whole pool.
* **A circuit breaker.** A batch that outlives `models.inference_timeout_s` opens the model's
  circuit: from then on its batches fail at once (`model_unavailable`) instead of queueing. After
  `retry_s` (doubling on every failed probe, up to `retry_max_s`) one batch's inputs are run as a
  probe while that batch, like every other, is failed at once: callers never wait on a model that
  is not known to work. A probe that finishes in time closes the circuit; one that times out
  opens it again for twice as long. Only a probe closes an open circuit (a batch started before
  the circuit opened and finishing late says little about the next one), and only one probe runs
  at a time, so a hung model sees one probe per backoff period, not one per request.

>>> circuit = ModelCircuit(CircuitPolicy(max_threads=1, retry_s=1.0, retry_max_s=8.0))
>>> circuit.decide(0.0), circuit.free_threads
('run', 1)
>>> circuit.started(1); circuit.decide(0.0)
'wait'
>>> circuit.timed_out(5.0), circuit.state, circuit.decide(5.5)
(True, 'open', 'fail')
>>> circuit.returned(1); circuit.decide(6.0)
'probe'
>>> circuit.decide(6.1)
'fail'
>>> circuit.probe_finished(); circuit.state
'closed'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

State = Literal["closed", "open", "half_open"]
Action = Literal["run", "wait", "fail", "probe"]
STATE_CODES: dict[str, int] = {"closed": 0, "half_open": 1, "open": 2}
"""The value of the `banditgate_model_circuit_state` gauge for each state."""


@dataclass(frozen=True)
class CircuitPolicy:
    """The limits of one model's breaker; times in seconds."""

    max_threads: int = 256
    """Pool threads one model's batches may hold at once (its share of `inference_threads`)."""
    retry_s: float = 1.0
    """How long a model stays unavailable after its first timeout before a probe."""
    retry_max_s: float = 60.0
    """The longest wait between probes (the wait doubles after every failed probe)."""

    def __post_init__(self) -> None:
        if self.max_threads < 1 or not (0 < self.retry_s <= self.retry_max_s):
            raise ValueError(f"invalid circuit policy {self}")


def thread_share(inference_threads: int, configured: int | None) -> int:
    """A model's cap on pool threads: `configured` when set, else half the pool (at least 1).

    Half, so that one model that hangs leaves the other half of the pool to everything else; a pool
    of one thread cannot be shared (its hung run is still ended at the timeout where ONNX Runtime
    can interrupt it). Raises ValueError for a cap outside 1..inference_threads.

    >>> thread_share(2, None), thread_share(16, None), thread_share(1, None), thread_share(8, 3)
    (1, 8, 1, 3)
    """
    if inference_threads < 1:
        raise ValueError("inference_threads must be >= 1")
    if configured is None:
        return max(1, inference_threads // 2)
    if not 1 <= configured <= inference_threads:
        raise ValueError(f"a model's thread cap must be within 1..{inference_threads}, got {configured}")
    return configured


class ModelCircuit:
    """One model version's breaker and the pool threads its batches hold now.

    The caller reports what happens (`started`, `returned`, `succeeded`, `timed_out`,
    `probe_finished`) with the time on its own monotonic clock, and asks `decide` before it
    starts a batch.
    """

    __slots__ = ("backoff_s", "policy", "probes", "retry_at", "running", "state", "timeouts")

    def __init__(self, policy: CircuitPolicy) -> None:
        self.policy = policy
        self.state: State = "closed"
        self.running = 0
        """Pool threads running this model's batches (a timed-out run counts until it returns)."""
        self.retry_at = 0.0
        self.backoff_s = policy.retry_s
        """The wait after the next timeout."""
        self.timeouts = 0
        """Batches (probes included) that outlived the timeout, ever."""
        self.probes = 0
        """Probes started, ever."""

    @property
    def available(self) -> bool:
        """True while the circuit is closed (the model's readiness)."""
        return self.state == "closed"

    @property
    def free_threads(self) -> int:
        """Threads this model may still start now (0 at its cap)."""
        return max(0, self.policy.max_threads - self.running)

    def accepts(self, now: float) -> bool:
        """Whether new rows may queue at all: False while the circuit is open and no probe is due,
        and while a probe runs (they would only be failed at the flush)."""
        return self.state == "closed" or (self.state == "open" and now >= self.retry_at)

    def decide(self, now: float) -> Action:
        """What to do with a batch that is due now.

        `run`: start it (on at most `free_threads` threads); `wait`: the model holds its cap, keep
        the rows queued until a thread comes back; `fail`: the model is unavailable, fail them at
        once; `probe`: fail them at once and run their inputs as the probe (the state is now
        `half_open`). A probe is not started while the model holds its cap (a run that cannot be
        interrupted keeps its thread; another probe would only take one more).
        """
        if self.state == "closed":
            return "run" if self.running < self.policy.max_threads else "wait"
        if self.state == "open" and now >= self.retry_at and self.running < self.policy.max_threads:
            self.state = "half_open"
            self.probes += 1
            return "probe"
        return "fail"

    def started(self, threads: int) -> None:
        """`threads` pool tasks of this model were submitted."""
        self.running += threads

    def returned(self, threads: int) -> None:
        """`threads` of its pool tasks finished (in time or not)."""
        self.running = max(0, self.running - threads)

    def succeeded(self) -> None:
        """A batch finished in time: while closed, the next timeout starts from the first wait."""
        if self.state == "closed":
            self.backoff_s = self.policy.retry_s

    def timed_out(self, now: float) -> bool:
        """A batch or the probe outlived the timeout. Returns True when this opened the circuit.

        From closed or half-open: open until `now + backoff`, and the next wait doubles (capped).
        Already open (another batch of the same episode timing out): nothing changes.
        """
        self.timeouts += 1
        if self.state == "open":
            return False
        self.state = "open"
        self.retry_at = now + self.backoff_s
        self.backoff_s = min(2.0 * self.backoff_s, self.policy.retry_max_s)
        return True

    def probe_finished(self) -> None:
        """The probe finished in time (rows it failed on are the model's errors, not a hang): closed."""
        if self.state == "half_open":
            self.state = "closed"
            self.backoff_s = self.policy.retry_s

    def retry_now(self) -> None:
        """A new file was swapped in for this version: probe at the next batch instead of waiting."""
        if self.state == "open":
            self.retry_at = 0.0
