"""Helpers for the chart tests: a `helm` binary (scripts/helm.sh: the one on PATH, or the pinned
version built from its Go module into a cache folder), and `helm template` as parsed documents."""

from __future__ import annotations

import functools
import importlib.util
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "banditgate"
RELEASE = "bg"


def _load_check_chart() -> Any:
    spec = importlib.util.spec_from_file_location("check_chart", ROOT / "scripts" / "check_chart.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_chart = _load_check_chart()
"""scripts/check_chart.py (what .ci/run runs): `optional_parts_on`, `validate`, `find_helm`."""


@functools.cache
def _helm() -> str | None:
    try:
        return str(check_chart.find_helm())
    except RuntimeError:
        return None


def helm() -> str:
    """The helm binary; skips the test only when there is none and scripts/helm.sh cannot build one
    (no Go toolchain, or no network for its module)."""
    path = _helm()
    if path is None:
        go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
        pytest.skip(f"no helm on PATH and scripts/helm.sh could not build it (Go toolchain: {go or 'none'})")
    return path


def optional_parts_on() -> list[str]:
    """`KEY=true` for every `enabled: false` in values.yaml (as ../shared/checks/deploy does)."""
    return list(check_chart.optional_parts_on())


def template(*sets: str, namespace: str = "serving") -> list[dict[str, Any]]:
    """`helm template` of the chart with `--set` for each of `sets`: the rendered documents."""
    command = [helm(), "template", RELEASE, str(CHART), "--namespace", namespace]
    for item in sets:
        command += ["--set", item]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def template_fails(*sets: str) -> str:
    """`helm template` that must fail: its error output."""
    command = [helm(), "template", RELEASE, str(CHART)]
    for item in sets:
        command += ["--set", item]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0, "helm template succeeded"
    return result.stderr


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind}/{name} in {[(d['kind'], d['metadata']['name']) for d in docs]}")
