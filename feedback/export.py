"""Training data for a retrain: joined request + prediction + outcome rows of a window, as Parquet.

:func:`join_rows` (pure) joins the three event kinds of one route by request_id and keeps the
rows whose outcome arrived in [since, until); one row per model that predicted the request
(serving arm and shadows, ``shadow`` says which). Rows carry the inputs, the arm, model and
version, the policy and the logged propensity (so the data supports off-policy training and
evaluation), the reward (serving arm only: a reward scores the arm that served), the label and
the timestamps.

:func:`write_export` writes rows as Parquet (pyarrow) under ``<destination>/<route>/<window>/``:
``part-00000.parquet``... then ``manifest.json`` with row counts and the time range. Every file is
written under a temporary name and renamed into place; the manifest comes last, so a folder with
a manifest is complete and a reader never sees a half-written file (on object stores, where a
rename is a copy, the manifest alone marks completion). ``destination`` is a local folder or any
URI pyarrow.fs understands (``s3://bucket/prefix``, ``gs://...``).

Columns whose values pyarrow cannot give one type (inputs of varying shape, labels mixing strings
and numbers) are written as JSON text instead, and the manifest lists them under ``json_columns``.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

COLUMNS = ("request_id", "route", "arm", "model", "model_version", "policy", "propensity", "shadow",
           "inputs", "outputs", "reward", "label", "unit_id", "ts_request", "ts_predicted", "ts_outcome", "latency_ms")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class ExportError(Exception):
    """The export cannot be written (no pyarrow, bad destination, unwritable folder); one line."""

    user_facing = True


def join_rows(requests: Iterable[Mapping[str, Any]], predictions: Iterable[Mapping[str, Any]],
              outcomes: Iterable[Mapping[str, Any]], route: str, since: float, until: float | None = None
              ) -> list[dict[str, Any]]:
    """Joined rows of `route` whose outcome ``ts`` is in [since, until), ordered by outcome time.

    Events are decoded JSON objects (as on the topics). A prediction without an outcome in the
    window, or an outcome without a prediction, gives no row; a request without a stored request
    event gets ``inputs`` None. The last outcome for a request_id wins (redelivery).
    """
    upper = math.inf if until is None else until
    chosen: dict[str, Mapping[str, Any]] = {}
    for outcome in outcomes:
        ts = outcome.get("ts")
        if isinstance(ts, (int, float)) and since <= ts < upper:
            chosen[str(outcome["request_id"])] = outcome
    inputs: dict[str, Mapping[str, Any]] = {}
    for request in requests:
        request_id = str(request.get("request_id"))
        if request.get("route") == route and request_id in chosen:
            inputs[request_id] = request
    rows = []
    for prediction in predictions:
        request_id = str(prediction.get("request_id"))
        outcome = chosen.get(request_id)
        if outcome is None or prediction.get("route") != route:
            continue
        request = inputs.get(request_id, {})
        shadow = bool(prediction.get("shadow", False))
        rows.append({
            "request_id": request_id, "route": route, "arm": prediction.get("arm"), "model": prediction.get("model"),
            "model_version": prediction.get("model_version"), "policy": prediction.get("policy"),
            "propensity": prediction.get("propensity"), "shadow": shadow,
            "inputs": request.get("inputs"), "outputs": prediction.get("outputs"),
            "reward": None if shadow else outcome.get("reward"), "label": outcome.get("label"),
            "unit_id": request.get("unit_id"), "ts_request": prediction.get("ts_request"),
            "ts_predicted": prediction.get("ts_predicted"), "ts_outcome": outcome.get("ts"),
            "latency_ms": prediction.get("latency_ms"),
        })
    rows.sort(key=lambda row: (row["ts_outcome"], row["request_id"], row["shadow"], str(row["arm"])))
    return rows


@dataclass(frozen=True)
class Manifest:
    """What an export folder holds (also written as its manifest.json)."""

    route: str
    path: str
    """The export folder (destination/route/window)."""
    reason: str
    window_start: float
    window_end: float | None
    rows: int
    serving_rows: int
    shadow_rows: int
    files: tuple[Mapping[str, Any], ...]
    ts_outcome_min: float | None
    ts_outcome_max: float | None
    json_columns: tuple[str, ...]
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "route": self.route, "path": self.path, "reason": self.reason,
                "window_start": self.window_start, "window_end": self.window_end, "rows": self.rows,
                "serving_rows": self.serving_rows, "shadow_rows": self.shadow_rows, "files": list(self.files),
                "ts_outcome_min": self.ts_outcome_min, "ts_outcome_max": self.ts_outcome_max,
                "json_columns": list(self.json_columns), "columns": list(COLUMNS), "created_at": self.created_at}


def _table(rows: Sequence[Mapping[str, Any]]) -> tuple[Any, tuple[str, ...]]:
    import pyarrow as pa

    arrays, names, json_columns = [], [], []
    for column in COLUMNS:
        values = [row.get(column) for row in rows]
        try:
            array = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
            array = pa.array([None if v is None else json.dumps(v, sort_keys=True) for v in values], type=pa.string())
            json_columns.append(column)
        if pa.types.is_null(array.type) and column in ("reward", "propensity", "ts_outcome"):
            array = array.cast(pa.float64())
        arrays.append(array)
        names.append(column)
    return pa.Table.from_arrays(arrays, names=names), tuple(json_columns)


def _filesystem(destination: str) -> tuple[Any, str]:
    try:
        import pyarrow.fs as pafs
    except ImportError:
        raise ExportError("exporting training data needs pyarrow: pip install pyarrow") from None
    if "://" in destination:
        try:
            return pafs.FileSystem.from_uri(destination)
        except Exception as exc:  # pyarrow raises several types for bad URIs and missing credentials
            raise ExportError(f"cannot open export destination {destination}: {exc}") from None
    return pafs.LocalFileSystem(), os.path.abspath(destination)


def _stamp(ts: float | None) -> str:
    return "open" if ts is None else time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(ts))


def write_export(rows: Sequence[Mapping[str, Any]], destination: str, route: str, window_start: float,
                 window_end: float | None, reason: str = "manual", rows_per_file: int = 100_000,
                 now: float | None = None) -> Manifest:
    """Write `rows` (from join_rows) as Parquet files plus manifest.json; return the manifest.

    Raises ExportError when pyarrow is missing or the destination cannot be written.
    """
    if rows_per_file < 1:
        raise ValueError(f"rows_per_file must be >= 1, got {rows_per_file}")
    import pyarrow.parquet as pq

    fs, root = _filesystem(destination)
    folder = f"{root.rstrip('/')}/{route}/{_stamp(window_start)}_{_stamp(window_end)}_{uuid.uuid4().hex[:8]}"
    files = []
    table, json_columns = _table(rows)  # one schema for every part
    try:
        fs.create_dir(folder, recursive=True)
        for index, begin in enumerate(range(0, max(len(rows), 1), rows_per_file)):
            chunk = table.slice(begin, rows_per_file)
            name = f"part-{index:05d}.parquet"
            temporary = f"{folder}/.tmp-{uuid.uuid4().hex}-{name}"
            with fs.open_output_stream(temporary) as stream:
                pq.write_table(chunk, stream)
            fs.move(temporary, f"{folder}/{name}")
            files.append({"name": name, "rows": chunk.num_rows, "bytes": fs.get_file_info(f"{folder}/{name}").size})
        outcome_ts = [row["ts_outcome"] for row in rows if isinstance(row.get("ts_outcome"), (int, float))]
        shadow_rows = sum(1 for row in rows if row.get("shadow"))
        manifest = Manifest(route=route, path=folder, reason=reason, window_start=window_start, window_end=window_end,
                            rows=len(rows), serving_rows=len(rows) - shadow_rows, shadow_rows=shadow_rows,
                            files=tuple(files), ts_outcome_min=min(outcome_ts) if outcome_ts else None,
                            ts_outcome_max=max(outcome_ts) if outcome_ts else None,
                            json_columns=json_columns,
                            created_at=time.time() if now is None else now)
        temporary = f"{folder}/.tmp-{uuid.uuid4().hex}-{MANIFEST}"
        with fs.open_output_stream(temporary) as stream:
            stream.write(json.dumps(manifest.to_dict(), indent=2).encode())
        fs.move(temporary, f"{folder}/{MANIFEST}")
    except OSError as exc:
        raise ExportError(f"cannot write the export to {folder}: {exc}") from None
    return manifest


def read_export(folder: str) -> tuple[dict[str, Any], Any]:
    """(manifest, pyarrow Table of all parts) of a complete export folder.

    Raises ExportError when the folder has no manifest (incomplete or not an export).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = _filesystem(folder)
    try:
        with fs.open_input_stream(f"{path.rstrip('/')}/{MANIFEST}") as stream:
            manifest = json.loads(stream.read())
    except (OSError, FileNotFoundError):
        raise ExportError(f"{folder} has no {MANIFEST}: not a complete export") from None
    tables = []
    for entry in manifest["files"]:
        with fs.open_input_file(f"{path.rstrip('/')}/{entry['name']}") as handle:
            tables.append(pq.read_table(handle))
    return manifest, pa.concat_tables(tables) if tables else None
