"""A model version's drift reference profile: fixed-size binned summaries of its training data.

The profile holds, per feature, quantile bin edges and bin frequencies (numeric) or the top-k
categories with an "other" bucket (categorical), the share of missing values, and the number
of reference rows (the monitors use it to account for the profile's own sampling error). It
never holds raw rows, so its size depends on the bin counts only.

It may also hold calibrated CUSUM thresholds (`thresholds`, written by `banditgate profile`),
each under the key of exactly the inputs it was calibrated from
(banditgate.drift.calibration.feature_key): a monitor whose inputs give the same key uses it
instead of simulating; any other key is calibrated when the monitor is built. Files without
thresholds load as before.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from banditgate.jsontypes import JSONObject, JSONValue

FORMAT = "banditgate.reference/1"
KINDS = ("numeric", "categorical")
Category = str | int | float


class ProfileError(ValueError):
    """A reference profile is malformed or unreadable; one line naming where."""

    user_facing = True


def is_missing(values: np.ndarray) -> np.ndarray:
    """Boolean mask of missing entries: NaN for numbers; None, NaN or "" for objects."""
    if values.dtype.kind in "fc":
        return np.isnan(values)
    if values.dtype.kind in "iub":
        return np.zeros(values.shape, dtype=bool)
    if values.dtype.kind == "U":
        return values == ""
    return np.fromiter((v is None or v == "" or (isinstance(v, float) and math.isnan(v)) for v in values),
                       dtype=bool, count=values.size)


def _json_category(value: object) -> Category:
    # numpy scalars are not JSON; integral floats stay floats so numeric rows still match them
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    return str(value)


@dataclass(frozen=True)
class FeatureProfile:
    """One feature's reference distribution.

    numeric: `edges` are the inner quantile edges (strictly increasing, finite); value bin j holds
    edges[j-1] <= x < edges[j], so there are len(edges) + 1 value bins.
    categorical: `categories` are the top-k values; the last value bin is "other".
    `probabilities` are the value-bin frequencies in the reference rows and `missing_probability`
    the share of missing values; together they sum to 1. `count` is the number of reference rows.
    Raises ProfileError on an inconsistent profile.
    """

    name: str
    kind: str
    probabilities: tuple[float, ...]
    missing_probability: float = 0.0
    edges: tuple[float, ...] = ()
    categories: tuple[Category, ...] = ()
    count: int = 1

    def __post_init__(self) -> None:
        where = f"feature {self.name!r}"
        if self.kind not in KINDS:
            raise ProfileError(f"{where}: kind must be one of {KINDS}, got {self.kind!r}")
        edges = np.asarray(self.edges, dtype=float)
        if self.kind == "numeric":
            if self.categories:
                raise ProfileError(f"{where}: a numeric feature has no categories")
            if not np.all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0):
                raise ProfileError(f"{where}: bin edges must be finite and strictly increasing")
            expected = len(self.edges) + 1
        else:
            if self.edges:
                raise ProfileError(f"{where}: a categorical feature has no bin edges")
            if len(set(self.categories)) != len(self.categories):
                raise ProfileError(f"{where}: categories must be distinct")
            expected = len(self.categories) + 1
        if len(self.probabilities) != expected:
            raise ProfileError(f"{where}: expected {expected} bin probabilities, got {len(self.probabilities)}")
        probabilities = np.asarray(self.probabilities + (self.missing_probability,), dtype=float)
        if not np.all(np.isfinite(probabilities)) or np.any(probabilities < 0):
            raise ProfileError(f"{where}: probabilities must be finite and non-negative")
        if abs(probabilities.sum() - 1.0) > 1e-6:
            raise ProfileError(f"{where}: probabilities and missing_probability must sum to 1")
        if int(self.count) < 1:
            raise ProfileError(f"{where}: count (reference rows) must be at least 1")

    @property
    def bin_count(self) -> int:
        """Number of bins the monitors track: the value bins plus one missing bin."""
        return len(self.probabilities) + 1

    @classmethod
    def numeric(cls, name: str, values: np.ndarray, bins: int = 10) -> FeatureProfile:
        """Quantile-bin a numeric column (NaN = missing). Tied quantiles merge, so a column with
        few distinct values gets fewer bins. Raises ProfileError if the column is not numeric."""
        try:
            values = np.asarray(values, dtype=float).ravel()
        except (TypeError, ValueError):
            raise ProfileError(f"feature {name!r}: values are not numeric (mark it categorical)") from None
        if values.size == 0:
            raise ProfileError(f"feature {name!r}: no reference rows")
        missing = np.isnan(values)
        present = values[~missing]
        edges = np.zeros(0)
        if present.size:
            clipped = present[np.isfinite(present)]
            if clipped.size:
                # cut between observed values (not interpolated quantiles): ties and discrete columns
                # stay exact, and a live value a rounding step away from a reference value (ONNX
                # Runtime's results vary in the last bit with thread count and batch size) stays in
                # the same bin
                levels = np.linspace(0.0, 1.0, bins + 1)[1:-1]
                quantiles = np.quantile(clipped, levels, method="inverted_cdf")
                edges = np.unique(quantiles)
                # a value that holds several quantiles is a mass point (a 0 in sparse data, a
                # dominant count): give it a bin of its own by also cutting at the next value up,
                # or a 99%-zero binary column would be one bin and its drift invisible
                heavy = edges[np.bincount(np.searchsorted(edges, quantiles), minlength=edges.size) > 1]
                distinct = np.unique(clipped)
                above = np.searchsorted(distinct, heavy, side="right")
                cuts = np.where(above < distinct.size, distinct[np.minimum(above, distinct.size - 1)],
                                np.nextafter(heavy, np.inf))  # the maximum: cut just above it
                edges = np.unique(np.concatenate([edges, cuts]))
                edges = _midpoint_edges(edges, distinct)
        counts = np.bincount(np.searchsorted(edges, present, side="right"), minlength=edges.size + 1)
        return cls(name=name, kind="numeric", probabilities=tuple(float(c) / values.size for c in counts),
                   missing_probability=float(missing.sum()) / values.size,
                   edges=tuple(float(e) for e in edges), count=int(values.size))

    @classmethod
    def categorical(cls, name: str, values: np.ndarray, top_k: int = 20) -> FeatureProfile:
        """Keep the top_k most frequent values (ties by value text, for determinism); the rest
        share an "other" bin. None, NaN and "" are missing."""
        values = np.asarray(values).ravel()
        if values.size == 0:
            raise ProfileError(f"feature {name!r}: no reference rows")
        missing = is_missing(values)
        counter = Counter(_json_category(v) for v in values[~missing].tolist())
        ranked = sorted(counter.items(), key=lambda item: (-item[1], str(item[0])))
        kept = ranked[:top_k]
        other = sum(count for _, count in ranked[top_k:])
        probabilities = [count / values.size for _, count in kept] + [other / values.size]
        return cls(name=name, kind="categorical", probabilities=tuple(probabilities),
                   missing_probability=float(missing.sum()) / values.size,
                   categories=tuple(value for value, _ in kept), count=int(values.size))

    def to_dict(self) -> JSONObject:
        return {"name": self.name, "kind": self.kind, "count": self.count, "edges": list(self.edges),
                "categories": list(self.categories), "probabilities": list(self.probabilities),
                "missing_probability": self.missing_probability}

    @classmethod
    def from_dict(cls, raw: Mapping[str, JSONValue]) -> FeatureProfile:
        if not isinstance(raw, Mapping):
            raise ProfileError("a feature entry must be an object")
        try:
            return cls(name=str(raw["name"]), kind=str(raw["kind"]), count=int(raw["count"]),
                       edges=tuple(float(e) for e in raw.get("edges", ())),
                       categories=tuple(_json_category(c) for c in raw.get("categories", ())),
                       probabilities=tuple(float(p) for p in raw["probabilities"]),
                       missing_probability=float(raw.get("missing_probability", 0.0)))
        except KeyError as exc:
            raise ProfileError(f"feature {raw.get('name', '?')!r}: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ProfileError):
                raise
            raise ProfileError(f"feature {raw.get('name', '?')!r}: {exc}") from None


@dataclass(frozen=True)
class ReferenceProfile:
    """The reference for one model version: one FeatureProfile per model input feature (in input
    column order) and optionally the prediction-score distribution. Fixed size: never raw rows."""

    features: list[FeatureProfile]
    score: FeatureProfile | None = None
    metadata: JSONObject = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    """Calibrated CUSUM thresholds by calibration key (see the module docstring)."""

    def __post_init__(self) -> None:
        names = [feature.name for feature in self.features]
        if len(set(names)) != len(names):
            raise ProfileError("feature names must be distinct")
        for key, value in self.thresholds.items():
            if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value <= 0:
                raise ProfileError(f"threshold {key!r}: must be a positive finite number, got {value!r}")

    def with_thresholds(self, thresholds: Mapping[str, float]) -> ReferenceProfile:
        """A copy that also holds `thresholds` (added to, and overriding, those it has)."""
        return ReferenceProfile(features=self.features, score=self.score, metadata=self.metadata,
                                thresholds={**self.thresholds, **{k: float(v) for k, v in thresholds.items()}})

    @property
    def feature_names(self) -> list[str]:
        return [feature.name for feature in self.features]

    @classmethod
    def build(cls, data: np.ndarray | Mapping[str, np.ndarray], feature_names: Iterable[str] | None = None,
              scores: np.ndarray | None = None, bins: int = 10, top_k: int = 20,
              categorical: Iterable[str] = ()) -> ReferenceProfile:
        """Profile training data: a 2-D array [rows, features] (names from feature_names, default
        x0, x1, ...) or a mapping name -> column (feature_names picks and orders them). Columns of
        text, object or bool dtype, and those named in `categorical`, get top-k profiles; the
        others quantile bins. Raises ProfileError on bad shapes, names or arguments."""
        if bins < 1 or top_k < 1:
            raise ProfileError(f"bins and top_k must be at least 1 (got bins={bins}, top_k={top_k})")
        columns = _columns(data, feature_names)
        lengths = {len(column) for column in columns.values()}
        if len(lengths) > 1:
            raise ProfileError(f"columns have different lengths: {sorted(lengths)}")
        wanted = set(categorical)
        unknown = wanted - set(columns)
        if unknown:
            raise ProfileError(f"categorical names unknown features: {sorted(unknown)}")
        features = [
            FeatureProfile.categorical(name, column, top_k)
            if name in wanted or column.dtype.kind in "OUSb" else FeatureProfile.numeric(name, column, bins)
            for name, column in columns.items()
        ]
        score = None
        if scores is not None:
            scores = np.asarray(scores, dtype=float).ravel()
            if lengths and scores.size != next(iter(lengths)):
                raise ProfileError(f"scores has {scores.size} rows, features have {next(iter(lengths))}")
            score = FeatureProfile.numeric("score", scores, bins)
        return cls(features=features, score=score, metadata={"bins": bins, "top_k": top_k})

    def to_json(self) -> bytes:
        document = {"format": FORMAT, "metadata": self.metadata,
                    "features": [feature.to_dict() for feature in self.features],
                    "score": self.score.to_dict() if self.score is not None else None}
        if self.thresholds:
            document["thresholds"] = dict(sorted(self.thresholds.items()))
        return json.dumps(document, allow_nan=False, indent=1).encode()

    @classmethod
    def from_json(cls, payload: bytes | str, source: str = "reference profile") -> ReferenceProfile:
        """Parse to_json's output. Raises ProfileError naming `source` when it is not a profile."""
        try:
            document = json.loads(payload)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProfileError(f"{source}: not valid JSON ({exc})") from None
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ProfileError(f"{source}: not a banditgate reference profile (format must be {FORMAT!r})")
        try:
            features = document["features"]
            if not isinstance(features, list):
                raise ProfileError("'features' must be a list")
            score = document.get("score")
            thresholds = document.get("thresholds") or {}
            if not isinstance(thresholds, dict):
                raise ProfileError("'thresholds' must be an object of key: threshold")
            return cls(features=[FeatureProfile.from_dict(raw) for raw in features],
                       score=FeatureProfile.from_dict(score) if score is not None else None,
                       metadata=dict(document.get("metadata") or {}), thresholds=dict(thresholds))
        except KeyError as exc:
            raise ProfileError(f"{source}: missing field {exc.args[0]!r}") from None
        except ProfileError as exc:
            raise ProfileError(f"{source}: {exc}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (temporary file in the same folder, then rename), so a reader never
        sees half a profile."""
        target = Path(path)
        payload = self.to_json()
        handle, temporary = tempfile.mkstemp(prefix=".reference-", suffix=".json", dir=target.parent)
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(payload)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ReferenceProfile:
        """Read a saved profile. Raises ProfileError naming the path if it is absent or bad."""
        try:
            payload = Path(path).read_bytes()
        except OSError as exc:
            raise ProfileError(f"{path}: cannot read reference profile ({exc.strerror or exc})") from None
        return cls.from_json(payload, source=str(path))


def _columns(data: np.ndarray | Mapping[str, np.ndarray], feature_names: Iterable[str] | None) -> dict[str, np.ndarray]:
    names = list(feature_names) if feature_names is not None else None
    if isinstance(data, Mapping):
        chosen = names if names is not None else list(data)
        missing = [name for name in chosen if name not in data]
        if missing:
            raise ProfileError(f"feature_names not in data: {missing}")
        return {name: np.asarray(data[name]).ravel() for name in chosen}
    array = np.asarray(data)
    if array.ndim != 2:
        raise ProfileError(f"data must be 2-D [rows, features], got shape {array.shape}")
    if names is None:
        names = [f"x{index}" for index in range(array.shape[1])]
    if len(names) != array.shape[1]:
        raise ProfileError(f"{len(names)} feature names for {array.shape[1]} columns")
    return {name: array[:, index] for index, name in enumerate(names)}


def _midpoint_edges(edges: np.ndarray, distinct: np.ndarray) -> np.ndarray:
    """Move each edge (an observed value, binned with side="right") halfway down to the next lower
    observed value: every reference value keeps its bin, and none sits exactly on an edge."""
    position = np.searchsorted(distinct, edges)
    below = distinct[np.maximum(position - 1, 0)]
    midpoints = (below + edges) / 2.0
    usable = (position > 0) & (midpoints > below) & (midpoints < edges)
    # an edge on the smallest observed value has nothing below it: lower it by a rounding margin
    lowered = edges - 1e-9 * np.maximum(1.0, np.abs(edges))
    return np.where(usable, midpoints, np.where(position == 0, lowered, edges))
