"""Regenerate the Grafana dashboards in deploy/grafana/dashboards/ (`python scripts/gen_dashboards.py`).

The JSON files are what Grafana provisions (deploy/grafana/provisioning/dashboards/banditgate.yml);
this script is their source, so every panel is built the same way (one datasource, the same
route/arm/model variables, units, legends). tests/observability checks that the committed JSON is
what this script writes, and evaluates every panel's query against a real Prometheus scraping a
running gateway and feedback worker. Metric names: docs/metrics.md.

Variables: `route` and `arm` (multi-select, "All" = regex `.*`) and `model`, the model names that
serve the selected arms (from `banditgate_arm_info`), for the panels whose metrics are per model
version rather than per arm.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}  # deploy/grafana/provisioning/datasources
RATE = "$__rate_interval"

ROUTE = 'route=~"$route"'
ARM = 'arm=~"$arm"'
ROUTE_ARM = f"{ROUTE}, {ARM}"
MODEL = 'model=~"$model"'
VERSION_LEGEND = "{{route}}/{{arm}} {{role}} {{model}} v{{version}}"


def target(expr: str, legend: str = "", instant: bool = False, table: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend or "__auto",
                           "range": not instant, "instant": instant}
    if table:
        out["format"] = "table"
    return out


def p(quantile: float, metric: str, by: str, selector: str = "") -> str:
    """histogram_quantile over `metric`'s buckets, keeping the labels in `by`."""
    keep = f"le, {by}" if by else "le"
    return f"histogram_quantile({quantile}, sum by ({keep}) (rate({metric}_bucket{{{selector}}}[{RATE}])))"


class Board:
    """Lays panels out left to right, 24 columns wide, rows top to bottom."""

    def __init__(self, uid: str, title: str, description: str, variables: list[dict[str, Any]]) -> None:
        self.uid = uid
        self.title = title
        self.description = description
        self.variables = variables
        self.panels: list[dict[str, Any]] = []
        self._x = 0
        self._y = 0
        self._row_height = 0

    def row(self, title: str) -> Board:
        self._newline()
        self.panels.append({"id": len(self.panels) + 1, "type": "row", "title": title, "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self._y}, "panels": []})
        self._y += 1
        return self

    def _newline(self) -> None:
        if self._x:
            self._y += self._row_height
            self._x = 0
            self._row_height = 0

    def panel(self, kind: str, title: str, description: str, targets: list[dict[str, Any]], unit: str = "short",
              width: int = 12, height: int = 8, **extra: Any) -> Board:
        if self._x + width > 24:
            self._newline()
        for index, item in enumerate(targets):
            item["refId"] = chr(ord("A") + index)
        defaults: dict[str, Any] = {"unit": unit}
        defaults.update(extra.pop("defaults", {}))
        panel: dict[str, Any] = {
            "id": len(self.panels) + 1, "type": kind, "title": title, "description": description,
            "datasource": DATASOURCE, "gridPos": {"h": height, "w": width, "x": self._x, "y": self._y},
            "targets": targets, "fieldConfig": {"defaults": defaults, "overrides": []},
        }
        if kind == "timeseries":
            panel["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                                "tooltip": {"mode": "multi", "sort": "desc"}}
        elif kind == "stat":
            panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                                "colorMode": "value", "graphMode": "area", "textMode": "auto",
                                "orientation": "auto", "justifyMode": "auto"}
        elif kind == "table":
            panel["options"] = {"showHeader": True}
            panel["transformations"] = [{"id": "organize", "options": {
                "excludeByName": {"Time": True, "Value": True}, "renameByName": {}}}]
        panel.update(extra)
        self.panels.append(panel)
        self._x += width
        self._row_height = max(self._row_height, height)
        return self

    def json(self) -> dict[str, Any]:
        return {
            "uid": self.uid, "title": self.title, "description": self.description, "tags": ["banditgate"],
            "editable": True, "graphTooltip": 1, "schemaVersion": 39, "version": 1, "timezone": "browser",
            "time": {"from": "now-1h", "to": "now"}, "refresh": "10s",
            "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                      "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                      "name": "Annotations & Alerts", "type": "dashboard"}]},
            "links": [{"title": "banditgate", "type": "dashboards", "tags": ["banditgate"], "asDropdown": True,
                       "includeVars": True, "keepTime": True}],
            "templating": {"list": self.variables},
            "panels": self.panels,
        }


def variable(name: str, label: str, metric_selector: str, value_label: str) -> dict[str, Any]:
    query = f"label_values({metric_selector}, {value_label})"
    return {"name": name, "label": label, "type": "query", "datasource": DATASOURCE,
            "definition": query, "query": {"query": query, "refId": f"{name}-values", "qryType": 1},
            "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*", "sort": 1,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "options": [], "hide": 0}


VARIABLES = [
    variable("route", "Route", "banditgate_arm_info", "route"),
    variable("arm", "Arm", 'banditgate_arm_info{route=~"$route"}', "arm"),
    variable("model", "Model", 'banditgate_arm_info{route=~"$route", arm=~"$arm"}', "model"),
]

RATIO = {"min": 0, "max": 1}
ALARM_AT_ONE = {"thresholds": {"mode": "absolute", "steps": [{"color": "green", "value": None},
                                                               {"color": "red", "value": 1}]},
                "custom": {"thresholdsStyle": {"mode": "line+area"}}}
UP = {"mappings": [{"type": "value", "options": {"0": {"text": "down", "color": "red"},
                                                   "1": {"text": "up", "color": "green"}}}],
      "thresholds": {"mode": "absolute", "steps": [{"color": "red", "value": None}, {"color": "green", "value": 1}]}}

OK_RATIO = (f'sum by (route) (rate(banditgate_requests_total{{{ROUTE}, status="ok"}}[{RATE}])) '
            f"/ sum by (route) (rate(banditgate_requests_total{{{ROUTE}}}[{RATE}]))")


def overview() -> Board:
    board = Board("banditgate-overview", "banditgate / Overview",
                  "Is the gateway serving, how fast, with which arms and model versions, and is the loop closing.",
                  VARIABLES)
    board.row("Now")
    board.panel("stat", "Requests / s", "Kafka requests answered or failed, all gateways.",
                [target(f"sum(rate(banditgate_requests_total{{{ROUTE}}}[{RATE}]))")], unit="reqps", width=4, height=4)
    board.panel("stat", "Error ratio", "Share of requests not answered (dead-lettered), all routes selected.",
                [target(f'1 - sum(rate(banditgate_requests_total{{{ROUTE}, status="ok"}}[{RATE}])) '
                        f"/ sum(rate(banditgate_requests_total{{{ROUTE}}}[{RATE}]))")],
                unit="percentunit", width=4, height=4,
                defaults={"thresholds": {"mode": "absolute", "steps": [{"color": "green", "value": None},
                                                                       {"color": "red", "value": 0.05}]}})
    board.panel("stat", "p99 end-to-end", "From receiving a request to its prediction being built.",
                [target(p(0.99, "banditgate_end_to_end_seconds", "", ROUTE))], unit="s", width=4, height=4)
    board.panel("stat", "Consumer lag", "Requests not yet consumed, summed over partitions.",
                [target("sum(banditgate_consumer_lag_messages)")], unit="short", width=4, height=4)
    board.panel("stat", "Join table entries", "Requests the feedback workers hold waiting for their partner.",
                [target("sum(banditgate_feedback_join_entries)")], unit="short", width=4, height=4)
    board.panel("stat", "Drift episodes open", "Drift alarm episodes open now (one alert each, across gateway "
                "replicas), per model version and feature summed.",
                [target(f"sum(max by (model, version, feature) (banditgate_drift_episodes_open{{{MODEL}}}))")],
                unit="short", width=4, height=4,
                defaults={"thresholds": {"mode": "absolute", "steps": [{"color": "green", "value": None},
                                                                       {"color": "red", "value": 1}]}})
    board.panel("stat", "Dependencies", "Gateways ready; gateway Kafka and Redis (arm snapshots); feedback "
                "Redis writes. 0 = down.",
                [target("min(banditgate_ready)", "gateway ready"),
                 target("min(banditgate_kafka_up)", "gateway kafka"),
                 target("min(banditgate_redis_up)", "gateway redis"),
                 target("min(banditgate_feedback_redis_up)", "feedback redis")],
                unit="none", width=16, height=4, defaults=UP)
    board.panel("stat", "Drained arms", "Arms drained by the guardrail or an admin (they get only the floor).",
                [target(f"sum(max by (route, arm) (banditgate_arm_drained{{{ROUTE}}}))")], unit="short",
                width=8, height=4,
                defaults={"thresholds": {"mode": "absolute", "steps": [{"color": "green", "value": None},
                                                                       {"color": "orange", "value": 1}]}})
    board.row("Traffic")
    board.panel("timeseries", "Requests / s by arm", "Answered requests per route and arm.",
                [target(f'sum by (route, arm) (rate(banditgate_requests_total{{{ROUTE_ARM}, status="ok"}}[{RATE}]))',
                        "{{route}}/{{arm}}")], unit="reqps")
    board.panel("timeseries", "Traffic share by arm", "Probability the policy gives each arm now (the logged "
                "propensity).", [target(f"avg by (route, arm) (banditgate_arm_traffic_share{{{ROUTE_ARM}}})",
                                        "{{route}}/{{arm}}")], unit="percentunit", defaults=RATIO)
    board.panel("timeseries", "Error ratio by route", "Share of requests dead-lettered instead of answered.",
                [target(f"1 - ({OK_RATIO})", "{{route}}")], unit="percentunit")
    board.panel("timeseries", "End-to-end latency by route", "p50 and p99, from receipt to prediction.",
                [target(p(0.5, "banditgate_end_to_end_seconds", "route", ROUTE), "p50 {{route}}"),
                 target(p(0.99, "banditgate_end_to_end_seconds", "route", ROUTE), "p99 {{route}}")], unit="s")
    board.row("Closed loop")
    board.panel("timeseries", "Reward by arm (feedback window)", "Mean reward per arm over the quality window.",
                [target(f'max by (route, arm) (banditgate_quality_reward_mean{{{ROUTE_ARM}, role="primary"}})',
                        "{{route}}/{{arm}}")], unit="none")
    board.panel("timeseries", "Outcomes / s by join result", "joined, duplicate, late, orphan, invalid.",
                [target(f"sum by (result) (rate(banditgate_feedback_outcomes_total[{RATE}]))", "{{result}}")],
                unit="ops")
    board.panel("table", "Serving now", "Arms and the model version serving each (primary and shadow).",
                [target(f"max by (route, arm, role, model, version) (banditgate_arm_info{{{ROUTE_ARM}}})",
                        instant=True, table=True)], unit="none", width=24, height=7)
    return board


def pair(metric: str) -> str:
    """An interleaving pair gauge for the selected routes, pairs with either ranker among the selected arms."""
    return (f'max by (route, arm_a, arm_b) ({metric}{{{ROUTE}, arm_a=~"$arm"}} '
            f'or {metric}{{{ROUTE}, arm_b=~"$arm"}})')


PAIR_LEGEND = "{{route}} {{arm_a}} vs {{arm_b}}"
VERDICT = {"mappings": [{"type": "value", "options": {"1": {"text": "promote", "color": "green"},
                                                        "0": {"text": "undecided", "color": "text"},
                                                        "-1": {"text": "reject", "color": "red"}}}],
           "min": -1, "max": 1}


def routing() -> Board:
    board = Board("banditgate-routing", "banditgate / Routing & bandit",
                  "What the policy does per arm: shares, posteriors, drains, rewards, shadow traffic.", VARIABLES)
    board.row("Shares")
    board.panel("timeseries", "Traffic share (served)", "After exploration floor, max_share caps and drains: the "
                "propensity logged with each prediction.",
                [target(f"avg by (route, arm) (banditgate_arm_traffic_share{{{ROUTE_ARM}}})", "{{route}}/{{arm}}")],
                unit="percentunit", defaults=RATIO)
    board.panel("timeseries", "Policy share (unconstrained)", "What Thompson sampling (P(arm is best)) or the "
                "fixed weights alone would give each arm.",
                [target(f"avg by (route, arm) (banditgate_arm_policy_share{{{ROUTE_ARM}}})", "{{route}}/{{arm}}")],
                unit="percentunit", defaults=RATIO)
    board.panel("timeseries", "Requests / s by arm", "Answered requests per arm.",
                [target(f'sum by (route, arm) (rate(banditgate_requests_total{{{ROUTE_ARM}, status="ok"}}[{RATE}]))',
                        "{{route}}/{{arm}}")], unit="reqps")
    board.panel("timeseries", "Drained arms", "1 while an arm is drained (guardrail or admin).",
                [target(f"max by (route, arm) (banditgate_arm_drained{{{ROUTE_ARM}}})", "{{route}}/{{arm}}")],
                unit="none", defaults={"min": 0, "max": 1})
    board.row("Posteriors and rewards")
    board.panel("timeseries", "Posterior mean reward (95% interval)", "Thompson routes: the posterior of each arm's "
                "mean reward that the gateways route on (from the Redis snapshot).",
                [target(f"avg by (route, arm) (banditgate_arm_posterior_mean{{{ROUTE_ARM}}})", "mean {{route}}/{{arm}}"),
                 target(f"avg by (route, arm) (banditgate_arm_posterior_lower{{{ROUTE_ARM}}})",
                        "lower {{route}}/{{arm}}"),
                 target(f"avg by (route, arm) (banditgate_arm_posterior_upper{{{ROUTE_ARM}}})",
                        "upper {{route}}/{{arm}}")], unit="none")
    board.panel("timeseries", "Observed reward (feedback window, with interval)", "Mean reward per arm over the "
                "quality window and its confidence interval.",
                [target(f'max by (route, arm) (banditgate_quality_reward_mean{{{ROUTE_ARM}, role="primary"}})',
                        "mean {{route}}/{{arm}}"),
                 target(f'max by (route, arm) (banditgate_quality_reward_mean_lower{{{ROUTE_ARM}, role="primary"}})',
                        "lower {{route}}/{{arm}}"),
                 target(f'max by (route, arm) (banditgate_quality_reward_mean_upper{{{ROUTE_ARM}, role="primary"}})',
                        "upper {{route}}/{{arm}}")], unit="none")
    board.panel("timeseries", "Rewards in window", "Rewards counted per arm over the quality window.",
                [target(f'max by (route, arm) (banditgate_quality_rewards{{{ROUTE_ARM}, role="primary"}})',
                        "{{route}}/{{arm}}")], unit="short")
    board.panel("timeseries", "Arm statistic updates / s", "Rewards applied to the arms' statistics in Redis "
                "(duplicates are redelivered outcomes, ignored).",
                [target(f"sum by (route, result) (rate(banditgate_feedback_arm_updates_total{{{ROUTE}}}[{RATE}]))",
                        "{{route}} {{result}}")], unit="ops")
    board.panel("timeseries", "Default rewards applied / s", "Predictions scored with default_reward after "
                "reward_wait_s without an outcome.",
                [target(f"sum by (route) (rate(banditgate_feedback_defaults_applied_total{{{ROUTE}}}[{RATE}]))",
                        "{{route}}")], unit="ops")
    board.panel("timeseries", "Shadow predictions / s", "Requests mirrored to shadow arms.",
                [target(f"sum by (route, arm) (rate(banditgate_shadow_predictions_total{{{ROUTE_ARM}}}[{RATE}]))",
                        "{{route}}/{{arm}}")], unit="ops")
    board.row("Interleaving (interleave routes)")
    board.panel("timeseries", "Pairwise wins, losses, ties", "Impressions per pair of rankers, all time: arm_a's "
                "team got more clicks (win), fewer (loss) or as many (tie, no click included).",
                [target(pair("banditgate_interleave_pair_wins"), f"{PAIR_LEGEND} wins"),
                 target(pair("banditgate_interleave_pair_losses"), f"{PAIR_LEGEND} losses"),
                 target(pair("banditgate_interleave_pair_ties"), f"{PAIR_LEGEND} ties")], unit="short", width=8)
    board.panel("timeseries", "Preference evidence ln M vs. threshold", "The always-valid test's statistic per pair "
                "(mixture SPRT on wins vs. losses); the pair is decided when it reaches the threshold, "
                "ln(pairs / (1 - confidence)).",
                [target(pair("banditgate_interleave_pair_log_evidence"), f"ln M {PAIR_LEGEND}"),
                 target(pair("banditgate_interleave_pair_evidence_threshold"), f"threshold {PAIR_LEGEND}")],
                unit="none", width=8)
    board.panel("stat", "Interleaving verdict", "Per ranker: promote (preferred to every other ranker), reject "
                "(some ranker is preferred to it) or undecided; sent once as an alert.",
                [target(f"max by (route, arm) (banditgate_interleave_verdict{{{ROUTE_ARM}}})", "{{route}}/{{arm}}")],
                unit="none", width=8, defaults=VERDICT)
    return board


def quality_drift() -> Board:
    board = Board("banditgate-quality-drift", "banditgate / Quality & drift",
                  "Live quality per model version (primary and shadow) against the outcomes' labels, and input "
                  "and prediction-score drift against each model's reference profile.", VARIABLES)
    sel = ROUTE_ARM
    board.row("Quality per model version (quality window)")
    board.panel("timeseries", "Accuracy", "Share of labelled predictions that were right.",
                [target(f"max by (route, arm, role, model, version) (banditgate_quality_accuracy_ratio{{{sel}}})",
                        VERSION_LEGEND)], unit="percentunit", defaults=RATIO)
    board.panel("timeseries", "Precision, recall, F1", "Binary labels, positive class 1.",
                [target(f"max by (route, arm, role, model, version) (banditgate_quality_precision_ratio{{{sel}}})",
                        "precision " + VERSION_LEGEND),
                 target(f"max by (route, arm, role, model, version) (banditgate_quality_recall_ratio{{{sel}}})",
                        "recall " + VERSION_LEGEND),
                 target(f"max by (route, arm, role, model, version) (banditgate_quality_f1_ratio{{{sel}}})",
                        "F1 " + VERSION_LEGEND)], unit="percentunit", defaults=RATIO)
    board.panel("timeseries", "Log loss", "Mean log loss of the predicted probability (lower is better).",
                [target(f"max by (route, arm, role, model, version) (banditgate_quality_log_loss{{{sel}}})",
                        VERSION_LEGEND)], unit="none")
    board.panel("timeseries", "Brier score", "Mean squared error of the predicted probability (lower is better).",
                [target(f"max by (route, arm, role, model, version) (banditgate_quality_brier_score{{{sel}}})",
                        VERSION_LEGEND)], unit="none")
    board.panel("timeseries", "Labelled outcomes in window", "How much evidence the quality numbers rest on.",
                [target(f"max by (route, arm, role, model, version) (banditgate_quality_labelled_outcomes{{{sel}}})",
                        VERSION_LEGEND)], unit="short")
    board.panel("timeseries", "Shadow agreement with primary", "Share of mirrored requests where the shadow's "
                "label equals the primary's.",
                [target(f"max by (route, arm, model, version) (banditgate_quality_agreement_ratio{{{sel}}})",
                        "{{route}}/{{arm}} {{model}} v{{version}}")], unit="percentunit", defaults=RATIO)
    board.panel("timeseries", "Shadow advantage (paired loss, confidence sequence)", "Mean loss(primary) - "
                "loss(shadow) on paired labels, all time; above 0 the shadow is better. Promote/reject alerts "
                "fire when the always-valid interval clears the margin.",
                [target(f"max by (route, arm, model, version) (banditgate_quality_shadow_advantage{{{sel}}})",
                        "advantage {{route}}/{{arm}} {{model}} v{{version}}"),
                 target(f"max by (route, arm, model, version) (banditgate_quality_shadow_advantage_lower{{{sel}}})",
                        "lower {{route}}/{{arm}}"),
                 target(f"max by (route, arm, model, version) (banditgate_quality_shadow_advantage_upper{{{sel}}})",
                        "upper {{route}}/{{arm}}")], unit="none")
    board.panel("timeseries", "Shadow paired labels", "Requests labelled for both the shadow and the primary.",
                [target(f"max by (route, arm, model, version) (banditgate_quality_shadow_pairs{{{sel}}})",
                        "{{route}}/{{arm}} {{model}} v{{version}}")], unit="short")
    board.row("Quality drift (feedback worker: CUSUM on each model version's error stream)")
    board.panel("timeseries", "Quality-drift CUSUM / threshold", "Per route, role, arm, model version and signal "
                "(label error, or failure of a 0/1 reward); an alarm is raised at 1. Series appear once a version's "
                "reference window (feedback.quality_drift_reference outcomes) has set its in-control error rate.",
                [target("max by (route, arm, role, model, version, signal) "
                        f"(banditgate_quality_drift_statistic{{{sel}}}) / max by (route, arm, role, model, version, "
                        f"signal) (banditgate_quality_drift_threshold{{{sel}}})",
                        VERSION_LEGEND + " {{signal}}")], unit="none", defaults=ALARM_AT_ONE)
    board.panel("timeseries", "Quality-drift error rates and alarms", "The in-control error rate learned from the "
                "reference window, and 1 while an alarm episode lasts (each episode sends one `quality` alert).",
                [target(f"max by (route, arm, role, model, version, signal) "
                        f"(banditgate_quality_drift_reference_error_rate{{{sel}}})",
                        "reference " + VERSION_LEGEND + " {{signal}}"),
                 target(f"max by (route, arm, role, model, version, signal) (banditgate_quality_drift_alarm{{{sel}}})",
                        "alarm " + VERSION_LEGEND + " {{signal}}")], unit="none")
    board.row("Drift (gateway monitors against reference.json)")
    board.panel("timeseries", "Drift statistic / threshold", "Per model version and feature (`score` is the "
                "prediction score); an alarm is raised at 1.",
                [target(f"max by (model, version, feature) (banditgate_drift_statistic{{{MODEL}}}) "
                        f"/ max by (model, version, feature) (banditgate_drift_threshold{{{MODEL}}})",
                        "{{model}} v{{version}} {{feature}}")], unit="none", defaults=ALARM_AT_ONE)
    board.panel("timeseries", "Drift statistic and threshold", "Raw sequential statistic and its alarm threshold "
                "(calibrated to the configured ARL0).",
                [target(f"max by (model, version, feature) (banditgate_drift_statistic{{{MODEL}}})",
                        "statistic {{model}} v{{version}} {{feature}}"),
                 target(f"max by (model, version, feature) (banditgate_drift_threshold{{{MODEL}}})",
                        "threshold {{model}} v{{version}} {{feature}}")], unit="none")
    board.panel("timeseries", "Drift alarms and open episodes", "Alarms (threshold crossings; a persisting drift "
                "keeps crossing) per model version and feature, and whether its episode is open (one alert per "
                "episode).",
                [target(f"sum by (model, version, feature) (increase(banditgate_drift_alarms_total{{{MODEL}}}[{RATE}]))",
                        "alarms {{model}} v{{version}} {{feature}}"),
                 target(f"max by (model, version, feature) (banditgate_drift_episodes_open{{{MODEL}}})",
                        "episode open {{model}} v{{version}} {{feature}}")], unit="short", width=24)
    return board


def pipeline() -> Board:
    board = Board("banditgate-pipeline", "banditgate / Kafka & feedback pipeline",
                  "The gateway's Kafka loop and batches, and the feedback worker's join.", VARIABLES)
    board.row("Gateway: Kafka loop")
    board.panel("timeseries", "Consumer lag by partition", "High watermark minus the gateway group's position.",
                [target("sum by (topic, partition) (banditgate_consumer_lag_messages)", "{{topic}}[{{partition}}]")],
                unit="short")
    board.panel("timeseries", "Requests / s by status", "Consumed requests, answered (ok) or dead-lettered (error).",
                [target(f"sum by (route, status) (rate(banditgate_requests_total{{{ROUTE}}}[{RATE}]))",
                        "{{route}} {{status}}")], unit="reqps")
    board.panel("timeseries", "Dead letters / s (gateway)", "By source topic and reason.",
                [target(f"sum by (topic, reason) (rate(banditgate_deadletters_total[{RATE}]))", "{{reason}} ({{topic}})")],
                unit="ops")
    board.panel("timeseries", "Request errors / s by reason", "Requests that could not be answered.",
                [target(f"sum by (route, reason) (rate(banditgate_request_errors_total{{{ROUTE}}}[{RATE}]))",
                        "{{route}} {{reason}}")], unit="ops")
    board.panel("timeseries", "Backpressure pauses", "Times fetching paused because model queues were full.",
                [target(f"sum(increase(banditgate_backpressure_pauses_total[{RATE}]))", "pauses")], unit="short")
    board.panel("timeseries", "Queue depth by model version", "Rows queued or being inferred.",
                [target(f"sum by (model, version) (banditgate_queue_depth_rows{{{MODEL}}})", "{{model}} v{{version}}")],
                unit="short")
    board.row("Gateway: batches and ONNX Runtime")
    board.panel("timeseries", "Batch size", "Rows per ONNX Runtime call, p50 and p99.",
                [target(p(0.5, "banditgate_batch_size_rows", "model, version", MODEL), "p50 {{model}} v{{version}}"),
                 target(p(0.99, "banditgate_batch_size_rows", "model, version", MODEL), "p99 {{model}} v{{version}}")],
                unit="short", width=8)
    board.panel("timeseries", "Queue wait p99", "Time a batch's oldest row waited before inference.",
                [target(p(0.99, "banditgate_queue_seconds", "model, version", MODEL), "{{model}} v{{version}}")],
                unit="s", width=8)
    board.panel("timeseries", "Inference time p99", "ONNX Runtime time per batch.",
                [target(p(0.99, "banditgate_inference_seconds", "model, version", MODEL), "{{model}} v{{version}}")],
                unit="s", width=8)
    board.panel("timeseries", "Models loaded", "1 per loaded model version and gateway.",
                [target(f"sum by (model, version) (banditgate_model_loaded{{{MODEL}}})", "{{model}} v{{version}}")],
                unit="short", width=24, height=6)
    board.row("Gateway: admission gate (new model versions against the incumbent)")
    admission = f"{ROUTE}, {MODEL}"
    by_version = "max by (route, model, version)"
    board.panel("table", "Admission figures per version", "The admission benchmark of each new version and of the "
                "incumbent it was compared with (docs/lifecycle.md, Admission gate): verdict (1 admitted, 0 refused; "
                "candidates only), p99 time per run at batch 1 and at the max batch, rows/s at the max batch, "
                "memory added by loading, file size.",
                [target(f"{by_version} (banditgate_admission_admitted{{{admission}}})", "admitted", instant=True,
                        table=True),
                 target(f'{by_version} (banditgate_admission_latency_p99_seconds{{{admission}, batch="1"}})',
                        "p99 batch 1", instant=True, table=True),
                 target(f'{by_version} (banditgate_admission_latency_p99_seconds{{{admission}, batch="max"}})',
                        "p99 max batch", instant=True, table=True),
                 target(f"{by_version} (banditgate_admission_throughput_rows_per_second{{{admission}}})", "rows/s",
                        instant=True, table=True),
                 target(f"{by_version} (banditgate_admission_memory_bytes{{{admission}}})", "memory", instant=True,
                        table=True),
                 target(f"{by_version} (banditgate_admission_file_bytes{{{admission}}})", "file", instant=True,
                        table=True)],
                unit="none", width=24, height=8,
                transformations=[{"id": "merge", "options": {}},
                                 {"id": "organize", "options": {"excludeByName": {"Time": True}, "renameByName": {
                                     "Value #A": "admitted", "Value #B": "p99 s (batch 1)",
                                     "Value #C": "p99 s (max batch)", "Value #D": "rows/s (max batch)",
                                     "Value #E": "memory added (bytes)", "Value #F": "file (bytes)"}}}])
    board.row("Feedback worker: join")
    board.panel("timeseries", "Events consumed / s by source", "predictions, shadow_predictions, outcomes.",
                [target(f"sum by (source) (rate(banditgate_feedback_events_total[{RATE}]))", "{{source}}")], unit="ops")
    board.panel("timeseries", "Outcomes / s by join result", "Orphans: outcomes whose prediction never came "
                "(route `_none`).",
                [target(f"sum by (result) (rate(banditgate_feedback_outcomes_total[{RATE}]))", "{{result}}")],
                unit="ops")
    board.panel("timeseries", "Join table entries (backlog)", "Requests held per worker: waiting for an outcome "
                "or prediction, or recently joined.",
                [target("sum by (instance) (banditgate_feedback_join_entries)", "{{instance}}")], unit="short")
    board.panel("timeseries", "Orphaned outcome ratio", "Share of outcomes that never met their prediction.",
                [target(f'sum(rate(banditgate_feedback_outcomes_total{{result="orphan"}}[{RATE}])) '
                        f"/ sum(rate(banditgate_feedback_outcomes_total[{RATE}]))", "orphans")], unit="percentunit")
    board.panel("timeseries", "Dead letters / s (feedback)", "By source and reason.",
                [target(f"sum by (source, reason) (rate(banditgate_feedback_dead_letters_total[{RATE}]))",
                        "{{source}} {{reason}}")], unit="ops")
    board.panel("timeseries", "Batch time and size", "Time to join, apply and persist a batch (p99), and events "
                "per batch (p50).",
                [target(p(0.99, "banditgate_feedback_batch_seconds", "instance"), "p99 seconds {{instance}}"),
                 target(p(0.5, "banditgate_feedback_batch_events", "instance"), "p50 events {{instance}}")],
                unit="short")
    board.panel("timeseries", "Redis and Kafka", "1 = up: gateway snapshots, gateway Kafka, feedback writes.",
                [target("min by (instance) (banditgate_redis_up)", "gateway redis {{instance}}"),
                 target("min by (instance) (banditgate_kafka_up)", "gateway kafka {{instance}}"),
                 target("min by (instance) (banditgate_feedback_redis_up)", "feedback redis {{instance}}")],
                unit="none", width=24, height=6, defaults={"min": 0, "max": 1})
    return board


BOARDS = {"overview.json": overview, "routing.json": routing, "quality-drift.json": quality_drift,
          "pipeline.json": pipeline}


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {name: json.dumps(build().json(), indent=2) + "\n" for name, build in BOARDS.items()}


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
