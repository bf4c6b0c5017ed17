"""The demo's models: real scikit-learn fits exported to ONNX, a Triton-style repository, atomic releases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import yaml

from demo.models import INPUT_NAME, ReferenceProfile, build_repository, load_dataset, publish, train_all
from demo.scenario import Scenario


@pytest.fixture(scope="module")
def trained():  # type: ignore[no-untyped-def]
    scenario = Scenario.quick()
    dataset = load_dataset(scenario.seed)
    versions = train_all(dataset, scenario.shifted(dataset.x_pool, dataset.feature_names), "gbm", scenario.seed)
    return dataset, versions


def test_arms_differ_clearly_and_the_broken_release_is_worse(trained) -> None:  # type: ignore[no-untyped-def]
    dataset, versions = trained
    accuracy = {key: float((v.pool_labels == dataset.y_pool).mean()) for key, v in versions.items()}
    # fixed seed; the margins are what the bandit needs to separate the arms within the quick run
    assert accuracy[("gbm", 1)] > accuracy[("stump", 1)] + 0.03 > accuracy[("nb", 1)] + 0.1
    assert accuracy[("gbm", 2)] < accuracy[("stump", 1)] - 0.2
    assert accuracy[("forest", 1)] > 0.9


def test_repository_layout_outputs_and_atomic_release(trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dataset, versions = trained
    repository = tmp_path / "models"
    build_repository(repository, versions, dataset)
    for model in ("gbm", "stump", "nb", "forest"):
        config = yaml.safe_load((repository / model / "config.yaml").read_text())
        assert config["score_output"] == "probabilities" and config["features"] == dataset.feature_names
        assert ReferenceProfile.load(repository / model / "1" / "reference.json").feature_names == dataset.feature_names
    session = onnxruntime.InferenceSession(str(repository / "nb" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    outputs = {o.name: o for o in session.get_outputs()}
    assert outputs["label"].type == "tensor(int64)" and outputs["probabilities"].type == "tensor(float)"
    label, probabilities = session.run(["label", "probabilities"], {INPUT_NAME: dataset.x_pool[:5]})
    assert label.shape == (5,) and probabilities.shape == (5, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert not (repository / "gbm" / "2").exists()
    publish(repository, versions[("gbm", 2)], dataset)
    assert sorted(p.name for p in (repository / "gbm").iterdir()) == ["1", "2", "config.yaml"]  # no temp folder left
    with pytest.raises(FileExistsError):
        publish(repository, versions[("gbm", 2)], dataset)


def test_references_carry_the_thresholds_the_gateway_needs(trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Every published reference.json holds the thresholds of its monitors at the demo's ARL0, so
    the gateway builds them without simulating. The keys come from a cache file here (filled with
    made-up values: this test is about which keys are stored, not about the statistics)."""
    import json

    from banditgate.drift.calibration import calibrations_run, clear_memo
    from banditgate.drift.monitor import FeatureDriftMonitor, ScoreDriftMonitor, profile_keys
    from demo.models import calibrate_references, reference_profile

    dataset, versions = trained
    wanted = {key for version in versions.values() for key in profile_keys(reference_profile(version, dataset), 10_000)}
    assert len(wanted) < 2 * len(versions)  # the versions share the pool: their feature keys coincide
    cache = tmp_path / "cache.json"
    cache.write_text(json.dumps({key: 30.0 + index for index, key in enumerate(sorted(wanted))}))
    assert calibrate_references(versions, dataset, 10_000, cache=cache) == 0  # nothing left to calibrate
    repository = tmp_path / "models"
    build_repository(repository, versions, dataset)
    publish(repository, versions[("gbm", 2)], dataset)
    clear_memo()
    for model, version in (("gbm", 1), ("forest", 1), ("gbm", 2)):
        profile = ReferenceProfile.load(repository / model / str(version) / "reference.json")
        assert set(profile.thresholds) == set(profile_keys(profile, 10_000))
        FeatureDriftMonitor(profile, family_arl0=10_000)
        ScoreDriftMonitor(profile, arl0=10_000)
    assert calibrations_run() == 0
    for version in versions.values():
        version.reference = None  # the module-scoped fixture is shared with the other tests
