"""`banditgate bench interleave`: how many impressions team-draft interleaving needs, against A/B.

World, rankers and click model: `loadtests.interleave_sim`; experiments: `loadtests.interleave_experiments`.
Two rankers with NDCG@10 0.86 and 0.84; every seed runs until the always-valid preference test
(`router.preference`, 95%) first names a ranker: with team-draft interleaving (one win/loss/tie
per impression from credited clicks) and with an A/B test (users alternate arms; a pair of
impressions is a win/loss/tie by click-through; the same test). Four rankers (0.86, 0.84, 0.82,
0.80) with multileaving measure the impressions until all six pairs are decided (Bonferroni).
Also: merges per second (k = 10, 2 rankers, 30 candidates, 100 000 requests per call, one core),
and a fixed-sample cross-check over several click models. Writes JSON, a PNG beside it (same
stem), a markdown table on stdout; progress on stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from loadtests.interleave_experiments import (Z_95, SequentialResult, ab_rates, fixed_sample_impressions,
                                              interleaving_rates, pair_probabilities, run_ab, run_interleaving)
from loadtests.interleave_sim import (INFORMATIONAL, LIST_LENGTH, N_CANDIDATES, NAVIGATIONAL, PERFECT,
                                      CascadeClickModel, calibrate_noise_scale, draw_grades, rank)
from router.interleave import rankings_from_scores, team_draft
from router.preference import PreferenceTest

TARGET_NDCG = (0.86, 0.84, 0.82, 0.80)
SEED = 20240611


def _finite_or_none(value: object) -> object:
    """JSON has no infinity: a censored or unreachable count becomes null."""
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


_STARTED = time.perf_counter()


def progress(message: str) -> None:
    print(f"bench interleave [{time.perf_counter() - _STARTED:5.0f} s]: {message}", file=sys.stderr, flush=True)


def _settings(quick: bool) -> dict[str, int]:
    if quick:
        return {"seeds": 24, "seeds_multileave": 16, "cap_interleave": 100_000, "cap_multileave": 300_000,
                "cap_ab": 20_000_000, "ab_queries": 100_000, "check_impressions": 20_000, "merge_requests": 20_000}
    return {"seeds": 400, "seeds_multileave": 200, "cap_interleave": 200_000, "cap_multileave": 1_000_000,
            "cap_ab": 50_000_000, "ab_queries": 1_000_000, "check_impressions": 300_000, "merge_requests": 100_000}


def merges_per_second(n_requests: int, noise_scales: np.ndarray, rng: np.random.Generator,
                      repeats: int = 3) -> dict[str, float]:
    """Team-draft merges per second of n_requests on full 30-candidate rankings, one thread.

    Best of `repeats`, for calls of several batch sizes; "merges_per_s" is one call with all
    n_requests. "rank_and_merge_per_s" adds turning the arms' scores into rankings.
    """
    grades = draw_grades(n_requests, rng)
    scores = grades[:, None, :] + noise_scales[None, :, None] * rng.standard_normal((n_requests, 2, N_CANDIDATES))
    rankings = rankings_from_scores(scores)
    speeds: dict[str, float] = {}
    for batch in (100, 1_000, n_requests):
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            for start in range(0, n_requests, batch):
                team_draft(rankings[start:start + batch], LIST_LENGTH, rng)
            best = min(best, time.perf_counter() - started)
        speeds[f"batch_{batch}"] = n_requests / best
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        team_draft(rankings_from_scores(scores), LIST_LENGTH, rng)
        best = min(best, time.perf_counter() - started)
    return {"merges_per_s": speeds[f"batch_{n_requests}"], "by_batch_size": speeds,
            "rank_and_merge_per_s": n_requests / best}


def click_model_table(scales: np.ndarray, settings: dict[str, int], rng: np.random.Generator) -> list[dict]:
    """Fixed-sample impressions (expected z = 1.96) for interleaving and A/B under several click models."""
    models = [NAVIGATIONAL, INFORMATIONAL, PERFECT,
              CascadeClickModel("navigational, patience 0.9", NAVIGATIONAL.click_probability,
                                NAVIGATIONAL.stop_probability, patience=0.9),
              CascadeClickModel("navigational, patience 0.7", NAVIGATIONAL.click_probability,
                                NAVIGATIONAL.stop_probability, patience=0.7)]
    rows = []
    for model in models:
        win, loss = interleaving_rates(scales, model, settings["check_impressions"], rng)
        rates = ab_rates(scales, model, settings["check_impressions"], rng)
        interleave = fixed_sample_impressions(win, loss)
        ab_ctr = fixed_sample_impressions(*pair_probabilities(*rates["ctr"][:2]), per_outcome=2)
        difference = rates["clicks_mean"][0] - rates["clicks_mean"][1]
        ab_clicks = (2 * Z_95**2 * rates["clicks_variance"][:2].sum() / difference**2
                     if difference > 0 else float("inf"))
        rows.append({"click_model": model.name, "interleave_win": win, "interleave_loss": loss,
                     "ctr": rates["ctr"][:2].tolist(), "clicks_per_impression": rates["clicks_mean"][:2].tolist(),
                     "impressions_interleave": interleave, "impressions_ab_ctr": ab_ctr,
                     "impressions_ab_clicks": ab_clicks,
                     "ratio_ctr": ab_ctr / interleave, "ratio_clicks": ab_clicks / interleave})
        progress(f"fixed-sample check, {model.name}: interleave {interleave:,.0f}, A/B CTR {ab_ctr:,.0f}, "
                 f"A/B clicks {ab_clicks:,.0f} impressions")
    return rows


def _summary(result: SequentialResult) -> dict[str, float]:
    return {"median": result.median(), "p10": result.quantile(0.1), "p90": result.quantile(0.9),
            "censored_fraction": result.censored_fraction, "error_rate": result.error_rate, "cap": result.cap}


def plot(path: Path, grid: np.ndarray, interleave: SequentialResult, ab: SequentialResult, confidence: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5))
    for name, result, color in (("team-draft interleaving", interleave, "tab:blue"), ("A/B (click-through)", ab, "tab:orange")):
        curves = result.curve_confidence
        if curves is None:
            continue
        low, middle, high = np.quantile(curves, [0.1, 0.5, 0.9], axis=0)
        axes.fill_between(grid, low, high, color=color, alpha=0.2)
        axes.plot(grid, middle, color=color, label=f"{name}: median, 10-90% of seeds")
        axes.axvline(result.median(), color=color, linestyle=":", linewidth=1)
    axes.axhline(confidence, color="grey", linestyle="--", linewidth=1, label=f"{confidence:.0%}")
    axes.set_xscale("log")
    axes.set_xlabel("impressions")
    axes.set_ylabel("confidence (1 - always-valid p-value)")
    axes.set_title("Naming the better ranker (NDCG@10 0.86 vs 0.84), navigational cascade clicks")
    axes.legend(loc="upper left", fontsize=8)
    figure.text(0.01, 0.01, "a seed stops at its decision; its curve is then held (it could only rise); "
                "dotted: median impressions to decide", fontsize=7, color="grey")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def markdown(results: dict) -> str:
    extra = results["details"]
    lines = ["| measure | value |", "| --- | ---: |",
             f"| impressions to name the better ranker, team draft (median) | {results['impressions_interleave']:,.0f} |",
             f"| impressions to name the better ranker, A/B on click-through (median) | {results['impressions_ab']:,.0f} |",
             f"| sensitivity ratio (A/B / interleaving) | {results['sensitivity_ratio']:.1f} |",
             f"| wrong ranker named, interleaving / A/B | {results['error_rate_interleave']:.3f} / "
             f"{extra['ab']['error_rate']:.3f} |",
             f"| impressions to order 4 rankers, multileaving (median) | {results['impressions_multileave']:,.0f} |",
             f"| merges per second (k=10, 2 rankers, one core) | {results['merges_per_s']:,.0f} |",
             "", "| click model (fixed-sample) | interleave | A/B CTR | A/B clicks | ratio CTR | ratio clicks |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in extra["click_models"]:
        cells = [_count(row[key]) for key in ("impressions_interleave", "impressions_ab_ctr", "impressions_ab_clicks")]
        ratios = [f"{row[key]:.1f}" if np.isfinite(row[key]) else "-" for key in ("ratio_ctr", "ratio_clicks")]
        lines.append(f"| {row['click_model']} | {' | '.join(cells + ratios)} |")
    lines.append("")
    lines.append("fixed-sample: impressions where a fixed-size test's expected z reaches 1.96; "
                 "'never': the worse ranker gets more clicks per impression")
    return "\n".join(lines)


def _count(value: float) -> str:
    return f"{value:,.0f}" if np.isfinite(value) else "never"


def run(out: Path, quick: bool = False) -> int:
    """Run the benchmark, write `out` (JSON) and `out` with suffix .png; return 0."""
    settings = _settings(quick)
    rng = np.random.default_rng(SEED)
    test = PreferenceTest(confidence=0.95)
    started = time.perf_counter()
    progress(f"{settings['seeds']} seeds (multileaving {settings['seeds_multileave']}); calibrating rankers")
    scales = np.array([calibrate_noise_scale(target, rng) for target in TARGET_NDCG])
    progress(f"rankers calibrated: noise scales {np.round(scales, 3).tolist()} for NDCG@10 {TARGET_NDCG}")
    merge_speed = merges_per_second(settings["merge_requests"], scales[:2], rng)
    progress(f"{merge_speed['merges_per_s']:,.0f} merges/s")
    grid = np.unique(np.geomspace(10, settings["cap_ab"], 240).astype(np.int64))

    interleave = run_interleaving(scales[:2], test, NAVIGATIONAL, settings["seeds"], settings["cap_interleave"], rng, grid)
    progress(f"team draft: median {interleave.median():,.0f} impressions over {settings['seeds']} seeds")
    rates = ab_rates(scales[:2], NAVIGATIONAL, settings["ab_queries"], rng)
    win, loss = pair_probabilities(*rates["ctr"])
    ab = run_ab(win, loss, test, settings["seeds"], settings["cap_ab"], rng, grid)
    progress(f"A/B: click-through {rates['ctr'].round(5).tolist()}, median {ab.median():,.0f} impressions")
    multi = run_interleaving(scales, test, NAVIGATIONAL, settings["seeds_multileave"], settings["cap_multileave"], rng)
    progress(f"multileaving, 4 rankers: median {multi.median():,.0f} impressions")
    click_models = click_model_table(scales[:2], settings, rng)

    results = {
        "impressions_interleave": interleave.median(),
        "impressions_ab": ab.median(),
        "sensitivity_ratio": ab.median() / interleave.median(),
        "error_rate_interleave": interleave.error_rate,
        "impressions_multileave": multi.median(),
        "merges_per_s": merge_speed["merges_per_s"],
        "details": {
            "quick": quick, "seed": SEED, "settings": settings, "confidence": test.confidence,
            "test": f"Beta({test.prior_strength:g}, {test.prior_strength:g})-mixture SPRT on wins among non-tied "
                    "outcomes, stopped at the first crossing of ln(1/alpha); the same test for both methods",
            "target_ndcg_at_10": TARGET_NDCG, "noise_scales": scales.tolist(),
            "click_model": NAVIGATIONAL.name, "ab_ctr": rates["ctr"].tolist(),
            "ab_pair_win_loss": [win, loss], "interleave": _summary(interleave), "ab": _summary(ab),
            "multileave": _summary(multi), "merge_speed": merge_speed,
            "click_models": click_models, "cpus": os.cpu_count(), "elapsed_s": time.perf_counter() - started,
            "censoring": "a seed not decided by the cap counts as needing more than the cap (inf) in the "
                         "median and quantiles, and as neither right nor wrong in the error rate",
        },
    }
    out.write_text(json.dumps(_finite_or_none(results), indent=2))
    plot(out.with_suffix(".png"), grid, interleave, ab, test.confidence)
    print(markdown(results))
    progress(f"wrote {out} and {out.with_suffix('.png')} in {time.perf_counter() - started:.0f} s")
    return 0
