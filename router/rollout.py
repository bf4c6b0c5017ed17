"""Progressive rollout of a new model version: the state machine and its criteria (pure).

A new version of a route's model enters as a **shadow** (mirrors traffic, serves nothing) - on a
route with ``rollout.admission``, first at the **admission** stage, where one gateway benchmarks
it against the incumbent (gateway/admission.py) and :func:`admission_transition` sends it on to
``shadow`` or ends it as **refused** (final; :func:`admit` lets an operator admit it by hand). On a
``promote`` verdict of the shadow test (feedback.outcome_metrics's always-valid confidence sequence on
paired label losses, computed by the caller) it becomes a **canary**: a primary arm capped at
``canary.max_share``. When the canary's own criteria hold - enough outcomes, long enough, reward
not worse than the arm it replaces under a sequential test, error rate and p99 within limits - it
joins the bandit as a **full** arm and the replaced arm is drained; after ``grace_s`` the replaced
arm is unloaded and the rollout is **done**. A ``reject`` verdict at the shadow stage ends it as
**rejected**; a reward, guardrail, error or latency breach at the canary or full stage ends it as
**rolled_back** (traffic returns to the previous arms at once). Both final states mark the version
as not to be retried until a newer one replaces it.

Everything here is a function of a :class:`RolloutState`, an :class:`Evidence` value and the
route's ``rollout:`` config; time comes in as ``now`` (epoch seconds). Each transition returns the
new state and an :class:`AuditRecord` (who or which rule, why, routing before and after). The
state carries ``seq``: a store applies a transition only if its stored ``seq`` still equals the
transition's ``from_seq`` (compare-and-set), so with several workers evaluating the same evidence
each transition is applied exactly once.

The canary reward test is the guardrail's one-sided mSPRT (:func:`router.guardrail.msprt_log_ratio`)
run twice, each at alpha = 1 - confidence:

* ``not_worse`` when it rejects "canary mean <= baseline mean - margin" (non-inferiority);
* ``worse`` when it rejects "canary mean >= baseline mean" (the canary is surely worse).

Both are always valid: checking them after every snapshot, forever, keeps each error below alpha.

>>> from banditgate.config import Rollout
>>> config = Rollout(canary={"max_share": 0.1, "min_outcomes": 10, "min_calls": 10})
>>> state = start("churn", "churn-gbm", 4, replaces="a", now=0.0)
>>> state.stage, state.candidate_arm
('shadow', 'churn-gbm-v4')
>>> transition = step(state, Evidence(shadow_decision="promote", shadow_pairs=500), config, now=60.0)
>>> transition.state.stage, transition.audit.actor, transition.audit.after["caps"]
('canary', 'rule:shadow-test', {'churn-gbm-v4': 0.1})
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

from banditgate.config import CanaryStage, Rollout
from banditgate.jsontypes import JSONObject, JSONValue
from router.arm_stats import ArmStats
from router.guardrail import msprt_log_ratio

Stage = Literal["admission", "shadow", "canary", "full", "done", "rejected", "rolled_back", "refused"]
ACTIVE_STAGES: tuple[str, ...] = ("admission", "shadow", "canary", "full")
FINAL_STAGES: tuple[str, ...] = ("done", "rejected", "rolled_back", "refused")
STAGES: tuple[str, ...] = ACTIVE_STAGES + FINAL_STAGES
NOT_RETRIED: tuple[str, ...] = ("rejected", "rolled_back", "refused")
"""Final stages whose version is never started again (until a newer one replaces it)."""
# the only edges the machine ever takes (manual operations included); `refused -> shadow` is an
# operator's admit by hand (the one way out of a final stage)
EDGES: frozenset[tuple[str, str]] = frozenset({
    ("admission", "shadow"), ("admission", "refused"), ("admission", "rolled_back"), ("refused", "shadow"),
    ("shadow", "canary"), ("shadow", "rejected"), ("shadow", "rolled_back"),
    ("canary", "full"), ("canary", "rolled_back"),
    ("full", "done"), ("full", "rolled_back"),
})
ALERT_KIND: Mapping[str, str] = {"canary": "promote", "full": "promote", "done": "promote",
                                 "rejected": "reject", "rolled_back": "rollback", "refused": "refused"}
"""Alert kind (alerts topic) for a transition into each stage."""


class RolloutError(ValueError):
    """A rollout operation cannot be done (unknown stage, final state, bad action); one line."""

    user_facing = True


def candidate_arm_name(model: str, version: int) -> str:
    """The arm name a rolled-out version serves under: ``<model>-v<version>``."""
    return f"{model}-v{version}"


@dataclass(frozen=True, slots=True)
class RolloutState:
    """Where one route's rollout of one version stands. Immutable; JSON-able with to_dict."""

    route: str
    model: str
    version: int
    candidate_arm: str
    replaces: str
    """The arm the version takes over from when it becomes a full arm."""
    stage: Stage
    stage_since: float
    """Epoch seconds at which the current stage began."""
    started_at: float
    seq: int = 0
    """Transitions so far; a store applies a transition only when its stored seq equals this."""
    paused: bool = False
    """Paused rollouts take no automatic promotion (breaches still roll back)."""
    reason: str = ""
    """Why the last transition happened."""

    @property
    def active(self) -> bool:
        return self.stage in ACTIVE_STAGES

    def to_dict(self) -> JSONObject:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, JSONValue]) -> RolloutState:
        """Inverse of to_dict. Raises RolloutError on a missing field or an unknown stage."""
        try:
            state = cls(route=str(data["route"]), model=str(data["model"]), version=int(data["version"]),
                        candidate_arm=str(data["candidate_arm"]), replaces=str(data["replaces"]),
                        stage=data["stage"], stage_since=float(data["stage_since"]),
                        started_at=float(data["started_at"]), seq=int(data.get("seq", 0)),
                        paused=bool(data.get("paused", False)), reason=str(data.get("reason", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise RolloutError(f"stored rollout state is not valid: {exc}") from None
        if state.stage not in STAGES:
            raise RolloutError(f"stored rollout state has unknown stage {state.stage!r}")
        return state


def start(route: str, model: str, version: int, replaces: str, now: float, admission: bool = False) -> RolloutState:
    """A new version enters as a shadow, or first at the admission gate when the route has one
    (``rollout.admission``). Raises RolloutError for a version below 1."""
    if version < 1:
        raise RolloutError(f"version must be >= 1, got {version}")
    return RolloutState(route=route, model=model, version=version, candidate_arm=candidate_arm_name(model, version),
                        replaces=replaces, stage="admission" if admission else "shadow", stage_since=now,
                        started_at=now, reason="new version appeared")


def may_start(model: str, version: int, current: RolloutState | None, rejected: Mapping[str, int]) -> bool:
    """Whether a version seen in the repository should start a rollout now.

    Not while another rollout of the route is active; not a version at or below one already
    rolled out, rejected or rolled back for this model (`rejected` maps model -> highest such
    version): a rejected version is not retried until a newer one replaces it.
    """
    if current is not None and current.active:
        return False
    if current is not None and current.model == model and version <= current.version:
        return False
    return version > rejected.get(model, 0)


# ---------------------------------------------------------------------------------------------
# evidence and criteria


@dataclass(frozen=True, slots=True)
class Evidence:
    """What the feedback worker and gateway counters know about the candidate right now."""

    shadow_decision: Literal["promote", "reject"] | None = None
    """Verdict of feedback.outcome_metrics.shadow_verdict for the candidate as a shadow."""
    shadow_pairs: float = 0.0
    """Labelled (shadow, primary) pairs behind that verdict."""
    shadow_advantage: float = 0.0
    """Mean loss(primary) - loss(shadow) (positive: the candidate is better)."""
    candidate: ArmStats = ArmStats()
    """The candidate's rewarded outcomes since it began serving (canary stage on)."""
    baseline: ArmStats = ArmStats()
    """The replaced arm's rewarded outcomes over the same period (concurrent, so comparable)."""
    calls: int = 0
    """Calls the candidate answered (primary or shadow) in the current stage."""
    errors: int = 0
    p99_latency_ms: float | None = None
    """p99 latency of the candidate's calls in the current stage."""
    guardrail_breach: str | None = None
    """The guardrail's finding when it drained the candidate (e.g. ``reward`` or ``error_rate``)."""


@dataclass(frozen=True, slots=True)
class RewardTest:
    """The canary's reward against the baseline: both sequential tests and what they say."""

    verdict: Literal["not_worse", "worse", "undecided"]
    difference: float
    """candidate mean - baseline mean."""
    log_ratio_not_worse: float
    log_ratio_worse: float
    log_threshold: float


def _variance(stats: ArmStats) -> float:
    # a pseudo-observation so a streak of equal rewards is not certainty (as the guardrail does)
    smoothed = (stats.m2 + 0.25) / (stats.weight + 1.0)
    return max(smoothed, 1e-12)


def reward_test(candidate: ArmStats, baseline: ArmStats, canary: CanaryStage) -> RewardTest:
    """Sequential non-inferiority and inferiority tests of candidate against baseline reward."""
    log_threshold = math.log(1.0 / (1.0 - canary.confidence))
    if candidate.weight < 1 or baseline.weight < 1:
        return RewardTest("undecided", 0.0, 0.0, 0.0, log_threshold)
    difference = candidate.mean - baseline.mean
    variance = _variance(candidate) / candidate.weight + _variance(baseline) / baseline.weight
    tau = canary.mixing_sd if canary.mixing_sd is not None else max(canary.margin, 0.05)
    not_worse_gap = difference + canary.margin
    worse_gap = -difference
    not_worse = msprt_log_ratio(not_worse_gap, variance, tau * tau) if not_worse_gap > 0 else 0.0
    worse = msprt_log_ratio(worse_gap, variance, tau * tau) if worse_gap > 0 else 0.0
    verdict: Literal["not_worse", "worse", "undecided"] = "undecided"
    if worse >= log_threshold:
        verdict = "worse"
    elif not_worse >= log_threshold:
        verdict = "not_worse"
    return RewardTest(verdict, difference, not_worse, worse, log_threshold)


def operational_breach(evidence: Evidence, canary: CanaryStage) -> str | None:
    """A one-line reason when the error rate or p99 latency is over its limit, else None.

    Judged only after `canary.min_calls` calls, so a few early failures do not decide.
    """
    if evidence.calls < canary.min_calls:
        return None
    rate = evidence.errors / evidence.calls
    if rate > canary.max_error_rate:
        return f"error rate {rate:.4f} > max_error_rate {canary.max_error_rate} over {evidence.calls} calls"
    limit = canary.max_p99_latency_ms
    if limit is not None and evidence.p99_latency_ms is not None and evidence.p99_latency_ms > limit:
        return f"p99 latency {evidence.p99_latency_ms:.1f} ms > max_p99_latency_ms {limit:g} over {evidence.calls} calls"
    return None


@dataclass(frozen=True, slots=True)
class Assessment:
    """What the evidence supports for a state now, and what is still awaited."""

    action: Literal["promote", "rollback", "wait"]
    rule: str
    """Which criterion decided (``shadow-test``, ``reward-test``, ``guardrail``, ``latency-error``,
    ``canary-criteria``, ``grace-period``) or ``waiting``."""
    reason: str
    awaiting: tuple[str, ...] = ()
    details: Mapping[str, JSONValue] = field(default_factory=dict)


def assess(state: RolloutState, evidence: Evidence, config: Rollout, now: float) -> Assessment:
    """The action the criteria call for. Final states always ``wait`` with nothing awaited."""
    canary = config.canary
    if state.stage == "admission":
        # decided by the gateway that benchmarks it (admission_transition), never by evidence
        return Assessment("wait", "waiting", "admission stage", ("the admission benchmark's verdict",))
    if state.stage == "shadow":
        if evidence.shadow_decision == "reject":
            return Assessment("rollback", "shadow-test", f"shadow test: reject after {evidence.shadow_pairs:.0f} "
                              f"labelled pairs (advantage {evidence.shadow_advantage:+.4f})")
        # a shadow's calls are off the request path (no user waits for them, batches differ), so
        # its latency and errors are judged from the canary stage on, when it serves
        awaiting = []
        if evidence.shadow_decision != "promote":
            awaiting.append("a promote verdict of the shadow test")
        if evidence.shadow_pairs < config.shadow.min_outcomes:
            awaiting.append(f"{config.shadow.min_outcomes - evidence.shadow_pairs:.0f} more labelled pairs")
        if awaiting:
            return Assessment("wait", "waiting", "shadow stage", tuple(awaiting),
                              {"shadow_pairs": evidence.shadow_pairs, "advantage": evidence.shadow_advantage})
        return Assessment("promote", "shadow-test", f"shadow test: promote after {evidence.shadow_pairs:.0f} "
                          f"labelled pairs (advantage {evidence.shadow_advantage:+.4f})")
    if state.stage in ("canary", "full"):
        if evidence.guardrail_breach:
            return Assessment("rollback", "guardrail", f"guardrail drained the candidate on {evidence.guardrail_breach}")
        breach = operational_breach(evidence, canary)
        if breach:
            return Assessment("rollback", "latency-error", breach)
        test = reward_test(evidence.candidate, evidence.baseline, canary)
        details = {"candidate_outcomes": evidence.candidate.weight, "candidate_mean": evidence.candidate.mean,
                   "baseline_outcomes": evidence.baseline.weight, "baseline_mean": evidence.baseline.mean,
                   "reward_test": test.verdict, "difference": test.difference,
                   "log_ratio_not_worse": test.log_ratio_not_worse, "log_ratio_worse": test.log_ratio_worse,
                   "log_threshold": test.log_threshold, "calls": evidence.calls, "errors": evidence.errors,
                   "p99_latency_ms": evidence.p99_latency_ms}
        if test.verdict == "worse" and state.stage == "canary":
            return Assessment("rollback", "reward-test", f"reward {evidence.candidate.mean:.4f} is surely below the "
                              f"replaced arm's {evidence.baseline.mean:.4f} (mSPRT)", details=details)
        if state.stage == "full":
            remaining = config.grace_s - (now - state.stage_since)
            if remaining > 0:
                return Assessment("wait", "waiting", "full arm; replaced arm draining",
                                  (f"{remaining:.0f} s of grace before {state.replaces} is unloaded",), details)
            return Assessment("promote", "grace-period", f"grace period of {config.grace_s:g} s over: "
                              f"{state.replaces} unloaded", details=details)
        awaiting = []
        if evidence.candidate.weight < canary.min_outcomes:
            awaiting.append(f"{canary.min_outcomes - evidence.candidate.weight:.0f} more canary outcomes")
        if now - state.stage_since < canary.min_duration_s:
            awaiting.append(f"{canary.min_duration_s - (now - state.stage_since):.0f} s more in the canary stage")
        if test.verdict != "not_worse":
            awaiting.append(f"the reward test to show the canary not worse by more than {canary.margin:g}")
        if evidence.calls < canary.min_calls:
            awaiting.append(f"{canary.min_calls - evidence.calls} more calls to judge error rate and latency")
        if awaiting:
            return Assessment("wait", "waiting", "canary stage", tuple(awaiting), details)
        return Assessment("promote", "canary-criteria", f"canary criteria hold: {evidence.candidate.weight:.0f} "
                          f"outcomes, reward {test.difference:+.4f} vs {state.replaces}, not worse by "
                          f"{canary.margin:g} (mSPRT); error rate and latency within limits", details=details)
    return Assessment("wait", "final", f"rollout {state.stage}")


# ---------------------------------------------------------------------------------------------
# routing per stage and audit


@dataclass(frozen=True, slots=True)
class RoutingPlan:
    """How the route's arms are set for a rollout state (what the gateways apply)."""

    shadows: tuple[str, ...] = ()
    """Arms of the rollout that only mirror traffic."""
    caps: Mapping[str, float] = field(default_factory=dict)
    """Rollout arms serving as primaries, with their traffic ceiling (1.0: uncapped)."""
    floors: Mapping[str, float] = field(default_factory=dict)
    """Shares rollout arms keep whatever the bandit prefers (the canary's `min_share`)."""
    drained: tuple[str, ...] = ()
    unloaded: tuple[str, ...] = ()
    """Arms taken out of the route (and their model versions released)."""

    def to_dict(self) -> JSONObject:
        return {"shadows": list(self.shadows), "caps": dict(self.caps), "floors": dict(self.floors),
                "drained": list(self.drained),
                "unloaded": list(self.unloaded)}


def routing_plan(state: RolloutState, config: Rollout) -> RoutingPlan:
    """The routing a state asks for; the candidate never serves more than the canary cap before `full`."""
    candidate, old = state.candidate_arm, state.replaces
    if state.stage == "admission":
        return RoutingPlan()  # benchmarked apart from serving: the route is as before
    if state.stage == "shadow":
        return RoutingPlan(shadows=(candidate,))
    if state.stage == "canary":
        return RoutingPlan(caps={candidate: config.canary.max_share}, floors={candidate: config.canary.floor})
    if state.stage == "full":
        return RoutingPlan(caps={candidate: 1.0}, drained=(old,))
    if state.stage == "done":
        return RoutingPlan(caps={candidate: 1.0}, unloaded=(old,))
    return RoutingPlan(unloaded=(candidate,))  # rejected / rolled back: previous arms only


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One routing change, for the routing-changes topic and the log."""

    route: str
    model: str
    version: int
    arm: str
    from_stage: str
    to_stage: str
    actor: str
    """``rule:<criterion>`` for automation, ``admin:<who>`` for a manual operation."""
    reason: str
    before: Mapping[str, JSONValue]
    after: Mapping[str, JSONValue]
    ts: float
    from_seq: int
    """The state's seq before the change: a store applies it only if it still holds this seq."""
    alert_kind: str | None = None
    """``promote``/``reject``/``rollback`` for the alerts topic, None for pause/resume."""
    details: Mapping[str, JSONValue] = field(default_factory=dict)

    def to_dict(self) -> JSONObject:
        out = asdict(self)
        out["before"], out["after"], out["details"] = dict(self.before), dict(self.after), dict(self.details)
        return out

    def log_line(self) -> str:
        return (f"route {self.route}: {self.arm} {self.from_stage} -> {self.to_stage} by {self.actor}: {self.reason}")


@dataclass(frozen=True, slots=True)
class Transition:
    state: RolloutState
    audit: AuditRecord


_NEXT: Mapping[str, Stage] = {"admission": "shadow", "shadow": "canary", "canary": "full", "full": "done"}


def _move(state: RolloutState, to_stage: Stage, config: Rollout, actor: str, reason: str, now: float,
          details: Mapping[str, JSONValue] | None = None, paused: bool | None = None) -> Transition:
    if (state.stage, to_stage) not in EDGES and to_stage != state.stage:
        raise RolloutError(f"route {state.route}: cannot go from {state.stage} to {to_stage}")
    new = replace(state, stage=to_stage, seq=state.seq + 1, reason=reason,
                  stage_since=now if to_stage != state.stage else state.stage_since,
                  paused=state.paused if paused is None else paused)
    audit = AuditRecord(route=state.route, model=state.model, version=state.version, arm=state.candidate_arm,
                        from_stage=state.stage, to_stage=to_stage, actor=actor, reason=reason,
                        before={"stage": state.stage, "paused": state.paused, **routing_plan(state, config).to_dict()},
                        after={"stage": new.stage, "paused": new.paused, **routing_plan(new, config).to_dict()},
                        ts=now, from_seq=state.seq,
                        alert_kind=ALERT_KIND.get(to_stage) if to_stage != state.stage else None,
                        details=dict(details or {}))
    return Transition(new, audit)


def step(state: RolloutState, evidence: Evidence, config: Rollout, now: float) -> Transition | None:
    """The automatic transition the evidence calls for, or None.

    A paused rollout takes no promotion but still rolls back on a breach or a reject verdict.
    """
    if not state.active:
        return None
    verdict = assess(state, evidence, config, now)
    if verdict.action == "rollback":
        to_stage: Stage = "rejected" if state.stage == "shadow" and verdict.rule == "shadow-test" else "rolled_back"
        return _move(state, to_stage, config, f"rule:{verdict.rule}", verdict.reason, now, verdict.details)
    if verdict.action == "promote" and not state.paused:
        return _move(state, _NEXT[state.stage], config, f"rule:{verdict.rule}", verdict.reason, now, verdict.details)
    return None


Action = Literal["promote", "rollback", "pause", "resume"]


def manual(state: RolloutState, action: Action, who: str, now: float, config: Rollout, reason: str = "") -> Transition:
    """An operator's override: promote one stage, roll back, pause or resume automation.

    Raises RolloutError when the rollout is already final or the action is unknown.
    """
    if not state.active:
        hint = f" (admit it by hand: banditgate rollout admit {state.route} --version {state.version})" \
            if state.stage == "refused" else ""
        raise RolloutError(f"route {state.route}: the rollout of {state.candidate_arm} is already {state.stage}{hint}")
    actor = f"admin:{who}"
    why = reason or f"manual {action}"
    if action == "promote":
        if state.stage == "admission":
            # admitting is its own operation (recorded as a manual admission in the result the
            # gateways and `rollout status` read); a plain promote would bypass that record
            raise RolloutError(f"route {state.route}: {state.candidate_arm} waits at the admission gate; admit it by "
                               f"hand: banditgate rollout admit {state.route} --version {state.version}")
        return _move(state, _NEXT[state.stage], config, actor, why, now)
    if action == "rollback":
        return _move(state, "rolled_back", config, actor, why, now)
    if action in ("pause", "resume"):
        return _move(state, state.stage, config, actor, why, now, paused=action == "pause")
    raise RolloutError(f"unknown rollout action {action!r}: promote, rollback, pause or resume")


def admission_transition(state: RolloutState, admitted: bool, reason: str, config: Rollout, now: float,
                         details: JSONObject | None = None) -> Transition:
    """The admission gate's verdict on a rollout at the ``admission`` stage: on to ``shadow`` when
    admitted, ``refused`` (final; an alert) when not. Raises RolloutError at any other stage."""
    if state.stage != "admission":
        raise RolloutError(f"route {state.route}: {state.candidate_arm} is at {state.stage}, not at admission")
    return _move(state, "shadow" if admitted else "refused", config, "rule:admission", reason, now, details)


def admit(state: RolloutState, version: int, who: str, now: float, config: Rollout, reason: str = "") -> Transition:
    """An operator admits `version` by hand: from ``admission`` (benchmark pending) or ``refused``
    it enters as a shadow. Raises RolloutError when the rollout is of another version or elsewhere."""
    if state.version != version:
        raise RolloutError(f"route {state.route}: the rollout is of version {state.version}, not {version}")
    if state.stage not in ("admission", "refused"):
        raise RolloutError(f"route {state.route}: {state.candidate_arm} is at {state.stage}; only a version at "
                           "admission or refused there can be admitted")
    return _move(state, "shadow", config, f"admin:{who}", reason or "admitted by hand", now)


def status(state: RolloutState, evidence: Evidence, config: Rollout, now: float) -> JSONObject:
    """What `banditgate rollout status` shows: stage, evidence so far, what is awaited."""
    verdict = assess(state, evidence, config, now)
    return {"route": state.route, "model": state.model, "version": state.version, "arm": state.candidate_arm,
            "replaces": state.replaces, "stage": state.stage, "paused": state.paused,
            "stage_age_s": now - state.stage_since, "seq": state.seq, "last_reason": state.reason,
            "next": verdict.action if state.active else None, "next_rule": verdict.rule,
            "next_reason": verdict.reason, "awaiting": list(verdict.awaiting), "evidence": dict(verdict.details),
            "routing": routing_plan(state, config).to_dict()}
