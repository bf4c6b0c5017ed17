"""Real models for the demo: scikit-learn on the Wisconsin breast-cancer data, exported to ONNX.

The data ships inside scikit-learn (`load_breast_cancer`: 569 rows, 30 numeric features), so
nothing is downloaded. Label 1 is *malignant* (the condition to find). A stratified split keeps
60% of the rows for training and 40% as the held-out pool the simulated product service samples
its requests from, so every reward in the demo is earned on rows the models never saw.

Arms of clearly different quality: gradient boosting (the best), a depth-1 tree (one threshold
on one feature) and Gaussian naive Bayes on three weak features; the shadow is a random forest.
The broken release is gradient boosting refit on shuffled labels.

Each version goes into a Triton-style repository as `<model>/<version>/model.onnx` with its drift
reference profile `reference.json`, written into a temporary folder and renamed into place, so
the gateway (which polls the repository) never sees half a version. The profiles carry the drift
monitors' calibrated thresholds (`calibrate_references`, as `banditgate profile` does), so the
gateway builds its monitors at once instead of simulating for seconds per model at start.

Reference profiles are built on the held-out pool, not on the training rows: the models are
over-confident on rows they were fit on (the forest's training scores are mostly 0 or 1), so a
score monitor against training scores alarms on the first few hundred honest requests; and the
bin frequencies of 341 training rows and of a 228-row pool differ by their own sampling noise,
which a per-feature CUSUM detects within ~500 requests. The pool is the in-control distribution
of this demo's traffic, as a production reference window is for real traffic.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from banditgate.drift.reference import ReferenceProfile

ROUTE = "diagnosis"
INPUT_NAME = "features"
CLASS_NAMES = ["benign", "malignant"]
NB_FEATURES = ("mean_smoothness", "mean_symmetry", "mean_fractal_dimension")
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
REFERENCE_BINS = 8
"""Quantile bins per feature in the reference profiles: ~28 pool rows per bin. With 8, every
feature of this pool has the same bin frequencies, so the gateway calibrates one feature
threshold instead of three (bins=10 leaves some features with tied edges): a third of the
start-up cost, and no slower to detect the shift."""


@dataclass(frozen=True)
class Dataset:
    """Training rows and the held-out pool (float32 features, int64 labels, 1 = malignant)."""

    feature_names: list[str]
    x_train: np.ndarray
    y_train: np.ndarray
    x_pool: np.ndarray
    y_pool: np.ndarray


def load_dataset(seed: int) -> Dataset:
    """The breast-cancer data, split 60/40 (stratified, seeded)."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    data = load_breast_cancer()
    x = data.data.astype(np.float32)
    y = (1 - data.target).astype(np.int64)  # scikit-learn codes malignant as 0
    names = [name.replace(" ", "_") for name in data.feature_names]
    x_train, x_pool, y_train, y_pool = train_test_split(x, y, test_size=0.4, stratify=y, random_state=seed)
    return Dataset(names, x_train, y_train, x_pool, y_pool)


@dataclass(frozen=True)
class ModelSpec:
    """A model the demo trains: repository name, role, one line for people, how to build it."""

    model: str
    role: str  # "arm" or "shadow"
    description: str
    build: Callable[[list[str], int], Any]


def _gbm(_names: list[str], seed: int) -> Any:
    from sklearn.ensemble import GradientBoostingClassifier

    return GradientBoostingClassifier(n_estimators=100, max_depth=2, random_state=seed)


def _stump(_names: list[str], seed: int) -> Any:
    from sklearn.tree import DecisionTreeClassifier

    return DecisionTreeClassifier(max_depth=1, random_state=seed)


def _naive_bayes(names: list[str], _seed: int) -> Any:
    from sklearn.compose import ColumnTransformer
    from sklearn.naive_bayes import GaussianNB
    from sklearn.pipeline import Pipeline

    columns = [names.index(name) for name in NB_FEATURES]
    return Pipeline([("select", ColumnTransformer([("keep", "passthrough", columns)], remainder="drop")),
                     ("nb", GaussianNB())])


def _forest(_names: list[str], seed: int) -> Any:
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=60, max_depth=6, random_state=seed, n_jobs=1)


SPECS = (
    ModelSpec("gbm", "arm", "gradient boosting, 100 trees of depth 2, all 30 features", _gbm),
    ModelSpec("stump", "arm", "decision stump: one threshold on one feature", _stump),
    ModelSpec("nb", "arm", f"Gaussian naive Bayes on {', '.join(NB_FEATURES)}", _naive_bayes),
    ModelSpec("forest", "shadow", "random forest, 60 trees of depth <= 6 (shadow candidate)", _forest),
)
BROKEN_DESCRIPTION = "gradient boosting refit on shuffled labels (a broken label join in the retraining pipeline)"
RETRAIN_MODEL = "stump"
"""The arm whose retrained version arrives mid-run and goes through a progressive rollout."""
RETRAIN_DESCRIPTION = ("decision tree of depth 3 retrained on labels with the classes swapped (a retraining "
                       "pipeline bug): must be rejected as a shadow, never serving")


@dataclass
class ModelVersion:
    """One trained, exported model version and what it predicts on the held-out pool."""

    model: str
    version: int
    role: str
    description: str
    onnx: bytes
    pool_labels: np.ndarray
    """Predicted label per pool row (ONNX Runtime on the exported file: exactly what is served)."""
    pool_labels_shifted: np.ndarray
    """The same after the scenario's covariate shift."""
    pool_scores: np.ndarray
    """P(malignant) per pool row: the score distribution of the drift reference."""
    reference: ReferenceProfile | None = None
    """The drift reference profile with calibrated thresholds (calibrate_references); None: publish
    builds one without thresholds."""
    published: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int]:
        return self.model, self.version


def export_onnx(estimator: Any, n_features: int) -> bytes:
    """skl2onnx export: input `features` FP32 [N, n_features]; outputs `label` INT64 [N] and
    `probabilities` FP32 [N, 2] (no ZipMap, so the gateway gets plain tensors)."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    onx = to_onnx(estimator, initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))],
                  options={id(final): {"zipmap": False}}, target_opset=TARGET_OPSET)
    return onx.SerializeToString()


def _predict(onnx_bytes: bytes, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels and P(malignant) as the gateway computes them. One intra-op thread, as the demo's
    config gives the gateway: with more, ONNX Runtime splits tree ensembles across threads and
    the sums come out 1 ulp apart depending on the batch size, which moves scores that sit
    exactly on a reference bin edge into the next bin."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    labels, probabilities = session.run(["label", "probabilities"], {INPUT_NAME: rows.astype(np.float32)})
    return np.asarray(labels, dtype=np.int64), np.asarray(probabilities, dtype=np.float32)[:, 1]


def _version(model: str, version: int, role: str, description: str, estimator: Any, dataset: Dataset,
             shifted_pool: np.ndarray) -> ModelVersion:
    onnx_bytes = export_onnx(estimator, len(dataset.feature_names))
    labels, scores = _predict(onnx_bytes, dataset.x_pool)
    labels_shifted, _ = _predict(onnx_bytes, shifted_pool)
    return ModelVersion(model, version, role, description, onnx_bytes, labels, labels_shifted, scores)


def train_all(dataset: Dataset, shifted_pool: np.ndarray, broken_model: str,
              seed: int) -> dict[tuple[str, int], ModelVersion]:
    """Fit and export every version the demo uses: version 1 of each spec, version 2 of
    `broken_model` (fit on shuffled labels, published mid-run) and version 2 of RETRAIN_MODEL (fit
    on swapped classes, published mid-run into its rollout). Raises ValueError for an
    unknown `broken_model`."""
    versions: dict[tuple[str, int], ModelVersion] = {}
    specs = {spec.model: spec for spec in SPECS}
    if broken_model not in specs:
        raise ValueError(f"unknown model to break: {broken_model!r}")
    for spec in SPECS:
        estimator = spec.build(dataset.feature_names, seed).fit(dataset.x_train, dataset.y_train)
        versions[(spec.model, 1)] = _version(spec.model, 1, spec.role, spec.description, estimator, dataset,
                                             shifted_pool)
    shuffled = np.random.default_rng(seed).permutation(dataset.y_train)
    broken = specs[broken_model].build(dataset.feature_names, seed).fit(dataset.x_train, shuffled)
    versions[(broken_model, 2)] = _version(broken_model, 2, specs[broken_model].role, BROKEN_DESCRIPTION, broken,
                                           dataset, shifted_pool)
    from sklearn.tree import DecisionTreeClassifier

    retrained = DecisionTreeClassifier(max_depth=3, random_state=seed).fit(dataset.x_train, 1 - dataset.y_train)
    versions[(RETRAIN_MODEL, 2)] = _version(RETRAIN_MODEL, 2, "arm", RETRAIN_DESCRIPTION, retrained, dataset,
                                            shifted_pool)
    return versions


def reference_profile(version: ModelVersion, dataset: Dataset) -> ReferenceProfile:
    """The version's drift reference: the held-out pool and the version's scores on it."""
    return ReferenceProfile.build(dataset.x_pool, dataset.feature_names, scores=version.pool_scores,
                                  bins=REFERENCE_BINS)


def calibrate_references(versions: dict[tuple[str, int], ModelVersion], dataset: Dataset, arl0: float,
                         workers: int = 2, cache: Path | None = None) -> int:
    """Give every version its reference profile with the thresholds the gateway's monitors need at
    `drift.arl0` = arl0, calibrating each distinct key once, `workers` at a time in processes
    (the versions share the pool, so their feature keys coincide; their score keys mostly
    differ). `cache`: a JSON file of thresholds by key kept between runs (a key names exactly
    the calibration's inputs, so a cached value is the value a simulation would give). Returns
    the number of keys calibrated now (not found in the cache)."""
    from concurrent.futures import ProcessPoolExecutor
    import json
    import multiprocessing

    from banditgate.drift.adaptive import EstimatorSettings
    from banditgate.drift.calibration import feature_threshold
    from banditgate.drift.monitor import profile_keys

    settings = EstimatorSettings()
    profiles = {key: reference_profile(version, dataset) for key, version in versions.items()}
    wanted = {}
    for profile in profiles.values():
        wanted.update(profile_keys(profile, arl0, settings))
    known = _read_cache(cache)
    jobs = {key: (np.asarray(feature.probabilities + (feature.missing_probability,)), feature.count, feature_arl0,
                  settings) for key, (feature, feature_arl0) in wanted.items() if key not in known}
    thresholds = {key: known[key] for key in wanted if key in known}
    if jobs:
        with ProcessPoolExecutor(max(1, min(workers, len(jobs))),
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {key: pool.submit(feature_threshold, *job) for key, job in jobs.items()}
            thresholds.update({key: future.result() for key, future in futures.items()})
        if cache is not None:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                temporary = cache.with_name(f".{cache.name}.{os.getpid()}")
                temporary.write_text(json.dumps({**known, **thresholds}, indent=1, sort_keys=True))
                os.replace(temporary, cache)
            except OSError:
                pass  # a cache, not a result: the next run calibrates again
    for key, version in versions.items():
        needed = profile_keys(profiles[key], arl0, settings)
        version.reference = profiles[key].with_thresholds({k: thresholds[k] for k in needed})
    return len(jobs)


def _read_cache(cache: Path | None) -> dict[str, float]:
    import json
    import math

    if cache is None:
        return {}
    try:
        document = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(document, dict):
        return {}
    return {str(k): float(v) for k, v in document.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0}


def write_model_config(repository: Path, model: str, feature_names: list[str]) -> Path:
    """`<repository>/<model>/config.yaml`: outputs, class names, score output and feature names."""
    folder = repository / model
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({"outputs": ["label", "probabilities"], "labels": CLASS_NAMES,
                                    "score_output": "probabilities", "features": list(feature_names),
                                    "providers": ["CPUExecutionProvider"]}, sort_keys=False))
    return path


def publish(repository: Path, version: ModelVersion, dataset: Dataset) -> Path:
    """Write `model.onnx` and `reference.json` of `version` into a temporary folder beside the
    version folders and rename it into place (atomic on one file system). Returns the folder.
    Raises FileExistsError if the version is already there."""
    folder = repository / version.model
    target = folder / str(version.version)
    if target.exists():
        raise FileExistsError(f"{target} already exists")
    folder.mkdir(parents=True, exist_ok=True)
    incoming = folder / f".incoming-{version.version}-{os.getpid()}"
    shutil.rmtree(incoming, ignore_errors=True)
    incoming.mkdir()
    try:
        (incoming / "model.onnx").write_bytes(version.onnx)
        profile = version.reference or reference_profile(version, dataset)
        profile.save(incoming / "reference.json")
        os.rename(incoming, target)
    except BaseException:
        shutil.rmtree(incoming, ignore_errors=True)
        raise
    version.published = True
    return target


def build_repository(repository: Path, versions: dict[tuple[str, int], ModelVersion], dataset: Dataset) -> None:
    """A fresh repository with every model's config.yaml and version 1 of each model."""
    repository.mkdir(parents=True, exist_ok=True)
    for spec in SPECS:
        write_model_config(repository, spec.model, dataset.feature_names)
        publish(repository, versions[(spec.model, 1)], dataset)
