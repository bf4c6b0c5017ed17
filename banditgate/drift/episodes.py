"""Alarm episodes: one alert when a drift or quality alarm starts, one when it has gone quiet (pure).

A CUSUM restarts after every alarm, so a drift that persists alarms again and again (every
threshold / KL observations). An operator wants one alert per problem, so alarms are grouped in
episodes per :class:`EpisodeKey` (route, arm, model, version, signal, feature):

* the first alarm of a key *opens* an episode: that one becomes a ``firing`` alert;
* later alarms of an open episode only update it (count, last alarm, gauges and counters);
* `quiet_s` seconds without an alarm *close* it: a ``resolved`` alert; the next alarm opens a
  new episode.

Across replicas (several gateways see samples of the same traffic and alarm on their own) an
episode is opened once: an opening replica *claims* the episode in Redis (see
:mod:`banditgate.episode_store`); if another replica already holds it, this replica
*follows* it (no alert). Every replica refreshes the claim while it sees alarms, so the claim
expires only when every replica has been quiet for `quiet_s` (plus the refresh interval); only the
owner sends ``resolved``, once its claim is gone. An owner that died sends nothing: its claim
expires and the next alarm anywhere opens a new episode.

This module holds the bookkeeping with an injected clock (no I/O): :class:`EpisodeBook` says what
to do (claim, refresh, close), the caller does the Redis part and reports back.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from banditgate.jsontypes import JSONObject, JSONValue

__all__ = ["Action", "Episode", "EpisodeBook", "EpisodeKey", "firing_alert", "resolved_alert"]


@dataclass(frozen=True, slots=True)
class EpisodeKey:
    """What an episode is about; `feature` is None for signals of a whole model (score, quality)."""

    route: str
    arm: str | None
    model: str
    version: int
    signal: str
    """The alert's `metric`: feature_drift, score_drift, label_error_rate, reward_failure_rate."""
    feature: str | None = None

    def name(self) -> str:
        """A stable text for Redis keys and logs (JSON: any feature name is safe in it)."""
        return json.dumps([self.route, self.arm, self.model, self.version, self.signal, self.feature],
                          separators=(",", ":"))


class Action(enum.Enum):
    """What the caller must do after :meth:`EpisodeBook.alarm`."""

    NONE = "none"
    """An open episode's alarm: counted, nothing to send or store."""
    CLAIM = "claim"
    """A new episode: claim it (Redis) and report :meth:`EpisodeBook.claimed`; send `firing` if owned."""
    REFRESH = "refresh"
    """An open episode whose claim is due for a refresh: claim again and report :meth:`EpisodeBook.claimed`."""


@dataclass(slots=True)
class Episode:
    """One open episode as this process sees it."""

    key: EpisodeKey
    token: str
    """This process's claim token (unique per episode opening)."""
    opened_at: float
    last_alarm_at: float
    alarms: int = 1
    """Alarms of this episode seen by this process (the first included)."""
    owner: bool | None = None
    """True: this process holds the claim (it sent `firing`, it will send `resolved`); False:
    another replica does; None: the claim's answer is not in yet."""
    refreshed_at: float = -math.inf
    recheck_at: float = -math.inf
    """An owner whose claim still lived when it went quiet looks again from here."""
    last: JSONObject = field(default_factory=dict)
    """The latest alarm's values (statistic, threshold, effect sizes...), for the resolved alert."""


class EpisodeBook:
    """Open episodes by key (see the module docstring). quiet_s: seconds without an alarm that
    close an episode. refresh_s: how often an open episode's claim is refreshed (default a
    quarter of quiet_s, at most 30 s); the claim's TTL is quiet_s + refresh_s. max_open bounds
    the book: beyond it the oldest quiet-longest episode is dropped (counted in `dropped`).
    Raises ValueError for quiet_s <= 0."""

    def __init__(self, quiet_s: float, refresh_s: float | None = None, max_open: int = 10_000) -> None:
        if not quiet_s > 0 or not math.isfinite(quiet_s):
            raise ValueError(f"quiet_s must be a positive number of seconds, got {quiet_s}")
        self.quiet_s = float(quiet_s)
        self.refresh_s = float(refresh_s) if refresh_s is not None else min(self.quiet_s / 4, 30.0)
        if not self.refresh_s > 0:
            raise ValueError(f"refresh_s must be positive, got {refresh_s}")
        self.max_open = max_open
        self._open: dict[EpisodeKey, Episode] = {}
        self._sequence = 0
        self.dropped = 0
        self._evicted: list[EpisodeKey] = []

    @property
    def ttl_s(self) -> float:
        """How long a claim lives after its last refresh: every replica quiet for this long."""
        return self.quiet_s + self.refresh_s

    def __len__(self) -> int:
        return len(self._open)

    def get(self, key: EpisodeKey) -> Episode | None:
        return self._open.get(key)

    def open_episodes(self) -> list[Episode]:
        return list(self._open.values())

    def alarm(self, key: EpisodeKey, now: float, values: Mapping[str, JSONValue] | None = None,
              token_prefix: str = "") -> tuple[Action, Episode]:
        """One alarm of `key` at `now`. Returns what to do and the episode (new or updated)."""
        episode = self._open.get(key)
        if episode is None:
            self._sequence += 1
            episode = Episode(key=key, token=f"{token_prefix}{self._sequence}", opened_at=now, last_alarm_at=now,
                              refreshed_at=now, last=dict(values or {}))
            self._open[key] = episode
            self._bound()
            return Action.CLAIM, episode
        episode.alarms += 1
        episode.last_alarm_at = max(episode.last_alarm_at, now)
        if values:
            episode.last = dict(values)
        if episode.owner is not None and now - episode.refreshed_at >= self.refresh_s:
            episode.refreshed_at = now
            return Action.REFRESH, episode
        return Action.NONE, episode

    def claimed(self, key: EpisodeKey, holds: bool) -> bool:
        """Report a claim's answer (`holds`: this process's token holds the claim now). Returns
        True when this process must send a `firing` alert: it opened the episode, or it followed
        one whose owner's claim had expired (the owner died) and now holds it."""
        episode = self._open.get(key)
        if episode is None:
            return False
        was = episode.owner
        episode.owner = holds
        if holds and not was:
            if was is False:  # took over an expired claim: from here on a new episode of its own
                episode.opened_at = episode.last_alarm_at
                episode.alarms = 1
            return True
        return False

    def due(self, now: float) -> list[Episode]:
        """Open episodes quiet for at least quiet_s at `now`. For each the caller closes it with
        :meth:`close` (a follower at once; an owner once its claim is gone, else :meth:`postpone`)."""
        return [e for e in self._open.values()
                if now - e.last_alarm_at >= self.quiet_s and now >= e.recheck_at and e.owner is not None]

    def postpone(self, key: EpisodeKey, now: float) -> None:
        """The owner's claim still lives (another replica alarmed, or this one's last refresh has
        not expired yet): look again in refresh_s."""
        episode = self._open.get(key)
        if episode is not None:
            episode.recheck_at = now + self.refresh_s

    def close(self, key: EpisodeKey) -> Episode | None:
        """Forget the episode; returns it (send `resolved` if it was owned)."""
        return self._open.pop(key, None)

    def take_evicted(self) -> list[EpisodeKey]:
        """Keys dropped to keep the bound since the last call (their gauges must go)."""
        evicted, self._evicted = self._evicted, []
        return evicted

    def _bound(self) -> None:
        while len(self._open) > self.max_open:
            oldest = min(self._open.values(), key=lambda e: e.last_alarm_at)
            del self._open[oldest.key]
            self._evicted.append(oldest.key)
            self.dropped += 1


def firing_alert(kind: str, episode: Episode, now: float, values: Mapping[str, JSONValue],
                 details: Mapping[str, JSONValue]) -> JSONObject:
    """The `firing` alert of an episode: `values` has value and threshold; `details` more fields
    (model and feature are set here, so every drift and quality alert carries them)."""
    key = episode.key
    return {"kind": kind, "state": "firing", "route": key.route, "arm": key.arm, "model_version": key.version,
            "metric": key.signal, "value": float(values["value"]), "threshold": float(values["threshold"]),
            "ts": now, "details": {**details, "model": key.model, "feature": key.feature, "episode": episode.token,
                                   "opened_at": episode.opened_at}}


def resolved_alert(kind: str, episode: Episode, now: float, details: Mapping[str, JSONValue] | None = None) -> JSONObject:
    """The `resolved` alert of an owned episode: its alarm count and times, the last alarm's values."""
    key = episode.key
    last = episode.last
    return {"kind": kind, "state": "resolved", "route": key.route, "arm": key.arm, "model_version": key.version,
            "metric": key.signal, "value": float(last.get("value", 0.0)), "threshold": float(last.get("threshold", 0.0)),
            "ts": now, "details": {**(details or {}), "model": key.model, "feature": key.feature,
                                   "episode": episode.token, "opened_at": episode.opened_at,
                                   "last_alarm_at": episode.last_alarm_at, "alarms": episode.alarms,
                                   "quiet_s": now - episode.last_alarm_at}}
