"""What the demo shows while it runs: a rich live view on a terminal, progress lines elsewhere.

The live view is redrawn from the asyncio loop (never from a thread) about four times a second;
when stdout is not a terminal (tests, CI, a pipe) a compact progress line is printed every few
seconds instead, so a log stays readable.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from demo.observe import ALL_PRIMARIES
from demo.scenario import Scenario
from demo.telemetry import Telemetry

REFRESH_S = 0.25
PROGRESS_EVERY_S = 5.0
WINDOW_S = 5.0


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


class View:
    """Live view or progress lines over the run's telemetry. Use as a context manager."""

    def __init__(self, telemetry: Telemetry, scenario: Scenario, stage: str = "starting",
                 interactive: bool | None = None) -> None:
        self.telemetry = telemetry
        self.scenario = scenario
        self.stage = stage
        self.interactive = sys.stdout.isatty() if interactive is None else interactive
        self.console = Console(highlight=False) if self.interactive else None
        self._live: Live | None = None
        self._last_refresh = 0.0
        self._last_progress = 0.0

    def __enter__(self) -> View:
        if self.interactive and self.console is not None:
            self._live = Live(self.render(), console=self.console, auto_refresh=False, transient=False)
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(self.render(), refresh=True)
            self._live.stop()
            self._live = None

    # -- output ------------------------------------------------------------------------------
    def say(self, message: str) -> None:
        """One line above the live view (or on stdout)."""
        if self._live is not None and self.console is not None:
            self._live.console.print(f"demo: {message}")
        else:
            print(f"demo: {message}", flush=True)

    def tick(self) -> None:
        """Redraw if due (call often from the loop)."""
        now = time.monotonic()
        if self._live is not None:
            if now - self._last_refresh >= REFRESH_S:
                self._last_refresh = now
                self._live.update(self.render(), refresh=True)
        elif now - self._last_progress >= PROGRESS_EVERY_S:
            self._last_progress = now
            print(f"demo: {self.progress_line()}", flush=True)

    # -- content -----------------------------------------------------------------------------
    def _phase_text(self) -> str:
        t = self.telemetry.now_s()
        if self.stage != "traffic":
            return self.stage
        phase = self.scenario.phase(t)
        detail = {"baseline": f"shift at t={self.scenario.drift_at_s:.0f}s",
                  "shift": f"{', '.join(self.scenario.drift_features)} x{self.scenario.drift_factor:g}; "
                           f"broken {self.scenario.degrade_model} release at t={self.scenario.degrade_at_s:.0f}s",
                  "broken": f"{self.scenario.degrade_model} v2 (shuffled labels) released at "
                            f"t={self.scenario.degrade_at_s:.0f}s"}[phase]
        return f"{phase} ({detail})"

    def progress_line(self) -> str:
        tel = self.telemetry
        t = tel.now_s()
        shares = tel.shares_between(t - WINDOW_S - 1, t - 1)
        sample = tel.latest
        applied = sample.outcome_counter if sample else None
        share_text = " ".join(f"{arm} {shares.get(arm, 0):.0%}" for arm in tel.arms)
        return (f"t={t:5.1f}s {self._phase_text().split(' (')[0]:<8} | sent {tel.sent} predicted {len(tel.predictions)}"
                f" outcomes {tel.outcomes_sent} applied {applied if applied is not None else '-'} | {share_text} | "
                f"drift episodes {len(tel.drift_alerts)}")

    def render(self) -> Any:
        tel = self.telemetry
        t = tel.now_s()
        sample = tel.latest
        header = Text.assemble(("banditgate demo", "bold"), f" ({self.scenario.name})  ",
                               f"t={t:5.1f}s of {self.scenario.end_s:.0f}s  ", ("phase: ", "dim"), self._phase_text())
        arms = Table(box=box.SIMPLE_HEAD, title="arms (route diagnosis, Thompson sampling)", title_justify="left")
        for column in ("arm", "model", "share 5s", "policy share", "posterior mean [95%]", "reward rate",
                       "req/s", "p99 ms", "outcomes"):
            arms.add_column(column, justify="left" if column in ("arm", "model") else "right")
        shares = tel.shares_between(t - WINDOW_S - 1, t - 1)
        counts = tel.served_between(t - WINDOW_S - 1, t - 1)
        for arm in tel.arms:
            posterior = sample.posteriors.get(arm) if sample else None
            policy = sample.policy_shares.get(arm) if sample else None
            version = tel.versions.get(arm)
            arms.add_row(arm, f"{arm}:{version}" if version else "-", _pct(shares.get(arm)), _pct(policy),
                         f"{posterior.posterior_mean:.3f} [{posterior.low:.3f}, {posterior.high:.3f}]"
                         if posterior else "-",
                         _num(tel.reward_rate(arm)), f"{counts.get(arm, 0) / WINDOW_S:.1f}",
                         _num(tel.recent_latency_p99(arm, 10.0), 1), str(tel.outcomes_by_arm[arm]))
        shadows = Table(box=box.SIMPLE_HEAD, title="shadow vs primary (feedback worker's ledger)", title_justify="left")
        for column in ("shadow", "model", "agreement", "F1 shadow", "F1 primary", "labelled"):
            shadows.add_column(column, justify="left" if column in ("shadow", "model") else "right")
        for shadow in tel.shadows:
            quality = _shadow_quality(sample.quality if sample else {}, shadow)
            version = tel.versions.get(shadow)
            shadows.add_row(shadow, f"{shadow}:{version}" if version else "-", _pct(quality.get("agreement")),
                            _num(quality.get("shadow_f1")), _num(quality.get("primary_f1")),
                            str(int(quality.get("labelled", 0))))
        drift = Table(box=box.SIMPLE_HEAD, title="drift (gateway: statistic / threshold, top 5)", title_justify="left")
        for column in ("model", "feature", "statistic", "threshold", "level"):
            drift.add_column(column, justify="left" if column in ("model", "feature") else "right")
        gauges = sample.drift if sample else {}
        ranked = sorted(gauges.items(), key=lambda item: -(item[1][0] / item[1][1] if item[1][1] else 0))[:5]
        for (model, version, feature), (statistic, threshold) in ranked:
            level = statistic / threshold if threshold else 0.0
            bar = "#" * min(20, int(level * 20))
            drift.add_row(f"{model}:{version}", feature, f"{statistic:.1f}", f"{threshold:.1f}",
                          Text(f"{bar:<20} {level:.0%}", style="red" if level >= 0.8 else ""))
        if not ranked:
            drift.add_row("-", "no banditgate_drift_* gauges yet", "", "", "")
        alerts = Text()
        for alert in tel.alerts[-4:]:
            details = alert.get("details") or {}
            alerts.append(f"  t={alert['t_s']:5.1f}s {alert.get('kind')} {details.get('model', alert.get('arm'))}"
                          f" v{alert.get('model_version')} {details.get('feature', alert.get('metric'))}: "
                          f"{float(alert.get('value', 0)):.1f} > {float(alert.get('threshold', 0)):.1f}\n",
                          style="bold red" if alert.get("kind") == "drift" else "yellow")
        applied = sample.outcome_counter if sample else None
        joined = sample.ledger_counts.get("joined") if sample else None
        e2e = tel.e2e_ms[-500:]
        footer = Text(f"requests sent {tel.sent} · predictions {len(tel.predictions)} (+{tel.prediction_duplicates} dup)"
                      f" · outcomes sent {tel.outcomes_sent}"
                      f" · counted in arm statistics {applied if applied is not None else '-'}"
                      f" · joined {int(joined) if joined is not None else '-'} · dead letters {tel.deadletters}"
                      f" · end-to-end p99 {_num(_p99(e2e), 1)} ms", style="dim")
        parts: list[Any] = [header, arms, shadows, drift]
        parts.append(Text(f"alerts ({len(tel.alerts)}, {len(tel.drift_alerts)} drift)", style="bold"))
        if tel.alerts:
            parts.append(alerts)
        parts.append(footer)
        return Group(*parts)


def _p99(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def _shadow_quality(quality: dict[tuple[str, str, str, str], dict[str, float]], shadow: str) -> dict[str, float]:
    """The shadow's agreement and F1, and the primaries' pooled F1, from the ledger metrics."""
    out: dict[str, float] = {}
    shadow_rows = [values for (role, arm, _m, _v), values in quality.items() if role == "shadow" and arm == shadow]
    if shadow_rows:
        newest = shadow_rows[-1]
        out.update({k: newest[k] for k in ("agreement", "labelled") if k in newest})
        if "f1" in newest:
            out["shadow_f1"] = newest["f1"]
    pooled = quality.get(ALL_PRIMARIES, {})
    if "f1" in pooled:
        out["primary_f1"] = pooled["f1"]
    return out
