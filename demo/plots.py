"""The report's figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend is chosen first

from demo.scenario import Scenario  # noqa: E402
from demo.telemetry import Telemetry  # noqa: E402

SCORE = "score"
SCORE_NAMES = ("score", "__score__")  # the score monitor's name in the gauges
OTHERS = "largest other feature"
COLORS = {"gbm": "#1f77b4", "stump": "#ff7f0e", "nb": "#2ca02c", "forest": "#9467bd"}
SMOOTH_S = 3


def _markers(ax: plt.Axes, scenario: Scenario, telemetry: Telemetry | None = None) -> None:
    ax.axvline(scenario.drift_at_s, color="0.3", linestyle="--", linewidth=1)
    ax.axvline(scenario.degrade_at_s, color="#d62728", linestyle="--", linewidth=1)
    top = ax.get_ylim()[1]
    ax.text(scenario.drift_at_s, top, " covariate shift", va="top", fontsize=8, color="0.3")
    ax.text(scenario.degrade_at_s, top, f" {scenario.degrade_model} v2 released", va="top", fontsize=8,
            color="#d62728")


def traffic_share(path: Path, telemetry: Telemetry, scenario: Scenario) -> Path:
    """Share of requests per arm, per second (smoothed over SMOOTH_S s), stacked; the gateway's
    own policy shares as lines."""
    seconds = list(range(0, math.ceil(scenario.end_s)))
    raw = {arm: [telemetry.served_per_s.get(s, {}).get(arm, 0) for s in seconds] for arm in telemetry.arms}
    shares = {arm: [] for arm in telemetry.arms}
    for index in range(len(seconds)):
        window = slice(max(0, index - SMOOTH_S + 1), index + 1)
        total = sum(sum(raw[arm][window]) for arm in telemetry.arms)
        for arm in telemetry.arms:
            shares[arm].append(sum(raw[arm][window]) / total if total else 0.0)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.stackplot(seconds, *[shares[arm] for arm in telemetry.arms], labels=telemetry.arms,
                 colors=[COLORS.get(arm, None) for arm in telemetry.arms], alpha=0.8)
    policy = defaultdict(list)
    for sample in telemetry.samples:
        if sample.t_s >= 0:
            for arm, share in sample.policy_shares.items():
                policy[arm].append((sample.t_s, share))
    for arm, points in policy.items():
        if points:
            ax.plot(*zip(*points), color=COLORS.get(arm, "k"), linewidth=0.8, linestyle=":",
                    label=f"{arm} (gateway policy)")
    ax.set_xlim(0, scenario.end_s)
    ax.set_ylim(0, 1)
    ax.set_xlabel("scenario time (s)")
    ax.set_ylabel("share of requests")
    ax.set_title(f"Traffic share per arm ({SMOOTH_S}s windows; dotted: the policy's own share)")
    _markers(ax, scenario)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cumulative_reward(path: Path, telemetry: Telemetry, scenario: Scenario) -> Path:
    """Top: cumulative reward per arm by request time. Bottom: posterior mean and 95% interval
    per arm, as the feedback worker's statistics in Redis give them."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    per_arm: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for sent_s, arm, reward in sorted(telemetry.outcome_log):
        per_arm[arm].append((sent_s, reward))
    for arm in telemetry.arms:
        points = per_arm.get(arm, [])
        times, total, values = [], 0.0, []
        for sent_s, reward in points:
            total += reward
            times.append(sent_s)
            values.append(total)
        top.step(times, values, where="post", color=COLORS.get(arm), label=f"{arm} ({int(total)} of {len(points)})")
    top.set_ylabel("cumulative reward")
    top.set_title("Cumulative reward per arm (correct diagnoses, by request time)")
    top.legend(loc="upper left", fontsize=8)
    _markers(top, scenario)
    for arm in telemetry.arms:
        rows = [(s.t_s, s.posteriors[arm]) for s in telemetry.samples if arm in s.posteriors and s.t_s >= 0]
        if not rows:
            continue
        times = [t for t, _ in rows]
        bottom.plot(times, [p.posterior_mean for _, p in rows], color=COLORS.get(arm), label=arm)
        bottom.fill_between(times, [p.low for _, p in rows], [p.high for _, p in rows], color=COLORS.get(arm),
                            alpha=0.2)
    bottom.set_ylim(0, 1)
    bottom.set_xlim(0, scenario.end_s)
    bottom.set_xlabel("scenario time (s)")
    bottom.set_ylabel("posterior mean reward")
    bottom.set_title(f"Posterior per arm, 95% interval (discounted, half-life {scenario.half_life:g} outcomes)")
    bottom.legend(loc="lower left", fontsize=8)
    _markers(bottom, scenario)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def drift(path: Path, telemetry: Telemetry, scenario: Scenario) -> Path | None:
    """Per model version: the shifted features' drift statistic and threshold, the largest other
    feature, the change point and the alarms. None when the gateway exported no drift gauges."""
    series: dict[tuple[str, str], dict[str, list[tuple[float, float, float]]]] = defaultdict(lambda: defaultdict(list))
    named = (*scenario.drift_features, SCORE)
    for sample in telemetry.samples:
        others: dict[tuple[str, str], tuple[float, float, float]] = {}
        for (model, version, feature), (statistic, threshold) in sample.drift.items():
            key = (model, version)
            feature = SCORE if feature in SCORE_NAMES else feature
            if feature in named:
                series[key][feature].append((sample.t_s, statistic, threshold))
            else:
                level = statistic / threshold if threshold else 0.0
                if key not in others or level > others[key][1] / others[key][2]:
                    others[key] = (sample.t_s, statistic, threshold)
        for key, point in others.items():
            series[key][OTHERS].append(point)
    if not series:
        return None
    for lines in series.values():  # a replaced version's gauges stay put: stop where it stopped moving
        moving = [max((i for i in range(1, len(points)) if points[i][1] != points[i - 1][1]), default=0)
                  for points in lines.values()]
        end = max(moving, default=0) + 1
        for feature in lines:
            lines[feature] = lines[feature][:end + 1]
    keys = sorted(series)
    fig, axes = plt.subplots(len(keys), 1, figsize=(10, 2.6 * len(keys)), sharex=True, squeeze=False)
    palette = {name: color for name, color in zip(named, ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"])}
    palette[SCORE], palette[OTHERS] = "#8c564b", "#7f7f7f"
    for ax, key in zip(axes[:, 0], keys):
        order = [name for name in (*named, OTHERS) if name in series[key]]
        drawn_thresholds: set[float] = set()
        for feature in order:
            points = series[key][feature]
            color = palette.get(feature, "k")
            times = [t for t, _, _ in points]
            ax.plot(times, [s for _, s, _ in points], color=color, label=feature,
                    linewidth=0.9 if feature == OTHERS else 1.4)
            threshold = points[-1][2] if points else None
            if feature != OTHERS and threshold is not None and round(threshold, 1) not in drawn_thresholds:
                drawn_thresholds.add(round(threshold, 1))
                ax.plot(times, [h for _, _, h in points], color=color, linestyle="--", linewidth=0.8,
                        label=f"{'score' if feature == SCORE else 'feature'} threshold")
        alarms = [a for a in telemetry.drift_alerts
                  if ((a.get("details") or {}).get("model"), str(a.get("model_version"))) == key]
        if alarms:
            ax.scatter([a["t_s"] for a in alarms], [float(a.get("value", 0)) for a in alarms], marker="x",
                       color="#d62728", zorder=5, label=f"alarms ({len(alarms)})")
        ax.set_title(f"{key[0]} v{key[1]}: drift statistic vs threshold", fontsize=10)
        ax.set_ylabel("CUSUM statistic")
        ax.set_xlim(min(0.0, min(t for pts in series[key].values() for t, _, _ in pts)), scenario.end_s)
        _markers(ax, scenario)
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    axes[-1, 0].set_xlabel("scenario time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
