"""Team-draft interleaving and multileaving of rankers' lists, and click credit (pure numpy).

Each request has candidates (indices 0..n_candidates-1 into the request's `items`); each ranker
(arm) ranks them. `team_draft` (two rankers; Radlinski, Kurup, Joachims 2008; Chapelle et al.
2012) and `multileave` (team-draft multileaving, any number of rankers; Schuth et al. 2014) merge
the rankers' lists into one shown list of length k and record which ranker ("team") contributed
each position. Clicks on the shown list are credited to teams (`credit_clicks`) and every pair of
rankers gets a win, loss or tie per impression (`pairwise_outcome`); `router.preference` turns the
counts into verdicts.

Rankings format: an integer array [n_requests, n_rankers, list_length] of candidate indices in
rank order. Ragged input (requests with fewer candidates, or rankers that only return their
top-k) is padded with -1; a -1 is skipped wherever it appears, so padding never reaches the
shown list except as -1 at its end when fewer than k distinct candidates exist.

Candidate indices should be dense (below the number of items): the merge keeps one flag per
request and candidate index. Each arm's own top-k, which the prediction event logs so that an
impression can be re-scored later, is simply `rankings[:, arm, :k]`.

The merge is vectorized across requests: one loop over the k positions, numpy over requests;
it draws one uniform per request, ranker and position from the injected generator.

>>> import numpy as np
>>> rankings = np.array([[[0, 1, 2, 3], [3, 2, 1, 0]]])
>>> merged = team_draft(rankings, k=4, rng=np.random.default_rng(0))
>>> sorted(merged.shown[0].tolist())
[0, 1, 2, 3]
>>> sorted(merged.team[0].tolist())
[0, 0, 1, 1]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Interleaving",
    "clicked_positions",
    "credit_click_matrix",
    "credit_clicks",
    "multileave",
    "pairwise_outcome",
    "rankings_from_scores",
    "team_draft",
]


@dataclass(frozen=True)
class Interleaving:
    """A batch of merged lists.

    `shown[i, p]` is the candidate index shown at position p of request i (-1: nothing, only at
    the end when fewer than k distinct candidates were ranked); `team[i, p]` is the ranker that
    contributed it (-1 where `shown` is -1). Both are int64 arrays [n_requests, k].
    """

    shown: np.ndarray
    team: np.ndarray


def rankings_from_scores(scores: np.ndarray) -> np.ndarray:
    """Turn scores into rankings: candidate indices ordered by descending score.

    `scores` is [n_rankers, n_candidates] (one request) or [..., n_rankers, n_candidates] (a
    batch); the result has the same shape, int64. Ties keep the lower candidate index first
    (stable), so equal scores give a deterministic order; NaN scores rank last.
    Raises ValueError when `scores` has fewer than two dimensions.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim < 2:
        raise ValueError(f"scores must be [n_rankers, n_candidates] (or batched), got shape {scores.shape}")
    # -scores keeps NaN (sorted last by numpy) last, and stable sort keeps ties in index order
    return np.argsort(-scores, axis=-1, kind="stable").astype(np.int64)


def team_draft(rankings: np.ndarray, k: int, rng: np.random.Generator) -> Interleaving:
    """Team-draft interleave two rankers' lists per request (vectorized across requests).

    Each round both teams pick once, in an order decided by a fair coin; a team picks its
    highest-ranked candidate not shown yet. So the teams' sizes differ by at most one at every
    prefix (until one ranker runs out of candidates, after which the other fills the list).
    `rankings`: int [n_requests, 2, list_length], -1 padded (see the module docstring).
    Raises ValueError on a wrong shape, a non-integer dtype, indices below -1, k < 1, or a
    number of rankers other than two (use `multileave`).
    """
    rankings = _check_rankings(rankings, k)
    if rankings.shape[1] != 2:
        raise ValueError(f"team_draft merges exactly 2 rankers, got {rankings.shape[1]}; use multileave")
    return _team_draft_merge(rankings, k, rng)


def multileave(rankings: np.ndarray, k: int, rng: np.random.Generator) -> Interleaving:
    """Team-draft multileave any number (>= 2) of rankers' lists per request (Schuth et al. 2014).

    At each position the team with the fewest picks so far picks next, ties broken uniformly at
    random; this is the same as every round drawing a random order of all teams. With two
    rankers it is exactly `team_draft`.
    `rankings`: int [n_requests, n_rankers, list_length], -1 padded.
    Raises ValueError on a wrong shape or dtype, indices below -1, k < 1, or fewer than 2 rankers.
    """
    return _team_draft_merge(_check_rankings(rankings, k), k, rng)


def _check_rankings(rankings: np.ndarray, k: int) -> np.ndarray:
    rankings = np.asarray(rankings)
    if rankings.ndim != 3:
        raise ValueError(f"rankings must be [n_requests, n_rankers, list_length], got shape {rankings.shape}")
    if not np.issubdtype(rankings.dtype, np.integer):
        raise ValueError(f"rankings must hold integer candidate indices, got dtype {rankings.dtype}")
    if rankings.shape[1] < 2:
        raise ValueError(f"interleaving needs at least 2 rankers, got {rankings.shape[1]}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if rankings.size and rankings.min() < -1:
        raise ValueError("rankings hold candidate indices >= 0, or -1 for padding")
    return rankings.astype(np.int64, copy=False)


_BLOCK_REQUESTS = 4096  # large batches merge block by block: arrays that fit in cache are ~3x faster


def _team_draft_merge(rankings: np.ndarray, k: int, rng: np.random.Generator) -> Interleaving:
    if rankings.shape[0] > _BLOCK_REQUESTS:
        blocks = [_team_draft_merge(rankings[start:start + _BLOCK_REQUESTS], k, rng)
                  for start in range(0, rankings.shape[0], _BLOCK_REQUESTS)]
        return Interleaving(shown=np.concatenate([block.shown for block in blocks]),
                            team=np.concatenate([block.team for block in blocks]))
    n_requests, n_rankers, length = rankings.shape
    shown = np.full((n_requests, k), -1, dtype=np.int64)
    team = np.full((n_requests, k), -1, dtype=np.int64)
    if n_requests == 0 or length == 0:
        return Interleaving(shown=shown, team=team)
    n_candidates = int(rankings.max()) + 1
    # padding maps to an extra "candidate" that counts as already shown, so it is always skipped
    stride = n_candidates + 1
    flat_rankings = np.where(rankings < 0, n_candidates, rankings).ravel()
    used = np.zeros(n_requests * stride, dtype=bool)
    used[n_candidates::stride] = True
    # flat views over [n_requests, n_rankers]: the list of (request, ranker) starts at list_start
    list_start = np.arange(n_requests * n_rankers, dtype=np.int64) * length
    used_start = np.repeat(np.arange(n_requests, dtype=np.int64) * stride, n_rankers)
    pointer = np.zeros(n_requests * n_rankers, dtype=np.int64)
    candidate = flat_rankings[list_start].copy()
    inside = np.ones(n_requests * n_rankers, dtype=bool)
    picks = np.zeros((n_requests, n_rankers))
    rows = np.arange(n_requests)
    stale = np.flatnonzero(candidate == n_candidates)
    for position in range(k):
        # move the pointers that sit on a shown candidate (or padding) forward until they do not;
        # only those few are touched, and a pointer never moves back
        while stale.size:
            pointer[stale] += 1
            inside[stale] = pointer[stale] < length
            candidate[stale] = flat_rankings[list_start[stale] + np.minimum(pointer[stale], length - 1)]
            stale = stale[inside[stale] & used[used_start[stale] + candidate[stale]]]
        # fewest picks first; the uniform draw in [0, 1) breaks ties only among the fewest
        key = picks + rng.random((n_requests, n_rankers))
        key[~inside.reshape(n_requests, n_rankers)] = np.inf
        picker = key.argmin(axis=1)
        picked = rows * n_rankers + picker
        has_candidate = inside[picked]
        chosen = np.where(has_candidate, candidate[picked], -1)
        shown[:, position] = chosen
        team[:, position] = np.where(has_candidate, picker, -1)
        used[rows * stride + np.where(has_candidate, chosen, n_candidates)] = True
        picks[rows, picker] += has_candidate
        # the chosen candidate is now shown: every pointer on it must move on
        stale = np.flatnonzero(inside & (candidate == np.repeat(chosen, n_rankers)))
    return Interleaving(shown=shown, team=team)


def clicked_positions(shown_items: Sequence[str], clicks: Sequence[str]) -> list[int]:
    """Map clicked item ids to their positions in the shown list, in click order, each once.

    Clicks on items that were not shown cannot be credited to a team and are left out; the
    caller compares lengths to count them. A repeated click on the same item counts once, so
    a user re-opening a result does not give its team extra credit.
    """
    position_of = {item: position for position, item in enumerate(shown_items)}
    positions: list[int] = []
    for item in clicks:
        position = position_of.get(item)
        if position is not None and position not in positions:
            positions.append(position)
    return positions


def credit_clicks(team: np.ndarray, clicked_positions: Sequence[int], n_rankers: int) -> np.ndarray:
    """Clicks per team for one impression: int64 [n_rankers].

    `team` is the impression's team per position ([k], as in `Interleaving.team`); each distinct
    clicked position credits the team that contributed it.
    Raises ValueError when a position is outside the list or on padding (team -1), or when a
    team index is not below n_rankers.
    """
    team = np.asarray(team, dtype=np.int64)
    if team.ndim != 1:
        raise ValueError(f"team must be one impression's [k] teams, got shape {team.shape}")
    if n_rankers < 1 or team.max(initial=-1) >= n_rankers:
        raise ValueError(f"team indices must be below n_rankers={n_rankers}")
    positions = np.unique(np.asarray(list(clicked_positions), dtype=np.int64))
    if positions.size and (positions.min() < 0 or positions.max() >= team.size):
        raise ValueError(f"clicked positions must lie in [0, {team.size}), got {positions.tolist()}")
    credited = team[positions]
    if (credited < 0).any():
        raise ValueError("a click on a padded position (team -1) cannot be credited")
    return np.bincount(credited, minlength=n_rankers).astype(np.int64)


def credit_click_matrix(team: np.ndarray, clicked: np.ndarray, n_rankers: int) -> np.ndarray:
    """Clicks per team for a batch of impressions: int64 [n_impressions, n_rankers].

    `team` is int [n_impressions, k]; `clicked` is bool [n_impressions, k] (position clicked).
    Clicks on padded positions (team -1) are not counted.
    Raises ValueError when the shapes differ or n_rankers < 1.
    """
    team = np.asarray(team)
    clicked = np.asarray(clicked, dtype=bool)
    if team.shape != clicked.shape or team.ndim != 2:
        raise ValueError(f"team and clicked must both be [n_impressions, k], got {team.shape} and {clicked.shape}")
    if n_rankers < 1:
        raise ValueError(f"n_rankers must be at least 1, got {n_rankers}")
    credits = np.zeros((team.shape[0], n_rankers), dtype=np.int64)
    for ranker in range(n_rankers):  # n_rankers is small; each pass is vectorized over impressions
        credits[:, ranker] = np.count_nonzero((team == ranker) & clicked, axis=1)
    return credits


def pairwise_outcome(credits: np.ndarray) -> np.ndarray:
    """Win (+1), loss (-1) or tie (0) of ranker i against ranker j: int8 [..., n_rankers, n_rankers].

    `credits` is clicks per team ([n_rankers], or batched [..., n_rankers]); i beats j when its
    team got more clicks. An impression without clicks is a tie for every pair. The diagonal is 0.
    """
    credits = np.asarray(credits)
    return np.sign(credits[..., :, None] - credits[..., None, :]).astype(np.int8)
