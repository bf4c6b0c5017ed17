"""What a route serves while a rollout runs: the stored rollout record and the arm lineup it implies (pure).

A :class:`RolloutRecord` is what the shared store keeps per route (see router.rollout_store): the
:class:`router.rollout.RolloutState`, the primary arms the rollout started from (``base``), the
highest version per model rejected or rolled back so far (so it is never retried), and the
replaced arm's reward statistics when the canary stage began (so the canary is compared with the
replaced arm *over the same period*).

:func:`lineup` turns a record into the arms every gateway routes to:

=============  ==============================================================================
admission      base arms (the candidate is benchmarked apart, gateway/admission.py)
shadow         base arms; the candidate mirrors traffic as a shadow
canary         base arms + the candidate capped at ``canary.max_share``, floor ``canary.floor``
full           base arms + the candidate uncapped; the replaced arm held drained
done           base arms without the replaced arm, + the candidate (the replaced model unloaded)
rejected /     base arms only (the candidate unloaded)
rolled_back /
refused
=============  ==============================================================================

The configured shadows stay in every stage. After a final stage, :func:`primaries_after` is the
base of the route's next rollout, so a version that went ``done`` keeps serving across restarts.

>>> from banditgate.config import Route
>>> from router.rollout import start
>>> route = Route(name="churn", arms=[{"name": "a", "model": "m", "version": 3}], rollout={"canary": {"max_share": 0.2}})
>>> record = RolloutRecord.begin(route, start("churn", "m", 4, "a", now=0.0), previous=None)
>>> [arm.name for arm in lineup(route, record).shadows]
['m-v4']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import orjson

from banditgate.config import Route
from banditgate.jsontypes import JSONObject, JSONValue
from router.arm_stats import ArmStats
from router.rollout import NOT_RETRIED, RolloutError, RolloutState


@dataclass(frozen=True, slots=True)
class LineupArm:
    """One arm a gateway routes to."""

    name: str
    model: str
    version: int | str
    weight: float = 1.0
    cap: float = 1.0
    floor: float = 0.0

    def to_dict(self) -> JSONObject:
        return {"name": self.name, "model": self.model, "version": self.version, "weight": self.weight,
                "cap": self.cap}

    @classmethod
    def from_dict(cls, data: Mapping[str, JSONValue]) -> LineupArm:
        version = data["version"]
        return cls(name=str(data["name"]), model=str(data["model"]),
                   version=version if version == "latest" else int(version), weight=float(data.get("weight", 1.0)),
                   cap=float(data.get("cap", 1.0)))


@dataclass(frozen=True, slots=True)
class Lineup:
    arms: tuple[LineupArm, ...]
    shadows: tuple[LineupArm, ...]
    held_drained: tuple[str, ...] = ()
    """Arms held drained (the replaced arm during `full`)."""
    retired: tuple[tuple[str, int], ...] = ()
    """(model, version) pairs this rollout took out of service (free to unload if nothing else uses them)."""

    def models(self) -> set[tuple[str, int | str]]:
        return {(arm.model, arm.version) for arm in (*self.arms, *self.shadows)}


def configured_arms(route: Route) -> tuple[LineupArm, ...]:
    return tuple(LineupArm(arm.name, arm.model, arm.version, arm.weight, 1.0 if arm.max_share is None else arm.max_share)
                 for arm in route.arms)


@dataclass(frozen=True, slots=True)
class RolloutRecord:
    """What the store keeps per route: the state and what the lineup needs besides it."""

    state: RolloutState
    base: tuple[LineupArm, ...]
    """Primary arms when the rollout started."""
    rejected: Mapping[str, int] = field(default_factory=dict)
    """model -> highest version rejected or rolled back (never retried)."""
    baseline: ArmStats | None = None
    """The replaced arm's statistics when the canary stage began."""
    admission: JSONObject | None = None
    """The admission gate's result for this version (router.rollout_admission.AdmissionResult.to_dict)."""

    @classmethod
    def begin(cls, route: Route, state: RolloutState, previous: RolloutRecord | None) -> RolloutRecord:
        """The record of a new rollout; its seq continues the previous one's (so a stale
        compare-and-set of an older rollout can never land on this one)."""
        if previous is None:
            return cls(state, configured_arms(route))
        rejected = dict(previous.rejected)
        if previous.state.stage in NOT_RETRIED:
            rejected[previous.state.model] = max(rejected.get(previous.state.model, 0), previous.state.version)
        return cls(replace(state, seq=previous.state.seq + 1), primaries_after(previous), rejected)

    def to_fields(self) -> dict[str, str]:
        """Hash fields: the state's fields as text, plus JSON for the rest."""
        fields = {key: ("1" if value is True else "0" if value is False else str(value))
                  for key, value in self.state.to_dict().items()}
        fields["base"] = orjson.dumps([arm.to_dict() for arm in self.base]).decode()
        fields["rejected"] = orjson.dumps(dict(self.rejected)).decode()
        if self.baseline is not None:
            fields["baseline"] = orjson.dumps([self.baseline.weight, self.baseline.mean, self.baseline.m2]).decode()
        if self.admission is not None:
            fields["admission"] = orjson.dumps(dict(self.admission)).decode()
        return fields

    @classmethod
    def from_fields(cls, raw: Mapping[bytes, bytes] | Mapping[str, str]) -> RolloutRecord:
        """Inverse of to_fields. Raises RolloutError for a hash that is not a valid record."""
        fields = {_text(k): _text(v) for k, v in raw.items()}
        state_fields: dict[str, str | bool] = dict(fields)
        state_fields["paused"] = fields.get("paused") == "1"
        state = RolloutState.from_dict(state_fields)
        try:
            base = tuple(LineupArm.from_dict(item) for item in orjson.loads(fields.get("base", "[]")))
            rejected = {str(k): int(v) for k, v in orjson.loads(fields.get("rejected", "{}")).items()}
            baseline = None
            if "baseline" in fields:
                weight, mean, m2 = orjson.loads(fields["baseline"])
                baseline = ArmStats(float(weight), float(mean), float(m2))
            admission = orjson.loads(fields["admission"]) if "admission" in fields else None
            if admission is not None and not isinstance(admission, dict):
                raise TypeError("admission must be a JSON object")
        except (ValueError, KeyError, TypeError) as exc:
            raise RolloutError(f"stored rollout record of route {state.route} is not valid: {exc}") from None
        return cls(state, base, rejected, baseline, admission)

    def with_state(self, state: RolloutState, baseline: ArmStats | None = None,
                   admission: JSONObject | None = None) -> RolloutRecord:
        return replace(self, state=state, baseline=self.baseline if baseline is None else baseline,
                       admission=self.admission if admission is None else admission)


def primaries_after(record: RolloutRecord) -> tuple[LineupArm, ...]:
    """The primary arms once `record`'s rollout is over (done: the candidate took the replaced arm's place)."""
    state = record.state
    if state.stage != "done":
        return record.base
    replaced = next((arm for arm in record.base if arm.name == state.replaces), None)
    weight = replaced.weight if replaced is not None else 1.0
    return tuple(arm for arm in record.base if arm.name != state.replaces) + (
        LineupArm(state.candidate_arm, state.model, state.version, weight),)


def lineup(route: Route, record: RolloutRecord | None) -> Lineup:
    """The arms `route` serves under `record` (the configured ones when there is none)."""
    shadows = tuple(LineupArm(s.name, s.model, s.version) for s in route.shadows)
    if record is None or route.rollout is None:
        return Lineup(configured_arms(route), shadows)
    state, canary = record.state, route.rollout.canary
    replaced = next((arm for arm in record.base if arm.name == state.replaces), None)
    weight = replaced.weight if replaced is not None else 1.0
    candidate = LineupArm(state.candidate_arm, state.model, state.version, weight)
    base = record.base
    if state.stage == "admission":
        return Lineup(base, shadows)
    if state.stage == "shadow":
        return Lineup(base, shadows + (candidate,))
    if state.stage == "canary":
        return Lineup(base + (replace(candidate, cap=canary.max_share, floor=canary.floor),), shadows)
    if state.stage == "full":
        return Lineup(base + (candidate,), shadows, held_drained=(state.replaces,))
    retired: tuple[tuple[str, int], ...] = ()
    if state.stage == "done":
        if replaced is not None and isinstance(replaced.version, int):
            retired = ((replaced.model, replaced.version),)
        return Lineup(primaries_after(record), shadows, retired=retired)
    return Lineup(base, shadows, retired=((state.model, state.version),))


def serving_version(arms: Sequence[LineupArm], arm_name: str) -> int | None:
    """The pinned version of `arm_name` among `arms` (None when absent or `latest`)."""
    for arm in arms:
        if arm.name == arm_name and isinstance(arm.version, int):
            return arm.version
    return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


def replaced_arm(route: Route, primaries: Sequence[LineupArm]) -> str | None:
    """The arm a new version of the route's rollout model takes over from, among `primaries`:
    the configured ``rollout.replaces`` while it serves, else the arm serving that model."""
    if route.rollout is None:
        return None
    names = [arm.name for arm in primaries]
    if route.rollout.replaces is not None and route.rollout.replaces in names:
        return route.rollout.replaces
    model = route.rollout_model()
    return next((arm.name for arm in primaries if arm.model == model), None)
