"""Small real ONNX models for tests and benchmarks, built with onnx.helper (no training needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def build_mlp(path: Path, n_features: int = 32, hidden: int = 64, seed: int = 0, input_name: str = "input",
              fail_on_negative_first: bool = False, hang_on_negative_first: bool = False) -> Path:
    """Write a 2-layer MLP (float32 [N, n_features] → `probability` [N, 1] and `label` [N]) to `path`.

    With `fail_on_negative_first`, the graph fails at run time for any batch containing a row whose
    first feature is negative (a poison row, for failure-isolation tests). With
    `hang_on_negative_first`, such a batch never ends: an ONNX Loop runs 2**62 iterations (one
    core busy until ONNX Runtime is told to terminate the run); other batches run zero iterations,
    so the model loads and warms up like any other.
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
    if hang_on_negative_first:
        nodes, initializers = _with_hang(nodes, initializers, input_name)
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


def _with_hang(nodes: list, initializers: list, input_name: str) -> tuple[list, list]:
    """The MLP's nodes with a Loop of 2**62 iterations (when the batch's smallest first feature is
    negative, else 0) whose count, times zero, is added to the logit: the result is the same
    MLP's, and nothing can be pruned away."""
    from onnx import TensorProto, helper, numpy_helper

    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["count_in", "one"], ["count_out"])],
        "spin",
        [helper.make_tensor_value_info("iteration", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("count_in", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("count_out", TensorProto.FLOAT, [])],
        [numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one")])
    at = next(i for i, node in enumerate(nodes) if node.output[0] == "probability")
    nodes = nodes[:at] + [
        helper.make_node("Slice", [input_name, "h_c0", "h_c1", "h_c1"], ["h_first"]),
        helper.make_node("ReduceMin", ["h_first"], ["h_fmin"], keepdims=0),
        helper.make_node("Less", ["h_fmin", "h_zero"], ["h_neg"]),
        helper.make_node("Cast", ["h_neg"], ["h_negi"], to=TensorProto.INT64),
        helper.make_node("Mul", ["h_negi", "h_forever"], ["h_trips"]),
        helper.make_node("Loop", ["h_trips", "h_true", "h_zero"], ["h_count"], body=body),
        helper.make_node("Mul", ["h_count", "h_zero"], ["h_nothing"]),
        helper.make_node("Add", ["zb", "h_nothing"], ["h_logit"]),
        helper.make_node("Sigmoid", ["h_logit"], ["probability"]),
    ] + nodes[at + 1:]
    initializers = [*initializers,
                    numpy_helper.from_array(np.array([0], dtype=np.int64), "h_c0"),
                    numpy_helper.from_array(np.array([1], dtype=np.int64), "h_c1"),
                    numpy_helper.from_array(np.array(0.0, dtype=np.float32), "h_zero"),
                    numpy_helper.from_array(np.array(2**62, dtype=np.int64), "h_forever"),
                    numpy_helper.from_array(np.array(True), "h_true")]
    return nodes, initializers


def write_repository(root: Path, models: dict[str, dict[int, int]], n_features: int = 32,
                     config_yaml: dict[str, str] | None = None) -> Path:
    """Create `<root>/<model>/<version>/model.onnx` for {model: {version: seed}}; optional config.yaml text."""
    for name, versions in models.items():
        for version, seed in versions.items():
            build_mlp(root / name / str(version) / "model.onnx", n_features=n_features, seed=seed)
        if config_yaml and name in config_yaml:
            (root / name / "config.yaml").write_text(config_yaml[name])
    return root
