"""The isolation policy of a hung model (gateway/batching/circuit.py): pure, the clock passed in.

The properties are checked over random histories (hypothesis): a caller that starts only what
`decide` allows never holds more than the model's cap of threads; an unavailable model sees at most
one probe at a time and no probe before its backoff has passed (no probe storms); the backoff
doubles per failed probe up to its maximum and starts again after a probe answers; only a probe
closes an open circuit.
"""

from __future__ import annotations

import doctest

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.batching import circuit as circuit_module
from gateway.batching.circuit import CircuitPolicy, ModelCircuit, thread_share


def test_the_docstrings_run() -> None:
    assert doctest.testmod(circuit_module).failed == 0


@pytest.mark.parametrize(("threads", "configured", "expected"),
                         [(1, None, 1), (2, None, 1), (3, None, 1), (4, None, 2), (16, None, 8), (8, 8, 8), (8, 1, 1)])
def test_the_thread_share_is_half_the_pool_unless_configured(threads: int, configured: int | None,
                                                             expected: int) -> None:
    assert thread_share(threads, configured) == expected


@pytest.mark.parametrize(("threads", "configured"), [(2, 3), (2, 0), (0, None)])
def test_a_thread_share_outside_the_pool_is_refused(threads: int, configured: int | None) -> None:
    with pytest.raises(ValueError):
        thread_share(threads, configured)


def test_an_invalid_policy_is_refused() -> None:
    for bad in ({"max_threads": 0}, {"retry_s": 0.0}, {"retry_s": 5.0, "retry_max_s": 1.0}):
        with pytest.raises(ValueError):
            CircuitPolicy(**bad)  # type: ignore[arg-type]


def test_a_model_that_always_answers_is_never_failed() -> None:
    circuit = ModelCircuit(CircuitPolicy(max_threads=2))
    now = 0.0
    for _ in range(1000):
        assert circuit.decide(now) == "run" and circuit.accepts(now)
        circuit.started(1)
        assert circuit.decide(now) in ("run", "wait")
        circuit.returned(1)
        circuit.succeeded()
        now += 0.01
    assert circuit.state == "closed" and circuit.timeouts == 0 and circuit.probes == 0


def test_the_backoff_doubles_per_failed_probe_up_to_its_maximum_and_resets_after_an_answer() -> None:
    circuit = ModelCircuit(CircuitPolicy(max_threads=1, retry_s=1.0, retry_max_s=5.0))
    now = 0.0
    assert circuit.timed_out(now)
    waits = []
    for _ in range(6):
        wait = circuit.retry_at - now
        waits.append(wait)
        assert circuit.decide(now + wait - 1e-9) == "fail"  # not a moment early
        now += wait
        assert circuit.decide(now) == "probe"
        assert not circuit.accepts(now)  # while it runs, rows are refused at once
        assert circuit.timed_out(now + 0.1)  # the probe timed out: open again
        now += 0.1
    assert waits == pytest.approx([1.0, 2.0, 4.0, 5.0, 5.0, 5.0])
    now = circuit.retry_at
    assert circuit.decide(now) == "probe"
    circuit.probe_finished()
    assert circuit.state == "closed" and circuit.available
    assert circuit.timed_out(now + 1.0) and circuit.retry_at == now + 2.0  # the first wait again


def test_a_late_batch_of_the_same_episode_changes_nothing() -> None:
    circuit = ModelCircuit(CircuitPolicy(max_threads=2, retry_s=1.0))
    assert circuit.timed_out(10.0)
    assert not circuit.timed_out(10.5)  # the second batch that was running when it opened
    assert circuit.retry_at == 11.0
    circuit.succeeded()  # a batch that started before and finished late does not close it
    assert circuit.state == "open"


def test_no_probe_while_the_model_holds_its_cap() -> None:
    """A run ONNX Runtime cannot end keeps its thread: a probe would only take one more."""
    circuit = ModelCircuit(CircuitPolicy(max_threads=1, retry_s=1.0))
    circuit.started(1)
    circuit.timed_out(0.0)  # terminated, but the thread never comes back
    assert [circuit.decide(t) for t in (1.0, 10.0, 100.0)] == ["fail", "fail", "fail"]
    assert circuit.probes == 0 and circuit.running == 1
    circuit.returned(1)
    assert circuit.decide(100.0) == "probe"


def test_a_swapped_file_is_probed_at_the_next_batch() -> None:
    circuit = ModelCircuit(CircuitPolicy(retry_s=30.0, retry_max_s=60.0))
    circuit.timed_out(0.0)
    circuit.retry_now()
    assert circuit.decide(0.1) == "probe"


events = st.lists(st.tuples(st.sampled_from(["batch", "return", "timeout", "advance"]),
                            st.floats(0.0, 3.0)), max_size=300)


@settings(max_examples=300, deadline=None)
@given(cap=st.integers(1, 4), retry=st.floats(0.1, 2.0), factor=st.integers(1, 8), history=events)
def test_a_random_history_keeps_the_cap_and_never_storms_probes(cap: int, retry: float, factor: int,
                                                                history: list[tuple[str, float]]) -> None:
    policy = CircuitPolicy(max_threads=cap, retry_s=retry, retry_max_s=retry * factor)
    circuit = ModelCircuit(policy)
    now = 0.0
    tasks: list[str] = []  # "batch", "probe" or "stuck probe" (it timed out), one per held thread
    opened_at: float | None = None  # when the circuit last opened
    wait_s: float | None = None
    last_probe: float | None = None
    for kind, amount in history:
        if kind == "advance":
            now += amount
        elif kind == "batch":
            action = circuit.decide(now)
            if action == "run":
                threads = min(circuit.free_threads, 1 + int(amount))
                assert threads >= 1
                circuit.started(threads)
                tasks += ["batch"] * threads
            elif action == "probe":
                assert opened_at is not None and wait_s is not None
                assert now >= opened_at + wait_s - 1e-9  # never before the backoff has passed
                assert "probe" not in tasks  # one undecided probe at a time
                last_probe = now
                circuit.started(1)
                tasks.append("probe")
            elif action == "wait":
                assert circuit.state == "closed" and circuit.running >= cap
            else:
                assert circuit.state != "closed"
        elif kind == "return" and tasks:
            task = tasks.pop(int(amount * 10) % len(tasks))
            circuit.returned(1)
            if task == "probe" and circuit.state == "half_open":
                circuit.probe_finished()
                assert circuit.state == "closed"
            elif task == "batch":
                circuit.succeeded()
        elif kind == "timeout":
            state_before = circuit.state
            if state_before == "half_open":  # the probe timed out; its thread may stay stuck
                tasks[tasks.index("probe")] = "stuck probe"
            opened = circuit.timed_out(now)
            assert opened == (state_before != "open")
            if opened:
                opened_at, wait_s = now, circuit.retry_at - now
                assert policy.retry_s - 1e-9 <= wait_s <= policy.retry_max_s + 1e-9
        assert 0 <= circuit.running <= cap  # never more threads than its share
        assert circuit.running == len(tasks)
        assert circuit.available == (circuit.state == "closed")
        if circuit.state == "half_open":
            assert last_probe is not None and not circuit.accepts(now)


def test_the_config_refuses_a_share_above_the_pool_and_a_first_wait_above_the_last() -> None:
    from banditgate.config import ConfigError, parse_config

    base = {"routes": [{"name": "r", "arms": [{"name": "a", "model": "m", "version": 1}]}]}
    with pytest.raises(ConfigError, match="model_max_threads .3. exceeds inference_threads .2."):
        parse_config({**base, "batching": {"inference_threads": 2, "model_max_threads": 3}}, env={})
    with pytest.raises(ConfigError, match="unavailable_retry_s must not exceed"):
        parse_config({**base, "models": {"unavailable_retry_s": 5, "unavailable_retry_max_s": 1}}, env={})
    config = parse_config({**base, "batching": {"inference_threads": 4}}, env={})
    assert thread_share(config.batching.inference_threads, config.batching.model_max_threads) == 2
