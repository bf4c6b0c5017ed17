"""`banditgate bench gpu [--quick] --out FILE.json`: the gateway's CUDA path against bare ONNX Runtime.

Where a CUDA device is usable (onnxruntime offers ``CUDAExecutionProvider`` and a session on it
really runs there), three measurements on the same model, a wide MLP (``N_FEATURES`` inputs,
``HIDDEN`` hidden units: heavy enough per row that the device, not Python, is what is measured),
each a fixed number of requests bounded in time:

* ``bare_cuda``: ``InferenceSession(providers=["CUDAExecutionProvider"]).run`` on batches of
  ``BATCH`` rows in a loop, nothing else;
* ``banditgate_cuda``: the gateway's own path for a tensor request (what the REST / gRPC sidecar
  runs after decoding a binary tensor): a route with one arm served by the model loaded the way
  the gateway loads it (``OnnxModel.load`` with ``models.providers: [CUDA, CPU]``), through
  ``serve_tensors`` (decide, validate, the batcher, the prediction events built) with requests of
  ``BATCH`` rows, ``IN_FLIGHT`` at a time;
* ``banditgate_cpu``: the same with ``models.providers: [CPU]``.

Keys: ``ratio_vs_bare_cuda`` (banditgate_cuda / bare_cuda rows per second; target >= 0.8),
``ratio_vs_cpu`` (banditgate_cuda / banditgate_cpu), the three ``{rows_per_s, seconds, rows}``,
``providers`` (what the CUDA session ran on), ``model`` ({n_features, hidden, batch}), ``device``
(the GPU's name, from nvidia-smi when there is one), ``quick``, ``skipped`` (false).

Without a usable CUDA device (this development machine) it prints one line saying it was skipped
and why, writes ``{"skipped": true, "reason": ..., "available_providers": [...]}`` and exits 0.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess  # nosec B404: nvidia-smi, a fixed argument list, only to name the device
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

N_FEATURES = 256
HIDDEN = 4096
BATCH = 256
IN_FLIGHT = 4
"""Fetched batches served at once (the Kafka loop's max_in_flight_batches does the same)."""
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def cuda_unusable_reason() -> str | None:
    """Why the CUDA execution provider cannot be measured here, or None when it can."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if CUDA not in available:
        return (f"onnxruntime {ort.__version__} offers no {CUDA} (providers: {', '.join(available)}; "
                "the GPU build is onnxruntime-gpu)")
    with tempfile.TemporaryDirectory() as folder:
        from loadtests.models import build_mlp

        path = build_mlp(Path(folder) / "probe.onnx", n_features=4, hidden=4)
        try:
            session = ort.InferenceSession(str(path), providers=[CUDA])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several types when no device is usable
            return f"a {CUDA} session could not be created: {str(exc).strip().splitlines()[0][:200] if str(exc) else type(exc).__name__}"
        if session.get_providers()[0] != CUDA:
            return f"{CUDA} is offered but a session falls back to {session.get_providers()[0]} (no usable CUDA device)"
    return None


def _device_name() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        done = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,  # noqa: S603
                              text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def bare(path: Path, rows: np.ndarray, n_batches: int, max_s: float, provider: str = CUDA) -> dict[str, Any]:
    """Rows per second of a bare session on `provider`, batches of `rows` in a loop."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=[provider])
    for _ in range(5):
        session.run(None, {"input": rows})  # warm-up: kernels chosen, memory arena grown
    started = time.perf_counter()
    done = 0
    while done < n_batches and time.perf_counter() - started < max_s:
        session.run(None, {"input": rows})
        done += 1
    seconds = time.perf_counter() - started
    return {"rows_per_s": done * len(rows) / seconds, "seconds": round(seconds, 3), "rows": done * len(rows),
            "providers": session.get_providers()}


async def gateway(repository: Path, providers: list[str], rows: np.ndarray, n_batches: int,
                   max_s: float) -> dict[str, Any]:
    """Rows per second through serve_tensors, `IN_FLIGHT` requests of `rows` at a time."""
    from banditgate.config import parse_config
    from gateway.dataplane import Dataplane, serve_tensors
    from gateway.models.repository import ModelRepository

    config = parse_config({
        "models": {"repository": str(repository), "providers": providers, "poll_interval_s": 0},
        "batching": {"max_batch_size": BATCH, "max_delay_us": 500, "max_queue_rows": BATCH * IN_FLIGHT * 4,
                     "inference_threads": 2},
        "routes": [{"name": "gpu", "policy": "fixed", "arms": [{"name": "a", "model": "mlp", "version": 1}]}],
    }, env={})
    repo = ModelRepository(repository, config.models, [("mlp", 1)])
    repo.load_all()
    model = repo.get("mlp", 1)
    with ThreadPoolExecutor(max_workers=config.batching.inference_threads) as executor:
        dataplane = Dataplane(config, repo, executor, rng=np.random.default_rng(0))
        counter = 0

        async def request() -> None:
            nonlocal counter
            counter += 1
            await serve_tensors(dataplane, "gpu", None, {"input": rows}, f"r{counter}", None, time.time(),
                                time.monotonic())

        for _ in range(5):
            await request()  # warm-up
        started = time.perf_counter()
        served = 0
        while served < n_batches and time.perf_counter() - started < max_s:
            await asyncio.gather(*(request() for _ in range(IN_FLIGHT)))  # a failure raises: the bench fails
            served += IN_FLIGHT
        seconds = time.perf_counter() - started
    return {"rows_per_s": served * len(rows) / seconds, "seconds": round(seconds, 3), "rows": served * len(rows),
            "providers": list(model.providers)}


def run(out: Path, quick: bool = False) -> int:
    import onnxruntime as ort

    reason = cuda_unusable_reason()
    if reason is not None:
        print(f"bench gpu: skipped: {reason}")
        out.write_text(json.dumps({"skipped": True, "reason": reason,
                                   "available_providers": ort.get_available_providers(), "quick": quick}, indent=2))
        return 0
    from loadtests.models import build_mlp

    n_batches, max_s = (64, 10.0) if quick else (1024, 60.0)
    rows = np.random.default_rng(0).uniform(0, 1, size=(BATCH, N_FEATURES)).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        repository = Path(folder) / "models"
        path = build_mlp(repository / "mlp" / "1" / "model.onnx", n_features=N_FEATURES, hidden=HIDDEN)
        plain = bare(path, rows, n_batches, max_s)
        print(f"bench gpu: bare ONNX Runtime CUDA: {plain['rows_per_s']:,.0f} rows/s")
        cuda = asyncio.run(gateway(repository, [CUDA, CPU], rows, n_batches, max_s))
        print(f"bench gpu: banditgate CUDA: {cuda['rows_per_s']:,.0f} rows/s (providers {cuda['providers']})")
        cpu = asyncio.run(gateway(repository, [CPU], rows, max(4, n_batches // 16), max_s))
        print(f"bench gpu: banditgate CPU: {cpu['rows_per_s']:,.0f} rows/s")
    result = {
        "skipped": False, "quick": quick, "device": _device_name(), "providers": cuda["providers"],
        "model": {"n_features": N_FEATURES, "hidden": HIDDEN, "batch": BATCH, "in_flight": IN_FLIGHT},
        "bare_cuda": plain, "banditgate_cuda": cuda, "banditgate_cpu": cpu,
        "ratio_vs_bare_cuda": round(cuda["rows_per_s"] / plain["rows_per_s"], 3),
        "ratio_vs_cpu": round(cuda["rows_per_s"] / cpu["rows_per_s"], 3),
    }
    out.write_text(json.dumps(result, indent=2))
    print(f"bench gpu: banditgate = {result['ratio_vs_bare_cuda']}x bare ONNX Runtime CUDA (target >= 0.8), "
          f"{result['ratio_vs_cpu']}x its CPU path; wrote {out}")
    return 0 if cuda["providers"][0] == CUDA else 1
