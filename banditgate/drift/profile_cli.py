"""`banditgate profile`: build a model version's reference.json from its training data.

Reads CSV (header row), Parquet or .npy; if `<repository>/<model>/<version>/model.onnx` exists,
runs it with ONNX Runtime to profile the prediction scores too; calibrates the drift monitors'
CUSUM thresholds for the given ARL0s (the gateway's `drift.arl0`) and stores them in the
profile, so a gateway loading it simulates nothing; writes reference.json beside the model
atomically.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from banditgate.drift.reference import ProfileError, ReferenceProfile

if TYPE_CHECKING:  # both optional (the drift extra): imported where they are used
    import onnxruntime
    import pyarrow

DEFAULT_ARL0 = 10_000.0
"""The gateway's default `drift.arl0` (banditgate.config.DriftConfig)."""

INFERENCE_ROWS = 65_536  # rows per ONNX call: bounded memory on large training sets


class ProfileBuildError(Exception):
    """`banditgate profile` could not build the profile; one line saying what and where."""

    user_facing = True


def load_table(path: Path) -> dict[str, np.ndarray]:
    """Columns of a CSV (with header), Parquet or .npy file; numbers as float64 (missing = NaN),
    text as object arrays (missing = None). Raises ProfileBuildError if unreadable."""
    if not path.is_file():
        raise ProfileBuildError(f"{path}: no such data file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
            if array.ndim == 1:
                array = array[:, None]
            if array.ndim != 2:
                raise ProfileBuildError(f"{path}: expected a 2-D array [rows, features], got shape {array.shape}")
            return {f"x{index}": array[:, index] for index in range(array.shape[1])}
        if suffix in (".parquet", ".pq"):
            from pyarrow import parquet

            return _from_arrow(parquet.read_table(path))
        if suffix in (".csv", ".txt"):
            try:
                import pyarrow.csv as arrow_csv
            except ImportError:
                table = np.genfromtxt(path, delimiter=",", names=True, dtype=None, encoding="utf-8")
                return {name: np.asarray(table[name]) for name in table.dtype.names or ()}
            return _from_arrow(arrow_csv.read_csv(path))
    except ProfileBuildError:
        raise
    except ImportError as exc:
        raise ProfileBuildError(f"{path}: reading {suffix} files needs {exc.name} (pip install pyarrow)") from None
    except Exception as exc:  # noqa: BLE001 - any reader failure is the user's file; say so in one line
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ProfileBuildError(f"{path}: cannot read data ({first_line})") from None
    raise ProfileBuildError(f"{path}: unsupported data format {suffix!r} (use .csv, .parquet or .npy)")


def _from_arrow(table: pyarrow.Table) -> dict[str, np.ndarray]:
    import pyarrow as arrow

    columns: dict[str, np.ndarray] = {}
    for name, column in zip(table.column_names, table.columns):
        kind = column.type
        if arrow.types.is_integer(kind) or arrow.types.is_floating(kind):
            columns[name] = column.cast(arrow.float64()).to_numpy(zero_copy_only=False).astype(float)
        else:  # text, booleans and anything else: categorical
            columns[name] = np.asarray(column.to_pylist(), dtype=object)
    return columns


def _scores(model_path: Path, columns: dict[str, np.ndarray]) -> tuple[np.ndarray, str]:
    """Run the model over the rows; return its score per row and the output used."""
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - a broken model file is the user's to fix; one line
        raise ProfileBuildError(f"{model_path}: cannot load model ({str(exc).splitlines()[0]})") from None
    inputs = session.get_inputs()
    names = list(columns)
    rows = len(next(iter(columns.values())))
    if len(inputs) == 1:
        width = inputs[0].shape[-1] if len(inputs[0].shape) >= 2 else 1
        if isinstance(width, int) and width != len(names):
            raise ProfileBuildError(f"{model_path}: model input {inputs[0].name!r} takes {width} columns, "
                                    f"the data has {len(names)}")
        try:
            matrix = np.column_stack([np.asarray(columns[name], dtype=np.float32) for name in names])
        except (TypeError, ValueError):
            raise ProfileBuildError(f"{model_path}: the model takes one float tensor but the data has "
                                    "non-numeric columns") from None
        feeds = lambda lo, hi: {inputs[0].name: matrix[lo:hi]}  # noqa: E731 - tiny closure
    else:
        absent = [i.name for i in inputs if i.name not in columns]
        if absent:
            raise ProfileBuildError(f"{model_path}: model inputs {absent} are not data columns")
        feeds = lambda lo, hi: {i.name: _typed(columns[i.name][lo:hi], i.type)[:, None] for i in inputs}  # noqa: E731
    output = _score_output(session)
    parts = []
    for lo in range(0, rows, INFERENCE_ROWS):
        try:
            result = session.run([output], feeds(lo, min(rows, lo + INFERENCE_ROWS)))[0]
        except Exception as exc:  # noqa: BLE001 - shape/type mismatches come from the data; one line
            raise ProfileBuildError(f"{model_path}: inference failed ({str(exc).splitlines()[0]})") from None
        parts.append(_score_column(result))
    return np.concatenate(parts) if parts else np.zeros(0), output


def _typed(values: np.ndarray, onnx_type: str) -> np.ndarray:
    if "string" in onnx_type:
        return np.asarray([("" if v is None else str(v)) for v in values], dtype=object)
    if "int64" in onnx_type:
        return np.asarray(values, dtype=np.int64)
    return np.asarray(values, dtype=np.float32)


def _score_output(session: onnxruntime.InferenceSession) -> str:
    outputs = session.get_outputs()
    for output in outputs:  # a classifier's probabilities first: they are the score that drifts
        if "prob" in output.name.lower():
            return str(output.name)
    for output in outputs:
        if "float" in output.type or "double" in output.type:
            return str(output.name)
    raise ProfileBuildError("the model has no float or probability output to profile")


def _score_column(result: Any) -> np.ndarray:  # Any: onnxruntime's InferenceSession.run output (untyped)
    if isinstance(result, list):  # ZipMap: one {class: probability} per row; positive = last class
        if not result:
            return np.zeros(0)
        key = max(result[0])
        return np.asarray([row[key] for row in result], dtype=float)
    array = np.asarray(result, dtype=float)
    if array.ndim == 2 and array.shape[1] == 2:
        return array[:, 1]  # binary classifier: the positive class
    if array.ndim == 2 and array.shape[1] > 2:
        return array.max(axis=1)  # multiclass: the winning class's probability
    return array.reshape(array.shape[0], -1)[:, 0]


def calibrated(profile: ReferenceProfile, arl0s: Sequence[float]) -> ReferenceProfile:
    """`profile` with the thresholds its gateway monitors need at each `drift.arl0` in `arl0s`.
    Raises ProfileBuildError for an ARL0 the monitors refuse."""
    from banditgate.drift.monitor import profile_thresholds

    thresholds: dict[str, float] = {}
    for arl0 in arl0s:
        try:
            thresholds.update(profile_thresholds(profile, arl0))
        except ValueError as exc:  # CalibrationError included
            raise ProfileBuildError(f"--arl0 {arl0:g}: {exc}") from None
    return profile.with_thresholds(thresholds)


def build_profile(repository: str, model: str, version: int, data: str, bins: int = 10,
                  arl0s: Sequence[float] = (DEFAULT_ARL0,)) -> int:
    """Profile `data` for `<repository>/<model>/<version>/` and write reference.json there, with
    the drift thresholds calibrated for each `drift.arl0` in `arl0s` (none: the gateway
    calibrates them when it loads the model). Returns 0. Raises ProfileBuildError (one line) for
    a missing file or model directory, unreadable data, data whose width does not match the
    model's input, or an ARL0 below 10."""
    version_dir = Path(repository) / model / str(version)
    if not version_dir.is_dir():
        raise ProfileBuildError(f"{version_dir}: no such model version directory "
                                f"(expected <repository>/<model>/<version>/)")
    if bins < 1:
        raise ProfileBuildError(f"--bins must be at least 1, got {bins}")
    columns = load_table(Path(data))
    if not columns or len(next(iter(columns.values()))) == 0:
        raise ProfileBuildError(f"{data}: no rows")
    model_path = version_dir / "model.onnx"
    scores, output = (None, "")
    if model_path.is_file():
        scores, output = _scores(model_path, columns)
    try:
        profile = ReferenceProfile.build(columns, scores=scores, bins=bins)
    except ProfileError as exc:
        raise ProfileBuildError(f"{data}: {exc}") from None
    started = time.monotonic()
    profile = calibrated(profile, arl0s)
    calibration_note = (f", {len(profile.thresholds)} drift thresholds for ARL0 "
                        f"{', '.join(f'{a:g}' for a in arl0s)} calibrated in {time.monotonic() - started:.1f}s"
                        if arl0s else ", no drift thresholds (the gateway calibrates them at load)")
    target = version_dir / "reference.json"
    profile.save(target)
    kinds = [feature.kind for feature in profile.features]
    rows = profile.features[0].count
    score_note = f", scores from output {output!r}" if scores is not None else ", no model.onnx: no scores"
    print(f"profiled {rows} rows, {len(kinds)} features ({kinds.count('numeric')} numeric, "
          f"{kinds.count('categorical')} categorical){score_note}{calibration_note} -> {target} "
          f"({target.stat().st_size} bytes)", file=sys.stdout)
    return 0
