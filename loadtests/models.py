"""Small real ONNX models for tests and benchmarks, built with onnx.helper (no training needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def build_mlp(path: Path, n_features: int = 32, hidden: int = 64, seed: int = 0, input_name: str = "input",
              fail_on_negative_first: bool = False) -> Path:
    """Write a 2-layer MLP (float32 [N, n_features] → `probability` [N, 1] and `label` [N]) to `path`.

    With `fail_on_negative_first`, the graph fails at run time for any batch containing a row whose
    first feature is negative (a poison row, for failure-isolation tests).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((n_features, hidden)) / np.sqrt(n_features)).astype(np.float32)
    b1 = (rng.standard_normal(hidden) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((hidden, 1)) / np.sqrt(hidden)).astype(np.float32)
    b2 = np.zeros(1, dtype=np.float32)
    nodes = [
        helper.make_node("MatMul", [input_name, "w1"], ["h1"]),
        helper.make_node("Add", ["h1", "b1"], ["h1b"]),
        helper.make_node("Relu", ["h1b"], ["h1r"]),
        helper.make_node("MatMul", ["h1r", "w2"], ["z"]),
        helper.make_node("Add", ["z", "b2"], ["zb"]),
        helper.make_node("Sigmoid", ["zb"], ["probability"]),
        helper.make_node("Constant", [], ["half"], value=numpy_helper.from_array(np.array(0.5, dtype=np.float32))),
        helper.make_node("Greater", ["probability", "half"], ["gt"]),
        helper.make_node("Cast", ["gt"], ["label2d"], to=TensorProto.INT64),
        helper.make_node("Constant", [], ["axes"], value=numpy_helper.from_array(np.array([1], dtype=np.int64))),
        helper.make_node("Squeeze", ["label2d", "axes"], ["label"]),
    ]
    initializers = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
                    numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(b2, "b2")]
    if fail_on_negative_first:
        # Reshape to an impossible shape when min(first column) < 0: ONNX Runtime raises at run time
        nodes += [
            helper.make_node("Constant", [], ["c0"], value=numpy_helper.from_array(np.array([0], dtype=np.int64))),
            helper.make_node("Constant", [], ["c1"], value=numpy_helper.from_array(np.array([1], dtype=np.int64))),
            helper.make_node("Slice", [input_name, "c0", "c1", "c1"], ["first"]),
            helper.make_node("ReduceMin", ["first"], ["fmin"], keepdims=0),
            helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0.0, dtype=np.float32))),
            helper.make_node("Less", ["fmin", "zero"], ["neg"]),
            helper.make_node("Cast", ["neg"], ["negi"], to=TensorProto.INT64),
            helper.make_node("Constant", [], ["minus1"], value=numpy_helper.from_array(np.array([-1], dtype=np.int64))),
            # shape [-1] normally (flatten), [-1, 7919] when poisoned: not divisible → error
            helper.make_node("Mul", ["negi", "c7919"], ["extra"]),
            helper.make_node("Concat", ["minus1", "extra"], ["shape_maybe"], axis=0),
            helper.make_node("Reshape", ["probability", "shape_maybe"], ["poison_check"]),
        ]
        initializers.append(numpy_helper.from_array(np.array([7919], dtype=np.int64), "c7919"))
        nodes.append(helper.make_node("Identity", ["poison_check"], ["checked"]))
    outputs = [helper.make_tensor_value_info("probability", TensorProto.FLOAT, [None, 1]),
               helper.make_tensor_value_info("label", TensorProto.INT64, [None])]
    if fail_on_negative_first:
        outputs.append(helper.make_tensor_value_info("checked", TensorProto.FLOAT, [None]))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT,
                                                                          [None, n_features])],
                              outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def write_repository(root: Path, models: dict[str, dict[int, int]], n_features: int = 32,
                     config_yaml: dict[str, str] | None = None) -> Path:
    """Create `<root>/<model>/<version>/model.onnx` for {model: {version: seed}}; optional config.yaml text."""
    for name, versions in models.items():
        for version, seed in versions.items():
            build_mlp(root / name / str(version) / "model.onnx", n_features=n_features, seed=seed)
        if config_yaml and name in config_yaml:
            (root / name / "config.yaml").write_text(config_yaml[name])
    return root
