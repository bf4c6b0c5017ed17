"""The private faust-streaming internals `feedback.consumer` overrides or calls, checked at its import.

`feedback.consumer` replaces faust's per-message drain loop with a batch one: it overrides private
methods of faust's aiokafka consumer and reads private state of faust's services and recovery.
faust-streaming does not promise those between releases; a release that renamed one would fail
mid-run (an AttributeError in the drain task), or, for an override, silently never call ours.
pyproject.toml pins faust-streaming to the minor version they were read from (`TESTED`); this check
turns any other that lacks one into a single clear error when the worker starts.

No faust import at module level: `banditgate feedback` imports the error class before the worker.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping

TESTED = "0.15"
"""The faust-streaming minor version whose internals feedback.consumer was written against."""

REQUIRED: tuple[tuple[str, str, tuple[str, ...] | None], ...] = (
    # (owner, attribute, the method's parameters after self; None: an attribute, only its presence)
    ("Consumer", "_drain_messages", ("fetcher",)),
    ("Consumer", "_wait_next_records", ("timeout",)),
    ("Consumer", "_new_offset", ("tp",)),
    ("Consumer", "_filter_tps_with_pending_acks", ("topics",)),
    ("Consumer", "_to_message", ("tp", "record")),
    ("Consumer", "_new_consumer_thread", ()),
    ("Consumer", "_read_offset", None),
    ("Consumer", "_stopped", None),
    ("ConsumerThread", "_create_worker_consumer", ("transport",)),
    ("Fetcher", "_stopped", None),  # the drain loop's `fetcher._stopped`
    ("Recovery", "_active_events_received_at", None),
    ("Recovery", "_standby_events_received_at", None),
    ("Recovery", "_set_recovery_ended", ()),
)


class FaustInternalsError(ImportError):
    """The installed faust-streaming lacks an internal that feedback.consumer relies on."""


def _declared(cls: type, name: str) -> bool:
    """Whether `cls` or a base defines `name` or declares it (instance attributes are annotated)."""
    return any(name in vars(klass) or name in getattr(klass, "__annotations__", {}) for klass in cls.__mro__)


def missing_internals(owners: Mapping[str, type],
                      required: Iterable[tuple[str, str, tuple[str, ...] | None]] = REQUIRED) -> list[str]:
    """The `Owner.attribute` names of `required` that `owners` lack (or whose parameters differ)."""
    missing = []
    for owner, name, parameters in required:
        cls = owners[owner]
        if not _declared(cls, name):
            missing.append(f"{owner}.{name}")
            continue
        if parameters is None:
            continue
        method = getattr(cls, name, None)
        if not callable(method):
            missing.append(f"{owner}.{name}()")
            continue
        try:
            found = tuple(inspect.signature(method).parameters)[1:]  # after self
        except (TypeError, ValueError):  # no signature to read: presence is all we can check
            continue
        if found != parameters:
            missing.append(f"{owner}.{name}({', '.join(parameters)})")
    return missing


def check_faust_internals() -> None:
    """Raise FaustInternalsError (one line) unless the installed faust-streaming has them all."""
    import faust
    from faust.tables.recovery import Recovery
    from faust.transport.consumer import Fetcher
    from faust.transport.drivers import aiokafka as faust_aiokafka

    owners = {"Consumer": faust_aiokafka.Consumer, "ConsumerThread": faust_aiokafka.AIOKafkaConsumerThread,
              "Fetcher": Fetcher, "Recovery": Recovery}
    missing = missing_internals(owners)
    if missing:
        raise FaustInternalsError(
            f"faust-streaming {faust.__version__} lacks {', '.join(missing)}, which the feedback worker's batch "
            f"consumer (feedback/consumer.py) overrides or uses; install faust-streaming {TESTED}.* "
            "(`pip install -c constraints.txt -e .`)")
