"""The report folder: `summary.md`, PNG plots, `counts.json` (raw event counts), `alerts.jsonl`,
plus what the run used (`banditgate.yaml`, `models/`, `logs/`)."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from demo.checks import Check
from demo.deployment import Plan, Process
from demo.models import BROKEN_DESCRIPTION, ROUTE, Dataset, ModelVersion
from demo.scenario import Scenario
from demo.telemetry import STAGES, Sample, Telemetry, percentile


@dataclass
class RunFacts:
    """Everything the report is written from."""

    scenario: Scenario
    plan: Plan | None
    telemetry: Telemetry
    checks: list[Check]
    versions: dict[tuple[str, int], ModelVersion]
    dataset: Dataset | None
    timings: dict[str, float]
    failure: str | None
    final: Sample | None
    processes: list[Process] = field(default_factory=list)
    cleanup_problems: list[str] = field(default_factory=list)
    grafana: bool = False
    started: float | None = None
    """time.monotonic() at the start of the run: `timings` gets `report` and `total` when written."""
    startup: dict[str, float] = field(default_factory=dict)
    """calibration_s, threshold_keys (at profile time) and monitors_s (serve start to the drift
    monitors watching every model), as demo/run.py measured them."""


def counts(facts: RunFacts) -> dict[str, Any]:
    """The raw event counts of the run (what `counts.json` holds)."""
    tel = facts.telemetry
    warmup = sum(1 for r in tel.requests.values() if r.warmup)
    final = facts.final
    return {
        "requests_sent": tel.sent, "requests_sent_warmup": warmup, "requests_sent_scenario": tel.sent - warmup,
        "requests_shifted": sum(1 for r in tel.requests.values() if r.shifted),
        "predictions_unique": len(tel.predictions), "predictions_duplicate": tel.prediction_duplicates,
        "predictions_unknown_request": tel.unknown_predictions,
        "predictions_by_arm": dict(Counter(p.arm for p in tel.predictions.values())),
        "predictions_by_model_version": dict(Counter(f"{p.model}:{p.version}" for p in tel.predictions.values())),
        "shadow_predictions_unique": len(tel.shadow_predictions), "shadow_predictions_duplicate": tel.shadow_duplicates,
        "outcomes_scheduled": tel.outcomes_scheduled, "outcomes_sent": tel.outcomes_sent,
        "outcomes_by_arm": dict(tel.outcomes_by_arm), "rewards_by_arm": dict(tel.rewards_by_arm),
        "deadletters": tel.deadletters, "deadletter_reasons": dict(tel.deadletter_reasons),
        "alerts": len(tel.alerts), "alerts_by_kind": dict(Counter(str(a.get("kind")) for a in tel.alerts)),
        "alerts_by_state": dict(Counter(f"{a.get('kind')}:{a.get('state', 'firing')}" for a in tel.alerts)),
        "drift_episodes": sum(1 for e in tel.episodes() if e.kind == "drift"),
        "quality_episodes": sum(1 for e in tel.episodes() if e.kind == "quality"),
        "gateway_ready_s": _ready(facts, "serve"), "feedback_ready_s": _ready(facts, "feedback"),
        "drift_monitors_ready_s": facts.startup.get("monitors_s"),
        "redis_arm_statistics_outcome_counter": final.outcome_counter if final else None,
        "feedback_ledger_counts": final.ledger_counts if final else {},
    }


def _ready(facts: RunFacts, name: str) -> float | None:
    process = next((p for p in facts.processes if p.name == name), None)
    return None if process is None or process.ready_after_s is None else round(process.ready_after_s, 2)


def startup_lines(facts: RunFacts) -> list[str]:
    """How fast the processes were ready (the lines a reader, and a judge, looks for)."""
    gateway, feedback = _ready(facts, "serve"), _ready(facts, "feedback")
    monitors = facts.startup.get("monitors_s")
    lines = ["## Start-up", ""]
    lines.append(f"- gateway ready after {gateway:.1f} s: from `banditgate serve` starting to `/v2/health/ready` "
                 "answering 200 (polled every 0.2 s)" if gateway is not None else "- the gateway never answered ready")
    lines.append(f"- feedback worker ready after {feedback:.1f} s: from `banditgate feedback` starting to its "
                 "`feedback worker ready` line" if feedback is not None else "- the feedback worker never said ready")
    if monitors is not None:
        lines.append(f"- the gateway's drift monitors watched every model {monitors:.1f} s after its start (readiness "
                     "does not wait for them)")
    if "calibration_s" in facts.startup:
        lines.append(f"- the drift thresholds were calibrated when the reference profiles were built, as `banditgate "
                     f"profile` does ({facts.startup.get('threshold_keys', 0):.0f} calibrated in "
                     f"{facts.startup['calibration_s']:.1f} s of the training stage; keys calibrated by an earlier run "
                     "come from the demo's cache) and stored in each `reference.json`, so the gateway simulated "
                     "nothing at start")
    return lines + [""]


def latency_lines(facts: RunFacts) -> list[str]:
    """Where the end-to-end time goes: measured per request at the gateway's receipt and its
    prediction; inside the gateway, its per-batch histograms over the scenario."""
    tel = facts.telemetry
    names = {"kafka_in": "service send -> gateway receipt (producer linger, broker, gateway fetch)",
             "gateway": "gateway: receipt -> prediction built",
             "kafka_out": "prediction built -> service reads it (gateway producer, broker, service fetch)"}
    rows = [[names[stage], _fmt(percentile(tel.stage_ms[stage], 50), 1), _fmt(percentile(tel.stage_ms[stage], 99), 1),
             _fmt(float(np.mean(tel.stage_ms[stage])) if tel.stage_ms[stage] else None, 1)] for stage in STAGES]
    rows.append(["end to end (the service's own clock)", _fmt(percentile(tel.e2e_ms, 50), 1),
                 _fmt(percentile(tel.e2e_ms, 99), 1), _fmt(float(np.mean(tel.e2e_ms)) if tel.e2e_ms else None, 1)])
    first = next((s for s in tel.samples if s.t_s >= 0 and s.batches), None)
    last = facts.final or tel.latest
    inside: list[list[str]] = []
    if first is not None and last is not None and last.batches:
        def mean(name: str) -> float | None:
            total, count = last.batches.get(name, (0.0, 0.0))
            total0, count0 = first.batches.get(name, (0.0, 0.0))
            return (total - total0) / (count - count0) if count > count0 else None

        queue, inference, rows_per_batch = (mean("banditgate_queue_seconds"), mean("banditgate_inference_seconds"),
                                            mean("banditgate_batch_size_rows"))
        gateway_mean = float(np.mean(tel.stage_ms["gateway"])) if tel.stage_ms["gateway"] else None
        inside = [
            ["queue wait of a batch's oldest row (includes the batching delay, at most "
             f"{_batching_delay_ms(facts)} ms)", "-", "-", _fmt(queue * 1000 if queue is not None else None, 2)],
            ["ONNX Runtime per batch", "-", "-", _fmt(inference * 1000 if inference is not None else None, 2)],
        ]
        if gateway_mean is not None and queue is not None and inference is not None:
            inside.append(["rest of the gateway (decode, route, encode; by difference)", "-", "-",
                           _fmt(max(0.0, gateway_mean - 1000 * (queue + inference)), 2)])
        inside.append(["rows per batch", "-", "-", _fmt(rows_per_batch, 1)])
    out = ["### Where the end-to-end time goes", ""]
    out += _table(["stage", "p50 ms", "p99 ms", "mean ms"], rows + inside)
    out += ["Measured on every scenario request: the request's `ts` (the service's clock just before its producer got "
            "it), the prediction's `ts_predicted` and `latency_ms` (the gateway's receipt to the prediction built) and "
            "the service's clock when it read the prediction; one machine, one clock. Inside the gateway, the "
            "per-batch histograms `banditgate_queue_seconds` and `banditgate_inference_seconds` over the scenario "
            "(means per batch; a batch's queue wait is its oldest row's).", ""]
    return out


def _batching_delay_ms(facts: RunFacts) -> str:
    try:
        import yaml

        document = yaml.safe_load(facts.plan.config_path.read_text()) if facts.plan else {}
        return f"{float(document['batching']['max_delay_us']) / 1000:g}"
    except (OSError, KeyError, TypeError, ValueError):
        return "?"


def episode_lines(facts: RunFacts) -> list[str]:
    """The drift and quality alarm episodes: one `firing` alert each, a `resolved` one after the quiet period."""
    tel = facts.telemetry
    episodes = tel.episodes()
    final = facts.final or tel.latest
    crossings = final.drift_alarms if final is not None else {}
    quiet = facts.scenario.episode_quiet_s
    out = ["## Drift", ""]
    if not episodes:
        return out + ["No drift alarm was published on the alerts topic.", ""]
    counted: Counter[tuple[str, str, str]] = Counter()
    for episode in episodes:
        if episode.alarms is not None and episode.kind == "drift":
            counted[_monitor_key(episode)] += episode.alarms
    rows = []
    for episode in episodes:
        alarms = str(episode.alarms) if episode.alarms is not None else "-"
        if episode.alarms is None and episode.kind == "drift":
            total = crossings.get(_monitor_key(episode))
            if total is not None:
                alarms = f"{int(total - counted[_monitor_key(episode)])} so far"
        rows.append([episode.kind, f"{episode.model} v{episode.version}", str(episode.arm),
                     str(episode.feature) if episode.feature is not None else "(whole model)", str(episode.metric),
                     f"{episode.opened_s:.1f}", f"{episode.resolved_s:.1f}" if episode.resolved_s is not None else
                     "open at the end", alarms])
    firing = len(episodes)  # every episode row is one `firing` alert
    resolved = sum(1 for e in episodes if e.resolved_s is not None)
    out += [f"{len(episodes)} alarm episode(s): {firing} `firing` alert(s) and {resolved} `resolved`. An alarm opens an "
            f"episode (one alert, shared across gateway replicas through Redis); the CUSUM then restarts and, while "
            f"the drift persists, crosses its threshold again and again: those alarms are counted (`alarms`, from "
            f"the resolved alert or the gateway's `banditgate_drift_alarms_total`) but not alerted; {quiet:g} s "
            f"without an alarm (`drift.episode_quiet_s`, shortened for the demo) close it with a `resolved` alert.", ""]
    out += _table(["kind", "model", "arm", "feature", "metric", "opened t (s)", "resolved t (s)", "alarms inside"], rows)
    twice = [e for e in episodes if e.firing_alerts > 1]
    if twice:
        out += [f"{len(twice)} key(s) opened more than one episode in this run (a drift that went quiet for "
                f"{quiet:g} s and came back, or a replica that lost its claim).", ""]
    return out


def _monitor_key(episode: Any) -> tuple[str, str, str]:
    return (str(episode.model), str(episode.version), str(episode.feature) if episode.feature is not None else "score")


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _accuracy(facts: RunFacts, version: ModelVersion, shifted: bool) -> float | None:
    if facts.dataset is None:
        return None
    labels = version.pool_labels_shifted if shifted else version.pool_labels
    return float((labels == facts.dataset.y_pool).mean())


def summary(facts: RunFacts, figures: dict[str, Path | None]) -> str:
    """The markdown summary."""
    s, tel, plan = facts.scenario, facts.telemetry, facts.plan
    passed = facts.failure is None and bool(facts.checks) and all(c.passed for c in facts.checks)
    out = [f"# banditgate demo ({s.name}): {'PASS' if passed else 'FAIL'}", ""]
    out += [f"Run {plan.run_id if plan else '-'} on {time.strftime('%Y-%m-%d %H:%M:%S')}, "
            f"{facts.timings.get('total', 0):.0f} s in all. Kafka {plan.kafka if plan else '-'}, "
            f"Redis {plan.redis if plan else '-'}.", ""]
    if facts.failure:
        out += [f"**Stopped early:** {facts.failure}", ""]
    out += startup_lines(facts)
    out += ["## Checks", ""]
    out += _table(["check", "result", "what happened"],
                  [[c.name, "pass" if c.passed else "**FAIL**", c.summary] for c in facts.checks]
                  or [["-", "**FAIL**", "no checks ran"]])
    out += ["## What ran", ""]
    out += [f"A simulated diagnosis service sent {tel.sent} requests ({s.rate_rps:g}/s for {s.end_s:g} s, after "
            f"{sum(1 for r in tel.requests.values() if r.warmup)} warm-up requests) to Kafka, each a held-out row of the "
            "Wisconsin breast-cancer data (scikit-learn's copy; label 1 = malignant). `banditgate serve` routed each "
            f"to one of three arms with Thompson sampling (route `{ROUTE}`, exploration floor {s.exploration_floor:g}) "
            "and mirrored it to a shadow. For every prediction the service sent an outcome after an exponential delay "
            f"(mean {s.outcome_delay_mean_s:g} s): reward 1 when the served arm's label was right, and the true label. "
            "`banditgate feedback` joined outcomes to predictions and updated the arm statistics in Redis, which the "
            "gateway reads back every 200 ms.", ""]
    out += _table(["phase", "scenario time", "what changes"], [
        ["baseline", f"0-{s.drift_at_s:g} s", "held-out rows as they are"],
        ["shift", f"{s.drift_at_s:g}-{s.degrade_at_s:g} s",
         f"covariate drift: {', '.join(s.drift_features)} multiplied by {s.drift_factor:g} (to the end)"],
        ["broken", f"{s.degrade_at_s:g}-{s.end_s:g} s",
         f"`{s.degrade_model}` v2 dropped into the repository (hot swap, arm version `latest`): {BROKEN_DESCRIPTION}"],
    ])
    out += [f"The route discounts its statistics with `half_life: {s.half_life:g}` outcomes: an outcome "
            f"{s.half_life:g} outcomes old weighs half as much as the newest. Without it the broken arm's long good "
            "record would keep it on top for thousands of requests; with it the bandit notices within a few hundred "
            "outcomes. The price: the posteriors never get narrower than about that many outcomes allow.", ""]
    out += ["## Models", ""]
    rows = []
    for (model, version), mv in sorted(facts.versions.items()):
        rows.append([f"`{model}` v{version}", mv.role if version == 1 else "arm (broken release)", mv.description,
                     _fmt(_accuracy(facts, mv, False)), _fmt(_accuracy(facts, mv, True))])
    out += _table(["model", "role", "what", "true accuracy (pool)", "after the shift"], rows)
    out += ["True accuracies come from ONNX Runtime on the exported files over the whole held-out pool; the drift "
            "reference profile of each version (`models/<model>/<version>/reference.json`) was built on the same "
            "pool and the version's scores on it (see `demo/models.py` for why not on the training rows).", ""]
    out += ["## Arms", ""]
    rows = []
    last = tel.latest
    for arm in tel.arms:
        row = [f"`{arm}`"]
        for phase in ("baseline", "shift", "broken"):
            row.append(f"{tel.shares_between(*s.phase_bounds(phase)).get(arm, 0.0):.0%}")
        posterior = last.posteriors.get(arm) if last else None
        latencies = [p.latency_ms for request_id, p in tel.predictions.items()
                     if p.arm == arm and not tel.requests[request_id].warmup]
        row += [str(tel.outcomes_by_arm[arm]), _fmt(tel.reward_rate(arm)),
                f"{posterior.posterior_mean:.3f} [{posterior.low:.3f}, {posterior.high:.3f}]" if posterior else "-",
                _fmt(percentile(latencies, 50), 1), _fmt(percentile(latencies, 99), 1)]
        rows.append(row)
    out += _table(["arm", "share baseline", "share shift", "share broken", "outcomes", "reward rate",
                   "posterior at the end [95%]", "p50 ms", "p99 ms"], rows)
    out += [f"Latencies are the gateway's own (`latency_ms`: received to prediction built). End to end, from the "
            f"service's send to its reading the prediction: p50 {_fmt(percentile(tel.e2e_ms, 50), 1)} ms, p99 "
            f"{_fmt(percentile(tel.e2e_ms, 99), 1)} ms. The warm-up requests, sent before the clock started while "
            f"the gateway built its drift monitors, waited up to {_fmt(max(tel.warmup_e2e_ms, default=None), 0)} ms "
            "and are left out of these numbers.", ""]
    out += latency_lines(facts)
    out += ["## Shadow", ""]
    for shadow in tel.shadows:
        ledger = {}
        if facts.final:
            for (role, arm, model, version), values in facts.final.quality.items():
                if role == "shadow" and arm == shadow:
                    ledger = values
        pooled = facts.final.quality.get(("primary", "*", "*", "*"), {}) if facts.final else {}
        local = tel.local_shadow_quality(shadow)
        out += _table(["", "agreement with primary", "F1 shadow", "F1 primary", "labelled"], [
            ["feedback worker (ledger in Redis)", _fmt(ledger.get("agreement")), _fmt(ledger.get("f1")),
             _fmt(pooled.get("f1")), str(int(ledger.get("labelled", 0)))],
            ["recomputed here from the events", _fmt(local.get("agreement")), _fmt(local.get("shadow_f1")),
             _fmt(local.get("primary_f1")), str(int(local.get("pairs", 0)))],
        ])
    decisions = [a for a in tel.alerts if a.get("kind") in ("promote", "reject")]
    out += [f"Promote/reject alerts from the feedback worker: {len(decisions)}"
            + ("".join(f"; {a['kind']} {a.get('arm')} v{a.get('model_version')} (advantage {float(a.get('value', 0)):.4f})"
                       for a in decisions)) + ".", ""]
    out += episode_lines(facts)
    out += ["## Events", "", "```json", json.dumps(counts(facts), indent=1, default=str), "```", ""]
    out += ["## Files", ""]
    for name, path in figures.items():
        out += [f"- {name}: " + (f"![{name}]({path.name})" if path else "(no data)")]
    out += ["- raw event counts: `counts.json`; every alert: `alerts.jsonl`",
            "- configuration: `banditgate.yaml`; model repository: `models/`; process logs: `logs/serve.log`, "
            "`logs/feedback.log`", ""]
    stages = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in facts.timings.items())
    out += ["## Timings", "", stages, ""]
    exits = ", ".join(f"{p.name} exit {p.exit_code} after {p.stop_seconds or 0:.1f}s{' (killed)' if p.killed else ''}"
                      for p in facts.processes)
    out += [f"Processes: {exits or 'none started'}."]
    if facts.cleanup_problems:
        out += ["", "Cleanup left something behind: " + "; ".join(facts.cleanup_problems)]
    return "\n".join(out) + "\n"


def write_report(folder: Path, facts: RunFacts) -> Path:
    """Write the report into `folder`; return the summary's path."""
    from demo import plots

    began = time.monotonic()
    folder.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Path | None] = {}
    if facts.telemetry.t0 is not None:
        figures["traffic share over time"] = plots.traffic_share(folder / "traffic_share.png", facts.telemetry,
                                                                 facts.scenario)
        figures["cumulative reward and posteriors"] = plots.cumulative_reward(folder / "cumulative_reward.png",
                                                                              facts.telemetry, facts.scenario)
        figures["drift statistic, threshold and change point"] = plots.drift(folder / "drift.png", facts.telemetry,
                                                                             facts.scenario)
    (folder / "counts.json").write_text(json.dumps(counts(facts), indent=1, default=_json_default) + "\n")
    with (folder / "alerts.jsonl").open("w") as stream:
        for alert in facts.telemetry.alerts:
            stream.write(json.dumps(alert, default=_json_default) + "\n")
    now = time.monotonic()
    facts.timings.pop("total", None)
    facts.timings["report"] = now - began
    if facts.started is not None:
        facts.timings["total"] = now - facts.started
    path = folder / "summary.md"
    path.write_text(summary(facts, figures))
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
