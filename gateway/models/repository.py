"""Triton-style model repository: `<root>/<model>/<version>/model.onnx` (+ optional config.yaml).

Versions load and warm up off the event loop; a swap replaces the served object only after the
new one is ready, so no request is dropped; a broken file is one error line and the version in
service keeps serving. A `latest` version superseded by a newer one is forgotten once the newer
one serves, unless a route names it by number; the forgotten versions wait in `take_retired()`
for the dataplane, which frees them when their batches are done (`Dataplane.collect_retired`).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from banditgate.config import ModelsConfig
from gateway.errors import ModelError, ModelNotFound
from gateway.models.model_config import load_model_config
from gateway.models.onnx_runtime import OnnxModel

log = logging.getLogger("banditgate.models")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")

VersionSpec = int | str  # a number or "latest"


@dataclass(frozen=True)
class LoadEvent:
    """What a scan did: a model version loaded (or swapped), or failed to."""

    model: str
    version: int
    ok: bool
    error: str | None = None
    swapped: bool = False


class ModelRepository:
    """Loads the model versions the routes need and keeps them current."""

    def __init__(self, root: Path, settings: ModelsConfig, wanted: Iterable[tuple[str, VersionSpec]]) -> None:
        self.root = Path(root).resolve()
        self.settings = settings
        self.wanted = sorted(set(wanted), key=str)
        self._loaded: dict[tuple[str, int], OnnxModel] = {}
        self._latest: dict[str, int] = {}
        self._failed: dict[tuple[str, int], tuple[int, str]] = {}  # (model, version) -> (mtime, error)
        self._lock = threading.Lock()
        self.on_swap: list[Callable[[OnnxModel], None]] = []
        self._newest_on_disk: dict[str, int] = {}  # per `latest` model, as of the last scan
        self._retired: list[OnnxModel] = []  # unloaded, not yet collected by the dataplane

    # -- paths -----------------------------------------------------------------------------------

    def model_dir(self, model: str) -> Path:
        """The folder of `model`, refusing names that could leave the repository."""
        if not _NAME.match(model) or model in (".", ".."):
            raise ModelNotFound(f"model name {model!r} is not a valid name (letters, digits, '_', '.', '-')")
        path = self.root / model
        resolved = path.resolve()
        if resolved.parent != self.root:
            raise ModelNotFound(f"model {model!r} resolves outside the repository {self.root}")
        return path

    def version_path(self, model: str, version: int) -> Path:
        path = self.model_dir(model) / str(int(version)) / "model.onnx"
        self.check_inside(path)
        return path

    def check_inside(self, path: Path) -> None:
        """Raise ModelError if `path` exists and is (or passes through) a link leaving the repository."""
        if path.exists() and not path.resolve().is_relative_to(self.root):
            raise ModelError(f"{path}: is a link to {path.resolve()}, outside the repository {self.root}")

    def available_versions(self, model: str) -> list[int]:
        """Version numbers present on disk for `model` (folders named by a positive integer with a model.onnx)."""
        folder = self.model_dir(model)
        if not folder.is_dir():
            return []
        versions = []
        for entry in os.scandir(folder):
            if entry.name.isascii() and entry.name.isdigit() and int(entry.name) > 0 and (Path(entry.path) / "model.onnx").exists():
                versions.append(int(entry.name))
        return sorted(versions)

    def resolve(self, model: str, spec: VersionSpec) -> int:
        """The concrete version `spec` stands for now (latest = highest one loaded)."""
        if spec == "latest":
            if model in self._latest:
                return self._latest[model]
            raise ModelNotFound(f"model {model!r} has no loaded version")
        return int(spec)

    # -- loading ---------------------------------------------------------------------------------

    def load_all(self) -> list[LoadEvent]:
        """Load every wanted version; raise ModelError listing what could not be loaded."""
        events = self.scan()
        problems = [e.error for e in events if not e.ok and e.error]
        missing = []
        for model, spec in self.wanted:
            try:
                self.get(model, spec)
            except (ModelNotFound, ModelError) as exc:
                missing.append(str(exc))
        if missing:
            raise ModelError("; ".join(dict.fromkeys(problems + missing)))
        return events

    def _targets(self) -> set[tuple[str, int]]:
        targets: set[tuple[str, int]] = set()
        for model, spec in self.wanted:
            try:
                if spec == "latest":
                    versions = self.available_versions(model)
                    if versions:
                        self._newest_on_disk[model] = versions[-1]
                        targets.add((model, versions[-1]))
                        # keep serving the previous latest until the new one has loaded
                        if model in self._latest:
                            targets.add((model, self._latest[model]))
                    else:
                        targets.add((model, 0))
                else:
                    targets.add((model, int(spec)))
            except ModelNotFound:
                targets.add((model, -1))
        return targets

    def scan(self) -> list[LoadEvent]:
        """Load new versions and changed files (blocking; run in a thread). Never raises for a bad file."""
        events = []
        for model, version in sorted(self._targets()):
            if version <= 0:
                error = (f"{self.root / model}: no version folder with a model.onnx" if version == 0
                         else f"model name {model!r} is not valid")
                if self._failed.get((model, version), (None, None))[1] != error:
                    log.error("%s", error)
                    events.append(LoadEvent(model, version, False, error))
                self._failed[(model, version)] = (0, error)
                continue
            events.extend(self._load_if_changed(model, version))
        self._retire_superseded()
        return events

    def _needed(self) -> set[tuple[str, int]]:
        """The versions some route serves: every pinned one, and for a `latest` model the one in
        service plus the newest on disk (so a version folder deleted under a newer loaded one
        does not flap between loaded and retired)."""
        needed: set[tuple[str, int]] = set()
        for model, spec in self.wanted:
            if spec != "latest":
                needed.add((model, int(spec)))
                continue
            if model in self._latest:
                needed.add((model, self._latest[model]))
            if model in self._newest_on_disk:
                needed.add((model, self._newest_on_disk[model]))
        return needed

    def _retire_superseded(self) -> None:
        with self._lock:
            needed = self._needed()
            retired = [key for key in self._loaded if key not in needed]
            for key in retired:
                self._retired.append(self._loaded.pop(key))
                self._failed.pop(key, None)
        for model, version in sorted(retired):
            log.info("model %s version %s unloaded: superseded by version %s (latest), no route names it", model,
                     version, self._latest.get(model))

    def take_retired(self) -> list[OnnxModel]:
        """The model versions unloaded since the last call (superseded `latest` ones, released
        ones); the caller frees what still refers to them once their batches are done."""
        with self._lock:
            taken, self._retired = self._retired, []
        return taken

    def _load_if_changed(self, model: str, version: int) -> list[LoadEvent]:
        try:
            path = self.version_path(model, version)
            mtime = path.stat().st_mtime_ns if path.exists() else 0
        except (ModelError, ModelNotFound) as exc:
            return [self._record_failure(model, version, 0, str(exc))]
        current = self._loaded.get((model, version))
        if current is not None and current.mtime_ns == mtime:
            return []
        failed = self._failed.get((model, version))
        if failed is not None and failed[0] == mtime:
            return []  # same broken file as last time: already reported
        try:
            self.check_inside(self.model_dir(model) / "config.yaml")
            config = load_model_config(self.model_dir(model))
            loaded = OnnxModel.load(path, model, version, config, self.settings)
            if current is not None and [(s.name, s.dtype, s.shape) for s in loaded.inputs] != \
                    [(s.name, s.dtype, s.shape) for s in current.inputs]:
                raise ModelError(f"{path}: inputs changed within version {version} "
                                 f"({[s.name for s in current.inputs]} → {[s.name for s in loaded.inputs]}); "
                                 "publish it as a new version instead")
            loaded.warmup(self.settings.warmup_rows)
        except ModelError as exc:
            return [self._record_failure(model, version, mtime, str(exc))]
        with self._lock:
            self._loaded[(model, version)] = loaded
            self._failed.pop((model, version), None)
            if version >= self._latest.get(model, 0):
                self._latest[model] = version
        verb = "reloaded" if current is not None else "loaded"
        log.info("model %s version %s %s from %s (providers %s)", model, version, verb, path,
                 ", ".join(loaded.providers))
        for callback in self.on_swap:
            callback(loaded)
        return [LoadEvent(model, version, True, swapped=current is not None)]

    def _record_failure(self, model: str, version: int, mtime: int, error: str) -> LoadEvent:
        self._failed[(model, version)] = (mtime, error)
        serving = self._loaded.get((model, version))
        suffix = f"; still serving the previous load of version {version}" if serving else ""
        log.error("%s%s", error, suffix)
        return LoadEvent(model, version, False, error)

    def ensure(self, model: str, version: int) -> OnnxModel:
        """Load `version` of `model` now if it is not loaded, and keep it current from then on
        (a rollout's candidate). Blocking: run in a thread. Raises ModelError / ModelNotFound
        when it cannot be loaded (the versions in service are untouched)."""
        with self._lock:
            if (model, version) not in self.wanted:
                self.wanted = sorted({*self.wanted, (model, version)}, key=str)
        found = self._loaded.get((model, version))
        if found is not None:
            return found
        for event in self._load_if_changed(model, version):
            if not event.ok:
                raise ModelError(event.error or f"model {model!r} version {version} could not be loaded")
        return self.get(model, version)

    def release(self, model: str, version: int) -> bool:
        """Stop serving and forget `version` of `model` (a rolled-back candidate, a replaced
        version after its grace period). Returns whether it was loaded."""
        with self._lock:
            self.wanted = [w for w in self.wanted if w != (model, version)]
            removed = self._loaded.pop((model, version), None)
            if removed is not None:
                self._retired.append(removed)
            self._failed.pop((model, version), None)
            if self._latest.get(model) == version:
                remaining = [v for (m, v) in self._loaded if m == model]
                if remaining:
                    self._latest[model] = max(remaining)
                else:
                    self._latest.pop(model, None)
        if removed is not None:
            log.info("model %s version %s unloaded", model, version)
        return removed is not None

    # -- lookup ----------------------------------------------------------------------------------

    def get(self, model: str, spec: VersionSpec) -> OnnxModel:
        """The model version in service for (model, spec); raise ModelNotFound if none is loaded."""
        version = self.resolve(model, spec)
        found = self._loaded.get((model, version))
        if found is None:
            failure = self._failed.get((model, version))
            detail = f": {failure[1]}" if failure else ""
            raise ModelNotFound(f"model {model!r} version {version} is not loaded{detail}")
        return found

    def loaded(self) -> list[OnnxModel]:
        return [self._loaded[k] for k in sorted(self._loaded)]

    def errors(self) -> dict[str, str]:
        return {f"{m}:{v}": e for (m, v), (_t, e) in self._failed.items()}
