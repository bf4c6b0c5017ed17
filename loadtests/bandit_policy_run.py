"""Runs a bandit scenario through the gateway's own objects: RoutePolicy and an arm-statistics store.

Where :mod:`loadtests.bandit_sim` re-implements the policy vectorised over seeds, this runs, per
seed, what a deployment runs:

* one :class:`router.decision.RoutePolicy` per gateway replica, built by ``RoutePolicy.from_route``
  from a configured :class:`banditgate.config.Route` (floor, half-life, draws), deciding its share
  of each block of requests with ``decide`` (request j of a block goes to replica j mod R);
* a :class:`router.memory_store.MemoryArmStatsStore` (the Redis store's semantics, tested against
  Redis) receiving each outcome when it arrives, in arrival order, the way the feedback worker
  applies a batch (counter, lazy decay per outcome, Welford update);
* replica ``block mod R`` refreshing its snapshot at the start of each block with
  ``store.snapshot_now`` + ``policy.apply_snapshot``, as the SnapshotRefresher does every
  ``snapshot_refresh_ms``.

Rewards come from the same hashed tapes as the vectorised simulator (seed s, arm k, m-th pull),
so a scenario run here and one simulated there see the same luck per arm. Seeds run in up to
two worker processes; every seed's random streams are fixed by (scenario seed, seed index), so
the result does not depend on how seeds are spread over workers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from banditgate.config import Route
from loadtests.bandit_sim import Result, RewardTapes, Scenario
from router.decision import RoutePolicy
from router.memory_store import MemoryArmStatsStore

ROUTE = "bench"


def route_for(scenario: Scenario) -> Route:
    """The configured route a scenario deploys: Thompson sampling on Bernoulli rewards."""
    return Route(name=ROUTE, policy="thompson", reward="bernoulli", exploration_floor=scenario.floor,
                 half_life=scenario.half_life,
                 arms=[{"name": f"arm{k}", "model": "m", "version": 1} for k in range(len(scenario.rates))])


@dataclass
class SeedResult:
    regret: float
    window_counts: np.ndarray  # (windows, arms)
    window_regret: np.ndarray  # (windows,)
    ipw_terms: np.ndarray  # (3,)


def run_seed(scenario: Scenario, index: int) -> SeedResult:
    """One seed of `scenario` through RoutePolicy and MemoryArmStatsStore."""
    sc = scenario
    arms = len(sc.rates)
    route = route_for(sc)
    names = tuple(arm.name for arm in route.arms)
    store = MemoryArmStatsStore(half_lives={ROUTE: sc.half_life})
    policies = [RoutePolicy.from_route(route, rng=np.random.default_rng([sc.seed, index, replica]), draws=sc.draws)
                for replica in range(sc.replicas)]
    delays = np.random.default_rng([sc.seed, index, 1_000_003])
    tapes = RewardTapes.for_seed(index, arms, sc.seed)
    rates_before = np.asarray(sc.rates, dtype=np.float64)
    rates_after = np.asarray(sc.switch_rates or sc.rates, dtype=np.float64)
    pending: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}  # block -> (arrival, arm, reward)
    windows = np.zeros((sc.horizon // sc.window, arms), dtype=np.int64)
    window_regret = np.zeros(sc.horizon // sc.window)
    ipw = np.zeros(3)
    regret = 0.0
    arm_range = np.arange(arms)
    chosen = np.empty(sc.block, dtype=np.int64)
    propensity = np.empty(sc.block)
    for block in range(sc.horizon // sc.block):
        start = block * sc.block
        arrived = pending.pop(block, None)
        if arrived:
            arrival = np.concatenate([a for a, _, _ in arrived])
            order = np.argsort(arrival, kind="stable")
            store.apply_rewards(ROUTE, names, np.concatenate([k for _, k, _ in arrived])[order],
                                np.concatenate([r for _, _, r in arrived])[order])
        policies[block % sc.replicas].apply_snapshot(store.snapshot_now(ROUTE))
        for replica, policy in enumerate(policies):
            decision = policy.decide(len(range(replica, sc.block, sc.replicas)))
            chosen[replica::sc.replicas] = decision.arm_index
            propensity[replica::sc.replicas] = decision.propensity
        rates = rates_after if sc.switch_at is not None and start >= sc.switch_at else rates_before
        onehot = chosen[None, :, None] == arm_range
        rewards = tapes.draw(onehot, rates)[0]
        counts = onehot[0].sum(axis=0)
        block_regret = float(counts @ (rates.max() - rates))
        regret += block_regret
        window_regret[start // sc.window] += block_regret
        windows[start // sc.window] += counts
        if start < sc.log_until:
            importance = (1.0 / arms) / propensity
            ipw += (float(importance @ rewards), float(importance.sum()), sc.block)
        if sc.delay_mean > 0:
            arrival = start + np.arange(sc.block) + delays.exponential(sc.delay_mean, size=sc.block)
            lands = np.minimum(np.ceil(arrival / sc.block).astype(np.int64), block + sc.ring_slots - 1)
            order = np.argsort(lands, kind="stable")
            lands, arrival = lands[order], arrival[order]
            arm_of, reward_of = chosen[order], rewards[order].astype(np.float64)
            slots, firsts = np.unique(lands, return_index=True)
            ends = [*firsts[1:].tolist(), len(lands)]
            for slot, first, end in zip(slots.tolist(), firsts.tolist(), ends):
                pending.setdefault(slot, []).append((arrival[first:end], arm_of[first:end], reward_of[first:end]))
        else:
            store.apply_rewards(ROUTE, names, chosen, rewards.astype(np.float64))
    return SeedResult(regret=regret, window_counts=windows, window_regret=window_regret, ipw_terms=ipw)


def _run_seeds(scenario: Scenario, indices: list[int]) -> list[SeedResult]:
    return [run_seed(scenario, index) for index in indices]


def run(scenario: Scenario, progress: Callable[[float], None] | None = None, workers: int | None = None) -> Result:
    """All seeds of `scenario` (in up to `workers` processes, default min(2, CPUs)); a Result
    shaped like :func:`loadtests.bandit_sim.simulate`'s."""
    started = time.perf_counter()
    workers = workers or min(2, os.cpu_count() or 1)
    # small chunks keep both workers busy to the end and give progress reports
    chunks = [list(range(first, min(first + 4, scenario.seeds))) for first in range(0, scenario.seeds, 4)]
    results: list[SeedResult] = []
    if workers <= 1:
        for done, chunk in enumerate(chunks, 1):
            results += _run_seeds(scenario, chunk)
            if progress is not None:
                progress(done / len(chunks))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for done, part in enumerate(pool.map(_run_seeds, [scenario] * len(chunks), chunks), 1):
                results += part
                if progress is not None:
                    progress(done / len(chunks))
    return Result(scenario=scenario, regret=np.array([r.regret for r in results]),
                  window_counts=np.stack([r.window_counts for r in results], axis=1),
                  window_regret=np.stack([r.window_regret for r in results], axis=1),
                  ipw_terms=np.stack([r.ipw_terms for r in results]), seconds=time.perf_counter() - started)
