"""Alarm episodes (pure, injected clock): one `firing` per episode, later alarms only counted, a
`resolved` after the quiet period; followers never alert; a follower whose owner's claim expired
takes over."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from banditgate.drift.episodes import Action, EpisodeBook, EpisodeKey, firing_alert, resolved_alert

KEY = EpisodeKey("churn", "a", "churn-gbm", 3, "feature_drift", "tenure")
QUIET = 10.0


def play(times: list[float], quiet: float = QUIET) -> tuple[list[float], list[tuple[float, int]]]:
    """One process alone (every claim held): alarms at `times`, a sweep before each alarm and one
    long after the last. Returns the firing times and (resolve time, alarms in the episode)."""
    book = EpisodeBook(quiet)
    firing, resolved = [], []

    def sweep(now: float) -> None:
        for episode in book.due(now):
            closed = book.close(episode.key)
            assert closed is not None and closed.owner
            resolved.append((now, closed.alarms))

    for now in times:
        sweep(now)
        action, _ = book.alarm(KEY, now)
        if action is Action.CLAIM and book.claimed(KEY, True):
            firing.append(now)
    sweep((times[-1] if times else 0.0) + quiet + 1)
    return firing, resolved


@settings(max_examples=200, deadline=None)
@given(gaps=st.lists(st.floats(0.0, 3 * QUIET, allow_nan=False), min_size=1, max_size=60))
def test_one_firing_per_episode_and_every_episode_resolves(gaps: list[float]) -> None:
    times = [sum(gaps[:i + 1]) for i in range(len(gaps))]
    firing, resolved = play(times)
    # an episode starts at the first alarm and after every gap of at least the quiet period
    starts = [times[0]] + [b for a, b in zip(times, times[1:]) if b - a >= QUIET]
    assert firing == starts
    assert len(resolved) == len(firing)
    assert sum(alarms for _, alarms in resolved) == len(times)  # every alarm counted in its episode
    for (closed_at, _), opened in zip(resolved, firing):
        assert closed_at >= opened + QUIET


def test_a_persisting_drift_alerts_once_however_many_alarms() -> None:
    firing, resolved = play([float(t) for t in range(0, 1000, 3)])  # an alarm every 3 s for 1000 s
    assert firing == [0.0] and len(resolved) == 1 and resolved[0][1] == 334


def test_refreshes_are_spaced_and_keys_are_independent() -> None:
    book = EpisodeBook(QUIET, refresh_s=2.0)
    other = EpisodeKey("churn", "a", "churn-gbm", 3, "feature_drift", "age")
    assert book.alarm(KEY, 0.0)[0] is Action.CLAIM
    assert book.alarm(KEY, 0.5)[0] is Action.NONE  # claim not answered yet: nothing to refresh
    assert book.claimed(KEY, True)
    actions = [book.alarm(KEY, t)[0] for t in (1.0, 1.9, 2.1, 3.0, 4.2)]
    assert actions == [Action.NONE, Action.NONE, Action.REFRESH, Action.NONE, Action.REFRESH]
    assert book.alarm(other, 4.3)[0] is Action.CLAIM and len(book) == 2
    assert book.ttl_s == QUIET + 2.0


def test_a_follower_never_alerts_and_takes_over_an_expired_claim() -> None:
    book = EpisodeBook(QUIET, refresh_s=2.0)
    book.alarm(KEY, 0.0)
    assert book.claimed(KEY, False) is False  # another replica holds it: no firing
    episode = book.get(KEY)
    assert episode is not None and episode.owner is False
    assert book.alarm(KEY, 3.0)[0] is Action.REFRESH  # followers keep the claim alive too
    assert book.claimed(KEY, False) is False
    assert book.alarm(KEY, 6.0)[0] is Action.REFRESH
    assert book.claimed(KEY, True) is True  # the owner's claim expired: this one opens anew and fires
    assert episode.owner and episode.alarms == 1 and episode.opened_at == 6.0
    assert book.due(15.9) == [] and book.due(16.0) == [episode]


def test_an_owner_waits_while_its_claim_lives() -> None:
    book = EpisodeBook(QUIET, refresh_s=2.0)
    book.alarm(KEY, 0.0)
    book.claimed(KEY, True)
    assert [e.key for e in book.due(10.0)] == [KEY]
    book.postpone(KEY, 10.0)  # another replica refreshed it: look again in refresh_s
    assert book.due(11.9) == [] and [e.key for e in book.due(12.0)] == [KEY]
    assert book.close(KEY) is not None and book.close(KEY) is None


def test_pending_claims_are_not_swept_and_the_book_is_bounded() -> None:
    book = EpisodeBook(QUIET, max_open=3)
    book.alarm(KEY, 0.0)
    assert book.due(100.0) == []  # the claim's answer is not in: nothing to decide yet
    for index in range(5):
        book.alarm(EpisodeKey("r", "a", "m", 1, "feature_drift", f"f{index}"), 1.0 + index)
    assert len(book) == 3 and book.dropped == 3 and book.get(KEY) is None
    assert book.take_evicted()[0] == KEY and book.take_evicted() == []


def test_alerts_carry_the_episode_key_and_state() -> None:
    book = EpisodeBook(QUIET)
    _, episode = book.alarm(KEY, 5.0, {"value": 12.0, "threshold": 10.0})
    book.claimed(KEY, True)
    book.alarm(KEY, 7.0, {"value": 11.0, "threshold": 10.0})
    fired = firing_alert("drift", episode, 5.0, {"value": 12.0, "threshold": 10.0}, {"psi": 0.2})
    assert (fired["state"], fired["route"], fired["arm"], fired["model_version"], fired["metric"]) == (
        "firing", "churn", "a", 3, "feature_drift")
    assert fired["details"]["model"] == "churn-gbm" and fired["details"]["feature"] == "tenure"
    done = resolved_alert("drift", episode, 20.0)
    assert done["state"] == "resolved" and done["details"]["alarms"] == 2 and done["value"] == 11.0
    assert done["details"]["quiet_s"] == 13.0 and done["details"]["episode"] == fired["details"]["episode"]
    score = EpisodeKey("churn", "a", "churn-gbm", 3, "score_drift")
    assert score.feature is None and score.name() != KEY.name()


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        EpisodeBook(0)
    with pytest.raises(ValueError):
        EpisodeBook(10, refresh_s=0)
