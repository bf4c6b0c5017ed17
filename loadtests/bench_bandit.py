"""`banditgate bench bandit`: regret under delayed, batched, multi-replica feedback; adaptation; OPE; speed.

Bernoulli arms with true rates 0.04, 0.05, 0.06, T = 10^6 requests, every scenario vectorised
over its seeds (:mod:`loadtests.bandit_sim`, using the router's own policy math):

(a) immediate - Beta-Bernoulli Thompson sampling, statistics updated every 10 requests, one replica;
(b) delayed   - each reward arrives after an exponential delay (mean 10 000 requests); 4 replicas
                share the store and each refreshes its snapshot every 1 000 requests (staggered
                by 250), deciding as the gateway does (quadrature propensities, sampled shares);
(c) switch    - like (b)'s replicas and refreshes, rewards without delay, exploration_floor 0.02
                and half_life 50 000 outcomes; at T/2 the worst arm's rate becomes 0.07.

(a) and (b) use the same seeds and reward tapes (common random numbers), so their ratio measures
the feedback model, not seed luck. Reports mean pseudo-regret, the Lai-Robbins value
sum gap_i / KL(mu_i, mu*) ln T, the requests after the switch until a 1 000-request window has
>= 90% of traffic on the new best arm (median over seeds), IPW and SNIPS estimates of a
uniform-random policy's value from (c)'s first-half logged propensities, and decisions per second
of RoutePolicy.decide on batches of 256 (one core). Writes JSON, a PNG of traffic shares for (b)
and (c) next to it, and a markdown table.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from banditgate.config import Route
from loadtests.bandit_sim import Result, Scenario, lai_robbins, requests_to_share, simulate
from router.arm_stats import ArmSnapshot, ArmStats, RouteSnapshot
from router.decision import RoutePolicy

RATES = (0.04, 0.05, 0.06)
SWITCHED_RATES = (0.07, 0.05, 0.06)
HORIZON = 1_000_000
REGRET_SEEDS = 128  # (a) and (b): the ratio of their means needs many seeds to be stable
SWITCH_SEEDS = 48
SEED = 20_240_517
BATCH = 256


def _say(message: str) -> None:
    print(f"bench bandit: {message}", file=sys.stderr, flush=True)


def scenarios(quick: bool) -> list[Scenario]:
    """The three scenarios; `quick` shrinks T and seeds (for tests), keeping the structure."""
    horizon = 100_000 if quick else HORIZON
    seeds = 8 if quick else REGRET_SEEDS
    switch_seeds = 8 if quick else SWITCH_SEEDS
    return [
        Scenario("immediate", RATES, horizon, seeds, block=10, draws="posterior", seed=SEED),
        Scenario("delayed", RATES, horizon, seeds, block=250, replicas=4, delay_mean=10_000.0,
                 draws="posterior", seed=SEED),
        Scenario("switch", RATES, horizon, switch_seeds, block=250, replicas=4, half_life=50_000.0,
                 floor=0.02, switch_at=horizon // 2, switch_rates=SWITCHED_RATES, draws="matched",
                 log_until=horizon // 2, seed=SEED + 1),
    ]


def decisions_per_second(draws: str, repeats: int = 5, batches: int = 2000) -> float:
    """Decisions per second of RoutePolicy.decide(256) on a 3-arm Thompson route with a floor (best of repeats)."""
    route = Route(name="bench", policy="thompson", exploration_floor=0.02,
                  arms=[{"name": name, "model": "m", "version": 1} for name in ("a", "b", "c")])
    policy = RoutePolicy.from_route(route, np.random.default_rng(SEED), draws=draws)
    steady = {"a": (1_500.0, 0.04), "b": (1_500.0, 0.05), "c": (69_000.0, 0.06)}
    policy.apply_snapshot(RouteSnapshot("bench", {name: ArmSnapshot(ArmStats(weight, mean, weight * mean * (1 - mean)))
                                                  for name, (weight, mean) in steady.items()}))
    best = np.inf
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(batches):
            policy.decide(BATCH)
        best = min(best, time.perf_counter() - started)
    return BATCH * batches / best


def _standard_error(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / np.sqrt(len(values)))


def summarise(results: dict[str, Result], speed: float, speed_posterior: float) -> dict[str, Any]:
    immediate, delayed, switch = results["immediate"], results["delayed"], results["switch"]
    bound = lai_robbins(RATES, immediate.scenario.horizon)
    regret_immediate = float(immediate.regret.mean())
    regret_delayed = float(delayed.regret.mean())
    per_seed_ratio = delayed.regret / np.maximum(immediate.regret, 1e-9)
    switch_requests = requests_to_share(switch, arm=0, share=0.9)
    ipw = switch.ipw_terms.sum(axis=0)
    return {
        "regret_immediate": regret_immediate,
        "regret_delayed": regret_delayed,
        "lai_robbins": bound,
        "ratio_delayed_vs_immediate": regret_delayed / regret_immediate,
        "ratio_delayed_vs_bound": regret_delayed / bound,
        "switch_requests_to_90pct": float(np.median(switch_requests)),
        "ipw_estimate": float(ipw[0] / ipw[2]),
        "snips_estimate": float(ipw[0] / ipw[1]),
        "true_value": float(np.mean(RATES)),
        "decisions_per_s": speed,
        # context for reading the numbers above
        "ratio_immediate_vs_bound": regret_immediate / bound,
        "regret_immediate_standard_error": _standard_error(immediate.regret),
        "regret_delayed_standard_error": _standard_error(delayed.regret),
        "median_per_seed_ratio": float(np.median(per_seed_ratio)),
        "switch_requests_quartiles": [float(q) for q in np.percentile(switch_requests, [25, 75])],
        "switch_never_reached_seeds": int(np.sum(switch_requests >= switch.scenario.horizon - switch.scenario.switch_at)),
        "decisions_per_s_posterior_draws": speed_posterior,
        "horizon": immediate.scenario.horizon,
        "seeds": {name: result.scenario.seeds for name, result in results.items()},
        "seconds": {name: round(result.seconds, 1) for name, result in results.items()},
    }


def plot(results: dict[str, Result], path: Path) -> None:
    """Mean traffic share per arm over time (1 000-request windows) for (b) and (c)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for axis, name, title in ((axes[0], "delayed", "(b) delayed rewards, 4 replicas, refresh every 1 000"),
                              (axes[1], "switch", "(c) switch at T/2, half_life 50 000, floor 0.02")):
        result = results[name]
        counts = result.window_counts.astype(np.float64)
        share = (counts / counts.sum(axis=2, keepdims=True)).mean(axis=1)
        x = (np.arange(len(share)) + 1) * result.scenario.window
        for arm in range(share.shape[1]):
            rates = f"{RATES[arm]:.2f}" + (f" -> {SWITCHED_RATES[arm]:.2f}" if name == "switch" and
                                           SWITCHED_RATES[arm] != RATES[arm] else "")
            axis.plot(x, share[:, arm], label=f"arm {arm} (rate {rates})", linewidth=1)
        if result.scenario.switch_at is not None:
            axis.axvline(result.scenario.switch_at, color="grey", linestyle="--", linewidth=0.8)
        axis.set_title(title)
        axis.set_ylabel(f"traffic share (mean of {result.scenario.seeds} seeds)")
        axis.set_ylim(0, 1)
        axis.legend(loc="center right")
    axes[1].set_xlabel("requests")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _table(summary: dict[str, Any]) -> str:
    rows = [
        ("regret (a) immediate", f"{summary['regret_immediate']:.1f} +- {summary['regret_immediate_standard_error']:.1f}", ""),
        ("regret (b) delayed", f"{summary['regret_delayed']:.1f} +- {summary['regret_delayed_standard_error']:.1f}", ""),
        ("Lai-Robbins sum gap/KL ln T", f"{summary['lai_robbins']:.1f}", ""),
        ("delayed / immediate", f"{summary['ratio_delayed_vs_immediate']:.3f}", "<= 1.25"),
        ("delayed / Lai-Robbins", f"{summary['ratio_delayed_vs_bound']:.3f}", "<= 0.6"),
        ("(c) requests to 90% on new best (median)", f"{summary['switch_requests_to_90pct']:.0f}", "<= 50 000"),
        ("IPW value of uniform policy", f"{summary['ipw_estimate']:.4f}", f"{summary['true_value']:.4f} +- 5%"),
        ("SNIPS value of uniform policy", f"{summary['snips_estimate']:.4f}", f"{summary['true_value']:.4f} +- 5%"),
        ("decisions/s, batches of 256 (matched)", f"{summary['decisions_per_s']:.3g}", ">= 2e6"),
        ("decisions/s, posterior draws", f"{summary['decisions_per_s_posterior_draws']:.3g}", ""),
    ]
    lines = ["| metric | value | target |", "| --- | --- | --- |"]
    lines += [f"| {name} | {value} | {target} |" for name, value, target in rows]
    return "\n".join(lines)


def run(out: Path, quick: bool = False) -> int:
    """Run the benchmark, write JSON to `out` and a PNG beside it, print a markdown table; returns 0."""
    started = time.perf_counter()
    results: dict[str, Result] = {}
    for scenario in scenarios(quick):
        _say(f"{scenario.name}: T={scenario.horizon:,} x {scenario.seeds} seeds, block {scenario.block}, "
             f"{scenario.replicas} replica(s)")
        scenario_started = time.perf_counter()

        def progress(fraction: float, name: str = scenario.name, since: float = scenario_started) -> None:
            if round(fraction * 20) % 4 == 0:
                _say(f"{name}: {fraction:4.0%} ({time.perf_counter() - since:.0f} s)")

        results[scenario.name] = simulate(scenario, progress=progress)
    _say("timing RoutePolicy.decide on batches of 256")
    speed = decisions_per_second("matched")
    speed_posterior = decisions_per_second("posterior", repeats=3, batches=500)
    summary = summarise(results, speed, speed_posterior)
    summary["total_seconds"] = round(time.perf_counter() - started, 1)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    picture = out.with_suffix(".png")
    plot(results, picture)
    _say(f"wrote {out} and {picture} in {summary['total_seconds']:.0f} s")
    print(_table(summary))
    return 0
