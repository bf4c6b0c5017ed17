"""Vectorised simulator of the router's Thompson policy on Bernoulli arms, all seeds at once.

Seeds are one numpy axis and requests are processed in blocks (10 or 250 requests), so a run of
10^6 requests x 100+ seeds is a few thousand numpy steps, not 10^8 Python iterations. The policy
math is the router's own (:mod:`router.thompson`, :mod:`router.allocation`), batched over seeds.

Reward tapes (common random numbers): the m-th pull of arm k in seed s earns
``u(s, k, m) < rate_k`` with u a stable hash, so scenarios run with the same seeds see the same
luck per arm. Comparing them (e.g. delayed vs immediate feedback) then measures the feedback
model rather than which seed drew the unlucky early rewards.

Deciding a block: ``draws="posterior"`` takes one Beta draw per arm and request (textbook
Thompson sampling, used where the snapshot changes every 10 requests); ``draws="matched"`` does
what the gateway does - once per snapshot refresh it computes P(best) by quadrature, applies the
floor, and samples the block from those shares, logging them as propensities.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from router.allocation import constrain_shares
from router.sticky import mix64, to_unit_interval
from router.thompson import BetaPosterior, BetaPrior, probability_best


@dataclass(frozen=True)
class Scenario:
    """One simulated deployment. Times are in requests; `half_life` in outcomes."""

    name: str
    rates: tuple[float, ...]
    horizon: int
    seeds: int
    block: int
    """Requests decided per step; statistics absorb outcomes between blocks."""
    replicas: int = 1
    """Gateways sharing the store; replica r refreshes its snapshot every `replicas` blocks."""
    delay_mean: float = 0.0
    """Mean of the exponential outcome delay; 0 means outcomes land at the end of their block."""
    half_life: float | None = None
    floor: float = 0.0
    switch_at: int | None = None
    switch_rates: tuple[float, ...] | None = None
    draws: str = "posterior"
    window: int = 1000
    """Requests per traffic-share record."""
    log_until: int = 0
    """Requests whose (arm, propensity, reward) feed the off-policy estimates."""
    seed: int = 0
    ring_slots: int = 1024
    """Blocks of future outcomes kept; a delay beyond ring_slots x block lands in the last slot."""


@dataclass
class Result:
    scenario: Scenario
    regret: np.ndarray
    """Pseudo-regret per seed: sum over requests of the chosen arm's gap."""
    window_counts: np.ndarray
    """Requests per (window, seed, arm)."""
    window_regret: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Pseudo-regret per (window, seed)."""
    ipw_terms: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Per seed: sum of w * reward, sum of w, number of logged requests (w = 1/K / propensity)."""
    seconds: float = 0.0


class RewardTapes:
    """Deterministic Bernoulli rewards per (seed, arm, pull index), shared across scenarios."""

    def __init__(self, seeds: int, arms: int, seed: int) -> None:
        self._keys = mix64(np.arange(seeds, dtype=np.uint64) + np.uint64(seed) * np.uint64(1_000_003))
        self.pulls = np.zeros((seeds, arms), dtype=np.int64)
        self._arm_salts = mix64(np.arange(arms, dtype=np.uint64) + np.uint64(0xA5A5))

    @classmethod
    def for_seed(cls, index: int, arms: int, seed: int) -> RewardTapes:
        """The tapes of seed `index` alone (batch of one): the same rewards as row `index` of
        ``RewardTapes(seeds, arms, seed)``, so a per-seed run shares the vectorised runs' luck."""
        tapes = cls(1, arms, seed)
        tapes._keys = mix64(np.array([index], dtype=np.uint64) + np.uint64(seed) * np.uint64(1_000_003))
        return tapes

    def draw(self, onehot: np.ndarray, rates: np.ndarray) -> np.ndarray:
        """Rewards (bool, (seeds, n)) for one-hot arm choices (seeds, n, arms) in order along axis 1."""
        # pull index of each request: the arm's pulls so far plus its rank within this block
        index = ((self.pulls[:, None, :] + np.cumsum(onehot, axis=1) - 1) * onehot).sum(axis=2)
        self.pulls += onehot.sum(axis=1)
        salts = (self._arm_salts * onehot).sum(axis=2, dtype=np.uint64)
        hashed = mix64(self._keys[:, None] ^ salts ^ mix64(index.astype(np.uint64)))
        return to_unit_interval(hashed) < (rates * onehot).sum(axis=2)


def simulate(scenario: Scenario, progress: Callable[[float], None] | None = None) -> Result:
    """Run one scenario for all its seeds. Raises ValueError for inconsistent block sizes."""
    sc = scenario
    if sc.horizon % (sc.block * sc.replicas) or sc.window % sc.block:
        raise ValueError(f"{sc.name}: horizon and window must be multiples of block x replicas")
    if sc.switch_at is not None and sc.switch_at % sc.block:
        raise ValueError(f"{sc.name}: switch_at must fall on a block boundary")
    started = time.perf_counter()
    seeds, arms = sc.seeds, len(sc.rates)
    rng = np.random.default_rng(sc.seed)
    tapes = RewardTapes(seeds, arms, sc.seed)
    rates_before = np.asarray(sc.rates, dtype=np.float64)
    rates_after = np.asarray(sc.switch_rates or sc.rates, dtype=np.float64)
    decay_per_outcome = 2.0 ** (-1.0 / sc.half_life) if sc.half_life else 1.0
    weight = np.zeros((seeds, arms))  # the store: decayed outcome count and successes per arm
    successes = np.zeros((seeds, arms))
    snapshot_weight = np.zeros((seeds, sc.replicas, arms))
    snapshot_successes = np.zeros((seeds, sc.replicas, arms))
    shares = np.full((seeds, sc.replicas, arms), 1.0 / arms)
    pending = np.zeros((sc.ring_slots, seeds, arms, 2)) if sc.delay_mean > 0 else None
    replica_of = np.arange(sc.block) % sc.replicas
    seed_index = np.arange(seeds)[:, None]
    regret = np.zeros(seeds)
    windows = np.zeros((sc.horizon // sc.window, seeds, arms), dtype=np.int32)
    window_regret = np.zeros((sc.horizon // sc.window, seeds))
    ipw = np.zeros((seeds, 3))
    arm_range = np.arange(arms)
    prior = BetaPrior()
    caps = np.ones(arms)
    no_drains = np.zeros(arms, dtype=bool)
    blocks = sc.horizon // sc.block
    report_every = max(1, blocks // 20)
    for block in range(blocks):
        start = block * sc.block
        if pending is not None:
            slot = block % sc.ring_slots
            _absorb(weight, successes, pending[slot, ..., 0], pending[slot, ..., 1], decay_per_outcome)
            pending[slot] = 0.0
        replica = block % sc.replicas
        snapshot_weight[:, replica] = weight
        snapshot_successes[:, replica] = successes
        if sc.draws == "matched":
            posterior = BetaPosterior.from_counts(weight, successes)
            shares[:, replica] = constrain_shares(probability_best(posterior), sc.floor, caps, no_drains)
        if sc.draws == "posterior":
            # alpha, beta of BetaPosterior.from_counts with the default Beta(1, 1) prior, inlined:
            # this runs 10^5 times per scenario
            snapshot_failures = snapshot_weight - snapshot_successes
            if sc.replicas > 1:
                alpha = prior.alpha + snapshot_successes[:, replica_of]
                beta = prior.beta + snapshot_failures[:, replica_of]
            else:
                alpha, beta = prior.alpha + snapshot_successes, prior.beta + snapshot_failures
            chosen = rng.beta(alpha, beta, size=(seeds, sc.block, arms)).argmax(axis=2)
        else:
            cumulative = np.cumsum(shares[:, replica_of], axis=2)
            uniform = rng.random((seeds, sc.block))
            chosen = np.minimum(np.sum(uniform[..., None] >= cumulative, axis=2), arms - 1)
        onehot = chosen[..., None] == arm_range
        switched = sc.switch_at is not None and start >= sc.switch_at
        rates = rates_after if switched else rates_before
        rewards = tapes.draw(onehot, rates)
        counts = onehot.sum(axis=1)
        block_regret = counts @ (rates.max() - rates)
        regret += block_regret
        window_regret[start // sc.window] += block_regret
        windows[start // sc.window] += counts
        if start < sc.log_until:
            propensity = shares[seed_index, replica_of[None, :], chosen]
            importance = (1.0 / arms) / propensity
            ipw[:, 0] += (importance * rewards).sum(axis=1)
            ipw[:, 1] += importance.sum(axis=1)
            ipw[:, 2] += sc.block
        if pending is None:
            new_successes = (onehot & rewards[..., None]).sum(axis=1)
            _absorb(weight, successes, new_successes, counts - new_successes, decay_per_outcome)
        else:
            arrival = start + np.arange(sc.block) + rng.exponential(sc.delay_mean, size=(seeds, sc.block))
            arrival_block = np.minimum(np.ceil(arrival / sc.block).astype(np.int64), block + sc.ring_slots - 1)
            np.add.at(pending, (arrival_block % sc.ring_slots, np.broadcast_to(seed_index, chosen.shape), chosen,
                                (~rewards).astype(np.int64)), 1.0)
        if progress is not None and (block + 1) % report_every == 0:
            progress((block + 1) / blocks)
    return Result(scenario=sc, regret=regret, window_counts=windows, window_regret=window_regret, ipw_terms=ipw,
                  seconds=time.perf_counter() - started)


def _absorb(weight: np.ndarray, successes: np.ndarray, new_successes: np.ndarray, new_failures: np.ndarray,
            decay_per_outcome: float) -> None:
    """Add arrived outcomes to the store's statistics, decaying old evidence per outcome.

    The outcomes of one block count as its last ones (all weight 1); with <= a few hundred
    outcomes per block and half-lives of tens of thousands this is exact to well under 1%.
    """
    arrived = new_successes + new_failures
    if decay_per_outcome < 1.0:
        factor = decay_per_outcome ** arrived.sum(axis=1, keepdims=True)
        weight *= factor
        successes *= factor
    weight += arrived
    successes += new_successes


def lai_robbins(rates: tuple[float, ...], horizon: int) -> float:
    """Lai-Robbins lower-bound constant times ln T: sum over suboptimal arms of gap / KL(mu_i, mu*)."""
    best = max(rates)
    total = 0.0
    for rate in rates:
        if rate < best:
            kl = rate * np.log(rate / best) + (1 - rate) * np.log((1 - rate) / (1 - best))
            total += (best - rate) / kl
    return float(total * np.log(horizon))


def requests_to_share(result: Result, arm: int, share: float) -> np.ndarray:
    """Per seed, requests after the switch until the first window with >= `share` on `arm`.

    Counted to the end of that window; seeds that never get there report the requests left.
    """
    sc = result.scenario
    if sc.switch_at is None:
        raise ValueError(f"{sc.name} has no switch")
    first = sc.switch_at // sc.window
    counts = result.window_counts[first:].astype(np.float64)
    fraction = counts[..., arm] / counts.sum(axis=2)
    reached = fraction >= share
    index = np.where(reached.any(axis=0), reached.argmax(axis=0), len(counts) - 1)
    return (index + 1) * float(sc.window)
