"""hub.onnx_inspect and hub.quantize on the real OCR models and on tiny built graphs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hub.errors import MeasureError, MissingShapeHint, ModelFileError, QuantizeError
from hub.onnx_inspect import inspect_model, measure, resolve_input_shapes, synthetic_inputs
from hub.quantize import _constants_to_initializers, quantize_int8

CLS_SHAPE = [2, 3, 48, 192]
REC_SHAPE = [1, 3, 48, 320]

EXPECTED = {
    "det": (
        12,
        "sigmoid_0.tmp_0",
        ("p2o.DynamicDimension.0", None, "p2o.DynamicDimension.1", "p2o.DynamicDimension.2"),
        (-1, 1, -1, -1),
    ),
    "cls": (11, "save_infer_model/scale_0.tmp_1", (None, None, "?", "?"), (-1, 2)),
    "rec": (
        12,
        "softmax_11.tmp_0",
        ("p2o.DynamicDimension.0", None, "?", "p2o.DynamicDimension.1"),
        (-1, -1, 6625),
    ),
}


def _tiny_model(path: Path, *, weight_as_constant: bool, op: str = "MatMul") -> Path:
    """x[2,16] @ W[16,8] -> softmax -> y[2,8]; W as an initializer or a Constant node."""
    weight = np.random.default_rng(1).standard_normal((16, 8)).astype(np.float32)
    nodes = []
    initializers = []
    if weight_as_constant:
        nodes.append(
            helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(weight, "W"))
        )
    else:
        initializers.append(numpy_helper.from_array(weight, "W"))
    nodes += [helper.make_node(op, ["x", "W"], ["h"]), helper.make_node("Softmax", ["h"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


# --- inspect ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["det", "cls", "rec"])
def test_inspect_reports_ocr_models_with_dynamic_dims(
    ocr_models: dict[str, Path], kind: str
) -> None:
    opset, output_name, input_dims, output_shape = EXPECTED[kind]
    path = ocr_models[kind]
    info = inspect_model(path)

    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.size == path.stat().st_size
    assert info.opset == opset
    assert info.opsets == {"ai.onnx": opset}
    [x] = info.inputs
    assert (x.name, x.type, x.shape, x.dim_names) == (
        "x",
        "tensor(float)",
        (-1, 3, -1, -1),
        input_dims,
    )
    assert x.dynamic
    [y] = info.outputs
    assert (y.name, y.type, y.shape) == (output_name, "tensor(float)", output_shape)
    json.dumps(info.to_dict())  # plain data for the store


def test_inspect_reports_producer(ocr_models: dict[str, Path]) -> None:
    assert inspect_model(ocr_models["cls"]).producer == "PaddlePaddle"


def test_inspect_fixed_shapes(tmp_path: Path) -> None:
    info = inspect_model(_tiny_model(tmp_path / "tiny.onnx", weight_as_constant=False))
    [x] = info.inputs
    assert x.shape == (2, 16)
    assert x.dim_names == (None, None)
    assert not x.dynamic
    assert info.ir_version == 8


def _truncated(tmp_path: Path, ocr_models: dict[str, Path]) -> Path:
    data = ocr_models["cls"].read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    return path


def _random_bytes(tmp_path: Path, _: object) -> Path:
    path = tmp_path / "random.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path


def _text(tmp_path: Path, _: object) -> Path:
    path = tmp_path / "text.onnx"
    path.write_text("hello, not a model\n")
    return path


def _empty(tmp_path: Path, _: object) -> Path:
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    return path


def _missing(tmp_path: Path, _: object) -> Path:
    return tmp_path / "missing.onnx"


@pytest.mark.parametrize("make", [_truncated, _random_bytes, _text, _empty, _missing])
def test_inspect_refuses_what_is_not_onnx(
    tmp_path: Path, ocr_models: dict[str, Path], make: Any
) -> None:
    path = make(tmp_path, ocr_models)
    with pytest.raises(ModelFileError) as caught:
        inspect_model(path)
    assert str(path) in str(caught.value)
    assert caught.value.path == path


def test_inspect_refuses_external_data(tmp_path: Path) -> None:
    model = onnx.load(str(_tiny_model(tmp_path / "tiny.onnx", weight_as_constant=False)))
    onnx.save(
        model,
        str(tmp_path / "ext.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.data",
        size_threshold=0,
    )
    with pytest.raises(ModelFileError, match="external data"):
        inspect_model(tmp_path / "ext.onnx")


# --- shapes and synthetic input --------------------------------------------------------------


def test_shape_hints_are_checked(ocr_models: dict[str, Path]) -> None:
    info = inspect_model(ocr_models["cls"])
    assert resolve_input_shapes(info, {"x": CLS_SHAPE}) == {"x": tuple(CLS_SHAPE)}
    with pytest.raises(MissingShapeHint, match="'x'") as caught:
        resolve_input_shapes(info, None)
    assert caught.value.input_name == "x"
    with pytest.raises(MeasureError, match="rank 3"):
        resolve_input_shapes(info, {"x": [3, 48, 192]})
    with pytest.raises(MeasureError, match="dimension 1 is fixed at 3"):
        resolve_input_shapes(info, {"x": [1, 4, 48, 192]})
    with pytest.raises(MeasureError, match="no input named 'image'"):
        resolve_input_shapes(info, {"x": CLS_SHAPE, "image": [1]})
    with pytest.raises(MeasureError, match="positive"):
        resolve_input_shapes(info, {"x": [0, 3, 48, 192]})


def test_synthetic_inputs_follow_shape_and_type(ocr_models: dict[str, Path]) -> None:
    feed = synthetic_inputs(inspect_model(ocr_models["cls"]), {"x": CLS_SHAPE}, seed=3)
    assert feed["x"].shape == tuple(CLS_SHAPE)
    assert feed["x"].dtype == np.float32
    again = synthetic_inputs(inspect_model(ocr_models["cls"]), {"x": CLS_SHAPE}, seed=3)
    assert np.array_equal(feed["x"], again["x"])


# --- measure ---------------------------------------------------------------------------------


def test_measure_cls(ocr_models: dict[str, Path]) -> None:
    result = measure(ocr_models["cls"], input_shapes={"x": CLS_SHAPE}, runs=5)
    assert result.input_shapes == {"x": tuple(CLS_SHAPE)}
    assert result.runs == 5
    assert result.threads == 1
    assert result.provider == "CPUExecutionProvider"
    assert result.load_rss_bytes > 0
    assert result.steady_rss_bytes > 0
    assert result.load_ms > 0
    assert 0 < result.latency_min_ms <= result.latency_ms <= result.latency_max_ms
    assert result.load_memory_mb >= 1
    assert json.loads(json.dumps(result.to_dict()))["load_memory_mb"] == result.load_memory_mb


def test_measure_needs_shape_for_dynamic_input(ocr_models: dict[str, Path]) -> None:
    with pytest.raises(MissingShapeHint, match="input 'x' has dynamic dimensions"):
        measure(ocr_models["rec"], input_shapes=None, runs=1)


def test_measure_fixed_shape_model_needs_no_hint(tmp_path: Path) -> None:
    result = measure(
        _tiny_model(tmp_path / "t.onnx", weight_as_constant=False), input_shapes=None, runs=3
    )
    assert result.input_shapes == {"x": (2, 16)}
    assert result.latency_ms > 0


def test_measure_reports_a_model_runtime_cannot_load(tmp_path: Path) -> None:
    path = _tiny_model(tmp_path / "bad.onnx", weight_as_constant=False, op="NoSuchOperator")
    with pytest.raises(MeasureError, match="could not load or run") as caught:
        measure(path, input_shapes=None, runs=1)
    assert str(path) in str(caught.value)


def test_measure_refuses_zero_runs(ocr_models: dict[str, Path]) -> None:
    with pytest.raises(MeasureError, match="runs"):
        measure(ocr_models["cls"], input_shapes={"x": CLS_SHAPE}, runs=0)


# --- quantize --------------------------------------------------------------------------------


def _samples(path: Path, shape: list[int], n: int = 3) -> list[dict[str, Any]]:
    info = inspect_model(path)
    return [synthetic_inputs(info, {"x": shape}, seed=seed) for seed in range(n)]


@pytest.mark.parametrize("preprocess", ["constants", "ort"])
def test_quantize_cls(ocr_models: dict[str, Path], tmp_path: Path, preprocess: Any) -> None:
    src = ocr_models["cls"]
    dst = tmp_path / "out" / "cls.int8.onnx"
    result = quantize_int8(src, dst, sample_inputs=_samples(src, CLS_SHAPE), preprocess=preprocess)

    assert result.size_before == src.stat().st_size
    assert result.size_after == dst.stat().st_size
    assert result.size_ratio < 0.5  # measured 0.39-0.43: most weights are Conv
    assert result.samples == 3
    [(name, drift)] = result.drift.items()
    assert name == "save_infer_model/scale_0.tmp_1"
    # Two-class softmax on noise input: measured max |diff| 0.05-0.08 and cosine 0.996-0.998
    # here. The bounds are about 2x the measured drift; a broken quantization (wrong weights)
    # moves probabilities by ~0.5 and cosine well below 0.9.
    assert 0 < drift.max_abs < 0.2
    assert drift.mean_abs <= drift.max_abs
    assert drift.cosine > 0.99
    assert drift.top1_agreement is not None  # detected as classification-like
    assert 0 <= drift.top1_agreement <= 1
    record = json.loads(json.dumps(result.drift_dict()))
    assert record["outputs"][name]["cosine"] == drift.cosine
    assert record["preprocess"] == preprocess
    assert record["sample_source"] == "given"

    quantized = inspect_model(dst)
    original = inspect_model(src)
    assert [(t.name, t.type) for t in quantized.inputs] == [
        (t.name, t.type) for t in original.inputs
    ]
    assert [t.name for t in quantized.outputs] == [t.name for t in original.outputs]
    assert [p.name for p in dst.parent.iterdir()] == [dst.name]  # no temporary file left


def test_quantize_rec_matmul_only(ocr_models: dict[str, Path], tmp_path: Path) -> None:
    src = ocr_models["rec"]
    result = quantize_int8(
        src,
        tmp_path / "rec.int8.onnx",
        sample_inputs=_samples(src, REC_SHAPE, n=2),
        op_types=["MatMul"],
    )
    assert result.op_types == ("MatMul",)
    # Measured here: 0.72 of the size (Conv weights stay fp32), cosine 0.99994, every
    # time step's arg-max unchanged, max |diff| 0.04 on a 6625-way softmax.
    assert result.size_ratio < 0.8
    drift = result.drift["softmax_11.tmp_0"]
    assert drift.cosine > 0.999
    assert drift.top1_agreement is not None
    assert drift.top1_agreement > 0.95


def test_quantize_converts_constant_weights(tmp_path: Path) -> None:
    src = _tiny_model(tmp_path / "const.onnx", weight_as_constant=True)
    assert _constants_to_initializers(src, tmp_path / "prepared.onnx") == 1
    prepared = onnx.load(str(tmp_path / "prepared.onnx"))
    assert [t.name for t in prepared.graph.initializer] == ["W"]
    assert [n.op_type for n in prepared.graph.node] == ["MatMul", "Softmax"]

    x = np.random.default_rng(2).standard_normal((2, 16)).astype(np.float32)
    result = quantize_int8(
        src, tmp_path / "const.int8.onnx", sample_inputs=[{"x": x}], sample_source="synthetic"
    )
    assert result.drift_dict()["sample_source"] == "synthetic"
    assert result.drift["y"].top1_agreement == 1.0
    assert result.drift["y"].cosine > 0.99


def test_quantize_refuses_when_nothing_is_quantized(
    ocr_models: dict[str, Path], tmp_path: Path
) -> None:
    src = ocr_models["cls"]
    dst = tmp_path / "none.onnx"
    with pytest.raises(QuantizeError, match="nothing was quantized") as caught:
        quantize_int8(src, dst, sample_inputs=_samples(src, CLS_SHAPE, 1), op_types=["LSTM"])
    assert str(src) in str(caught.value)
    assert not dst.exists()
    assert list(tmp_path.iterdir()) == []


def test_quantize_refuses_bad_arguments(ocr_models: dict[str, Path], tmp_path: Path) -> None:
    src = ocr_models["cls"]
    with pytest.raises(QuantizeError, match="sample input"):
        quantize_int8(src, tmp_path / "a.onnx", sample_inputs=[])
    with pytest.raises(QuantizeError, match="destination is the source"):
        quantize_int8(src, src, sample_inputs=_samples(src, CLS_SHAPE, 1))
    with pytest.raises(QuantizeError, match="no output named 'logits'"):
        quantize_int8(
            src,
            tmp_path / "b.onnx",
            sample_inputs=_samples(src, CLS_SHAPE, 1),
            classification_outputs=["logits"],
        )
    with pytest.raises(QuantizeError, match="running the fp32 and int8 models"):
        quantize_int8(src, tmp_path / "c.onnx", sample_inputs=[{"image": np.zeros(1)}])
    assert not any(tmp_path.iterdir())


def test_quantize_refuses_non_onnx(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_text("nope")
    with pytest.raises(ModelFileError):
        quantize_int8(bad, tmp_path / "out.onnx", sample_inputs=[{"x": np.zeros(1)}])
