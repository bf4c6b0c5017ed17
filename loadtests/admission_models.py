"""ONNX models for the admission gate's tests and bench: an incumbent, a candidate that answers
exactly the same but costs more (bigger weights, more arithmetic), and an equally cheap one.

Every model is ``input`` float32 [N, F] -> ``probability`` [N, 1] and ``label`` [N] through
F -> H -> H -> 1 (ReLU, sigmoid). The heavy one adds a branch of `extra` H x H weight matrices,
applied `repeat` times each (tanh), whose sum times zero is added to the logit: its answers are
the incumbent's (equal accuracy), while its memory and time are genuinely larger - ONNX Runtime
neither folds a product with a computed value nor drops a branch that feeds the output.
With one extra matrix applied twice, memory is about 2x (two H x H matrices instead of one) and
time about 3x (three H x H products per row instead of one).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def build_admission_model(path: Path, n_features: int = 64, hidden: int = 1024, seed: int = 0, extra: int = 0,
                          repeat: int = 2) -> Path:
    """Write the model to `path` (see the module docstring); returns `path`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((n_features, hidden)) / np.sqrt(n_features)).astype(np.float32)
    w2 = (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)
    w3 = (rng.standard_normal((hidden, 1)) / np.sqrt(hidden)).astype(np.float32)
    initializers = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                    numpy_helper.from_array(w3, "w3")]
    nodes = [helper.make_node("MatMul", ["input", "w1"], ["h1"]), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w2"], ["h2"]), helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("MatMul", ["r2", "w3"], ["z"])]
    logit = "z"
    if extra:
        current = "r2"
        for k in range(extra):
            x = (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)
            initializers.append(numpy_helper.from_array(x, f"x{k}"))
            for r in range(repeat):
                nodes += [helper.make_node("MatMul", [current, f"x{k}"], [f"p{k}_{r}"]),
                          helper.make_node("Tanh", [f"p{k}_{r}"], [f"t{k}_{r}"])]
                current = f"t{k}_{r}"
        initializers.append(numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"))
        nodes += [helper.make_node("ReduceSum", [current, "one_axis"], ["extra_sum"], keepdims=1),
                  helper.make_node("Mul", ["extra_sum", "zero"], ["nothing"]),
                  helper.make_node("Add", ["z", "nothing"], ["z_heavy"])]
        initializers.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "one_axis"))
        logit = "z_heavy"
    nodes += [
        helper.make_node("Sigmoid", [logit], ["probability"]),
        helper.make_node("Constant", [], ["half"], value=numpy_helper.from_array(np.array(0.5, dtype=np.float32))),
        helper.make_node("Greater", ["probability", "half"], ["gt"]),
        helper.make_node("Cast", ["gt"], ["label2d"], to=TensorProto.INT64),
        helper.make_node("Constant", [], ["axes"], value=numpy_helper.from_array(np.array([1], dtype=np.int64))),
        helper.make_node("Squeeze", ["label2d", "axes"], ["label"]),
    ]
    graph = helper.make_graph(nodes, "admission", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                [None, n_features])],
                              [helper.make_tensor_value_info("probability", TensorProto.FLOAT, [None, 1]),
                               helper.make_tensor_value_info("label", TensorProto.INT64, [None])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
