"""`banditgate bench gpu`: skipped with one line (exit 0, JSON `skipped: true` and the reason) where
no CUDA device is usable, as on this development machine; its two measurements run on the CPU
provider at small sizes, so the code the GPU run uses is exercised here too (no stack)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loadtests.bench_gpu import CPU, bare, cuda_unusable_reason, gateway
from loadtests.models import build_mlp

REPO = Path(__file__).resolve().parents[2]


def test_without_a_cuda_device_it_is_skipped_with_one_line_and_the_reason(tmp_path: Path) -> None:
    reason = cuda_unusable_reason()
    if reason is None:
        pytest.skip("a CUDA device is usable here: the bench runs instead")
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, "-m", "banditgate.cli", "bench", "gpu", "--out", str(out)], cwd=REPO,  # noqa: S603
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bench gpu: skipped: ") and reason in lines[0]
    result = json.loads(out.read_text())
    assert result["skipped"] is True and result["reason"] == reason
    assert "CPUExecutionProvider" in result["available_providers"]


def test_the_measurements_run_on_the_cpu_provider(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    path = build_mlp(repository / "mlp" / "1" / "model.onnx", n_features=8, hidden=16)
    rows = np.random.default_rng(0).uniform(0, 1, size=(32, 8)).astype(np.float32)
    plain = bare(path, rows, n_batches=8, max_s=10.0, provider=CPU)
    assert plain["rows"] == 8 * 32 and plain["rows_per_s"] > 0 and plain["providers"] == [CPU]
    served = asyncio.run(gateway(repository, [CPU], rows, n_batches=8, max_s=10.0))
    assert served["rows"] == 8 * 32 and served["rows_per_s"] > 0 and served["providers"] == [CPU]
