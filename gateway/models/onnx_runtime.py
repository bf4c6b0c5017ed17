"""One loaded model version: an ONNX Runtime session plus what it needs to validate inputs.

`run` is synchronous and meant for a worker thread: ONNX Runtime releases the GIL while it
computes, so the event loop keeps serving.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from banditgate.config import ModelsConfig
from gateway.errors import ModelError
from gateway.models.model_config import ModelConfig

log = logging.getLogger("banditgate.models")

_ORT_TYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32), "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16), "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32), "tensor(int16)": np.dtype(np.int16), "tensor(int8)": np.dtype(np.int8),
    "tensor(uint8)": np.dtype(np.uint8), "tensor(bool)": np.dtype(np.bool_), "tensor(string)": np.dtype(object),
}
# OIP datatype names (KServe V2) for each numpy dtype
OIP_DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64", np.dtype(np.float16): "FP16",
                 np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32", np.dtype(np.int16): "INT16",
                 np.dtype(np.int8): "INT8", np.dtype(np.uint8): "UINT8", np.dtype(np.bool_): "BOOL",
                 np.dtype(object): "BYTES"}
_GRAPH_LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                 "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                 "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                 "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
_provider_logged: set[tuple[str, ...]] = set()
_provider_lock = threading.Lock()


@dataclass(frozen=True)
class TensorSpec:
    """An input or output of the model: name, numpy dtype and shape (None where dynamic)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]

    @property
    def row_shape(self) -> tuple[int | None, ...]:
        """Shape of one request's row (the batch dimension removed)."""
        return self.shape[1:]

    @property
    def datatype(self) -> str:
        return OIP_DATATYPES.get(self.dtype, "BYTES")


def choose_providers(preferred: list[str]) -> list[str]:
    """The preferred providers onnxruntime offers, in order; CPU always last as the fallback."""
    available = set(ort.get_available_providers())
    chosen = [p for p in preferred if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    key = tuple(chosen)
    with _provider_lock:
        if key not in _provider_logged:
            _provider_logged.add(key)
            log.info("execution providers: %s (onnxruntime offers %s)", ", ".join(chosen),
                     ", ".join(sorted(available)))
    return chosen


def run_options() -> ort.RunOptions:
    """Options for one run that another thread can end (`terminate = True`).

    Their log level is FATAL: the error a run raises (a terminated run, a bad row) is reported by
    the caller with the rows it concerns; ONNX Runtime's own line on stderr would repeat it for
    every batch."""
    options = ort.RunOptions()
    options.log_severity_level = 4
    return options


def _shape(raw: list) -> tuple[int | None, ...]:
    return tuple(d if isinstance(d, int) and d > 0 else None for d in raw)


@dataclass
class OnnxModel:
    """A loaded, warmed-up model version."""

    name: str
    version: int
    path: Path
    session: ort.InferenceSession
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    config: ModelConfig
    providers: tuple[str, ...]
    mtime_ns: int = 0
    ranges: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}"

    @classmethod
    def load(cls, path: Path, name: str, version: int, config: ModelConfig, settings: ModelsConfig) -> OnnxModel:
        """Load and warm up `path`; raise ModelError (one line) if it is missing, corrupt or incompatible."""
        if not path.is_file():
            raise ModelError(f"{path}: model file not found")
        expected = config.sha256.get(version)
        # A pinned file is read once: the bytes whose sha256 matched are the bytes ONNX Runtime
        # loads. Hashing one open and loading another would let a file swapped in between (a
        # deploy writing the next version in place, an attacker racing the check) be served under
        # the pin. (A pinned model must be one file: ONNX external data is not covered by the pin.)
        try:
            with path.open("rb") as handle:
                mtime_ns = os.fstat(handle.fileno()).st_mtime_ns
                data = handle.read() if expected is not None else None
        except OSError as exc:
            raise ModelError(f"{path}: cannot read it: {exc.strerror}") from None
        if expected is not None and data is not None:
            actual = hashlib.sha256(data).hexdigest()
            if actual != expected.lower():
                raise ModelError(f"{path}: sha256 {actual[:16]}… does not match the {expected[:16]}… in config.yaml; "
                                 "refusing to load it")
        options = ort.SessionOptions()
        options.intra_op_num_threads = settings.intra_op_threads
        options.inter_op_num_threads = settings.inter_op_threads
        options.graph_optimization_level = _GRAPH_LEVELS[settings.graph_optimization]
        options.log_severity_level = 3
        providers = choose_providers(config.providers or settings.providers)
        try:
            session = ort.InferenceSession(data if data is not None else str(path), sess_options=options,
                                           providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types for a bad file
            detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{path}: ONNX Runtime cannot load it: {detail}") from None
        inputs = []
        for node in session.get_inputs():
            if node.type not in _ORT_TYPES:
                raise ModelError(f"{path}: input {node.name!r} has unsupported type {node.type}")
            inputs.append(TensorSpec(node.name, _ORT_TYPES[node.type], _shape(node.shape)))
        outputs = [TensorSpec(o.name, _ORT_TYPES.get(o.type, np.dtype(object)), _shape(o.shape or []))
                   for o in session.get_outputs()]
        wanted = config.outputs
        if wanted:
            missing = [n for n in wanted if n not in {o.name for o in outputs}]
            if missing:
                raise ModelError(f"{path}: config.yaml asks for outputs {missing} the model does not have "
                                 f"(it has {[o.name for o in outputs]})")
            outputs = [o for o in outputs if o.name in wanted]
        model = cls(name=name, version=version, path=path, session=session, inputs=tuple(inputs),
                    outputs=tuple(outputs), config=config, providers=tuple(session.get_providers()),
                    mtime_ns=mtime_ns)
        model.ranges = model._compile_ranges()
        return model

    def _compile_ranges(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per input: arrays of lower and upper bounds per column (±inf where unconstrained)."""
        if not self.config.ranges:
            return {}
        if len(self.inputs) != 1 or len(self.inputs[0].row_shape) != 1 or self.inputs[0].row_shape[0] is None:
            raise ModelError(f"{self.path}: config.yaml 'ranges' needs a single 2-D input with a fixed width")
        spec = self.inputs[0]
        width = spec.row_shape[0]
        assert width is not None  # noqa: S101 - checked just above
        names = self.config.features or []
        low = np.full(width, -np.inf)
        high = np.full(width, np.inf)
        for key, (lo, hi) in self.config.ranges.items():
            if key in names:
                index = names.index(key)
            elif key.isascii() and key.isdigit() and int(key) < width:
                index = int(key)
            else:
                raise ModelError(f"{self.path}: config.yaml range for unknown feature {key!r}")
            low[index], high[index] = lo, hi
        return {spec.name: (low, high)}

    def feature_name(self, input_name: str, column: int) -> str:
        names = self.config.features
        if names and column < len(names):
            return names[column]
        return f"{input_name}[{column}]"

    def run(self, feeds: dict[str, np.ndarray], options: ort.RunOptions | None = None) -> dict[str, np.ndarray]:
        """Run one batch (blocking; call from a worker thread). Returns the configured outputs.

        Setting `options.terminate` from another thread ends the run between two node executions
        (Loop iterations included): it raises, and so does any later run with the same options."""
        names = [o.name for o in self.outputs]
        results = self.session.run(names, feeds, options)
        return dict(zip(names, results))

    def warmup(self, rows: int) -> None:
        """Run a batch of zeros so the first real request does not pay for lazy initialisation."""
        if rows <= 0:
            return
        feeds = {}
        for spec in self.inputs:
            shape = tuple(rows if i == 0 else (d or 1) for i, d in enumerate(spec.shape)) or (rows,)
            if spec.dtype == np.dtype(object):
                feeds[spec.name] = np.full(shape, "", dtype=object)
            else:
                feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
            if spec.name in self.ranges:
                low, high = self.ranges[spec.name]
                feeds[spec.name] = np.broadcast_to(np.clip(0.0, low, high), shape).astype(spec.dtype)
        try:
            self.run(feeds)
        except Exception as exc:  # noqa: BLE001 - ORT raises various types; the load fails with one line
            raise ModelError(f"{self.path}: warm-up inference failed: {str(exc).splitlines()[0][:200]}") from None
