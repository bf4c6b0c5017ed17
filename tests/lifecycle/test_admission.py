"""The admission gate's pure parts: percentiles, the verdict from figures, output checks, the
admission and refused stages of the rollout state machine and the record that keeps the figures;
and the benchmark child on real ONNX models (a heavier model measured heavier)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from banditgate.config import Admission, Route
from router.lineup import RolloutRecord, lineup
from router.rollout import Evidence, RolloutError, admission_transition, admit, assess, manual, may_start, start, step
from router.rollout_admission import (
    AdmissionError,
    AdmissionResult,
    ModelFigures,
    judge,
    output_problems,
    percentile,
    table,
)

ROUTE = Route(name="churn", arms=[{"name": "a", "model": "m", "version": 3}],
              rollout={"admission": {"max_latency_p99_ratio": 1.5, "max_memory_ratio": 1.5,
                                     "min_throughput_ratio": 0.7, "max_size_mb": 100}})
BUDGET = ROUTE.rollout.admission  # type: ignore[union-attr]


def figures(scale: float = 1.0, memory: float = 40.0, size: float = 20.0, problems: tuple[str, ...] = ()
            ) -> ModelFigures:
    return ModelFigures(p50_ms=1.0 * scale, p99_ms=1.5 * scale, batch_p50_ms=10.0 * scale,
                        batch_p99_ms=14.0 * scale, rows_per_s=3200.0 / scale, memory_mb=memory, size_mb=size,
                        problems=problems)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=300), st.floats(0, 1))
def test_percentile_is_numpys_linear_percentile(samples: list[float], q: float) -> None:
    assert percentile(samples, q) == pytest.approx(float(np.percentile(samples, q * 100)), rel=1e-9, abs=1e-6)


def test_percentile_refuses_what_is_no_sample() -> None:
    with pytest.raises(AdmissionError):
        percentile([], 0.5)
    with pytest.raises(AdmissionError):
        percentile([1.0, float("nan")], 0.5)
    with pytest.raises(AdmissionError):
        percentile([1.0], 1.5)


def test_equal_cost_is_admitted_heavier_is_refused_on_each_budget() -> None:
    assert judge(figures(), figures(), BUDGET, batch=32).admitted
    slow = judge(figures(scale=3.0), figures(), BUDGET, batch=32)
    assert not slow.admitted
    assert {c.name for c in slow.checks if not c.ok} == {"latency_p99_batch1", "latency_p99_max_batch", "throughput"}
    assert slow.reason.startswith("refused at admission: latency_p99_batch1 3.00 > 1.5")
    fat = judge(figures(memory=80.0), figures(memory=40.0), BUDGET, batch=32)
    assert [c.name for c in fat.checks if not c.ok] == ["memory"]
    big = judge(figures(size=150.0), figures(), BUDGET, batch=32)
    assert [c.name for c in big.checks if not c.ok] == ["size"]
    broken = judge(figures(problems=("probability has 3 NaN or infinite values",)), figures(), BUDGET, batch=32)
    assert not broken.admitted and "NaN" in broken.reason


def test_floors_keep_noise_below_them_from_deciding() -> None:
    budget = Admission(max_latency_p99_ratio=1.5, max_memory_ratio=1.5, latency_floor_ms=0.5, memory_floor_mb=8)
    tiny = ModelFigures(0.01, 0.03, 0.1, 0.2, 320_000, 0.3, 0.01)
    tinier = ModelFigures(0.01, 0.01, 0.05, 0.1, 640_000, 0.1, 0.01)
    assert judge(tiny, tinier, budget, batch=32).admitted  # 3x of microseconds and kilobytes decides nothing


@settings(max_examples=100, deadline=None)
@given(st.floats(1.0, 10.0), st.floats(1.0, 10.0))
def test_more_costly_never_turns_a_refusal_into_admission(scale: float, memory_factor: float) -> None:
    base = figures()
    verdict = judge(figures(scale=scale, memory=40.0 * memory_factor), base, BUDGET, batch=32)
    worse = judge(figures(scale=scale * 1.5, memory=60.0 * memory_factor), base, BUDGET, batch=32)
    assert verdict.admitted or not worse.admitted


def test_result_round_trips_and_prints_a_table() -> None:
    result = judge(figures(scale=3.0), figures(), BUDGET, batch=32, rows_source="synthetic", seconds=4.2)
    again = AdmissionResult.from_dict(result.to_dict())
    assert again.to_dict() == result.to_dict()
    lines = table(result.to_dict())
    assert lines[0].startswith("admission: refused at admission")
    assert any(line.strip().startswith("OVER latency_p99_batch1") for line in lines)
    assert any("memory added MB" in line for line in lines)
    with pytest.raises(AdmissionError):
        AdmissionResult.from_dict({"admitted": True})
    with pytest.raises(AdmissionError):
        ModelFigures(float("nan"), 1, 1, 1, 1, 1, 1)


def test_output_problems() -> None:
    incumbent = {"probability": ("float32", (1,), 0), "label": ("int64", (), 0)}
    assert output_problems(dict(incumbent), incumbent) == []
    assert output_problems({"probability": ("float32", (2,), 4)}, incumbent) == [
        "label missing", "probability row shape [2], incumbent [1]", "probability has 4 NaN or infinite values"]
    assert output_problems({"probability": ("float64", (1,), 0), "label": ("int64", (), 0)}, incumbent) == [
        "probability dtype float64, incumbent float32"]


def test_admission_stage_waits_then_goes_to_shadow_or_refused() -> None:
    config = ROUTE.rollout
    assert config is not None
    state = start("churn", "m", 4, "a", now=0.0, admission=True)
    assert state.stage == "admission" and state.active
    record = RolloutRecord.begin(ROUTE, state, previous=None)
    view = lineup(ROUTE, record)
    assert [a.name for a in view.arms] == ["a"] and not view.shadows  # nothing serves or mirrors it yet
    assert step(state, Evidence(shadow_decision="promote", shadow_pairs=1e6), config, 1.0) is None
    assert assess(state, Evidence(), config, 1.0).awaiting == ("the admission benchmark's verdict",)
    admitted = admission_transition(state, True, "admitted: ...", config, 2.0)
    assert admitted.state.stage == "shadow" and admitted.audit.actor == "rule:admission"
    assert admitted.audit.alert_kind is None
    refused = admission_transition(state, False, "refused at admission: memory", config, 2.0, {"x": 1})
    assert refused.state.stage == "refused" and not refused.state.active
    assert refused.audit.alert_kind == "refused" and refused.audit.details == {"x": 1}
    view = lineup(ROUTE, record.with_state(refused.state))
    assert not view.shadows and [a.name for a in view.arms] == ["a"]
    with pytest.raises(RolloutError, match="not at admission"):
        admission_transition(admitted.state, False, "late", config, 3.0)
    with pytest.raises(RolloutError, match="rollout admit churn --version 4"):
        manual(refused.state, "promote", "bob", 3.0, config)
    # a refused version is never started again; by hand it enters as a shadow
    assert not may_start("m", 4, refused.state, {"m": 4})
    by_hand = admit(refused.state, 4, "bob", 4.0, config)
    assert by_hand.state.stage == "shadow" and by_hand.audit.actor == "admin:bob"
    with pytest.raises(RolloutError, match="not 5"):
        admit(refused.state, 5, "bob", 4.0, config)
    with pytest.raises(RolloutError, match="only a version at admission or refused"):
        admit(by_hand.state, 4, "bob", 5.0, config)


def test_record_keeps_the_admission_result() -> None:
    state = start("churn", "m", 4, "a", now=0.0, admission=True)
    result = judge(figures(), figures(), BUDGET, batch=8).to_dict()
    record = RolloutRecord.begin(ROUTE, state, previous=None).with_state(state, admission=result)
    again = RolloutRecord.from_fields({k.encode(): v.encode() for k, v in record.to_fields().items()})
    assert again.admission == result and again.state == state
    newer = RolloutRecord.begin(ROUTE, start("churn", "m", 5, "a", 1.0, admission=True),
                                previous=record.with_state(admission_transition(state, False, "no", ROUTE.rollout,
                                                                                1.0).state))
    assert newer.rejected == {"m": 4} and newer.admission is None


def test_benchmark_child_measures_a_heavier_model_heavier(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from gateway.admission import run_benchmark
    from loadtests.admission_models import build_admission_model

    incumbent = build_admission_model(tmp_path / "m" / "1" / "model.onnx", hidden=512, seed=1)
    heavy = build_admission_model(tmp_path / "m" / "2" / "model.onnx", hidden=512, seed=1, extra=2, repeat=2)
    budget = Admission(max_latency_p99_ratio=50, max_memory_ratio=1.5, min_throughput_ratio=0.01, memory_floor_mb=0.5,
                       samples=20, batch_samples=3, busy_fraction=1.0, timeout_s=120)
    spec = {"candidate": {"path": str(heavy), "model": "m", "version": 2},
            "incumbent": {"path": str(incumbent), "model": "m", "version": 1}, "references": [], "max_batch": 16,
            "samples": budget.samples, "batch_samples": budget.batch_samples, "threads": 1, "busy_fraction": 1.0,
            "nice": 0, "providers": ["CPUExecutionProvider"], "graph_optimization": "all"}
    result = asyncio.run(run_benchmark(spec, budget))
    assert result.candidate is not None and result.incumbent is not None, result.reason
    # two extra 512x512 matrices on top of one: about 3x the weights, and a refusal on memory only
    assert result.candidate.memory_mb > 2 * result.incumbent.memory_mb
    assert result.candidate.size_mb > 2.5 * result.incumbent.size_mb
    assert [c.name for c in result.checks if not c.ok] == ["memory"] and not result.admitted
    assert result.candidate.problems == ()
    assert result.rows_source.startswith("synthetic")


def test_a_candidate_with_other_inputs_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from gateway.admission import run_benchmark
    from loadtests.admission_models import build_admission_model

    incumbent = build_admission_model(tmp_path / "m" / "1" / "model.onnx", hidden=64, seed=1)
    narrower = build_admission_model(tmp_path / "m" / "2" / "model.onnx", hidden=64, seed=1, n_features=32)
    spec = {"candidate": {"path": str(narrower), "model": "m", "version": 2},
            "incumbent": {"path": str(incumbent), "model": "m", "version": 1}, "references": [], "max_batch": 8,
            "samples": 10, "batch_samples": 3, "threads": 1, "busy_fraction": 1.0, "nice": 0,
            "providers": ["CPUExecutionProvider"], "graph_optimization": "all"}
    result = asyncio.run(run_benchmark(spec, Admission()))
    assert not result.admitted and "cannot serve the same requests" in result.reason


def test_manual_promote_cannot_skip_the_admission_gate() -> None:
    config = ROUTE.rollout
    assert config is not None
    state = start("churn", "m", 4, "a", now=0.0, admission=True)
    with pytest.raises(RolloutError, match="banditgate rollout admit churn --version 4"):
        manual(state, "promote", "bob", 1.0, config)
    assert manual(state, "rollback", "bob", 1.0, config).state.stage == "rolled_back"


@pytest.mark.parametrize(("routes", "message"), [
    # the gated route's own shadow follows the model's latest version
    ([{"name": "churn", "arms": [{"name": "a", "model": "m", "version": 3}],
       "shadows": [{"name": "s", "model": "m"}], "rollout": {"admission": {}}}], "'s' uses model 'm' as 'latest'"),
    # another route's arm
    ([{"name": "churn", "arms": [{"name": "a", "model": "m", "version": 3}], "rollout": {"admission": {}}},
      {"name": "other", "arms": [{"name": "b", "model": "m"}]}], "'b' uses model 'm' as 'latest'"),
    # another route's shadow
    ([{"name": "churn", "arms": [{"name": "a", "model": "m", "version": 3}], "rollout": {"admission": {}}},
      {"name": "other", "arms": [{"name": "b", "model": "n", "version": 1}], "shadows": [{"name": "s", "model": "m"}]}],
     "'s' uses model 'm' as 'latest'"),
    # a second route rolling the same model out (without or with a gate of its own)
    ([{"name": "churn", "arms": [{"name": "a", "model": "m", "version": 3}], "rollout": {"admission": {}}},
      {"name": "other", "arms": [{"name": "b", "model": "m", "version": 3}], "rollout": {}}],
     "rolled out by route 'churn' with rollout.admission and by route 'other'"),
])
def test_config_refuses_a_way_around_the_admission_gate(routes: list[dict[str, object]], message: str) -> None:
    from pydantic import ValidationError

    from banditgate.config import Config

    with pytest.raises(ValidationError, match=message):
        Config(routes=routes)
    pinned = [dict(r, shadows=[dict(s, version=2) for s in r.get("shadows", [])],  # type: ignore[call-overload]
                   arms=[dict(a, version=a.get("version", 2)) for a in r["arms"]]) for r in routes]  # type: ignore[attr-defined]
    if "rolled out by route" not in message:
        Config(routes=pinned)  # pinned versions are fine


@pytest.mark.parametrize("module", ["router.lineup", "router.rollout_admission", "router.rollout"])
def test_module_doctests_run(module: str) -> None:
    import doctest
    import importlib

    outcome = doctest.testmod(importlib.import_module(module))
    assert outcome.attempted > 0 and outcome.failed == 0


def test_reason_and_problems_are_bounded_and_printable() -> None:
    evil = {f"out\n\x1b[31m{i}": ("float32", (1,), 3) for i in range(40)}
    problems = output_problems(evil, {})
    assert len(problems) == 6 and problems[-1] == "and 35 more"
    assert all(ch.isprintable() for p in problems for ch in p)
    result = judge(figures(problems=tuple(problems)), figures(), BUDGET, batch=8)
    assert not result.admitted and len(result.reason) <= 300 and result.reason.isprintable()
    assert result.candidate is not None and result.candidate.problems == tuple(problems)  # bounded once, kept
    long = judge(figures(problems=tuple(f"p{i} " + "x" * 200 for i in range(50))), figures(), BUDGET, batch=8)
    assert len(long.reason) <= 300 and long.candidate is not None and long.candidate.problems[-1] == "and 45 more"


def _pair(tmp_path: Path, hidden: int = 32) -> tuple[Path, Path]:
    from loadtests.admission_models import build_admission_model

    incumbent = build_admission_model(tmp_path / "m" / "1" / "model.onnx", hidden=hidden, seed=1)
    candidate = build_admission_model(tmp_path / "m" / "2" / "model.onnx", hidden=hidden, seed=2)
    return incumbent, candidate


def _spec(incumbent: Path, candidate: Path) -> dict[str, object]:
    return {"candidate": {"path": str(candidate), "model": "m", "version": 2},
            "incumbent": {"path": str(incumbent), "model": "m", "version": 1}, "references": [], "max_batch": 4,
            "samples": 10, "batch_samples": 3, "threads": 1, "busy_fraction": 1.0, "nice": 0,
            "providers": ["CPUExecutionProvider"], "graph_optimization": "all"}


@pytest.mark.parametrize(("child", "says"), [
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "killed by signal 9"),
    ("import sys; sys.stderr.write('x' * 10_000_000 + '\\nboom'); sys.exit(3)", r"exit code 3\) boom"),
    ("import sys; sys.stdout.write('[1, 2]')", "no JSON object"),
    ("pass", "no JSON object"),
    ("import sys, json; sys.stdout.write(json.dumps({'error': 'x', 'who': 'incumbent', 'refuse': True}))",
     "the incumbent could not be benchmarked"),
    ("import sys, json; sys.stdout.write(json.dumps({'error': 'x', 'who': 'candidate'}))",
     "the candidate could not be benchmarked"),
])
def test_a_broken_benchmark_is_no_verdict_not_a_refusal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        child: str, says: str) -> None:
    """A child that dies, writes no object or blames the incumbent gives no verdict (tried again);
    before, each of these refused the candidate for good."""
    pytest.importorskip("onnx")
    from gateway import admission

    incumbent, candidate = _pair(tmp_path)
    monkeypatch.setattr(admission, "_BOOTSTRAP", child)
    with pytest.raises(admission.NoVerdict, match=says) as raised:
        asyncio.run(admission.run_benchmark(_spec(incumbent, candidate), Admission(timeout_s=60)))
    assert not raised.value.timed_out and len(str(raised.value)) <= 300


def test_a_timeout_is_no_verdict_marked_timed_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnx")
    from gateway import admission

    incumbent, candidate = _pair(tmp_path)
    monkeypatch.setattr(admission, "_BOOTSTRAP", "import time; time.sleep(60)")
    with pytest.raises(admission.NoVerdict, match="did not finish within timeout_s") as raised:
        asyncio.run(admission.run_benchmark(_spec(incumbent, candidate), Admission(timeout_s=0.5)))
    assert raised.value.timed_out


def test_a_failing_incumbent_or_a_file_still_arriving_is_no_verdict(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    import os

    from gateway.admission import NoVerdict, run_benchmark

    incumbent, candidate = _pair(tmp_path)
    good = incumbent.read_bytes()
    incumbent.write_bytes(b"not a model")
    with pytest.raises(NoVerdict, match="the incumbent could not be benchmarked: it does not load"):
        asyncio.run(run_benchmark(_spec(incumbent, candidate), Admission(timeout_s=60)))
    incumbent.write_bytes(good)
    whole = candidate.read_bytes()
    candidate.write_bytes(whole[: len(whole) // 2])  # half copied, just now
    with pytest.raises(NoVerdict, match="the candidate could not be benchmarked: its file changed less than"):
        asyncio.run(run_benchmark(_spec(incumbent, candidate), Admission(timeout_s=60)))
    candidate.unlink()
    with pytest.raises(NoVerdict, match="not readable"):
        asyncio.run(run_benchmark(_spec(incumbent, candidate), Admission(timeout_s=60)))
    # the same broken file, unchanged for a minute: the candidate's own fault, refused
    candidate.write_bytes(whole[: len(whole) // 2])
    os.utime(candidate, (candidate.stat().st_atime - 120, candidate.stat().st_mtime - 120))
    result = asyncio.run(run_benchmark(_spec(incumbent, candidate), Admission(timeout_s=60)))
    assert not result.admitted and result.reason.startswith("refused at admission: the candidate: it does not load")


def test_a_file_over_max_size_is_refused_without_loading_it(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from gateway.admission import run_benchmark

    incumbent, candidate = _pair(tmp_path)
    started: list[int] = []
    size_mb = candidate.stat().st_size / 2**20
    result = asyncio.run(run_benchmark(_spec(incumbent, candidate), Admission(max_size_mb=size_mb / 2),
                                       on_start=started.append))
    assert started == [] and not result.admitted and result.reason.startswith("refused at admission: size")
    assert [(c.name, c.ok) for c in result.checks] == [("size", False)]
    assert result.checks[0].value == pytest.approx(size_mb)


def test_no_verdict_backs_off_and_three_timeouts_refuse() -> None:
    from gateway.admission import RETRY_MAX_S, AdmissionRunner, NoVerdict, retry_delay_s

    assert [retry_delay_s(n) for n in (1, 2, 3)] == [5.0, 10.0, 20.0]
    assert retry_delay_s(10) == RETRY_MAX_S == retry_delay_s(10_000)
    runner = AdmissionRunner(None, None, None, {})  # type: ignore[arg-type]  # only its bookkeeping is used
    key = ("churn", 4)
    assert runner._no_verdict(key, NoVerdict("child died")) is None
    assert runner._no_verdict(key, NoVerdict("slow", timed_out=True)) is None
    assert runner._no_verdict(key, NoVerdict("slow", timed_out=True)) is None
    refused = runner._no_verdict(key, NoVerdict("slow", timed_out=True))
    assert refused is not None and not refused.admitted
    assert refused.reason == "refused at admission: admission benchmark timed out 3 times"


def test_runner_forgets_a_version_once_it_leaves_admission() -> None:
    from gateway.admission import AdmissionRunner

    runner = AdmissionRunner(None, None, None, {})  # type: ignore[arg-type]  # only its bookkeeping is used
    state = start("churn", "m", 4, "a", now=0.0, admission=True)
    record = RolloutRecord.begin(ROUTE, state, previous=None)
    key = ("churn", 4)
    runner._next_claim[key], runner._episodes[key], runner._timeouts[key] = 1e18, 2, 1
    runner.child_pids[key] = [1]
    runner.results[key] = judge(figures(), figures(), BUDGET, batch=8)
    runner.consider("churn", record)  # still at admission, and not due: kept
    assert runner._next_claim[key] == 1e18 and runner.child_pids == {key: [1]}
    shadow = admission_transition(state, True, "admitted", ROUTE.rollout, 1.0).state  # type: ignore[arg-type]
    runner.consider("churn", record.with_state(shadow))
    assert (runner._next_claim, runner._episodes, runner._timeouts, runner.results, runner.child_pids) == (
        {}, {}, {}, {}, {})
