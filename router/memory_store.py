"""MemoryArmStatsStore: the Redis arm-statistics store's semantics in process memory (pure Python + numpy).

A stand-in for :class:`router.stats_store.ArmStatsStore` wherever the real Redis is not the point:
the benchmark (`banditgate bench bandit` drives RoutePolicy against it) and unit tests. It keeps
what the Redis hash keeps - per route the outcome ``counter`` and ``half_life``, per arm weight,
mean, m2, the counter at its last update, state and call counters - and computes exactly what
the Lua update script and the snapshot parser compute:

* :meth:`apply_now` counts each (request_id, arm, reward) once per request id (the ``seen``
  marks expire after ``dedup_ttl_s`` of the store's clock), increments the counter, decays the
  arm by the outcomes since its last update and adds the reward with weight 1 - the same
  floating-point operations in the same order as ``ARM_UPDATE_LUA``, so the numbers are
  bit-for-bit those Redis holds (tests/router/test_memory_store.py checks it against the real
  Redis);
* :meth:`snapshot_now` decays every arm to the current counter, as ``stats_store._parse`` does.

:meth:`apply_rewards` is the benchmark's bulk path: a batch of outcomes known to be distinct
(no request ids, no dedup marks), applied in order with closed-form numpy sums instead of one
Python step per outcome. It equals a sequence of :meth:`apply_now` calls up to floating-point
rounding (relative 1e-12, property-tested), since decaying weight and m2 by the same factor and
adding weight-1 rewards is a weighted mean and a weighted sum of squares with weights
``2^(-(last counter - counter at the outcome) / half_life)``.

The ``async`` methods mirror ArmStatsStore's, so a SnapshotRefresher or the feedback code can use
this store unchanged. The dedup marks are bounded by ``max_seen`` (oldest dropped first, counted
in ``seen_dropped``), like the TTL bounds them in Redis.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from router.arm_stats import ARM_STATES, ArmSnapshot, ArmStats, RouteSnapshot, decay_factor
from router.stats_store import _CHUNK, ApplyResult, ArmUpdate, check_arm_update


@dataclass(slots=True)
class _Arm:
    weight: float = 0.0
    mean: float = 0.0
    m2: float = 0.0
    touched: int = 0
    """The route's counter right after this arm's last update (``<arm>:c``)."""
    has_stats: bool = False
    """Whether w/m/q/c were ever written (a drained-only arm has none: it decays from ``counter``)."""
    state: str | None = None
    calls: int = 0
    errors: int = 0


@dataclass(slots=True)
class _Route:
    counter: int = 0
    half_life: float = 0.0
    arms: dict[str, _Arm] = field(default_factory=dict)


class MemoryArmStatsStore:
    """Arm statistics of every route in memory, with ArmStatsStore's semantics (module docstring)."""

    transient_errors: tuple[type[BaseException], ...] = ()
    """Nothing here can fail transiently (the refresher's SnapshotSource protocol asks)."""

    def __init__(self, dedup_ttl_s: int = 8 * 86400, half_lives: Mapping[str, float | None] | None = None,
                 clock: Callable[[], float] = time.monotonic, max_seen: int = 1_000_000) -> None:
        """`half_lives` maps route name to its discounting half-life in outcomes (absent: none)."""
        if dedup_ttl_s < 1:
            raise ValueError(f"dedup_ttl_s must be >= 1, got {dedup_ttl_s}")
        if max_seen < 1:
            raise ValueError(f"max_seen must be >= 1, got {max_seen}")
        self._dedup_ttl_s = int(dedup_ttl_s)
        self._half_lives = dict(half_lives or {})
        self._clock = clock
        self._max_seen = max_seen
        self._routes: dict[str, _Route] = {}
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()  # (route, request id) -> expiry
        self.seen_dropped = 0
        """Dedup marks dropped to keep at most `max_seen` (a redelivery after that would count again)."""

    @property
    def dedup_ttl_s(self) -> int:
        return self._dedup_ttl_s

    def half_life(self, route: str) -> float:
        """The route's half-life in outcomes as the update applies it (0.0: none)."""
        return float(self._half_lives.get(route) or 0.0)

    def _route(self, route: str) -> _Route:
        state = self._routes.get(route)
        if state is None:
            state = self._routes[route] = _Route()
        return state

    # -- updates ---------------------------------------------------------------------------

    def _first_time(self, route: str, request_id: str) -> bool:
        """``SET seen NX EX ttl``: True (and marked) unless the request id was counted and unexpired."""
        now = self._clock()
        key = (route, request_id)
        expiry = self._seen.get(key)
        if expiry is not None and expiry > now:
            return False
        self._seen[key] = now + self._dedup_ttl_s
        self._seen.move_to_end(key)
        while len(self._seen) > self._max_seen:
            self._seen.popitem(last=False)
            self.seen_dropped += 1
        return True

    def apply_now(self, route: str, updates: Sequence[ArmUpdate]) -> ApplyResult:
        """Count each update once per request_id, exactly as the Redis update script does."""
        if not updates:
            return ApplyResult(0, 0)
        applied = duplicates = 0
        for start in range(0, len(updates), _CHUNK):
            chunk_applied, chunk_duplicates = self._apply_chunk(route, updates[start:start + _CHUNK])
            applied += chunk_applied
            duplicates += chunk_duplicates
        return ApplyResult(applied, duplicates)

    def _apply_chunk(self, route: str, updates: Sequence[ArmUpdate]) -> tuple[int, int]:
        """One script call's worth (ArmStatsStore sends at most _CHUNK updates per call)."""
        state = self._route(route)
        half_life = self.half_life(route)
        applied = duplicates = 0
        for update in updates:
            if not self._first_time(route, update.request_id):
                duplicates += 1
                continue
            arm = state.arms.setdefault(update.arm, _Arm())
            state.counter += 1
            # the Lua script's arithmetic, operation for operation (see ARM_UPDATE_LUA's arm_add)
            if half_life > 0 and state.counter > arm.touched:
                factor = math.pow(2, -(state.counter - arm.touched) / half_life)
                arm.weight = arm.weight * factor
                arm.m2 = arm.m2 * factor
            arm.weight = arm.weight + 1
            delta = update.reward - arm.mean
            arm.mean = arm.mean + delta / arm.weight
            arm.m2 = arm.m2 + delta * (update.reward - arm.mean)
            arm.touched = state.counter
            arm.has_stats = True
            applied += 1
        if applied:
            # the script writes back every arm it loaded, also one whose updates were all
            # duplicates (its fields then exist, holding zeros for a new arm)
            for update in updates:
                state.arms.setdefault(update.arm, _Arm()).has_stats = True
            state.half_life = half_life
        return applied, duplicates

    def apply_rewards(self, route: str, arm_names: Sequence[str], arm_index: np.ndarray, rewards: np.ndarray) -> int:
        """Count a batch of distinct outcomes in order (no dedup): ``rewards[i]`` for arm
        ``arm_names[arm_index[i]]``. Equals :meth:`apply_now` on the same sequence up to rounding.

        Raises ValueError for mismatched lengths, an index out of range, a name that is not an
        arm name or a reward outside what the update script accepts. Returns the outcomes counted.
        """
        arm_index = np.asarray(arm_index, dtype=np.int64)
        rewards = np.asarray(rewards, dtype=np.float64)
        count = len(arm_index)
        if rewards.shape != (count,) or arm_index.ndim != 1:
            raise ValueError("arm_index and rewards need one value per outcome")
        if count == 0:
            return 0
        if arm_index.min() < 0 or arm_index.max() >= len(arm_names):
            raise ValueError(f"arm_index must be in [0, {len(arm_names)})")
        for name in {arm_names[i] for i in np.unique(arm_index)}:
            check_arm_update(name, 0.0)
        if not np.all(np.abs(rewards) <= 1e15):  # also refuses NaN
            raise ValueError("rewards must be finite and within [-1e15, 1e15]")
        state = self._route(route)
        half_life = self.half_life(route)
        start = state.counter
        counters = start + 1 + np.arange(count)  # the counter each outcome gets
        for index in np.unique(arm_index):
            name = arm_names[index]
            arm = state.arms.get(name)
            if arm is None:
                arm = state.arms[name] = _Arm()
            mine = arm_index == index
            at, values = counters[mine], rewards[mine]
            last = int(at[-1])
            if half_life > 0:
                old = 2.0 ** (-(last - arm.touched) / half_life) if last > arm.touched else 1.0
                weights = np.exp2(-(last - at) / half_life)
            else:
                old, weights = 1.0, np.ones(len(at))
            old_weight = arm.weight * old
            new_weight = float(weights.sum())
            new_mean = float(weights @ values) / new_weight
            new_m2 = float(weights @ (values - new_mean) ** 2)
            merged = ArmStats(weight=old_weight, mean=arm.mean, m2=arm.m2 * old) + \
                ArmStats(weight=new_weight, mean=new_mean, m2=new_m2)
            arm.weight, arm.mean, arm.m2 = merged.weight, merged.mean, merged.m2
            arm.touched = last
            arm.has_stats = True
        state.counter = start + count
        state.half_life = half_life
        return count

    # -- reads -----------------------------------------------------------------------------

    def snapshot_now(self, route: str) -> RouteSnapshot:
        """All arms of `route`, decayed to now (what ArmStatsStore.snapshot returns)."""
        state = self._routes.get(route)
        if state is None:
            return RouteSnapshot(route=route)
        half_life = state.half_life or None
        arms: dict[str, ArmSnapshot] = {}
        for name, arm in state.arms.items():
            stats = ArmStats()
            if arm.has_stats:
                elapsed = max(0, state.counter - arm.touched)
                stats = ArmStats(weight=arm.weight, mean=arm.mean, m2=arm.m2).decayed(decay_factor(elapsed, half_life))
            arms[name] = ArmSnapshot(stats=stats, state=arm.state or "active", calls=arm.calls, errors=arm.errors)
        return RouteSnapshot(route=route, arms=arms, outcome_count=state.counter)

    # -- admin -----------------------------------------------------------------------------

    def set_arm_state_now(self, route: str, arm: str, state: str) -> None:
        if state not in ARM_STATES:
            raise ValueError(f"arm state must be one of {', '.join(ARM_STATES)}, got {state!r}")
        self._route(route).arms.setdefault(arm, _Arm()).state = state

    def reset_arm_now(self, route: str, arm: str) -> None:
        """Forget an arm's statistics and call counters (its state is kept)."""
        known = self._route(route).arms.get(arm)
        if known is not None:
            self._route(route).arms[arm] = _Arm(state=known.state)

    def record_calls_now(self, route: str, counts: Mapping[str, tuple[int, int]]) -> None:
        for name, (calls, errors) in counts.items():
            arm = self._route(route).arms.setdefault(name, _Arm())
            arm.calls += int(calls)
            arm.errors += int(errors)

    def clear_route_now(self, route: str) -> None:
        self._routes.pop(route, None)

    # -- ArmStatsStore's asynchronous interface ---------------------------------------------

    async def apply(self, route: str, updates: Sequence[ArmUpdate]) -> ApplyResult:
        return self.apply_now(route, updates)

    async def snapshot(self, route: str) -> RouteSnapshot:
        return self.snapshot_now(route)

    async def snapshots(self, routes: Iterable[str]) -> dict[str, RouteSnapshot]:
        return {name: self.snapshot_now(name) for name in routes}

    async def set_arm_state(self, route: str, arm: str, state: str) -> None:
        self.set_arm_state_now(route, arm, state)

    async def reset_arm(self, route: str, arm: str) -> None:
        self.reset_arm_now(route, arm)

    async def record_calls(self, route: str, counts: Mapping[str, tuple[int, int]]) -> None:
        self.record_calls_now(route, counts)

    async def clear_route(self, route: str) -> None:
        self.clear_route_now(route)
