"""Retraining triggers per route: schedule, new labels, quality alarm, drift alarm, one cooldown (pure).

A route's ``retrain:`` config enables any combination of

* ``every_s``    - a schedule: fire when that long has passed since the last trigger (or since
                   the first joined outcome the trigger saw);
* ``new_labels`` - fire when that many joined outcomes arrived since the last trigger;
* ``quality``    - fire on the quality-drift alarm (banditgate.drift.bernoulli_cusum's Bernoulli CUSUM);
* ``drift``      - fire on a feature or score drift alarm.

Whatever fires, at most one trigger per ``cooldown_s``: while cooling down, alarms are counted as
suppressed and labels keep accumulating, so a ``new_labels`` or schedule trigger that came due
fires as soon as the cooldown ends. A trigger names its data window: from the end of the previous
window (or the first outcome) to now; the next window starts where this one ended, so windows
tile time without gaps or overlaps.

:class:`TriggerState` is a few numbers, JSON-able, meant to be stored per route (one Redis hash
under the route's key prefix) and updated by compare-and-set so that one trigger fires once
across feedback workers.

>>> from banditgate.config import Retrain
>>> config = Retrain(new_labels=100, cooldown_s=0)
>>> state = TriggerState().with_labels(60, now=10.0)
>>> evaluate(state, config, now=11.0).fired
False
>>> decision = evaluate(state.with_labels(40, now=12.0), config, now=12.0)
>>> decision.fired, decision.reasons, decision.window, decision.state.labels_since
(True, ('new_labels',), (10.0, 12.0), 0)
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, replace

from banditgate.config import Retrain
from banditgate.events import Alert
from banditgate.jsontypes import JSONObject, JSONValue

REASONS = ("new_labels", "quality", "drift", "every")
"""In the order a trigger names them when several hold at once (the first is its `reason`)."""


@dataclass(frozen=True, slots=True)
class TriggerState:
    """Where one route's retraining triggers stand."""

    window_start: float | None = None
    """Epoch seconds the current data window began (None: no outcome seen yet)."""
    labels_since: int = 0
    """Joined outcomes since the window began."""
    last_fired_at: float | None = None
    fired_total: int = 0
    suppressed_total: int = 0
    """Alarms that came during a cooldown."""
    seq: int = 0
    """Bumped on every fire (compare-and-set in a shared store)."""

    def with_labels(self, count: int, now: float) -> TriggerState:
        """`count` more joined outcomes arrived by `now`. Raises ValueError for a negative count."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        start = self.window_start if self.window_start is not None else now
        return replace(self, labels_since=self.labels_since + count, window_start=start)

    def to_dict(self) -> JSONObject:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, JSONValue]) -> TriggerState:
        def number(key: str) -> float | None:
            value = data.get(key)
            return None if value in (None, "", "None") else float(value)
        return cls(window_start=number("window_start"), labels_since=int(data.get("labels_since", 0)),
                   last_fired_at=number("last_fired_at"), fired_total=int(data.get("fired_total", 0)),
                   suppressed_total=int(data.get("suppressed_total", 0)), seq=int(data.get("seq", 0)))


@dataclass(frozen=True, slots=True)
class TriggerDecision:
    """The outcome of one evaluation: the new state and, if it fired, why and on which window."""

    state: TriggerState
    fired: bool
    reasons: tuple[str, ...] = ()
    window: tuple[float, float] | None = None
    labels: int = 0
    """Joined outcomes in the window."""
    cooling_until: float | None = None
    """Set when something was due but the cooldown held it back."""

    @property
    def reason(self) -> str | None:
        return self.reasons[0] if self.reasons else None


def due(state: TriggerState, config: Retrain, now: float, alarms: Collection[str] = ()) -> tuple[str, ...]:
    """The reasons that hold now, cooldown aside (in REASONS order).

    `alarms` names the alarm kinds raised since the last evaluation (``quality``, ``drift``);
    kinds the config does not enable are ignored.
    """
    reasons = []
    if config.new_labels is not None and state.labels_since >= config.new_labels:
        reasons.append("new_labels")
    if config.quality and "quality" in alarms:
        reasons.append("quality")
    if config.drift and "drift" in alarms:
        reasons.append("drift")
    if config.every_s is not None:
        since = state.last_fired_at if state.last_fired_at is not None else state.window_start
        if since is not None and now - since >= config.every_s:
            reasons.append("every")
    return tuple(reasons)


def evaluate(state: TriggerState, config: Retrain, now: float, alarms: Collection[str] = ()) -> TriggerDecision:
    """Fire if some trigger holds and the cooldown allows; the returned state is the one to store."""
    reasons = due(state, config, now, alarms)
    if not reasons:
        return TriggerDecision(state, False)
    if state.last_fired_at is not None and now - state.last_fired_at < config.cooldown_s:
        suppressed = sum(1 for r in reasons if r in ("quality", "drift"))
        return TriggerDecision(replace(state, suppressed_total=state.suppressed_total + suppressed), False,
                               cooling_until=state.last_fired_at + config.cooldown_s)
    start = state.window_start if state.window_start is not None else now
    new = TriggerState(window_start=now, labels_since=0, last_fired_at=now, fired_total=state.fired_total + 1,
                       suppressed_total=state.suppressed_total, seq=state.seq + 1)
    return TriggerDecision(new, True, reasons, (start, now), state.labels_since)


def retrain_alert(decision: TriggerDecision, route: str, model: str, model_version: int | None, config: Retrain,
                  export_manifest: str | None = None) -> Alert:
    """The ``retrain`` alert for a decision that fired (alerts topic and the route's webhook).

    Raises ValueError for a decision that did not fire.
    """
    if not decision.fired or decision.window is None:
        raise ValueError("only a decision that fired makes a retrain alert")
    threshold = float(config.new_labels) if decision.reason == "new_labels" and config.new_labels else 0.0
    details: JSONObject = {"model": model, "reason": decision.reason, "reasons": list(decision.reasons),
                               "window_start": decision.window[0], "window_end": decision.window[1],
                               "labels": decision.labels, "cooldown_s": config.cooldown_s}
    if export_manifest is not None:
        details["export_manifest"] = export_manifest
    return Alert(kind="retrain", route=route, arm=None, model_version=model_version, metric=decision.reason or "",
                 value=float(decision.labels), threshold=threshold, ts=decision.window[1], details=details)
