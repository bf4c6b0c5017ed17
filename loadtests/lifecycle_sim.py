"""Simulator of one route's rollout of a new model version on delayed labels (one seed per call).

The route serves an incumbent version; at request ``arrival`` a new version appears and the real
rollout state machine (:mod:`router.rollout`) takes it through its stages, driven by

* the real shadow test (:func:`feedback.outcome_metrics.shadow_verdict`) on paired label losses of the
  requests the candidate mirrored, counted when their labels arrive;
* the real router (:class:`router.decision.RoutePolicy`, Thompson sampling with the canary's cap)
  fed snapshots of arm statistics every ``block`` requests, as a gateway refreshes them;
* the real guardrail (:func:`router.guardrail.evaluate`) and the rollout's own reward test,
  error-rate and p99 checks on the candidate's calls.

Time is counted in requests. Each request's outcome (reward and label) arrives after an
exponential delay; calls (errors, latency) are known at once. Every version has a true reward
rate, a label accuracy (equal to the reward rate for an honest version; higher for one that looks
better offline than it does online), an error rate and a log-normal latency. Within a seed the
work is vectorized per block (one numpy pass over the block's requests and the outcomes that
arrived during it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from banditgate.config import Guardrail, Rollout
from feedback.outcome_metrics import QualityStats, shadow_verdict
from router.arm_stats import ArmSnapshot, ArmStats, RouteSnapshot
from router.decision import RoutePolicy
from router.guardrail import evaluate
from router.rollout import Evidence, RolloutState, start, step

_STAGE_CODE = {"shadow": 0, "canary": 1, "full": 2, "done": 3, "rejected": 4, "rolled_back": 5}
_LATENCY_SIGMA = 0.5  # log-normal: p99 = median * exp(2.326 * 0.5) ~ 3.2 x median


@dataclass(frozen=True)
class Version:
    """A model version's true behaviour."""

    reward_rate: float
    label_accuracy: float | None = None
    """Chance its prediction matches the label (default: the reward rate)."""
    error_rate: float = 0.001
    median_latency_ms: float = 40.0

    @property
    def accuracy(self) -> float:
        return self.reward_rate if self.label_accuracy is None else self.label_accuracy

    @property
    def p99_latency_ms(self) -> float:
        return self.median_latency_ms * float(np.exp(2.326 * _LATENCY_SIGMA))


@dataclass(frozen=True)
class Scenario:
    name: str
    incumbent: Version
    candidate: Version
    horizon: int = 30_000
    arrival: int = 1_000
    block: int = 250
    delay_mean: float = 1_500.0
    incumbent_history: int = 3_000
    """Outcomes the incumbent had before the horizon (its arm statistics at the start)."""

    def acceptable(self, config: Rollout) -> bool:
        """Whether the candidate is one an operator wants: within the latency and error limits."""
        limit = config.canary.max_p99_latency_ms
        return (self.candidate.error_rate <= config.canary.max_error_rate
                and (limit is None or self.candidate.p99_latency_ms <= limit))

    def oracle_rate(self, config: Rollout) -> float:
        """Reward rate of an oracle that switches to the better acceptable version at once."""
        if self.acceptable(config) and self.candidate.reward_rate > self.incumbent.reward_rate:
            return self.candidate.reward_rate
        return self.incumbent.reward_rate


@dataclass
class Run:
    """What one seed of one scenario did."""

    final_stage: str
    stage_at: dict[str, int] = field(default_factory=dict)
    """Request index at which each stage was entered."""
    outcomes_at: dict[str, int] = field(default_factory=dict)
    """Route outcomes that had arrived since the version's arrival when each stage was entered."""
    max_candidate_share: float = 0.0
    """Largest traffic share (propensity) the policy ever gave the candidate."""
    served_by_candidate: int = 0
    regret: float = 0.0
    """Sum over requests from arrival of (oracle rate - served version's rate), in rewards."""
    transitions: list[str] = field(default_factory=list)


def _stats(rewards: np.ndarray) -> ArmStats:
    """ArmStats of a batch of rewards, each with weight 1 (one numpy pass)."""
    if rewards.size == 0:
        return ArmStats()
    mean = float(rewards.mean())
    return ArmStats(float(rewards.size), mean, float(((rewards - mean) ** 2).sum()))


def simulate(scenario: Scenario, config: Rollout, guardrail: Guardrail, seed: int) -> Run:
    """One seed of a scenario. Deterministic given the seed."""
    rng = np.random.default_rng(seed)
    horizon, versions = scenario.horizon, (scenario.incumbent, scenario.candidate)
    # per request and version: label correctness and reward, drawn up front (common to every policy)
    uniform = rng.random((horizon, 2))
    correct = uniform < np.array([v.accuracy for v in versions])
    honest = np.array([v.label_accuracy is None for v in versions])
    reward_uniform = np.where(honest, uniform, rng.random((horizon, 2)))
    reward = (reward_uniform < np.array([v.reward_rate for v in versions])).astype(np.float64)
    failed = rng.random((horizon, 2)) < np.array([v.error_rate for v in versions])
    latency = np.array([v.median_latency_ms for v in versions]) * np.exp(_LATENCY_SIGMA * rng.standard_normal((horizon, 2)))
    arrival_time = np.arange(horizon) + rng.exponential(scenario.delay_mean, horizon)
    arrival_order = np.argsort(arrival_time, kind="stable")
    sorted_arrival = arrival_time[arrival_order]

    served = np.zeros(horizon, dtype=np.int8)  # 0 incumbent, 1 candidate
    stage_of = np.full(horizon, -1, dtype=np.int8)  # stage at decision time (-1: before arrival)
    rates = np.array([v.reward_rate for v in versions])
    oracle = scenario.oracle_rate(config)

    names = ("incumbent", "candidate")
    incumbent_stats = ArmStats(float(scenario.incumbent_history), scenario.incumbent.reward_rate,
                               scenario.incumbent_history * scenario.incumbent.reward_rate * (1 - scenario.incumbent.reward_rate))
    candidate_stats = ArmStats()
    pair = QualityStats()
    candidate_since, baseline_since = ArmStats(), ArmStats()
    stage_calls = stage_errors = 0
    stage_latency: list[np.ndarray] = []
    outcomes_since_arrival = 0
    state: RolloutState | None = None
    run = Run(final_stage="none")
    arrived = 0
    rng_policy = np.random.default_rng(seed + 1)
    # two arms: the route's exploration floor is exactly the canary's guaranteed share
    policy = RoutePolicy("sim", names, caps=[1.0, config.canary.max_share], exploration_floor=config.canary.floor,
                         rng=rng_policy)
    full_policy = RoutePolicy("sim", names, rng=rng_policy)

    for begin in range(0, horizon, scenario.block):
        end = min(begin + scenario.block, horizon)
        if state is None and begin >= scenario.arrival:
            state = start("sim", "m", 2, replaces="incumbent", now=float(begin))
            run.stage_at["shadow"], run.outcomes_at["shadow"] = begin, 0
        stage = state.stage if state is not None else None
        # -- route this block
        if stage in ("canary", "full", "done"):
            active = policy if stage == "canary" else full_policy
            drained = "drained" if stage in ("full", "done") else "active"
            active.apply_snapshot(RouteSnapshot("sim", {"incumbent": ArmSnapshot(incumbent_stats, drained),
                                                        "candidate": ArmSnapshot(candidate_stats)}))
            share = float(active.shares[1])
            run.max_candidate_share = max(run.max_candidate_share, share)
            served[begin:end] = active.decide(end - begin).arm_index
        if stage is not None:
            stage_of[begin:end] = _STAGE_CODE[stage]
            run.regret += float((oracle - rates[served[begin:end]]).sum())
        block_served = served[begin:end]
        serving = np.flatnonzero(block_served == 1) + begin
        if serving.size:
            run.served_by_candidate += int(serving.size)
            stage_calls += int(serving.size)
            stage_errors += int(failed[serving, 1].sum())
            stage_latency.append(latency[serving, 1])
        # -- outcomes whose delay ended during this block
        upto = int(np.searchsorted(sorted_arrival, end, side="right"))
        new = arrival_order[arrived:upto]
        arrived = upto
        if new.size:
            outcomes_since_arrival += int((new >= scenario.arrival).sum())
            by = served[new]
            mirrored = new[stage_of[new] == 0]
            if mirrored.size:
                primary_loss = 1.0 - correct[mirrored, 0]
                shadow_loss = 1.0 - correct[mirrored, 1]
                pair = pair + QualityStats(n_pair=float(mirrored.size), pair_primary_loss_sum=float(primary_loss.sum()),
                                           pair_shadow_loss_sum=float(shadow_loss.sum()))
            incumbent_stats = incumbent_stats + _stats((reward[new[by == 0], 0]))
            candidate_stats = candidate_stats + _stats((reward[new[by == 1], 1]))
            serving_stage = stage_of[new] >= 1
            candidate_since = candidate_since + _stats((reward[new[serving_stage & (by == 1)], 1]))
            baseline_since = baseline_since + _stats((reward[new[serving_stage & (by == 0)], 0]))
        if state is None or not state.active:
            continue
        # -- the rollout looks at the evidence, as the feedback worker does after each flush
        verdict = shadow_verdict(pair, config.shadow.confidence, config.shadow.margin)
        breach = None
        if state.stage in ("canary", "full"):
            findings = evaluate({"incumbent": ArmSnapshot(incumbent_stats, "drained" if state.stage == "full" else "active"),
                                 "candidate": ArmSnapshot(candidate_stats)}, guardrail)
            breach = next((f.metric for f in findings if f.arm == "candidate"), None)
        evidence = Evidence(shadow_decision=verdict.decision, shadow_pairs=verdict.n, shadow_advantage=verdict.advantage,
                            candidate=candidate_since, baseline=baseline_since, calls=stage_calls, errors=stage_errors,
                            p99_latency_ms=float(np.percentile(np.concatenate(stage_latency), 99)) if stage_latency else None,
                            guardrail_breach=breach)
        transition = step(state, evidence, config, now=float(end))
        if transition is not None:
            state = transition.state
            run.transitions.append(transition.audit.log_line())
            run.stage_at[state.stage] = end
            run.outcomes_at[state.stage] = outcomes_since_arrival
            if state.stage in ("canary", "full"):
                stage_calls = stage_errors = 0
                stage_latency = []
    run.final_stage = state.stage if state is not None else "none"
    return run
