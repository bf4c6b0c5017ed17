"""Tiny ONNX scorers for lifecycle tests: P(label 1) = sigmoid(slope * x0), optionally slow on purpose."""

from __future__ import annotations

from pathlib import Path

import numpy as np

N_FEATURES = 8


def build_scorer(path: Path, slope: float, slow_matmuls: int = 0, size: int = 256) -> Path:
    """Write a model with input `input` float32 [N, 8] and outputs `probability` [N, 1], `label` [N].

    `slope` 0 gives 0.5 for every row (label 0); a large slope is nearly always right when the true
    label is ``x0 > 0``; a negative one nearly always wrong. `slow_matmuls` > 0 adds that many
    `size` x `size` matrix products per batch whose result (times 0) feeds the output, so the model
    answers the same but each batch costs real time.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.zeros((N_FEATURES, 1), dtype=np.float32)
    weights[0, 0] = slope
    nodes = [helper.make_node("MatMul", ["input", "w"], ["z"])]
    initializers = [numpy_helper.from_array(weights, "w")]
    logit = "z"
    if slow_matmuls:
        rng = np.random.default_rng(0)
        initializers.append(numpy_helper.from_array(np.ones((size, size), dtype=np.float32), "m0"))
        nodes += [helper.make_node("ReduceSum", ["input"], ["total"], keepdims=0),
                  helper.make_node("Mul", ["m0", "total"], ["h0"])]
        for k in range(slow_matmuls):
            initializers.append(numpy_helper.from_array(
                (rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32), f"k{k}"))
            nodes += [helper.make_node("MatMul", [f"h{k}", f"k{k}"], [f"p{k}"]),
                      helper.make_node("Tanh", [f"p{k}"], [f"h{k + 1}"])]
        initializers.append(numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"))
        nodes += [helper.make_node("ReduceSum", [f"h{slow_matmuls}"], ["slow_sum"], keepdims=0),
                  helper.make_node("Mul", ["slow_sum", "zero"], ["nothing"]),
                  helper.make_node("Add", ["z", "nothing"], ["z_slow"])]
        logit = "z_slow"
    nodes += [
        helper.make_node("Sigmoid", [logit], ["probability"]),
        helper.make_node("Constant", [], ["half"], value=numpy_helper.from_array(np.array(0.5, dtype=np.float32))),
        helper.make_node("Greater", ["probability", "half"], ["gt"]),
        helper.make_node("Cast", ["gt"], ["label2d"], to=TensorProto.INT64),
        helper.make_node("Constant", [], ["axes"], value=numpy_helper.from_array(np.array([1], dtype=np.int64))),
        helper.make_node("Squeeze", ["label2d", "axes"], ["label"]),
    ]
    graph = helper.make_graph(nodes, "scorer", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                             [None, N_FEATURES])],
                              [helper.make_tensor_value_info("probability", TensorProto.FLOAT, [None, 1]),
                               helper.make_tensor_value_info("label", TensorProto.INT64, [None])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
