"""`banditgate profile`: data files in, reference.json beside the model out, one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from banditgate.cli import main
from banditgate.drift.profile_cli import ProfileBuildError, build_profile
from banditgate.drift.calibration import calibrations_run, clear_memo
from banditgate.drift.monitor import FeatureDriftMonitor, ScoreDriftMonitor, profile_keys
from banditgate.drift.reference import ReferenceProfile


def _logistic_model(path: Path, features: int) -> None:
    from sklearn.linear_model import LogisticRegression
    from skl2onnx import to_onnx

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, features)).astype(np.float32)
    y = (x[:, 0] + rng.normal(size=400) > 0).astype(int)
    path.write_bytes(to_onnx(LogisticRegression().fit(x, y), x[:1]).SerializeToString())


def _linear_model(path: Path, features: int) -> None:
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.arange(1, features + 1, dtype=np.float32)[:, None], "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["variable"])], "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, features])],
        [helper.make_tensor_value_info("variable", TensorProto.FLOAT, [None, 1])], initializer=[weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    (tmp_path / "models" / "churn" / "3").mkdir(parents=True)
    return tmp_path / "models"


def test_classifier_scores_are_profiled_from_npy(repository: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    _logistic_model(repository / "churn" / "3" / "model.onnx", 3)
    data = tmp_path / "train.npy"
    np.save(data, np.random.default_rng(1).normal(size=(1000, 3)))
    assert build_profile(str(repository), "churn", 3, str(data), bins=5) == 0
    profile = ReferenceProfile.load(repository / "churn" / "3" / "reference.json")
    assert profile.feature_names == ["x0", "x1", "x2"] and profile.score is not None
    assert len(profile.features[0].edges) == 4 and profile.score.count == 1000
    assert 0.0 < profile.score.edges[0] < profile.score.edges[-1] < 1.0  # positive-class probabilities
    out = capsys.readouterr().out
    assert "profiled 1000 rows, 3 features" in out and "drift thresholds for ARL0 10000 calibrated" in out
    # the thresholds the gateway's monitors need at drift.arl0 10 000 are stored: building them simulates nothing
    assert set(profile.thresholds) == set(profile_keys(profile, 10_000))
    clear_memo()
    FeatureDriftMonitor(profile, family_arl0=10_000)
    ScoreDriftMonitor(profile, arl0=10_000)
    assert calibrations_run() == 0


def test_regressor_from_csv_with_a_text_column_rejected_by_float_model(repository: Path, tmp_path: Path) -> None:
    _linear_model(repository / "churn" / "3" / "model.onnx", 2)
    data = tmp_path / "train.csv"
    data.write_text("a,b\n" + "".join(f"{i % 7},{i % 3}\n" for i in range(300)))
    build_profile(str(repository), "churn", 3, str(data), arl0s=())
    profile = ReferenceProfile.load(repository / "churn" / "3" / "reference.json")
    assert profile.score is not None and profile.score.edges[-1] <= 6 + 2 * 2  # a + 2b
    data.write_text("a,city\n1,ams\n2,ber\n")
    with pytest.raises(ProfileBuildError, match="non-numeric columns"):
        build_profile(str(repository), "churn", 3, str(data), arl0s=())


def test_parquet_without_model_profiles_features_only(repository: Path, tmp_path: Path) -> None:
    import pyarrow as arrow
    import pyarrow.parquet as parquet

    data = tmp_path / "train.parquet"
    parquet.write_table(arrow.table({"age": [31.0, None, 45.0, 52.0], "plan": ["a", "b", None, "a"]}), data)
    build_profile(str(repository), "churn", 3, str(data), arl0s=())
    profile = ReferenceProfile.load(repository / "churn" / "3" / "reference.json")
    age, plan = profile.features
    assert profile.score is None and age.missing_probability == 0.25
    assert plan.kind == "categorical" and plan.categories == ("a", "b") and plan.missing_probability == 0.25


@pytest.mark.parametrize("case, message", [
    ("missing file", "no such data file"),
    ("wrong model dir", "no such model version directory"),
    ("unreadable", "cannot read data"),
    ("width mismatch", "takes 3 columns, the data has 2"),
])
def test_errors_are_one_user_facing_line(repository: Path, tmp_path: Path, case: str, message: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    _logistic_model(repository / "churn" / "3" / "model.onnx", 3)
    data, version = tmp_path / "train.parquet", "3"
    if case == "unreadable":
        data.write_bytes(b"not parquet at all")
    elif case == "width mismatch":
        data = tmp_path / "train.npy"
        np.save(data, np.zeros((10, 2)))
    elif case == "wrong model dir":
        version = "9"
    with pytest.raises(SystemExit):
        main(["profile", "--repository", str(repository), "--model", "churn", "--version", version,
              "--data", str(data)])
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1 and error.startswith("banditgate: error: ")
    assert ProfileBuildError.user_facing
