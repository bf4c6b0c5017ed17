"""Model repository safety: names that could leave the repository, links out of it, sha256 pins in
config.yaml, and an admin reload that can only load what the routes name from the repository."""

from __future__ import annotations

import hashlib
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from banditgate.config import ModelsConfig, parse_config
from gateway.admin import Admin
from gateway.dataplane import Dataplane
from gateway.errors import ModelError, ModelNotFound
from gateway.models.repository import ModelRepository
from loadtests.models import build_mlp, write_repository

SETTINGS = ModelsConfig(warmup_rows=1, poll_interval_s=0)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    return write_repository(tmp_path / "models", {"good": {1: 1}}, n_features=4)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A valid model outside the repository: what an attacker would like us to load."""
    build_mlp(tmp_path / "outside" / "1" / "model.onnx", n_features=4, seed=9)
    (tmp_path / "outside" / "config.yaml").write_text("labels: [stolen]\n")
    return tmp_path / "outside"


@pytest.mark.parametrize("name", ["..", "../outside", "good/../../outside", "/etc", ".hidden", "a\\b", "%2e%2e",
                                  "good\x00", "", "x" * 200])
def test_traversal_model_names_are_refused(repository: Path, name: str) -> None:
    repo = ModelRepository(repository, SETTINGS, [])
    with pytest.raises(ModelNotFound, match="not a valid name"):
        repo.model_dir(name)


def test_traversal_links_out_of_the_repository_are_refused(repository: Path, outside: Path) -> None:
    (repository / "linked-model").symlink_to(outside, target_is_directory=True)  # a model folder link
    (repository / "good" / "2").symlink_to(outside / "1", target_is_directory=True)  # a version folder link
    (repository / "good" / "3").mkdir()
    (repository / "good" / "3" / "model.onnx").symlink_to(outside / "1" / "model.onnx")  # a file link
    (repository / "inside").mkdir()
    (repository / "inside" / "1").mkdir()
    (repository / "inside" / "1" / "model.onnx").symlink_to(repository / "good" / "1" / "model.onnx")
    (repository / "inside" / "config.yaml").symlink_to(outside / "config.yaml")  # a config link
    wanted = [("good", 1), ("good", 2), ("good", 3), ("linked-model", 1), ("inside", 1)]
    repo = ModelRepository(repository, SETTINGS, wanted)
    events = {(e.model, e.version): e for e in repo.scan()}
    assert events[("good", 1)].ok
    for key in [("good", 2), ("good", 3), ("inside", 1), ("linked-model", 1)]:
        assert not events[key].ok and "outside the repository" in str(events[key].error), events[key]
    with pytest.raises(ModelNotFound, match="outside the repository"):
        repo.model_dir("linked-model")
    assert [m.key for m in repo.loaded()] == ["good:1"]
    with pytest.raises(ModelError, match="outside the repository"):
        repo.load_all()


def test_sha256_pin_in_config_refuses_a_different_file(repository: Path, tmp_path: Path) -> None:
    model_file = repository / "good" / "1" / "model.onnx"
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
    (repository / "good" / "config.yaml").write_text(f"sha256: {{1: {digest.upper()}}}\n")
    assert ModelRepository(repository, SETTINGS, [("good", 1)]).load_all()[0].ok  # the pinned file loads

    build_mlp(tmp_path / "swapped.onnx", n_features=4, seed=5)
    shutil.copy(tmp_path / "swapped.onnx", model_file)  # same name, other bytes
    repo = ModelRepository(repository, SETTINGS, [("good", 1)])
    with pytest.raises(ModelError) as info:
        repo.load_all()
    message = str(info.value)
    assert "sha256" in message and "does not match" in message and "refusing" in message and "\n" not in message
    assert str(model_file) in message and digest[:16] in message.lower()


async def test_traversal_admin_reload_loads_only_what_routes_name_inside_the_repository(
        repository: Path, outside: Path) -> None:
    """The reload endpoint takes no path: a body naming another folder or model changes nothing, and
    a link planted in the repository after start is refused on reload with the reason."""
    config = parse_config({"models": {"repository": str(repository), "poll_interval_s": 0, "warmup_rows": 1},
                           "routes": [{"name": "r", "arms": [{"name": "a", "model": "good", "version": "latest"}]}]},
                          env={})
    repo = ModelRepository(repository, config.models, [("good", "latest")])
    repo.load_all()
    executor = ThreadPoolExecutor(max_workers=1)
    try:
        admin = Admin(Dataplane(config, repo, executor), repo, None)
        body = b'{"repository": "%s", "model": "../outside", "path": "%s"}' % (str(outside).encode(),
                                                                              str(outside / "1").encode())
        result = await admin.handle({"action": "reload"}, "POST", body)
        assert result["events"] == [] and [m.key for m in repo.loaded()] == ["good:1"]

        (repository / "good" / "7").symlink_to(outside / "1", target_is_directory=True)
        result = await admin.handle({"action": "reload"}, "POST", b"")
        assert [(e["model"], e["version"], e["ok"]) for e in result["events"]] == [("good", 7, False)]
        assert "outside the repository" in result["events"][0]["error"]
        assert [m.key for m in repo.loaded()] == ["good:1"] and repo.resolve("good", "latest") == 1
        with pytest.raises(ModelNotFound):
            await admin.handle({"action": "../../outside"}, "POST", b"")
    finally:
        executor.shutdown(wait=False)


def test_sha256_pin_holds_for_the_bytes_loaded_even_if_the_file_is_swapped_after_the_check(
        repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pinned file is read once, hashed, and loaded from those bytes. Before, the hash was taken
    on one open and ONNX Runtime opened the path again: a file swapped in between was served
    under the pin. The swap is made deterministic by doing it just before the session is built."""
    import numpy as np

    from gateway.models import onnx_runtime

    model_file = repository / "good" / "1" / "model.onnx"
    pinned = model_file.read_bytes()
    (repository / "good" / "config.yaml").write_text(f"sha256: {{1: {hashlib.sha256(pinned).hexdigest()}}}\n")
    build_mlp(tmp_path / "other.onnx", n_features=4, seed=5)
    real_session = onnx_runtime.ort.InferenceSession

    def swap_then_load(source, *args, **kwargs):  # type: ignore[no-untyped-def]
        shutil.copy(tmp_path / "other.onnx", model_file)  # between the check and the load
        return real_session(source, *args, **kwargs)

    monkeypatch.setattr(onnx_runtime.ort, "InferenceSession", swap_then_load)
    repo = ModelRepository(repository, SETTINGS, [("good", 1)])
    assert repo.load_all()[0].ok
    monkeypatch.setattr(onnx_runtime.ort, "InferenceSession", real_session)
    rows = {"input": np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)}
    served = repo.get("good", 1).run(rows)["probability"]
    expected = real_session(pinned).run(["probability"], rows)[0]
    swapped = real_session(str(tmp_path / "other.onnx")).run(["probability"], rows)[0]
    assert not np.allclose(expected, swapped)  # the two files answer differently
    np.testing.assert_allclose(served, expected)  # what is served is what was pinned
