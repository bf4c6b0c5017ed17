"""`banditgate demo [--quick] [--grafana] [--report-dir DIR]`: the closed loop, end to end.

Stages: local stack up (or reuse) → train and export models into a fresh repository → config and
topics → `banditgate serve` + `banditgate feedback` subprocesses → warm-up (every model serves a
batch, so the gateway builds its drift monitors before the clock starts) → the scenario
(baseline, covariate shift, broken release) → drain (every prediction, every outcome, every
outcome counted by the feedback worker) → SIGTERM both processes → checks → report.

Whatever happens (a failure, Ctrl-C, SIGTERM), the processes it started are stopped and a
report of what was seen is written. The last line printed is the verdict with the report path;
the exit code is 0 only when every check passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from demo.checks import (
    Check,
    OracleLabels,
    check_accounting,
    check_bandit,
    check_drift,
    check_lifecycle,
    check_processes,
)
from demo.deployment import (
    DemoError,
    Plan,
    Process,
    create_topics,
    delete_run_state,
    feedback_ready,
    gateway_ready,
    make_plan,
    start_processes,
    write_config,
)
from demo.models import (
    RETRAIN_MODEL,
    ROUTE,
    SPECS,
    Dataset,
    ModelVersion,
    build_repository,
    calibrate_references,
    load_dataset,
    publish,
    train_all,
)
from demo.observe import Observer
from demo.report import RunFacts, write_report
from demo.scenario import Scenario
from demo.telemetry import Telemetry
from demo.traffic import ProductService
from demo.view import View

WARMUP_REQUESTS = 24
START_TIMEOUT_S = 120.0
DRAIN_TIMEOUT_S = 45.0


def run_demo(quick: bool, grafana: bool, report_dir: str | None) -> int:
    """Run the demo; return 0 when every check passed, 1 otherwise (130 when interrupted).
    Raises DemoError (one line) when it cannot start at all (no stack, unusable report folder)."""
    scenario = Scenario.quick() if quick else Scenario.full()
    folder = Path(report_dir or f"demo-report-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if (folder / "models").exists() or (folder / "summary.md").exists():
        raise DemoError(f"{folder} already holds a demo report: name another --report-dir")
    folder.mkdir(parents=True, exist_ok=True)
    demo = Demo(scenario, folder, grafana)
    try:
        return asyncio.run(demo.main())
    except KeyboardInterrupt:
        print(f"demo INTERRUPTED: processes stopped; partial report {folder / 'summary.md'}", flush=True)
        return 130


class Demo:
    """One run: owns the processes, the product service, the observer and the telemetry."""

    def __init__(self, scenario: Scenario, folder: Path, grafana: bool) -> None:
        self.scenario = scenario
        self.folder = folder
        self.grafana = grafana
        self.telemetry = Telemetry([s.model for s in SPECS if s.role == "arm"],
                                   [s.model for s in SPECS if s.role == "shadow"])
        self.view = View(self.telemetry, scenario, stage="setup")
        self.plan: Plan | None = None
        self.processes: list[Process] = []
        self.service: ProductService | None = None
        self.observer: Observer | None = None
        self.dataset: Dataset | None = None
        self.versions: dict[tuple[str, int], ModelVersion] = {}
        self.timings: dict[str, float] = {}
        self.failure: str | None = None
        self.final_sample: Any = None
        self.rollout: dict[str, Any] | None = None
        self.retrain_released_s: float | None = None
        self.startup: dict[str, float] = {}
        """Seconds: calibration (at profile time), and from `banditgate serve` start to the drift
        monitors watching every model (see StartUp in demo/report.py)."""
        self.cleanup_problems: list[str] = []
        self._stage_started = time.monotonic()
        self._run_started = time.monotonic()
        self._shut_down = False

    # -- helpers -----------------------------------------------------------------------------
    def _stage(self, name: str) -> None:
        """Close the current stage's timing and name the next."""
        now = time.monotonic()
        if self.view.stage not in self.timings and self.view.stage != "setup":
            self.timings[self.view.stage] = now - self._stage_started
        self._stage_started = now
        self.view.stage = name

    def _tick(self) -> None:
        for process in self.processes:
            process.check_alive()
        self.view.tick()

    async def _wait(self, what: str, ready: Callable[[], bool], timeout_s: float,
                    every: Callable[[], Awaitable[None]] | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            self._tick()
            if self.service is not None:
                self.service.check()
            if time.monotonic() > deadline:
                raise DemoError(f"{what} not within {timeout_s:.0f}s")
            if every is not None:
                await every()
            await asyncio.sleep(0.2)

    # -- the run -----------------------------------------------------------------------------
    async def main(self) -> int:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        if task is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signal.SIGTERM, task.cancel)
        checks: list[Check] = []
        try:
            with self.view:
                try:
                    await self._run()
                except DemoError as exc:
                    self.failure = str(exc)
                finally:
                    await self._shutdown()
        except asyncio.CancelledError:
            self.failure = self.failure or "interrupted (SIGTERM or Ctrl-C)"
            await self._shutdown()
        checks = self._checks()
        path = self._report(checks)
        passed = self.failure is None and all(check.passed for check in checks)
        self._print_verdict(passed, checks, path)
        if self.failure == "interrupted (SIGTERM or Ctrl-C)":
            return 130
        return 0 if passed else 1

    async def _run(self) -> None:
        say = self.view.say
        say(f"{'quick' if self.scenario.name == 'quick' else 'full'} run, report folder {self.folder}")
        self._stage("stack")
        from banditgate.stack import Stack, StackError

        try:
            addresses = await asyncio.to_thread(Stack.default().up, say)
        except StackError as exc:
            raise DemoError(f"the local stack is not available: {exc}") from None
        # --grafana: the compose Prometheus container must reach the processes from outside loopback
        bind_host = "0.0.0.0" if self.grafana else "127.0.0.1"  # nosec B104: only with --grafana, said when used
        self.plan = plan = make_plan(uuid.uuid4().hex[:8], addresses.kafka, addresses.redis, self.folder, bind_host)
        prefix = plan.topics.requests.rsplit(".", 1)[0]
        say(f"kafka {plan.kafka}, redis {plan.redis}; run {plan.run_id}: topics {prefix}.*, redis prefix {plan.redis_prefix}")

        self._stage("training")
        started = time.monotonic()
        self.dataset, self.versions = await asyncio.to_thread(self._train)
        say(f"trained and exported {len(self.versions)} models in {time.monotonic() - started:.1f}s "
            f"(true accuracy on the held-out pool: "
            + ", ".join(f"{m}:{v} {self._accuracy(m, v):.3f}" for (m, v) in self.versions) + f"); drift thresholds "
            f"stored in each reference.json as `banditgate profile` does ({self.startup.get('threshold_keys', 0):.0f} "
            f"calibrated now, in {self.startup.get('calibration_s', 0):.1f}s; the others from earlier runs' cache)")

        self._stage("starting")
        write_config(plan, self.scenario)
        await create_topics(plan)
        if self.grafana:
            from demo.grafana import grafana_instructions

            for line in grafana_instructions(plan):
                say(line)
        self.processes = list(start_processes(plan))
        serve, feedback = self.processes
        say(f"started banditgate serve (pid {serve.process.pid}) and banditgate feedback "  # type: ignore[union-attr]
            f"(pid {feedback.process.pid}); logs in {plan.logs}")  # type: ignore[union-attr]

        def gateway_up() -> bool:
            feedback.note_ready(feedback_ready(feedback))  # timed from its own start, while we wait here
            return serve.note_ready(gateway_ready(plan))

        await self._wait("banditgate serve ready on /v2/health/ready", gateway_up, START_TIMEOUT_S)
        say(f"gateway ready after {serve.ready_after_s:.1f} s (`banditgate serve` start to /v2/health/ready 200)")
        self.service = ProductService(plan, self.scenario, self.dataset, self.telemetry)
        await self.service.start()
        self.observer = Observer(plan, self.telemetry)
        await self.observer.start()

        self._stage("warm-up")
        say(f"warm-up: {WARMUP_REQUESTS} requests so every model serves a batch; waiting until the gateway's drift "
            "monitors watch every model and the feedback worker is ready")
        await self.service.warm_up(WARMUP_REQUESTS)
        expected = {(spec.model, "1") for spec in SPECS}

        def monitors_ready() -> bool:
            feedback.note_ready(feedback_ready(feedback))
            sample = self.telemetry.latest
            ready = sample is not None and expected <= {(m, v) for (m, v, _f) in sample.drift}
            if ready and "monitors_s" not in self.startup and serve.started_at is not None:
                self.startup["monitors_s"] = time.monotonic() - serve.started_at
            return ready

        last_extra = time.monotonic()

        async def nudge() -> None:  # a model that got no warm-up request yet gets another chance
            nonlocal last_extra
            if time.monotonic() - last_extra > 5 and self.service is not None:
                last_extra = time.monotonic()
                await self.service.warm_up(6)

        try:
            await self._wait("the gateway's drift monitors for every model", monitors_ready, START_TIMEOUT_S, nudge)
        except DemoError:
            say("the gateway exports no drift gauges for some models; going on without waiting for them")
        await self._wait("banditgate feedback ready", lambda: feedback.note_ready(feedback_ready(feedback)),
                         START_TIMEOUT_S)
        monitors = self.startup.get("monitors_s")
        say(f"feedback worker ready after {feedback.ready_after_s:.1f} s (start to its ready line); the gateway's drift "
            f"monitors watched every model {monitors:.1f} s after its start" if monitors is not None else
            f"feedback worker ready after {feedback.ready_after_s:.1f} s (start to its ready line)")
        say(f"set up in {time.monotonic() - self._run_started:.0f}s in all; {self.scenario.total_requests} requests "
            f"at {self.scenario.rate_rps:g}/s follow")

        self._stage("traffic")

        async def release_broken() -> None:
            assert self.dataset is not None  # noqa: S101
            version = self.versions[(self.scenario.degrade_model, 2)]
            target = await asyncio.to_thread(publish, plan.repository, version, self.dataset)
            self.telemetry.note(f"published {version.model} v2 (shuffled labels) to {target}")
            say(f"t={self.telemetry.now_s():.1f}s: broken release {version.model} v2 dropped into the repository "
                f"(true accuracy {self._accuracy(version.model, 2):.3f})")

        async def release_retrained() -> None:
            assert self.dataset is not None  # noqa: S101
            version = self.versions[(RETRAIN_MODEL, 2)]
            target = await asyncio.to_thread(publish, plan.repository, version, self.dataset)
            self.retrain_released_s = self.telemetry.now_s()
            self.telemetry.note(f"published retrained {version.model} v2 (classes swapped) to {target}: its rollout starts")
            say(f"t={self.telemetry.now_s():.1f}s: retrained {version.model} v2 dropped into the repository "
                f"(true accuracy {self._accuracy(version.model, 2):.3f}); it enters as a shadow, and the feedback "
                "worker promotes or rejects it on its own")

        async def announce_shift() -> None:
            self.telemetry.note("covariate shift starts")
            say(f"t={self.telemetry.now_s():.1f}s: covariate shift: {', '.join(self.scenario.drift_features)} "
                f"x{self.scenario.drift_factor:g} from now on")

        events = [(self.scenario.drift_at_s, announce_shift), (self.scenario.degrade_at_s, release_broken)]
        if self.scenario.retrain_at_s is not None:
            events.append((self.scenario.retrain_at_s, release_retrained))
        await self.service.run_scenario(sorted(events, key=lambda event: event[0]), tick=self._tick)

        self._stage("draining")
        say(f"all {self.telemetry.sent} requests sent; waiting for the last predictions and outcomes")
        if not await self.service.drain(DRAIN_TIMEOUT_S, tick=self._tick):
            say("drain timed out: some predictions or outcomes are missing (see the accounting check)")

        def counted() -> bool:
            sample = self.telemetry.latest
            return (sample is not None and sample.outcome_counter == self.telemetry.outcomes_sent
                    and int(sample.ledger_counts.get("joined", -1)) == self.telemetry.outcomes_sent)

        with contextlib.suppress(DemoError):
            await self._wait("the feedback worker counting every outcome", counted, DRAIN_TIMEOUT_S)
        assert self.observer is not None  # noqa: S101
        self.final_sample = await self.observer.final_accounting()
        if self.scenario.retrain_at_s is not None:
            self.rollout = await self._rollout_outcome()

    async def _rollout_outcome(self) -> dict[str, Any] | None:
        """Where the retrained version's rollout ended (the record in Redis), in scenario seconds."""
        import redis.asyncio as aredis

        from router.rollout_store import RolloutStore

        assert self.plan is not None  # noqa: S101
        client = aredis.Redis.from_url(self.plan.redis)
        try:
            record = await RolloutStore(client, prefix=self.plan.redis_prefix).read(ROUTE)
            status = await RolloutStore(client, prefix=self.plan.redis_prefix).status(ROUTE)
        except Exception as exc:  # noqa: BLE001 - reported by the check
            return {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            await client.aclose()
        if record is None:
            return None
        state = record.state
        return {"arm": state.candidate_arm, "version": state.version, "stage": state.stage, "reason": state.reason,
                "started_s": self.telemetry.scenario_time_of(state.started_at),
                "decided_s": self.telemetry.scenario_time_of(state.stage_since), "seq": state.seq,
                "evidence": (status or {}).get("evidence", {})}

    def _train(self) -> tuple[Dataset, dict[tuple[str, int], ModelVersion]]:
        dataset = load_dataset(self.scenario.seed)
        shifted = self.scenario.shifted(dataset.x_pool, dataset.feature_names)
        versions = train_all(dataset, shifted, self.scenario.degrade_model, self.scenario.seed)
        # what `banditgate profile` does: the thresholds the gateway's monitors need, stored in
        # each reference.json, so the gateway simulates nothing when it loads the models
        from banditgate.config import DriftConfig
        from banditgate.stack import cache_dir

        started = time.monotonic()
        self.startup["threshold_keys"] = calibrate_references(versions, dataset, DriftConfig().arl0,
                                                              cache=cache_dir() / "demo-drift-thresholds.json")
        self.startup["calibration_s"] = time.monotonic() - started
        assert self.plan is not None  # noqa: S101
        build_repository(self.plan.repository, versions, dataset)
        return dataset, versions

    def _accuracy(self, model: str, version: int, shifted: bool = False) -> float:
        assert self.dataset is not None  # noqa: S101
        labels = self.versions[(model, version)]
        predicted = labels.pool_labels_shifted if shifted else labels.pool_labels
        return float((predicted == self.dataset.y_pool).mean())

    async def _shutdown(self) -> None:
        """Stop everything this run started, in order; never raises; runs once."""
        if self._shut_down:
            return
        self._shut_down = True
        if self.view.stage not in ("stopping", "report"):
            self._stage("stopping")
        for closer in (self.observer, self.service):
            if closer is not None:
                with contextlib.suppress(Exception):
                    await closer.stop()
        self.observer = None
        self.service = None
        # the gateway first (no new predictions), then the feedback worker
        for process in self.processes:
            if process.exit_code is None:
                await asyncio.to_thread(process.stop)
        if self.plan is not None and self.processes:
            self.cleanup_problems = await delete_run_state(self.plan)
            shutil.rmtree(self.plan.workdir, ignore_errors=True)

    # -- the end -----------------------------------------------------------------------------
    def _oracle(self, after: bool) -> dict[str, OracleLabels]:
        out = {}
        for spec in SPECS:
            if spec.role != "arm":
                continue
            version = 2 if after and spec.model == self.scenario.degrade_model else 1
            labels = self.versions[(spec.model, version)]
            out[spec.model] = OracleLabels(labels.pool_labels, labels.pool_labels_shifted)
        return out

    def _checks(self) -> list[Check]:
        if not self.versions or self.telemetry.t0 is None:
            return []
        gauges_seen = any(sample.drift for sample in self.telemetry.samples)
        return [
            check_bandit(self.telemetry, self.scenario, self._oracle(after=False), self._oracle(after=True)),
            check_drift(self.telemetry, self.scenario, gauges_seen),
            check_accounting(self.telemetry, self.final_sample),
            *([check_lifecycle(self.telemetry, self.rollout, self.retrain_released_s)]
              if self.scenario.retrain_at_s is not None else []),
            check_processes({p.name: p.exit_code for p in self.processes}),
        ]

    def _report(self, checks: list[Check]) -> Path:
        self._stage("report")
        self.timings.pop("report", None)
        self.timings["total"] = time.monotonic() - self._run_started
        facts = RunFacts(scenario=self.scenario, plan=self.plan, telemetry=self.telemetry, checks=checks,
                         versions=self.versions, dataset=self.dataset, timings=self.timings, failure=self.failure,
                         final=self.final_sample, processes=self.processes, cleanup_problems=self.cleanup_problems,
                         grafana=self.grafana, started=self._run_started, startup=dict(self.startup))
        try:
            return write_report(self.folder, facts)
        except Exception as exc:  # noqa: BLE001 - the verdict must still be printed
            self.failure = (self.failure + "; " if self.failure else "") + f"report failed: {type(exc).__name__}: {exc}"
            return self.folder / "summary.md"

    def _print_verdict(self, passed: bool, checks: list[Check], path: Path) -> None:
        for check in checks:
            print(f"demo: {'PASS' if check.passed else 'FAIL'} {check.name}: {check.summary}", flush=True)
        if self.failure:
            print(f"demo: stopped early: {self.failure}", flush=True)
        total = self.timings.get("total", 0.0)
        names = ", ".join(f"{c.name} {'ok' if c.passed else 'FAILED'}" for c in checks) or "no checks ran"
        verdict = "PASS" if passed else "FAIL"
        print(f"demo {verdict} in {total:.0f}s ({names}): report {path}", flush=True)
