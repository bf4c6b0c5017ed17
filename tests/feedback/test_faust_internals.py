"""The faust-streaming internals feedback.consumer overrides are checked when it is imported: the
pinned faust passes, another that lacks one fails with one line naming what is missing."""

from __future__ import annotations

from typing import Any

import pytest
from faust.transport.drivers import aiokafka as faust_aiokafka

import feedback.consumer  # noqa: F401 - importing it runs the check against the installed faust
from feedback.faust_internals import REQUIRED, FaustInternalsError, check_faust_internals, missing_internals


def test_the_installed_faust_has_every_internal_the_consumer_relies_on() -> None:
    check_faust_internals()


def test_a_consumer_without_the_drain_loop_or_with_another_signature_is_named() -> None:
    class Service:
        _stopped: Any

    class Consumer(Service):
        _read_offset: Any

        async def _wait_next_records(self, timeout_s: float) -> None:  # a renamed parameter
            return None

        def _new_offset(self, tp: Any) -> None:
            return None

    required = [entry for entry in REQUIRED if entry[0] == "Consumer"]
    assert missing_internals({"Consumer": Consumer}, required) == [
        "Consumer._drain_messages", "Consumer._wait_next_records(timeout)", "Consumer._filter_tps_with_pending_acks",
        "Consumer._to_message", "Consumer._new_consumer_thread"]


def test_an_attribute_where_a_method_was_is_named() -> None:
    class Recovery:
        _active_events_received_at: Any
        _standby_events_received_at: Any
        _set_recovery_ended = None

    assert missing_internals({"Recovery": Recovery}, [e for e in REQUIRED if e[0] == "Recovery"]) == [
        "Recovery._set_recovery_ended()"]


def test_another_faust_fails_with_one_line_naming_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    class Consumer:  # a faust whose aiokafka consumer kept none of them
        pass

    monkeypatch.setattr(faust_aiokafka, "Consumer", Consumer)
    with pytest.raises(FaustInternalsError) as raised:
        check_faust_internals()
    message = str(raised.value)
    assert "\n" not in message
    assert "Consumer._drain_messages" in message and "Consumer._stopped" in message
    assert "install faust-streaming 0.15.*" in message
    assert isinstance(raised.value, ImportError)  # raised while feedback.consumer is imported
