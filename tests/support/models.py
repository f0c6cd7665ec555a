"""Tiny ONNX models built in tests (never downloaded)."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper


def nan_model(path: Path) -> Path:
    """A valid ONNX model whose output is always NaN: sqrt(-(|x| + 1))."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    one = helper.make_node("Constant", [], ["one"], value=helper.make_tensor("c", 1, [], [1.0]))
    nodes = [
        one,
        helper.make_node("Abs", ["x"], ["a"]),
        helper.make_node("Add", ["a", "one"], ["b"]),
        helper.make_node("Neg", ["b"], ["c"]),
        helper.make_node("Sqrt", ["c"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "nan", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path
