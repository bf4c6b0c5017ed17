"""Alarm episodes across replicas: claims in Redis, and the async glue the gateway's drift watch
and the feedback worker's quality-drift watch share (the bookkeeping is pure:
banditgate.drift.episodes).

A claim is one Redis string per episode key, `<prefix>:episode:<kind>:<key>`, holding the
token of the replica that opened the episode, with a TTL of quiet_s + refresh_s. Every replica
that alarms on the episode refreshes the TTL (whoever holds it), so it expires only after every
replica has been quiet that long; a claim whose owner died expires the same way.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from banditgate.drift.episodes import Action, Episode, EpisodeBook, EpisodeKey, firing_alert, resolved_alert
from banditgate.jsontypes import JSONObject, JSONValue

if TYPE_CHECKING:
    from redis import asyncio as aredis

log = logging.getLogger("banditgate.episodes")

# KEYS[1] the claim; ARGV token, ttl ms. Creates the claim for the token if absent; refreshes the
# TTL either way; returns 1 when the token holds the claim afterwards, else 0.
_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if holder == ARGV[1] then return 1 end
return 0
"""


def process_token() -> str:
    """A prefix that makes episode tokens unique across replicas and restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}:"


class EpisodeClaims:
    """The Redis side (`redis.asyncio` client). Raises RedisError (and OSError) from the client."""

    def __init__(self, redis: aredis.Redis, prefix: str, kind: str) -> None:
        self._redis = redis
        self._prefix = f"{prefix}:episode:{kind}:"
        self._script = redis.register_script(_CLAIM)

    def key(self, episode: EpisodeKey) -> str:
        return self._prefix + episode.name()

    async def claim(self, episode: EpisodeKey, token: str, ttl_s: float) -> bool:
        """Create or refresh the claim; True when `token` holds it."""
        return bool(await self._script(keys=[self.key(episode)], args=[token, max(1, int(ttl_s * 1000))]))

    async def holder(self, episode: EpisodeKey) -> str | None:
        value = await self._redis.get(self.key(episode))
        return value.decode() if isinstance(value, bytes) else value


class Episodes:
    """Turns alarms into episode alerts for one alert `kind` (drift, quality).

    `claims` None: this process alone decides (one replica, or tests). A Redis error is logged
    once per outage and the episode is treated as this process's own: a duplicate alert beats a
    lost one. `on_change(key, open)` is called when an episode opens or closes here (gauges)."""

    def __init__(self, kind: str, book: EpisodeBook, claims: EpisodeClaims | None,
                 clock: Callable[[], float] = time.time, token_prefix: str | None = None,
                 on_change: Callable[[EpisodeKey, bool], None] | None = None) -> None:
        self.kind = kind
        self.book = book
        self.claims = claims
        self._clock = clock
        self._token_prefix = process_token() if token_prefix is None else token_prefix
        self._on_change = on_change
        self._redis_failing = False
        self.redis_errors = 0

    async def alarm(self, key: EpisodeKey, values: Mapping[str, JSONValue], details: Mapping[str, JSONValue]) -> JSONObject | None:
        """One alarm. `values`: value and threshold (and anything the resolved alert should repeat).
        Returns the `firing` alert to send, or None (an open episode, or another replica's)."""
        now = self._clock()
        action, episode = self.book.alarm(key, now, values, self._token_prefix)
        if action is Action.NONE:
            return None
        if action is Action.CLAIM and self._on_change is not None:
            self._on_change(key, True)
            for evicted in self.book.take_evicted():
                self._on_change(evicted, False)
        holds = await self._claim(episode)
        if self.book.claimed(key, holds) and self.book.get(key) is episode:
            return firing_alert(self.kind, episode, now, values, details)
        return None

    async def sweep(self) -> list[JSONObject]:
        """Close the episodes that went quiet; returns the `resolved` alerts of those this process
        owned (call every second or so)."""
        now = self._clock()
        resolved = []
        for episode in self.book.due(now):
            if episode.owner and await self._still_held(episode):
                self.book.postpone(episode.key, now)
                continue
            if self.book.close(episode.key) is None:
                continue
            if self._on_change is not None:
                self._on_change(episode.key, False)
            if episode.owner:
                resolved.append(resolved_alert(self.kind, episode, now))
        return resolved

    async def _claim(self, episode: Episode) -> bool:
        if self.claims is None:
            return True
        try:
            holds = await self.claims.claim(episode.key, episode.token, self.book.ttl_s)
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return True
        self._recovered()
        return holds

    async def _still_held(self, episode: Episode) -> bool:
        """The owner's claim still holds its token (some replica refreshed it within the TTL)."""
        if self.claims is None:
            return False
        try:
            holder = await self.claims.holder(episode.key)
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return False
        self._recovered()
        return holder == episode.token

    def _failed(self, exc: BaseException) -> None:
        self.redis_errors += 1
        if not self._redis_failing:
            self._redis_failing = True
            log.warning("%s episodes: Redis unavailable (%s: %s); each replica alerts on its own until it answers",
                        self.kind, type(exc).__name__, exc)

    def _recovered(self) -> None:
        if self._redis_failing:
            self._redis_failing = False
            log.info("%s episodes: Redis answers again; episodes are shared across replicas", self.kind)
