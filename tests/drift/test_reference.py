"""Reference profiles: fixed size, monotone bins, exact JSON round trip, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from banditgate.drift.reference import FeatureProfile, ProfileError, ReferenceProfile

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)
columns = hnp.arrays(np.float64, st.tuples(st.integers(1, 300), st.integers(1, 4)),
                     elements=st.one_of(finite, st.just(np.nan)))


@settings(max_examples=60, deadline=None)
@given(data=columns, bins=st.integers(1, 12))
def test_numeric_bins_are_monotone_and_round_trip(data: np.ndarray, bins: int) -> None:
    profile = ReferenceProfile.build(data, scores=np.nan_to_num(data[:, 0]), bins=bins)
    for feature in profile.features + [profile.score]:
        assert feature is not None
        assert np.all(np.diff(feature.edges) > 0)
        assert len(feature.edges) <= bins - 1
        assert len(feature.probabilities) == len(feature.edges) + 1
        assert sum(feature.probabilities) + feature.missing_probability == pytest.approx(1.0)
    assert ReferenceProfile.from_json(profile.to_json()) == profile


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 5000), top_k=st.integers(1, 8), seed=st.integers(0, 2**32 - 1))
def test_profile_size_does_not_grow_with_rows(rows: int, top_k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    data = {"x": rng.normal(size=rows), "city": rng.choice(["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"], rows)}
    profile = ReferenceProfile.build(data, bins=10, top_k=top_k)
    # bounded by the bin counts alone: 9 edges + 11 numbers per numeric, top_k + 2 per categorical
    assert len(profile.to_json()) < 2500
    city = profile.features[1]
    assert city.kind == "categorical" and len(city.categories) <= top_k
    assert ReferenceProfile.from_json(profile.to_json()) == profile


def test_categorical_top_k_other_and_missing() -> None:
    values = np.array(["a"] * 50 + ["b"] * 30 + ["c"] * 15 + ["d"] * 5 + [None] * 10, dtype=object)
    feature = FeatureProfile.categorical("colour", values, top_k=2)
    assert feature.categories == ("a", "b")
    assert feature.probabilities == pytest.approx((50 / 110, 30 / 110, 20 / 110))
    assert feature.missing_probability == pytest.approx(10 / 110)


def test_ties_merge_bins() -> None:
    feature = FeatureProfile.numeric("count", np.array([0.0] * 80 + [1.0] * 15 + [2.0] * 5), bins=10)
    # quantiles tie at 0 and 1: three bins, not ten; cuts sit between observed values (0 | 1)
    assert feature.edges == pytest.approx((0.0, 0.5), abs=1e-8)
    assert feature.probabilities == pytest.approx((0.0, 0.8, 0.2))


def test_save_is_atomic_and_load_reads_back(tmp_path: Path) -> None:
    profile = ReferenceProfile.build(np.arange(100.0)[:, None], ["x"])
    target = tmp_path / "reference.json"
    profile.save(target)
    assert ReferenceProfile.load(target) == profile
    assert [p.name for p in tmp_path.iterdir()] == ["reference.json"]  # no temporary left behind


@pytest.mark.parametrize("payload, message", [
    (b"{not json", "not valid JSON"),
    (b'{"format": "other"}', "not a banditgate reference profile"),
    (b'{"format": "banditgate.reference/1"}', "missing field 'features'"),
])
def test_bad_file_names_the_path(tmp_path: Path, payload: bytes, message: str) -> None:
    path = tmp_path / "reference.json"
    path.write_bytes(payload)
    with pytest.raises(ProfileError, match=message) as info:
        ReferenceProfile.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_inconsistent_feature_is_rejected(tmp_path: Path) -> None:
    document = json.loads(ReferenceProfile.build(np.arange(100.0)[:, None], ["x"]).to_json())
    document["features"][0]["edges"] = [3.0, 1.0]
    path = tmp_path / "reference.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ProfileError, match="strictly increasing"):
        ReferenceProfile.load(path)
    with pytest.raises(ProfileError, match="no such file|cannot read"):
        ReferenceProfile.load(tmp_path / "absent.json")


def test_build_rejects_bad_arguments() -> None:
    with pytest.raises(ProfileError, match="2 feature names for 3 columns"):
        ReferenceProfile.build(np.zeros((5, 3)), ["a", "b"])
    with pytest.raises(ProfileError, match="bins and top_k"):
        ReferenceProfile.build(np.zeros((5, 1)), bins=0)
    with pytest.raises(ProfileError, match="categorical names unknown"):
        ReferenceProfile.build(np.zeros((5, 1)), categorical=["nope"])


def test_a_mass_point_gets_its_own_bin() -> None:
    # 99% zeros: every decile is 0, yet the rare ones must stay visible to the monitor
    values = np.array([0.0] * 990 + [1.0] * 10)
    feature = FeatureProfile.numeric("clicked", values)
    assert feature.edges == pytest.approx((0.0, 0.5), abs=1e-8)
    assert feature.probabilities == pytest.approx((0.0, 0.99, 0.01))


def test_values_a_rounding_step_from_reference_values_keep_their_bin() -> None:
    rng = np.random.default_rng(5)
    reference = rng.normal(size=2000).astype(np.float32).astype(float)
    feature = FeatureProfile.numeric("score", reference)
    edges = np.asarray(feature.edges)
    nudged = np.nextafter(reference, -np.inf)  # the same scores, one ulp lower
    assert np.array_equal(np.searchsorted(edges, reference, side="right"),
                          np.searchsorted(edges, nudged, side="right"))
