"""Traffic shares under an exploration floor, canary caps and drains, and how to realise them (pure).

A policy first says which share each arm *would* get (Thompson: the probability each arm is
best; fixed: the normalised weights). :func:`constrain_shares` turns that into the shares actually
served: every active arm gets at least the floor and at most its cap, a drained arm gets exactly
the floor, and within those bounds the policy's preferences are kept in proportion
(``share_i = clip(t * preferred_i, floor, cap_i)`` with the one ``t`` that makes shares sum to 1).

For Thompson sampling, requests still draw from the posterior (one draw per arm and request),
and :func:`thinning_plan` / :func:`apply_thinning` adjust the drawn arm so that the final arm is
distributed exactly as the constrained shares: an arm drawn more often than its share is kept
with probability ``share / preferred`` and otherwise replaced by an arm drawn from the
shortfalls ``max(share - preferred, 0)``. Then P(final arm = i) = share_i whenever `preferred` is
the true probability of each draw winning, which is why the logged propensity is the share.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# an active arm the policy gives no traffic at all still gets a vanishing preference, so that
# caps elsewhere can always push the remaining traffic somewhere (never visible at 1e-6 accuracy)
_MINIMUM_PREFERENCE = 1e-12


def constrain_shares(preferred: np.ndarray, floor: float | np.ndarray, caps: np.ndarray, drained: np.ndarray
                     ) -> np.ndarray:
    """Shares per arm (last axis; any leading axes), summing to 1.

    `floor` is one value for every arm or one per arm (a canary's guaranteed share).

    `preferred` is the policy's unconstrained split (non-negative), `caps` the per-arm ceilings
    (1 for none), `drained` a boolean mask. Drained arms get exactly `floor`; active arms get
    ``clip(t * preferred, floor, cap)``. If the active arms' caps cannot absorb the traffic left
    after the drained arms' floors, the drained arms take the rest (so nothing is ever dropped);
    callers that drain on purpose check :func:`drain_is_feasible` first.

    Raises ValueError when `floor` times the number of arms exceeds 1 or a cap is below the floor.
    """
    preferred = np.asarray(preferred, dtype=np.float64)
    arms = preferred.shape[-1]
    caps = np.broadcast_to(np.asarray(caps, dtype=np.float64), preferred.shape)
    drained = np.broadcast_to(np.asarray(drained, dtype=bool), preferred.shape)
    floors = np.broadcast_to(np.asarray(floor, dtype=np.float64), preferred.shape)
    if np.any(floors < 0) or np.any(floors.sum(axis=-1) > 1 + 1e-12):
        raise ValueError(f"floors {np.unique(floors).tolist()} over {arms} arms must add up to at most 1")
    if np.any(caps < floors - 1e-12):
        raise ValueError("every cap must be at least the floor")
    low = np.array(floors)
    high = np.where(drained, floors, caps)
    preferred = np.where(preferred > _MINIMUM_PREFERENCE, preferred, 0.0)
    total = preferred.sum(axis=-1, keepdims=True)
    preferred = np.where(total > 0, preferred / np.where(total > 0, total, 1.0), 1.0 / arms)
    # where no bound binds, the preferences are served as they are (exact fixed-weight propensities)
    untouched = np.all(~drained & (preferred >= low) & (preferred <= high), axis=-1, keepdims=True)
    if untouched.all():
        return preferred
    weight = np.where(drained, 0.0, np.maximum(preferred, _MINIMUM_PREFERENCE))
    t = np.empty((*preferred.shape[:-1], 1))
    for index in np.ndindex(*preferred.shape[:-1]):
        t[index] = _level(weight[index], low[index], high[index])
    shares = np.clip(t * weight, low, high)
    shortfall = 1.0 - shares.sum(axis=-1, keepdims=True)
    # infeasible drains (caps too tight): the drained arms share what nobody else may take
    drained_count = drained.sum(axis=-1, keepdims=True)
    spill = (shortfall > 1e-12) & (drained_count > 0)
    shares = shares + np.where(spill & drained, shortfall / np.maximum(drained_count, 1), 0.0)
    shares = shares / shares.sum(axis=-1, keepdims=True)
    return np.where(untouched, preferred, shares)


def _level(weight: np.ndarray, low: np.ndarray, high: np.ndarray) -> float:
    """The t with sum clip(t * weight, low, high) = 1 (1-D arrays), in O(arms log arms).

    g(t) = sum clip(t * weight, low, high) is piecewise linear and non-decreasing in t, with
    breakpoints where an arm enters (t = low / weight) or leaves (t = high / weight) its linear
    part; g at every breakpoint comes from sorted breakpoints and prefix sums, and g(t) = 1 is
    solved exactly on the segment that crosses 1. If even the last breakpoint gives less than 1
    (caps too tight), that breakpoint is returned and the caller spills the rest.
    """
    moving = weight > 0
    fixed = float(low[~moving].sum())  # an arm of weight 0 sits at its low bound for every t
    weight, low, high = weight[moving], low[moving], high[moving]
    enter, leave = low / weight, high / weight
    by_enter, by_leave = np.argsort(enter), np.argsort(leave)
    enter, leave = enter[by_enter], leave[by_leave]
    candidates = np.unique(np.concatenate([[0.0], enter, leave]))
    # for each candidate t: arms entered (enter <= t) and left (leave <= t), via prefix sums
    entered = np.searchsorted(enter, candidates, side="right")
    left = np.searchsorted(leave, candidates, side="right")
    low_after = np.concatenate([[0.0], np.cumsum(low[by_enter])])  # low of the first n entering
    weight_entered = np.concatenate([[0.0], np.cumsum(weight[by_enter])])
    high_left = np.concatenate([[0.0], np.cumsum(high[by_leave])])
    weight_left = np.concatenate([[0.0], np.cumsum(weight[by_leave])])
    totals = (fixed + (low_after[-1] - low_after[entered]) + candidates * (weight_entered[entered] - weight_left[left])
              + high_left[left])
    # the prefix sums cancel (a weight of 1e-12 next to ones): they only locate the segment,
    # which is then checked and solved with direct sums
    crossing = int(np.searchsorted(totals, 1.0, side="left"))

    def level_at(t: float) -> float:
        return fixed + float(np.clip(t * weight, low, high).sum())

    while 1 < crossing < len(candidates) + 1 and level_at(candidates[crossing - 1]) >= 1.0:
        crossing -= 1
    while crossing < len(candidates) and level_at(candidates[crossing]) < 1.0:
        crossing += 1
    if crossing >= len(candidates):
        return float(candidates[-1])
    if crossing == 0:
        return 0.0
    before, after = candidates[crossing - 1], candidates[crossing]
    middle = 0.5 * (before + after)
    slope = float(np.sum(np.where((middle * weight > low) & (middle * weight < high), weight, 0.0)))
    if slope <= 0:
        return float(after)
    return float(before + (1.0 - level_at(before)) / slope)


def drain_is_feasible(floor: float | np.ndarray, caps: np.ndarray, drained: np.ndarray) -> bool:
    """Whether the active arms' caps plus the drained arms' floors can carry all traffic."""
    caps = np.asarray(caps, dtype=np.float64)
    drained = np.asarray(drained, dtype=bool)
    return bool(np.sum(np.where(drained, floor, caps)) >= 1.0 - 1e-9)


@dataclass(frozen=True)
class ThinningPlan:
    """Per arm: probability a draw of it is kept, and the CDF of replacements (last axis arms)."""

    keep: np.ndarray
    replacement_cdf: np.ndarray
    needed: bool
    """False when shares equal the preferences (nothing to thin: skip the work per batch)."""


def thinning_plan(preferred: np.ndarray, shares: np.ndarray) -> ThinningPlan:
    """The plan that turns draws distributed as `preferred` into arms distributed as `shares`."""
    preferred = np.asarray(preferred, dtype=np.float64)
    shares = np.asarray(shares, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        keep = np.where(preferred > shares, shares / preferred, 1.0)
    shortfall = np.maximum(shares - preferred, 0.0)
    cumulative = np.cumsum(shortfall, axis=-1)
    total = cumulative[..., -1:]
    arms = shares.shape[-1]
    # x / x is exactly 1, so from the last arm with a shortfall on the CDF is 1 and a uniform
    # draw just below 1 never lands on an arm that must not be chosen
    with np.errstate(divide="ignore", invalid="ignore"):
        cdf = np.where(total > 0, cumulative / total, np.arange(1, arms + 1) / arms)
    needed = bool(np.any(keep < 1.0 - 1e-9))  # differences below 1e-9 are invisible in any count
    return ThinningPlan(keep=keep, replacement_cdf=cdf, needed=needed)


def apply_thinning(drawn: np.ndarray, plan: ThinningPlan, uniforms: np.ndarray) -> np.ndarray:
    """Final arms for `drawn` arm indices (shape (*batch, n)) given two uniforms per request.

    `uniforms` has shape (2, *batch, n): the first decides keeping, the second the replacement.
    `plan` arrays have shape (*batch, arms).
    """
    keep = np.take_along_axis(plan.keep, drawn, axis=-1)
    replacement = np.sum(uniforms[1][..., None] >= plan.replacement_cdf[..., None, :], axis=-1)
    replacement = np.minimum(replacement, plan.keep.shape[-1] - 1)
    return np.where(uniforms[0] < keep, drawn, replacement)


def categorical(shares: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Arm indices distributed as `shares` (last axis arms) for uniforms of shape (*batch, n)."""
    cumulative = np.cumsum(shares, axis=-1)
    cumulative = cumulative / cumulative[..., -1:]
    chosen = np.sum(uniforms[..., None] >= cumulative[..., None, :], axis=-1)
    return np.minimum(chosen, shares.shape[-1] - 1)
