"""Interleaving routes: every arm (ranker) scores all candidates of a batch of ranking requests in
one call per arm; the router merges the rankers' lists per request (team draft or multileave).

A ranking request carries `items` (candidate ids) and one input row per candidate. Its
prediction event's `outputs` hold the shown list (`items`), the ranker that contributed each
position (`teams`) and each ranker's own top-k (`rankings`), so an impression can be scored by
its clicks now and re-scored later.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from banditgate.events import prediction_event
from banditgate.jsontypes import JSONObject
from gateway.batching.batcher import ModelBatcher
from gateway.drift_watch import score_column
from gateway.errors import GatewayError, ModelNotFound, ModelUnavailable
from gateway.models.onnx_runtime import OnnxModel
from gateway.models.repository import ModelRepository
from gateway.serving import Answer, Pending, RouteRuntime
from gateway.validation import validate_batch
from router.interleave import multileave, rankings_from_scores, team_draft


class Rankers(Protocol):
    """What an interleave route needs of `gateway.dataplane.Dataplane` (which calls it): the models,
    their batchers and the clocks. A protocol, so this module does not import the dataplane's."""

    repository: ModelRepository
    clock: Callable[[], float]
    wall_clock: Callable[[], float]

    def batcher(self, model: OnnxModel) -> ModelBatcher: ...


async def serve_interleave(dataplane: Rankers, runtime: RouteRuntime, requests: Sequence[Pending],
                           rng: np.random.Generator) -> list[Answer]:
    """Score, merge and build prediction events for ranking requests of one interleave route."""
    route = runtime.route
    answers = [Answer() for _ in requests]
    try:
        models = [dataplane.repository.get(arm.model, arm.version) for arm in route.arms]
    except ModelNotFound as exc:
        for answer in answers:
            answer.error = ("model_unavailable", str(exc))
        return answers
    # one row per candidate, all requests of the batch together
    rows: list[JSONObject] = []
    owner: list[int] = []
    for index, request in enumerate(requests):
        items = request.items
        if not items:
            answers[index].error = ("missing_field", (f"request {request.request_id!r} on interleave route "
                                                      f"{route.name!r} needs 'items' (candidate ids)"))
            continue
        candidate_rows = _candidate_rows(request, len(items))
        if isinstance(candidate_rows, str):
            answers[index].error = ("bad_input", f"request {request.request_id!r}: {candidate_rows}")
            continue
        rows.extend(candidate_rows)
        owner.extend([index] * len(items))
    if not rows:
        return answers
    owner_array = np.asarray(owner)
    checked = validate_batch(models[0], rows)
    for local, (reason, message) in checked.errors.items():
        request_index = owner[local]
        if answers[request_index].error is None:
            answers[request_index].error = (reason, (f"request {requests[request_index].request_id!r}, candidate "
                                                     f"{local - owner.index(request_index)}: {message}"))
    bad_requests = {i for i, a in enumerate(answers) if a.error is not None}
    keep = checked.ok & ~np.isin(owner_array, list(bad_requests))
    if not keep.any():
        return answers
    feeds = {name: array[keep[checked.ok]] for name, array in checked.feeds.items()}
    kept_owner = owner_array[keep]
    rows_kept = int(keep.sum())
    jobs: list[asyncio.Future] = []
    try:
        for model in models:
            jobs.append(dataplane.batcher(model).submit(feeds, rows_kept))  # an unavailable model raises here
        results = await asyncio.gather(*jobs)
    except GatewayError as exc:
        for job in jobs:
            job.cancel()  # the other rankers' answers are not needed (nor their errors left unread)
        reason = "model_unavailable" if isinstance(exc, ModelUnavailable) else "inference_failed"
        for index in set(kept_owner.tolist()):
            answers[index].error = (reason, str(exc))
        return answers
    scores = []
    for model, result in zip(models, results):
        column = score_column(model, result.outputs)
        if column is None or not result.ok.all():
            for index in set(kept_owner.tolist()):
                answers[index].error = ("inference_failed", f"ranker {model.key} gave no score for every candidate")
            return answers
        scores.append(column)
    score_matrix = np.stack(scores)  # [n_rankers, rows_kept]
    served = sorted(set(kept_owner.tolist()))
    width = max(len(requests[i].items or ()) for i in served)
    padded = np.full((len(served), len(models), width), np.nan)
    for slot, index in enumerate(served):
        columns = np.flatnonzero(kept_owner == index)
        padded[slot, :, : columns.size] = score_matrix[:, columns]
    rankings = rankings_from_scores(padded)
    lengths = np.array([len(requests[i].items or ()) for i in served])
    padding = np.arange(width)[None, None, :] >= lengths[:, None, None]
    rankings[np.broadcast_to(padding, rankings.shape)] = -1
    merge = team_draft if len(models) == 2 else multileave
    merged = merge(rankings, route.k, rng)
    now_wall, now = dataplane.wall_clock(), dataplane.clock()
    arm_names = [arm.name for arm in route.arms]
    rankers = {arm.name: {"model": model.name, "model_version": model.version} for arm, model in zip(route.arms, models)}
    shown_all, team_all, top_all = merged.shown.tolist(), merged.team.tolist(), rankings[:, :, : route.k].tolist()
    for slot, index in enumerate(served):
        request = requests[index]
        items = request.items or ()
        shown = [items[c] for c in shown_all[slot] if c >= 0]
        teams = [arm_names[t] for t, c in zip(team_all[slot], shown_all[slot]) if c >= 0]
        own = {arm_names[r]: [items[c] for c in top_all[slot][r] if c >= 0] for r in range(len(models))}
        event = prediction_event(request.request_id, route.name, "interleave", "interleave", 0, "interleave", 1.0,
                                 {"items": shown, "teams": teams, "rankings": own}, request.ts_request, now_wall,
                                 round((now - request.received_s) * 1000.0, 3))
        event["rankers"] = rankers
        event["method"] = "team_draft" if len(models) == 2 else "multileave"
        answers[index].prediction = event
    return answers


def _candidate_rows(request: Pending, count: int) -> list[JSONObject] | str:
    """Split a ranking request's inputs into one input dict per candidate, or say what is wrong."""
    per_input = {}
    for name, value in request.inputs.items():
        if not isinstance(value, list) or len(value) != count:
            return f"input {name!r} must hold one row per item ({count} items)"
        per_input[name] = value
    return [{name: values[i] for name, values in per_input.items()} for i in range(count)]
