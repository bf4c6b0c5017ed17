"""Team-draft interleaving and multileaving: properties of the merged list (hypothesis) and fairness."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.interleave import Interleaving, multileave, rankings_from_scores, team_draft


@st.composite
def permutation_batches(draw: st.DrawFn, min_rankers: int = 2, max_rankers: int = 2) -> tuple[np.ndarray, int, int]:
    """Rankings where every ranker orders the same full candidate set, a k and a seed."""
    n_requests = draw(st.integers(1, 6))
    n_rankers = draw(st.integers(min_rankers, max_rankers))
    n_candidates = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**32 - 1))
    generator = np.random.default_rng(seed)
    rankings = np.argsort(generator.random((n_requests, n_rankers, n_candidates)), axis=-1)
    return rankings, draw(st.integers(1, n_candidates)), seed


@st.composite
def ragged_batches(draw: st.DrawFn) -> tuple[np.ndarray, int, int]:
    """Rankers that return different, partial, -1 padded lists over a candidate set."""
    n_requests = draw(st.integers(1, 5))
    n_rankers = draw(st.integers(2, 4))
    length = draw(st.integers(1, 8))
    rankings = np.full((n_requests, n_rankers, length), -1, dtype=np.int64)
    for request in range(n_requests):
        for ranker in range(n_rankers):
            items = draw(st.lists(st.integers(0, 9), max_size=length, unique=True))
            rankings[request, ranker, :len(items)] = items
    return rankings, draw(st.integers(1, 12)), draw(st.integers(0, 2**32 - 1))


def _merge(rankings: np.ndarray, k: int, seed: int) -> Interleaving:
    merge = team_draft if rankings.shape[1] == 2 else multileave
    return merge(rankings, k, np.random.default_rng(seed))


def _check_team_draft_invariant(rankings: np.ndarray, merged: Interleaving) -> None:
    """Each shown candidate is its team's highest-ranked candidate not shown before it."""
    for request in range(rankings.shape[0]):
        shown_so_far: list[int] = []
        for candidate, team in zip(merged.shown[request].tolist(), merged.team[request].tolist()):
            if candidate < 0:
                assert team == -1
                continue
            remaining = [c for c in rankings[request, team].tolist() if c >= 0 and c not in shown_so_far]
            assert remaining[0] == candidate
            shown_so_far.append(candidate)


@settings(max_examples=150, deadline=None)
@given(ragged_batches())
def test_shown_list_has_no_duplicates_and_only_candidates(case: tuple[np.ndarray, int, int]) -> None:
    rankings, k, seed = case
    merged = _merge(rankings, k, seed)
    assert merged.shown.shape == merged.team.shape == (rankings.shape[0], k)
    for request in range(rankings.shape[0]):
        shown = merged.shown[request]
        real = shown[shown >= 0].tolist()
        candidates = set(rankings[request][rankings[request] >= 0].tolist())
        assert len(real) == len(set(real))
        assert set(real) <= candidates
        # the list is as long as the candidates allow, padding only at the end
        assert len(real) == min(k, len(candidates))
        assert (shown[len(real):] == -1).all()
        assert ((merged.team[request] >= 0) == (shown >= 0)).all()
    _check_team_draft_invariant(rankings, merged)


@settings(max_examples=150, deadline=None)
@given(permutation_batches())
def test_team_draft_team_sizes_differ_by_at_most_one_at_every_prefix(case: tuple[np.ndarray, int, int]) -> None:
    rankings, k, seed = case
    merged = team_draft(rankings, k, np.random.default_rng(seed))
    assert (merged.shown >= 0).all()
    sizes = np.cumsum(merged.team == 0, axis=1) - np.cumsum(merged.team == 1, axis=1)
    assert np.abs(sizes).max() <= 1
    _check_team_draft_invariant(rankings, merged)


@settings(max_examples=100, deadline=None)
@given(permutation_batches(min_rankers=3, max_rankers=5))
def test_multileave_team_sizes_differ_by_at_most_one_at_every_prefix(case: tuple[np.ndarray, int, int]) -> None:
    rankings, k, seed = case
    merged = multileave(rankings, k, np.random.default_rng(seed))
    n_rankers = rankings.shape[1]
    counts = np.stack([np.cumsum(merged.team == ranker, axis=1) for ranker in range(n_rankers)])
    assert (counts.max(axis=0) - counts.min(axis=0)).max() <= 1
    _check_team_draft_invariant(rankings, merged)


def test_identical_rankers_give_each_position_to_each_team_half_the_time() -> None:
    # so a click anywhere is credited to either team with probability 1/2; 40 000 requests give
    # a binomial standard error of 0.0025 per position, and 0.015 is six of them (fixed seed)
    generator = np.random.default_rng(11)
    ranking = np.argsort(generator.random(30))
    rankings = np.broadcast_to(ranking, (40_000, 2, 30))
    merged = team_draft(rankings, 10, generator)
    assert (merged.shown == ranking[:10]).all()  # identical rankers show their common list
    share_team_zero = (merged.team == 0).mean(axis=0)
    assert np.abs(share_team_zero - 0.5).max() < 0.015
    # and any fixed click pattern is credited evenly: clicks on positions 0 and 3
    clicked_to_zero = (merged.team[:, [0, 3]] == 0).mean()
    assert abs(clicked_to_zero - 0.5) < 0.015


def test_two_rankers_through_multileave_match_team_draft_in_distribution() -> None:
    generator = np.random.default_rng(5)
    rankings = np.argsort(generator.random((20_000, 2, 8)), axis=-1)
    a = team_draft(rankings, 6, np.random.default_rng(1))
    b = multileave(rankings, 6, np.random.default_rng(1))
    assert (a.shown == b.shown).all() and (a.team == b.team).all()


def test_merge_arguments_are_checked() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="exactly 2"):
        team_draft(np.zeros((1, 3, 4), dtype=np.int64), 2, rng)
    with pytest.raises(ValueError, match=r"\[n_requests, n_rankers, list_length\]"):
        team_draft(np.zeros((2, 4), dtype=np.int64), 2, rng)
    with pytest.raises(ValueError, match="integer"):
        multileave(np.zeros((1, 3, 4)), 2, rng)
    with pytest.raises(ValueError, match="k must be"):
        multileave(np.zeros((1, 3, 4), dtype=np.int64), 0, rng)
    with pytest.raises(ValueError, match="-1 for padding"):
        multileave(np.full((1, 3, 4), -2), 2, rng)
    with pytest.raises(ValueError, match="at least 2"):
        multileave(np.zeros((1, 1, 4), dtype=np.int64), 2, rng)


def test_empty_batch_and_large_batch_shapes() -> None:
    rng = np.random.default_rng(0)
    assert team_draft(np.zeros((0, 2, 5), dtype=np.int64), 3, rng).shown.shape == (0, 3)
    rankings = np.argsort(rng.random((10_000, 2, 12)), axis=-1)  # more than one internal block
    merged = team_draft(rankings, 10, rng)
    assert merged.shown.shape == (10_000, 10)
    assert (np.sort(merged.shown, axis=1)[:, 1:] != np.sort(merged.shown, axis=1)[:, :-1]).all()


def test_rankings_from_scores_orders_descending_with_stable_ties() -> None:
    scores = np.array([[0.1, 0.9, 0.5, 0.9], [1.0, np.nan, 0.0, 2.0]])
    assert rankings_from_scores(scores).tolist() == [[1, 3, 2, 0], [3, 0, 2, 1]]
    assert rankings_from_scores(np.stack([scores, scores])).shape == (2, 2, 4)
    with pytest.raises(ValueError):
        rankings_from_scores(np.array([1.0, 2.0]))
