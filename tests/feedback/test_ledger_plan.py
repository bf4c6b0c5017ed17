"""The ledger planner refuses, never raises: a reward the arm statistics cannot take (an arm name
with ':', a NaN, a number past the events contract's bound; e.g. from a join entry written before
the decoders checked them) is handed back to be dead-lettered, and the rest of the batch is
planned. Before, LedgerPlanner.plan raised ValueError and the worker stopped on every restart."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis.asyncio as aredis

from banditgate.events import MAX_MAGNITUDE
from feedback.join import Count, Reward, Served
from feedback.ledger import FeedbackKeys, Ledger, LedgerPlanner, Refusal
from feedback.outcome_metrics import PredictionView
from feedback.sinks import Plan, RedisSink
from router.stats_store import ArmStatsStore

A = Served("a", "m", 3, PredictionView(0.8, 1), offset=1)


@pytest.fixture
def store() -> Iterator[ArmStatsStore]:
    client = aredis.Redis()  # never connected: planning is pure CPU, the client only registers scripts
    yield ArmStatsStore(client, prefix="p")


def _reward(request_id: str, reward: float, arm: str = "a") -> Reward:
    served = A if arm == "a" else Served(arm, "m", 3, PredictionView(0.8, 1), offset=1)
    return Reward("churn", request_id, served, reward, False, 100.0)


@pytest.mark.parametrize(("effect", "reason"), [
    (_reward("r", 1.0, arm="a:b"), "bad_id"),
    (_reward("r", 1.0, arm=""), "bad_id"),
    (_reward("r", float("nan")), "not_finite"),
    (_reward("r", float("-inf")), "not_finite"),
    (_reward("r", 1e200), "out_of_range"),
    (_reward("r", -MAX_MAGNITUDE * 1.000001), "out_of_range"),
])
def test_a_reward_the_arm_statistics_cannot_take_is_refused_not_raised(store, effect, reason) -> None:
    planner = LedgerPlanner(FeedbackKeys("p"), 60.0)
    good = [Count("churn", "g", "joined", "decision", "a"), _reward("g", 1.0)]
    refused: list[Refusal] = []
    [chunk] = planner.plan([good[0], effect, good[1]], store, refused)
    assert chunk.members == good
    assert [(r.effect, r.reason) for r in refused] == [(effect, reason)]
    assert "churn" in refused[0].error and "\n" not in refused[0].error
    with pytest.raises(ValueError):  # without a list to refuse into, as ArmUpdate does
        planner.plan([effect], store)


def test_the_sink_plan_carries_the_refusals(store) -> None:
    keys = FeedbackKeys("p")
    sink = RedisSink(store, Ledger(store._client, keys, 3600), LedgerPlanner(keys, 60.0))
    plan = sink.plan([_reward("bad", 1.0, arm="a:b"), _reward("ok", MAX_MAGNITUDE)])
    assert isinstance(plan, Plan)
    assert [r.effect.request_id for r in plan.refused] == ["bad"]
    assert [m.request_id for chunk in plan.pending for m in chunk.members] == ["ok"]
