"""Training data for a retrain: joined request + prediction + outcome rows of a window, as Parquet.

:func:`make_row` (pure) is one row: one per model that predicted a request whose outcome arrived
in [since, until) (serving arm and shadows, ``shadow`` says which). Rows carry the inputs, the
arm, model and version, the policy and the logged propensity (so the data supports off-policy
training and evaluation), the reward (serving arm only: a reward scores the arm that served), the
label and the timestamps. :func:`join_rows` joins lists of events in memory (the reference the
streaming join of feedback.export_join is tested against); an export of Kafka topics never holds
the window in memory (feedback.export_join spills it to disk).

:class:`ExportWriter` writes row groups as they come (pyarrow.parquet.ParquetWriter) under
``<destination>/<route>/<window>/``: ``part-00000.parquet``... then ``manifest.json`` with row
counts and the time range. Every file is written under a temporary name and renamed into place;
the manifest comes last, so a folder with a manifest is complete and a reader never sees a
half-written file (on object stores, where a rename is a copy, the manifest alone marks
completion); an aborted writer deletes its folder. ``destination`` is a local folder or any URI
pyarrow.fs understands (``s3://bucket/prefix``, ``gs://...``).

A column gets one Arrow type for the whole export, found by :class:`SchemaProbe` over every row
group before the first is written (types that differ only in numeric width or in struct fields
are promoted: int64 + double -> double). Columns whose values have no common type (inputs of
varying nesting, labels mixing strings and numbers) are written as JSON text instead, and the
manifest lists them under ``json_columns``.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

from banditgate.jsontypes import JSONObject, JSONValue

if TYPE_CHECKING:  # pyarrow is optional (the export extra): imported where it is used
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

COLUMNS = ("request_id", "route", "arm", "model", "model_version", "policy", "propensity", "shadow",
           "inputs", "outputs", "reward", "label", "unit_id", "ts_request", "ts_predicted", "ts_outcome", "latency_ms")
FLOAT_COLUMNS = ("reward", "propensity", "ts_outcome")
"""Columns written as float64 even when every value is null (so every export has the same type)."""
PREDICTION_FIELDS = ("arm", "model", "model_version", "policy", "propensity", "outputs", "shadow", "ts_request",
                     "ts_predicted", "latency_ms")
"""The fields of a prediction event a row uses."""
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class ExportError(Exception):
    """The export cannot be written (no pyarrow, bad destination, unwritable folder, Kafka away); one line."""

    user_facing = True


class ExportAborted(ExportError):
    """The export was stopped before its manifest was written (its lease was lost, its worker stopped)."""


def outcome_time(outcome: Mapping[str, JSONValue], since: float, until: float | None) -> float | None:
    """The outcome's ``ts`` (epoch seconds) when it is a finite number in [since, until), else None."""
    ts = outcome.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
        return None
    return float(ts) if since <= ts and (until is None or ts < until) else None


def make_row(route: str, prediction: Mapping[str, JSONValue], request: Mapping[str, JSONValue] | None,
             outcome: Mapping[str, JSONValue], ts_outcome: float) -> JSONObject:
    """The export row of one prediction joined with its request (None: not stored) and outcome."""
    request = request or {}
    shadow = bool(prediction.get("shadow", False))
    return {
        "request_id": str(prediction.get("request_id")), "route": route, "arm": prediction.get("arm"),
        "model": prediction.get("model"), "model_version": prediction.get("model_version"),
        "policy": prediction.get("policy"), "propensity": prediction.get("propensity"), "shadow": shadow,
        "inputs": request.get("inputs"), "outputs": prediction.get("outputs"),
        "reward": None if shadow else outcome.get("reward"), "label": outcome.get("label"),
        "unit_id": request.get("unit_id"), "ts_request": prediction.get("ts_request"),
        "ts_predicted": prediction.get("ts_predicted"), "ts_outcome": ts_outcome,
        "latency_ms": prediction.get("latency_ms"),
    }


def row_order(row: Mapping[str, JSONValue]) -> tuple[float, str, bool, str]:
    """Rows are ordered by outcome time, then request id, serving before shadow, then arm."""
    return (row["ts_outcome"], row["request_id"], row["shadow"], str(row["arm"]))


def join_rows(requests: Iterable[Mapping[str, JSONValue]], predictions: Iterable[Mapping[str, JSONValue]],
              outcomes: Iterable[Mapping[str, JSONValue]], route: str, since: float, until: float | None = None
              ) -> list[JSONObject]:
    """Joined rows of `route` whose outcome ``ts`` is in [since, until), ordered by :func:`row_order`.

    Events are decoded JSON objects (as on the topics). A prediction without an outcome in the
    window, or an outcome without a prediction, gives no row; a request without a stored request
    event gets ``inputs`` None. The last outcome (and request) for a request_id wins (redelivery).
    Holds everything in memory: for tests and small lists; exports use feedback.export_join.
    """
    chosen: dict[str, tuple[Mapping[str, JSONValue], float]] = {}
    for outcome in outcomes:
        ts = outcome_time(outcome, since, until)
        if ts is not None:
            chosen[str(outcome.get("request_id"))] = (outcome, ts)
    inputs: dict[str, Mapping[str, JSONValue]] = {}
    for request in requests:
        request_id = str(request.get("request_id"))
        if request.get("route") == route and request_id in chosen:
            inputs[request_id] = request
    rows = []
    for prediction in predictions:
        request_id = str(prediction.get("request_id"))
        found = chosen.get(request_id)
        if found is None or prediction.get("route") != route:
            continue
        rows.append(make_row(route, prediction, inputs.get(request_id), found[0], found[1]))
    rows.sort(key=row_order)  # stable: repeats of one prediction stay in read order
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
    files: tuple[Mapping[str, JSONValue], ...]
    ts_outcome_min: float | None
    ts_outcome_max: float | None
    json_columns: tuple[str, ...]
    created_at: float

    def to_dict(self) -> JSONObject:
        return {"format_version": FORMAT_VERSION, "route": self.route, "path": self.path, "reason": self.reason,
                "window_start": self.window_start, "window_end": self.window_end, "rows": self.rows,
                "serving_rows": self.serving_rows, "shadow_rows": self.shadow_rows, "files": list(self.files),
                "ts_outcome_min": self.ts_outcome_min, "ts_outcome_max": self.ts_outcome_max,
                "json_columns": list(self.json_columns), "columns": list(COLUMNS), "created_at": self.created_at}


def _arrow() -> ModuleType:
    try:
        import pyarrow
    except ImportError:
        raise ExportError("exporting training data needs pyarrow: pip install pyarrow") from None
    return pyarrow


def _conversion_errors(pa: ModuleType) -> tuple[type[BaseException], ...]:
    return (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError)


class SchemaProbe:
    """The Arrow type of every column over all row groups of an export, seen one group at a time
    (so the schema of the first Parquet file already fits the last row)."""

    def __init__(self) -> None:
        self._types: dict[str, pa.DataType] = {}
        self._json: set[str] = set()

    def add(self, rows: Sequence[Mapping[str, JSONValue]]) -> None:
        """Take one row group's values into account."""
        pa = _arrow()
        for column in COLUMNS:
            if column in self._json:
                continue
            try:
                array = pa.array([row.get(column) for row in rows])
            except _conversion_errors(pa):
                self._json.add(column)
                continue
            if pa.types.is_null(array.type):
                continue
            known = self._types.get(column)
            if known is None or known == array.type:
                self._types[column] = array.type
                continue
            try:
                unified = pa.unify_schemas([pa.schema([(column, known)]), pa.schema([(column, array.type)])],
                                           promote_options="permissive")
            except _conversion_errors(pa):
                self._json.add(column)
                self._types.pop(column, None)
                continue
            self._types[column] = unified.field(column).type

    def schema(self) -> tuple[pa.Schema, tuple[str, ...]]:
        """(pyarrow Schema, the columns written as JSON text)."""
        pa = _arrow()
        fields = []
        for column in COLUMNS:
            if column in self._json:
                fields.append(pa.field(column, pa.string()))
            elif column in self._types:
                fields.append(pa.field(column, self._types[column]))
            else:
                fields.append(pa.field(column, pa.float64() if column in FLOAT_COLUMNS else pa.null()))
        return pa.schema(fields), tuple(c for c in COLUMNS if c in self._json)


def to_table(rows: Sequence[Mapping[str, JSONValue]], schema: pa.Schema, json_columns: Sequence[str]) -> pa.Table:
    """A pyarrow Table of `rows` with `schema` (from SchemaProbe). Raises ExportError when a value
    does not fit its column's type (rows that SchemaProbe did not see)."""
    pa = _arrow()
    arrays = []
    for field in schema:
        values = [row.get(field.name) for row in rows]
        if field.name in json_columns:
            values = [None if v is None else json.dumps(v, sort_keys=True) for v in values]
        try:
            arrays.append(pa.array(values, type=field.type))
        except _conversion_errors(pa) as exc:
            raise ExportError(f"column {field.name}: a value does not fit the type {field.type}: {exc}") from None
    return pa.Table.from_arrays(arrays, schema=schema)


def _filesystem(destination: str) -> tuple[pafs.FileSystem, str]:
    try:
        import pyarrow.fs as pafs
    except ImportError:
        raise ExportError("exporting training data needs pyarrow: pip install pyarrow") from None
    if "://" in destination:
        try:
            return pafs.FileSystem.from_uri(destination)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for bad URIs and missing credentials
            raise ExportError(f"cannot open export destination {destination}: {exc}") from None
    return pafs.LocalFileSystem(), os.path.abspath(destination)


def _stamp(ts: float | None) -> str:
    return "open" if ts is None else time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(ts))


class ExportWriter:
    """One export folder, written a row group at a time (see the module docstring).

    Memory: the row group being written (pyarrow holds one group's column chunks until it is
    flushed to the file). ``rows_per_file`` rows go to one part file. The folder is made at once
    (an unwritable destination fails before any work); `schema` (from SchemaProbe) may be set
    later, before the first write. Raises ExportError when the destination cannot be written.
    """

    def __init__(self, destination: str, route: str, window_start: float, window_end: float | None,
                 schema: pa.Schema | None = None, json_columns: Sequence[str] = (), reason: str = "manual",
                 rows_per_file: int = 100_000, now: float | None = None) -> None:
        if rows_per_file < 1:
            raise ValueError(f"rows_per_file must be >= 1, got {rows_per_file}")
        self._fs, root = _filesystem(destination)
        self.folder = f"{root.rstrip('/')}/{route}/{_stamp(window_start)}_{_stamp(window_end)}_{uuid.uuid4().hex[:8]}"
        self.route, self.reason, self.window = route, reason, (window_start, window_end)
        self.schema, self.json_columns, self.rows_per_file, self._now = schema, tuple(json_columns), rows_per_file, now
        self.files: list[JSONObject] = []
        self.rows = self.shadow_rows = 0
        self._ts_min: float | None = None
        self._ts_max: float | None = None
        self._stream: pa.NativeFile | None = None
        self._writer: pq.ParquetWriter | None = None
        self._temporary = ""
        self._part_rows = 0
        try:
            self._fs.create_dir(self.folder, recursive=True)
        except OSError as exc:
            raise ExportError(f"cannot write the export to {self.folder}: {exc}") from None

    @property
    def bytes_written(self) -> int:
        """Bytes of the part files so far (the open one included)."""
        done = sum(int(entry["bytes"] or 0) for entry in self.files)
        return done + (int(self._stream.tell()) if self._stream is not None else 0)

    def write(self, rows: Sequence[Mapping[str, JSONValue]]) -> None:
        """Append rows (one row group per part file they land in)."""
        begin = 0
        try:
            while begin < len(rows):
                writer = self._writer if self._writer is not None else self._open_part()
                schema = self.schema
                if schema is None:  # as _open_part says, for a part opened before the schema was unset
                    raise ValueError("ExportWriter: set the schema before writing")
                chunk = rows[begin:begin + self.rows_per_file - self._part_rows]
                writer.write_table(to_table(chunk, schema, self.json_columns))
                self._count(chunk)
                self._part_rows += len(chunk)
                begin += len(chunk)
                if self._part_rows >= self.rows_per_file:
                    self._close_part()
        except OSError as exc:
            raise ExportError(f"cannot write the export to {self.folder}: {exc}") from None

    def commit(self) -> Manifest:
        """Close the last part file and write manifest.json (the folder is then complete)."""
        try:
            if self._writer is None and not self.files:
                self._open_part()  # an empty window still gets one (empty) file with the schema
            if self._writer is not None:
                self._close_part()
            manifest = Manifest(route=self.route, path=self.folder, reason=self.reason, window_start=self.window[0],
                                window_end=self.window[1], rows=self.rows, serving_rows=self.rows - self.shadow_rows,
                                shadow_rows=self.shadow_rows, files=tuple(self.files), ts_outcome_min=self._ts_min,
                                ts_outcome_max=self._ts_max, json_columns=self.json_columns,
                                created_at=time.time() if self._now is None else self._now)
            temporary = f"{self.folder}/.tmp-{uuid.uuid4().hex}-{MANIFEST}"
            with self._fs.open_output_stream(temporary) as stream:
                stream.write(json.dumps(manifest.to_dict(), indent=2).encode())
            self._fs.move(temporary, f"{self.folder}/{MANIFEST}")
        except OSError as exc:
            raise ExportError(f"cannot write the export to {self.folder}: {exc}") from None
        return manifest

    def abort(self) -> None:
        """Drop everything written (no manifest was; nothing may stay behind that looks like data)."""
        for closer in (self._writer, self._stream):
            if closer is not None:
                try:
                    closer.close()
                except (OSError, ValueError):
                    pass  # already broken: the folder is deleted below
        self._writer = self._stream = None
        try:
            self._fs.delete_dir(self.folder)
        except OSError:
            pass  # best effort: a folder without a manifest is incomplete by definition

    def _open_part(self) -> pq.ParquetWriter:
        import pyarrow.parquet as pq

        if self.schema is None:
            raise ValueError("ExportWriter: set the schema before writing")

        name = f"part-{len(self.files):05d}.parquet"
        self._temporary = f"{self.folder}/.tmp-{uuid.uuid4().hex}-{name}"
        self._stream = self._fs.open_output_stream(self._temporary)
        self._writer = pq.ParquetWriter(self._stream, self.schema)
        self._part_rows = 0
        return self._writer

    def _close_part(self) -> None:
        for closer in (self._writer, self._stream):  # both open: _close_part follows an _open_part
            if closer is not None:
                closer.close()
        self._writer = self._stream = None
        name = f"part-{len(self.files):05d}.parquet"
        self._fs.move(self._temporary, f"{self.folder}/{name}")
        self.files.append({"name": name, "rows": self._part_rows, "bytes": self._fs.get_file_info(f"{self.folder}/{name}").size})

    def _count(self, rows: Sequence[Mapping[str, JSONValue]]) -> None:
        self.rows += len(rows)
        for row in rows:
            if row.get("shadow"):
                self.shadow_rows += 1
            ts = row.get("ts_outcome")
            if isinstance(ts, (int, float)):
                self._ts_min = ts if self._ts_min is None else min(self._ts_min, ts)
                self._ts_max = ts if self._ts_max is None else max(self._ts_max, ts)


def write_export(rows: Sequence[Mapping[str, JSONValue]], destination: str, route: str, window_start: float,
                 window_end: float | None, reason: str = "manual", rows_per_file: int = 100_000,
                 now: float | None = None, row_group_rows: int = 10_000) -> Manifest:
    """Write `rows` (a list, e.g. from join_rows) as Parquet files plus manifest.json; return the manifest.

    Raises ExportError when pyarrow is missing or the destination cannot be written.
    """
    if rows_per_file < 1 or row_group_rows < 1:
        raise ValueError(f"rows_per_file and row_group_rows must be >= 1, got {rows_per_file}, {row_group_rows}")
    probe = SchemaProbe()
    groups = [rows[begin:begin + row_group_rows] for begin in range(0, len(rows), row_group_rows)]
    for group in groups:
        probe.add(group)
    schema, json_columns = probe.schema()
    writer = ExportWriter(destination, route, window_start, window_end, schema, json_columns, reason, rows_per_file,
                          now)
    try:
        for group in groups:
            writer.write(group)
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def read_export(folder: str) -> tuple[JSONObject, pa.Table | None]:
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
