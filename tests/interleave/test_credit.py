"""Click credit and pairwise outcomes of interleaved impressions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.interleave import clicked_positions, credit_click_matrix, credit_clicks, pairwise_outcome


def test_clicks_are_credited_to_the_team_of_their_position() -> None:
    team = np.array([1, 0, 0, 1, 2, 1])
    assert credit_clicks(team, [0, 3, 4], n_rankers=3).tolist() == [0, 2, 1]
    assert credit_clicks(team, [], n_rankers=3).tolist() == [0, 0, 0]
    # a position clicked twice counts once
    assert credit_clicks(team, [1, 1, 2], n_rankers=3).tolist() == [2, 0, 0]


def test_credit_rejects_impossible_clicks() -> None:
    with pytest.raises(ValueError, match="lie in"):
        credit_clicks(np.array([0, 1]), [2], n_rankers=2)
    with pytest.raises(ValueError, match="padded"):
        credit_clicks(np.array([0, 1, -1]), [2], n_rankers=2)
    with pytest.raises(ValueError, match="below n_rankers"):
        credit_clicks(np.array([0, 3]), [0], n_rankers=2)


def test_pairwise_outcome_is_win_loss_tie() -> None:
    outcome = pairwise_outcome(np.array([2, 0, 2]))
    assert outcome.tolist() == [[0, 1, 0], [-1, 0, -1], [0, 1, 0]]
    assert (pairwise_outcome(np.zeros(4, dtype=np.int64)) == 0).all()  # no clicks: a tie for every pair


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 5), st.integers(1, 10), st.integers(0, 2**32 - 1))
def test_batch_credit_matches_single_credit_and_outcomes_are_antisymmetric(n_rankers: int, k: int, seed: int) -> None:
    generator = np.random.default_rng(seed)
    team = generator.integers(-1, n_rankers, size=(7, k))
    clicked = (generator.random((7, k)) < 0.4) & (team >= 0)
    credits = credit_click_matrix(team, clicked, n_rankers)
    for row in range(7):
        assert credits[row].tolist() == credit_clicks(team[row], np.nonzero(clicked[row])[0], n_rankers).tolist()
    outcome = pairwise_outcome(credits)
    assert outcome.shape == (7, n_rankers, n_rankers)
    assert (outcome == -np.swapaxes(outcome, -1, -2)).all()


def test_clicked_item_ids_map_to_positions() -> None:
    shown = ["a", "b", "c", "d"]
    assert clicked_positions(shown, ["c", "a", "c", "zz"]) == [2, 0]
    assert clicked_positions(shown, []) == []
