"""Per-route routing decisions for a batch of requests: arm, propensity, shadow copies (pure).

:class:`RoutePolicy` holds one route's current shares and decides a whole batch with a few
numpy calls (never one call per request). The work that depends on the posteriors - the
probability that each arm is best, the floor/cap/drain constraints and the thinning plan - is
done once per snapshot in :meth:`RoutePolicy.apply_snapshot`, so the propensity logged for every
request of a snapshot is that snapshot's constrained share of the chosen arm:

* ``fixed`` (and ``shadow``, whose primary arms are split by weight): exact;
* ``thompson``: the probability that the arm's posterior draw is the largest, by quadrature
  (error far below the promised +-0.01, see :mod:`router.thompson`), then constrained.

Thompson routes sample a batch in one of two equivalent ways (``draws``). Given a snapshot, each
request of plain Thompson sampling independently picks arm i with probability P(i is best), so

* ``"matched"`` (default) samples the batch from the constrained shares with one uniform per
  request: the logged propensity is then *exactly* the serving probability, and a batch of 256
  costs about ten microseconds;
* ``"posterior"`` draws one posterior sample per arm and request (one numpy call for the batch),
  takes the argmax and thins it to the constrained shares (:mod:`router.allocation`): textbook
  Thompson sampling, about 10x slower, with the propensity exact to the quadrature's accuracy.

A policy is not thread-safe for concurrent *decisions* (the numpy Generator is not), but
:meth:`apply_snapshot` swaps one immutable state object, so a decision never sees half a snapshot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from banditgate.config import Route
from router.allocation import ThinningPlan, apply_thinning, constrain_shares, drain_is_feasible, thinning_plan
from router.arm_stats import ArmStats, RouteSnapshot
from router.sticky import arm_hashes, rendezvous, unit_hashes
from router.thompson import (
    BetaPosterior,
    BetaPrior,
    NormalInverseGammaPrior,
    Posterior,
    StudentTPosterior,
    probability_best,
)


class RoutingError(ValueError):
    """An admin operation on a route cannot be done (unknown arm, would leave no traffic path)."""

    user_facing = True


@dataclass(frozen=True, eq=False)
class Decision:
    """Routing of a batch of n requests."""

    arm_index: np.ndarray
    """int64 [n]: index into ``RoutePolicy.arm_names`` of the arm that answers."""
    propensity: np.ndarray
    """float64 [n]: probability the policy gave the chosen arm at decision time."""
    shadow_mask: np.ndarray
    """bool [n, n_shadows]: which shadows (``RoutePolicy.shadow_names``) mirror each request."""


@dataclass(frozen=True, eq=False)
class _State:
    preferred: np.ndarray  # what the policy alone would give each arm
    shares: np.ndarray  # after floor, caps and drains: the propensities
    drained: np.ndarray
    plan: ThinningPlan
    cumulative: np.ndarray  # CDF of shares, last entry exactly 1
    posterior: Posterior | None = None
    stats: tuple[ArmStats, ...] = field(default_factory=tuple)


class RoutePolicy:
    """One route's policy. Build with :meth:`from_route`."""

    def __init__(self, route_name: str, arm_names: Sequence[str], *, policy_name: str = "thompson",
                 reward: str = "bernoulli", exploration_floor: float = 0.0, caps: Sequence[float] | None = None,
                 weights: Sequence[float] | None = None, shadow_names: Sequence[str] = (),
                 shadow_fraction: float = 1.0, sticky: bool = False, rng: np.random.Generator | None = None,
                 draws: str = "matched",
                 beta_prior: BetaPrior = BetaPrior(),
                 gaussian_prior: NormalInverseGammaPrior = NormalInverseGammaPrior()) -> None:
        """Raises ValueError for inconsistent arguments (the config validator normally catches them)."""
        if not arm_names:
            raise ValueError(f"route {route_name!r} needs at least one arm")
        if reward not in ("bernoulli", "gaussian"):
            raise ValueError(f"reward must be bernoulli or gaussian, got {reward!r}")
        if draws not in ("matched", "posterior"):
            raise ValueError(f"draws must be matched or posterior, got {draws!r}")
        if not 0.0 <= shadow_fraction <= 1.0:
            raise ValueError(f"shadow_fraction must be in [0, 1], got {shadow_fraction!r}")
        self.route_name = route_name
        self.arm_names: tuple[str, ...] = tuple(arm_names)
        self.shadow_names: tuple[str, ...] = tuple(shadow_names)
        self.policy_name = policy_name
        self.reward = reward
        self.exploration_floor = float(exploration_floor)
        self.draws = draws
        count = len(self.arm_names)
        self._caps = np.ones(count) if caps is None else np.asarray(caps, dtype=np.float64)
        self._weights = np.ones(count) if weights is None else np.asarray(weights, dtype=np.float64)
        if self._caps.shape != (count,) or self._weights.shape != (count,) or self._weights.sum() <= 0:
            raise ValueError("caps and weights need one value per arm and weights a positive sum")
        self._shadow_fraction = float(shadow_fraction)
        self._sticky = sticky
        self._arm_hashes = arm_hashes(self.arm_names)
        self._rng = rng if rng is not None else np.random.default_rng()
        self._beta_prior = beta_prior
        self._gaussian_prior = gaussian_prior
        self._floors = np.full(count, self.exploration_floor)
        self._held: frozenset[str] = frozenset()  # drained whatever the store says (a rollout's replaced arm)
        self._stats_by_name: dict[str, ArmStats] = {}
        self._state = self._build(tuple(ArmStats() for _ in self.arm_names), np.zeros(count, dtype=bool))

    @classmethod
    def from_route(cls, route: Route, rng: np.random.Generator | None = None, draws: str = "matched") -> RoutePolicy:
        """The policy a configured route asks for. ``interleave`` routes split primaries by weight."""
        return cls(route.name, [arm.name for arm in route.arms],
                   policy_name=route.policy, reward=route.reward, exploration_floor=route.exploration_floor,
                   caps=[1.0 if arm.max_share is None else arm.max_share for arm in route.arms],
                   weights=[arm.weight for arm in route.arms], shadow_names=[s.name for s in route.shadows],
                   shadow_fraction=route.shadow_fraction, sticky=route.sticky_key is not None, rng=rng,
                   draws=draws)

    # -- state ------------------------------------------------------------------------------

    @property
    def is_thompson(self) -> bool:
        return self.policy_name == "thompson"

    def _build(self, stats: tuple[ArmStats, ...], drained: np.ndarray) -> _State:
        posterior: Posterior | None = None
        if self.is_thompson:
            if self.reward == "bernoulli":
                posterior = BetaPosterior.from_stats(list(stats), self._beta_prior)
            else:
                posterior = StudentTPosterior.from_stats(list(stats), self._gaussian_prior)
            preferred = probability_best(posterior)
        else:
            preferred = self._weights / self._weights.sum()
        drained = drained | np.array([name in self._held for name in self.arm_names], dtype=bool)
        shares = constrain_shares(preferred, self._floors, self._caps, drained)
        cumulative = np.cumsum(shares)
        return _State(preferred=preferred, shares=shares, drained=drained.copy(),
                      plan=thinning_plan(preferred, shares), cumulative=cumulative / cumulative[-1],
                      posterior=posterior, stats=stats)

    def apply_snapshot(self, snapshot: RouteSnapshot) -> None:
        """Adopt a store snapshot: new posteriors, and the store's drained/active states.

        The store is authoritative for arm states: a local :meth:`drain` not also written to the
        store is undone here. Arms the snapshot lacks count as fresh and active.
        """
        arms = [snapshot.arm(name) for name in self.arm_names]
        stats = tuple(arm.stats for arm in arms)
        drained = np.array([arm.state == "drained" for arm in arms], dtype=bool)
        self._state = self._build(stats, drained)
        self._stats_by_name = {name: arm.stats for name, arm in snapshot.arms.items()}

    def reconfigure(self, arm_names: Sequence[str], caps: Sequence[float], weights: Sequence[float],
                    floors: Sequence[float] | None = None, shadow_names: Sequence[str] | None = None,
                    held_drained: Sequence[str] = ()) -> None:
        """Change the arm set at run time (a rollout adds a shadow, a capped canary, a full arm, or
        removes an arm): per-arm caps and weights, per-arm floors (at least the route's exploration
        floor), the shadows, and arms held drained whatever the store says. Arms keep their last
        snapshot's statistics by name; new ones start on the prior until the next snapshot.

        The swap is synchronous (no await), so a batch is decided wholly before or after it.
        Raises ValueError for inconsistent lengths, floors adding up to more than 1, or caps that
        cannot carry all traffic; the policy is unchanged then.
        """
        names = tuple(arm_names)
        count = len(names)
        if count == 0:
            raise ValueError(f"route {self.route_name!r} needs at least one arm")
        cap_array = np.asarray(caps, dtype=np.float64)
        weight_array = np.asarray(weights, dtype=np.float64)
        floor_array = np.maximum(self.exploration_floor,
                                 np.zeros(count) if floors is None else np.asarray(floors, dtype=np.float64))
        if cap_array.shape != (count,) or weight_array.shape != (count,) or floor_array.shape != (count,) \
                or weight_array.sum() <= 0:
            raise ValueError("caps, weights and floors need one value per arm and weights a positive sum")
        held = frozenset(held_drained) & frozenset(names)
        if not drain_is_feasible(floor_array, cap_array, np.array([n in held for n in names], dtype=bool)):
            raise ValueError(f"route {self.route_name!r}: the arms' caps cannot carry all traffic")
        old_names, old_state = self.arm_names, self._state
        known = dict(self._stats_by_name)
        known.update(zip(old_names, old_state.stats))
        store_drained = {name for name, flag in zip(old_names, old_state.drained) if flag and name not in self._held}
        stats = tuple(known.get(name, ArmStats()) for name in names)
        drained = np.array([name in store_drained for name in names], dtype=bool)
        previous = (self.arm_names, self._caps, self._weights, self._floors, self._held, self._arm_hashes,
                    self.shadow_names)
        self.arm_names, self._caps, self._weights, self._floors, self._held = \
            names, cap_array, weight_array, floor_array, held
        self._arm_hashes = arm_hashes(names)
        if shadow_names is not None:
            self.shadow_names = tuple(shadow_names)
        try:
            self._state = self._build(stats, drained)
        except ValueError:
            (self.arm_names, self._caps, self._weights, self._floors, self._held, self._arm_hashes,
             self.shadow_names) = previous
            raise

    def drain(self, arm: str) -> None:
        """Give `arm` exactly the exploration floor from now on (0 if the floor is 0).

        Raises RoutingError for an unknown arm, or when the other arms' caps could not carry the
        traffic (or no active arm would be left).
        """
        index = self._index(arm)
        drained = self._state.drained.copy()
        drained[index] = True
        if drained.all() or not drain_is_feasible(self._floors, self._caps, drained):
            raise RoutingError(f"route {self.route_name!r}: draining arm {arm!r} would leave no arm able to take the traffic")
        self._state = self._build(self._state.stats, drained)

    def restore(self, arm: str) -> None:
        """Undo :meth:`drain`. Raises RoutingError for an unknown arm."""
        index = self._index(arm)
        drained = self._state.drained.copy()
        drained[index] = False
        self._state = self._build(self._state.stats, drained)

    def _index(self, arm: str) -> int:
        try:
            return self.arm_names.index(arm)
        except ValueError:
            raise RoutingError(f"route {self.route_name!r} has no arm {arm!r} (arms: {', '.join(self.arm_names)})") from None

    @property
    def shares(self) -> np.ndarray:
        """Current probability per arm (a copy; sums to 1): the propensities being logged."""
        return self._state.shares.copy()

    @property
    def preferred(self) -> np.ndarray:
        """What the policy alone would give each arm, before floor, caps and drains (a copy)."""
        return self._state.preferred.copy()

    @property
    def drained(self) -> frozenset[str]:
        return frozenset(name for name, flag in zip(self.arm_names, self._state.drained) if flag)

    @property
    def posterior(self) -> Posterior | None:
        """The current snapshot's posterior over the arms' mean rewards (None unless Thompson)."""
        return self._state.posterior

    # -- deciding ---------------------------------------------------------------------------

    def decide(self, n: int, unit_ids: Sequence[str | None] | None = None) -> Decision:
        """Route `n` requests; `unit_ids` (sticky routes) pins each unit with an id to one arm.

        Raises ValueError for a negative `n` or `unit_ids` of another length.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if unit_ids is not None and len(unit_ids) != n:
            raise ValueError(f"unit_ids has {len(unit_ids)} entries for {n} requests")
        state = self._state  # read once: a concurrent apply_snapshot swaps the whole object
        if len(self.arm_names) == 1 and not self.shadow_names:
            # one arm, no shadows: every draw (share, posterior, thinning or sticky unit) picks arm 0, and
            # there is no shadow mask to draw; skipping the numpy draw was 15 us of a REST request's 430
            arms = np.zeros(n, dtype=np.int64)
            return Decision(arm_index=arms, propensity=state.shares[arms], shadow_mask=np.zeros((n, 0), dtype=bool))
        rng = self._rng
        if state.posterior is not None and self.draws == "posterior":
            arms = state.posterior.sample(rng, n).argmax(axis=1)
            if state.plan.needed:
                arms = apply_thinning(arms, state.plan, rng.random((2, n)))
        else:
            # side="right": an arm with share 0 has an empty interval and is never chosen
            arms = np.searchsorted(state.cumulative, rng.random(n), side="right")
            arms = np.minimum(arms, len(self.arm_names) - 1, out=arms)
        arms = arms.astype(np.int64, copy=False)
        if self._sticky and unit_ids is not None:
            positions = [i for i, unit in enumerate(unit_ids) if unit is not None]
            if positions:
                units = unit_hashes([str(unit_ids[i]) for i in positions])
                arms[np.asarray(positions)] = rendezvous(units, self._arm_hashes, state.shares)
        if not self.shadow_names or self._shadow_fraction >= 1.0:
            shadow_mask = np.full((n, len(self.shadow_names)), bool(self.shadow_names))
        else:
            shadow_mask = rng.random((n, len(self.shadow_names))) < self._shadow_fraction
        return Decision(arm_index=arms, propensity=state.shares[arms], shadow_mask=shadow_mask)
