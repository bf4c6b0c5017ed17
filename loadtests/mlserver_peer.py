"""Seldon MLServer as a peer in the benchmarks: its own virtual environment, a small ONNX runtime, a server.

MLServer is installed into a virtual environment of its own under the user's cache folder
(`~/.cache/banditgate/mlserver-venv`, honouring XDG_CACHE_HOME / BANDITGATE_CACHE), created once
and reused, so its dependency pins never touch the project's environment. It gets the same
onnxruntime version as ours and an older uvloop (a fresh install of MLServer 1.7 breaks on the
newest uvloop).

MLServer has no ONNX runtime of its own: `write_model_folder` writes a custom runtime, an
`mlserver.MLModel` subclass whose `load` opens the model with ONNX Runtime (one intra-op thread,
as the gateway does) and whose `predict` decodes the inputs with MLServer's NumpyCodec, runs the
session and encodes the outputs. Server settings: HTTP on a free loopback port, gRPC on another
free port (MLServer cannot switch it off), metrics endpoint off, gzip off, access logs off
(`debug: false`) and `parallel_workers: 0`, so inference runs inside the one serving process like
the gateway's. MLServer's default, `parallel_workers: 1`, puts one inference worker process
behind the server, so every request also crosses a process boundary; the bench measures it too,
for reference, but compares against the faster setting.
Adaptive batching stays at MLServer's default (off): on a model this small its queueing costs
more than the inference it would save.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from banditgate.stack import cache_dir

MLSERVER_VERSION = "1.7.1"
UVLOOP_PIN = "uvloop<0.22"

RUNTIME = '''"""A minimal ONNX Runtime runtime for MLServer (written by banditgate bench)."""

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxModel(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        path = await get_model_uri(self.settings)
        self._session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        self._output_names = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {tensor.name: NumpyCodec.decode_input(tensor) for tensor in payload.inputs}
        outputs = self._session.run(None, feeds)
        return InferenceResponse(
            model_name=self.name, model_version=self.version, id=payload.id,
            outputs=[NumpyCodec.encode_output(name, array) for name, array in zip(self._output_names, outputs)])
'''


class MLServerUnavailable(Exception):
    """MLServer could not be installed or started; one line saying why."""

    user_facing = True


def venv_dir() -> Path:
    return cache_dir() / "mlserver-venv"


def _requirements() -> list[str]:
    import onnxruntime

    return [f"mlserver=={MLSERVER_VERSION}", f"onnxruntime=={onnxruntime.__version__}", UVLOOP_PIN]


def ensure_venv(progress) -> Path:  # type: ignore[no-untyped-def]
    """The `mlserver` executable of the cached environment, creating the environment first if needed.

    Raises MLServerUnavailable (one line, naming the pip log) when pip cannot install it.
    """
    target = venv_dir()
    stamp = target / ".banditgate-requirements"
    wanted = "\n".join(_requirements())
    executable = target / "bin" / "mlserver"
    if executable.exists() and stamp.exists() and stamp.read_text() == wanted:
        progress(f"mlserver: reusing {target}")
        return executable
    # a half-made environment (an interrupted install) has no stamp: start it again
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    log_path = target.with_name("mlserver-venv-pip.log")
    progress(f"mlserver: creating a virtual environment in {target} (once; about a minute)")
    base_python = getattr(sys, "_base_executable", None) or sys.executable
    with open(log_path, "wb") as log:
        made = subprocess.run([base_python, "-m", "venv", str(target)], stdout=log,  # noqa: S603
                              stderr=subprocess.STDOUT, check=False)
        if made.returncode != 0:
            raise MLServerUnavailable(f"python -m venv {target} failed (see {log_path})")
        progress(f"mlserver: pip install {' '.join(_requirements())}")
        pip = subprocess.run([str(target / "bin" / "python"), "-m", "pip", "install",  # noqa: S603
                              "--disable-pip-version-check", *_requirements()],
                             stdout=log, stderr=subprocess.STDOUT, check=False)
    if pip.returncode != 0 or not executable.exists():
        raise MLServerUnavailable(f"pip could not install MLServer {MLSERVER_VERSION} into {target} "
                                  f"(exit {pip.returncode}; see {log_path})")
    stamp.write_text(wanted)
    progress(f"mlserver: installed into {target}")
    return executable


def write_model_folder(folder: Path, model_name: str, model_path: Path, http_port: int, grpc_port: int,
                       parallel_workers: int = 0) -> Path:
    """settings.json, <model>/model-settings.json, the runtime module and a copy of the model, under `folder`.

    `parallel_workers`: 0 runs inference in the serving process (MLServer's fastest for a small
    model); MLServer's own default is 1 (one inference worker process behind the server).
    """
    model_dir = folder / model_name
    model_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_path, model_dir / "model.onnx")
    (model_dir / "onnx_runtime.py").write_text(RUNTIME)
    (model_dir / "model-settings.json").write_text(json.dumps({
        "name": model_name, "implementation": "onnx_runtime.OnnxModel",
        "parameters": {"uri": "./model.onnx", "version": "1"}}, indent=2))
    (folder / "settings.json").write_text(json.dumps({
        "debug": False, "host": "127.0.0.1", "http_port": http_port, "grpc_port": grpc_port,
        "metrics_endpoint": None, "parallel_workers": parallel_workers, "gzip_enabled": False, "load_models_at_startup": True},
        indent=2))
    return folder


SETTINGS_NOTE = ("MLServer %s, custom ONNX Runtime MLModel (1 intra-op thread, NumpyCodec), parallel_workers=0 "
                 "(inference in the serving process), adaptive batching off (default), metrics off, gzip off, "
                 "access log off" % MLSERVER_VERSION)
