"""The Open Inference Protocol codec alone: datatypes, JSON and binary tensors, refusals."""

from __future__ import annotations

import json
import math
import struct
import tracemalloc
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from agent.api import oip
from agent.api.oip import ProtocolError
from agent.host import TensorMeta
from agent.smoke import ORT_TO_NUMPY

NUMERIC = [name for name in oip.DATATYPES if name != "BYTES"]


def request(*inputs: dict[str, Any], **extra: Any) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


def tensor(
    name: str = "x", datatype: Any = "FP32", shape: Any = None, **rest: Any
) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": [2] if shape is None else shape, **rest}


def refused(header: bytes, binary: bytes = b"") -> str:
    with pytest.raises(ProtocolError) as info:
        oip.parse_infer_request(header, binary)
    assert info.value.status == 400
    return info.value.message


# --- datatypes ---------------------------------------------------------------------------


def test_every_datatype_maps_to_onnx_runtime_and_numpy_and_back() -> None:
    for name, dtype in oip.DATATYPES.items():
        ort_type = oip.OIP_TO_ORT[name]
        assert oip.oip_datatype(ort_type) == name
        assert ORT_TO_NUMPY[ort_type] == dtype.newbyteorder("=")
        if name != "BYTES":
            assert oip.datatype_of(np.zeros(1, dtype=dtype)) == name
    assert oip.datatype_of(np.array(["a"], dtype=object)) == "BYTES"
    assert oip.oip_datatype("tensor(bfloat16)") == "BF16"
    assert oip.oip_datatype("seq(tensor(float))") == "seq(tensor(float))"
    with pytest.raises(ProtocolError, match="unknown datatype 'FP8'"):
        oip.numpy_dtype("FP8")
    with pytest.raises(ProtocolError) as info:
        oip.datatype_of(np.zeros(1, dtype=np.complex64))
    assert info.value.status == 500


# --- JSON tensors ------------------------------------------------------------------------


def test_json_data_flat_or_nested_row_major() -> None:
    flat = oip.parse_infer_request(request(tensor(shape=[2, 3], data=[1, 2, 3, 4, 5, 6.5])))
    nested = oip.parse_infer_request(request(tensor(shape=[2, 3], data=[[1, 2, 3], [4, 5, 6.5]])))
    expected = np.array([[1, 2, 3], [4, 5, 6.5]], dtype=np.float32)
    for parsed in (flat, nested):
        (x,) = parsed.inputs
        assert x.data.dtype == np.float32
        np.testing.assert_array_equal(x.data, expected)


@pytest.mark.parametrize(
    ("datatype", "data"),
    [
        ("BOOL", [True, False]),
        ("UINT8", [0, 255]),
        ("UINT16", [0, 65535]),
        ("UINT32", [0, 2**32 - 1]),
        ("UINT64", [0, 2**64 - 1]),
        ("INT8", [-128, 127]),
        ("INT16", [-(2**15), 2**15 - 1]),
        ("INT32", [-(2**31), 2**31 - 1]),
        ("INT64", [-(2**63), 2**63 - 1]),
        ("FP16", [0.5, -65504.0]),
        ("FP32", [1.5, -3]),
        ("FP64", [1e300, -0.0]),
        ("BYTES", ["hello", "wörld"]),
    ],
)
def test_json_data_of_every_datatype(datatype: str, data: list[Any]) -> None:
    (x,) = oip.parse_infer_request(request(tensor(datatype=datatype, data=data))).inputs
    dtype = oip.DATATYPES[datatype]
    assert x.data.dtype == dtype
    assert x.data.tolist() == data


@pytest.mark.parametrize(
    ("datatype", "data", "message"),
    [
        ("INT32", [1.5, 2], "INT32 data must be integers"),
        ("INT32", [True, False], "INT32 data must be integers"),
        ("UINT8", [0, 256], "do not fit UINT8"),
        ("INT8", [-129, 0], "do not fit INT8"),
        ("FP16", [0.5, -70000.0], "values up to 70000 do not fit FP16 (largest 65504)"),
        ("FP16", [100000, 1], "values up to 100000 do not fit FP16"),
        ("FP16", [math.nan, 70000.0], "values up to 70000 do not fit FP16"),
        ("FP16", [-math.inf, 70000.0], "values up to 70000 do not fit FP16"),
        ("FP32", [1e300, 1.0], "values up to 1e+300 do not fit FP32 (largest 3.40282e+38)"),
        ("FP32", ["1", "2"], "FP32 data must be numbers"),
        ("FP32", [True, False], "FP32 data must be numbers"),
        ("FP32", [1, None], "FP32 data must be numbers"),
        ("BOOL", [0, 1], "BOOL data must be true/false"),
        ("BYTES", ["a", 1], "BYTES data must be strings"),
        ("FP32", [[1], [2, 3]], "data has|not a regular list"),
        ("FP32", {"a": 1}, "FP32 data must be numbers|data has"),
    ],
)
def test_json_data_of_the_wrong_kind_is_refused(datatype: str, data: Any, message: str) -> None:
    text = refused(request(tensor(datatype=datatype, data=data)))
    assert any(part in text for part in message.split("|")), text


def test_data_count_must_match_the_shape() -> None:
    assert "data has 3 values, shape [2, 2] needs 4" in refused(
        request(tensor(shape=[2, 2], data=[1, 2, 3]))
    )
    assert "data has 1 values" in refused(request(tensor(datatype="BYTES", data=["a"])))


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"\xff\xfe", "not valid JSON"),
        (request(), "inputs must be a non-empty list"),
        (json.dumps({"inputs": {}}).encode(), "inputs must be a non-empty list"),
        (request(tensor(datatype="FP8", data=[1, 2])), "unknown datatype 'FP8'"),
        (request(tensor(datatype=None, data=[1, 2])), "datatype must be a string"),
        (request(tensor(shape=[-1], data=[1])), "shape must be a list of non-negative"),
        (request(tensor(shape=[True], data=[1])), "shape must be a list of non-negative"),
        (request(tensor(shape="2", data=[1, 2])), "shape must be a list of non-negative"),
        (request(tensor(name="", data=[1, 2])), "name must be a non-empty string"),
        (request(tensor(data=[1, 2]), tensor(data=[1, 2])), "is given twice"),
        (request(tensor()), "neither data nor binary_data_size"),
        (request(tensor(data=[1, 2]), id=5), "id must be a string"),
        (request(tensor(data=[1, 2]), parameters=[]), "parameters must be a JSON object"),
        (
            request(tensor(data=[1, 2]), parameters={"binary_data_output": "yes"}),
            "binary_data_output must be true or false",
        ),
        (
            request(tensor(data=[1, 2], parameters={"shared_memory_region": "r"})),
            "shared memory",
        ),
        (request(tensor(data=[1, 2]), outputs={}), "outputs must be a list"),
        (request(tensor(data=[1, 2]), outputs=[{"name": "y"}, {"name": "y"}]), "twice"),
        (
            request(tensor(data=[1, 2]), outputs=[{"name": "y", "parameters": {"binary_data": 1}}]),
            "binary_data must be true or false",
        ),
        (
            request(
                tensor(data=[1, 2]), outputs=[{"name": "y", "parameters": {"classification": 2}}]
            ),
            "classification extension is not supported",
        ),
    ],
)
def test_malformed_requests_are_refused(header: bytes, message: str) -> None:
    assert message in refused(header)


def test_request_fields_are_kept() -> None:
    parsed = oip.parse_infer_request(
        request(
            tensor(data=[1, 2], parameters={"custom": 1}),
            id="req-1",
            parameters={"binary_data_output": True, "priority": 3},
            outputs=[{"name": "a", "parameters": {"binary_data": False}}, {"name": "b"}],
        )
    )
    assert parsed.id == "req-1"
    assert parsed.parameters["priority"] == 3
    assert parsed.inputs[0].parameters == {"custom": 1}
    assert parsed.output_binary("a") is False  # the output's own flag wins
    assert parsed.output_binary("b") is True  # else the request-wide one
    no_outputs = oip.parse_infer_request(request(tensor(data=[1, 2])))
    assert no_outputs.outputs is None
    assert no_outputs.output_binary("anything") is False


# --- binary tensors ----------------------------------------------------------------------


def binary_input(name: str, datatype: str, shape: list[int], size: Any) -> dict[str, Any]:
    return tensor(name, datatype, shape, parameters={"binary_data_size": size})


def bytes_blob(values: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


@pytest.mark.parametrize("datatype", NUMERIC)
def test_binary_input_of_every_numeric_datatype(datatype: str) -> None:
    dtype = oip.DATATYPES[datatype]
    array = (np.arange(6) % 2).astype(dtype).reshape(2, 3)
    parsed = oip.parse_infer_request(
        request(binary_input("x", datatype, [2, 3], array.nbytes)), array.tobytes()
    )
    np.testing.assert_array_equal(parsed.inputs[0].data, array)
    assert parsed.inputs[0].data.dtype == dtype


def test_binary_inputs_follow_in_order_and_may_mix_with_json() -> None:
    a = np.arange(3, dtype=np.uint8)
    b = np.arange(4, dtype=np.float64).reshape(2, 2)
    header = request(
        binary_input("a", "UINT8", [3], a.nbytes),
        tensor("j", "INT64", [1], data=[7]),
        binary_input("b", "FP64", [2, 2], b.nbytes),
    )
    parsed = oip.parse_infer_request(header, a.tobytes() + b.tobytes())
    feeds = parsed.feeds()
    np.testing.assert_array_equal(feeds["a"], a)
    np.testing.assert_array_equal(feeds["b"], b)
    assert feeds["j"].tolist() == [7]
    assert feeds["b"].flags.aligned  # offset 3 is misaligned for FP64: it was copied


def test_binary_bytes_tensor() -> None:
    values = ["", "a", "wörld"]
    blob = bytes_blob([v.encode() for v in values])
    parsed = oip.parse_infer_request(request(binary_input("s", "BYTES", [3], len(blob))), blob)
    assert parsed.inputs[0].data.tolist() == values


@pytest.mark.parametrize(
    ("header", "binary", "message"),
    [
        (request(binary_input("x", "FP32", [2], 8)), b"\0" * 4, "runs past the 4 bytes"),
        (request(binary_input("x", "FP32", [2], 4)), b"\0" * 4, "does not match shape [2]"),
        (request(binary_input("x", "FP32", [2], 8)), b"\0" * 12, "4 bytes of binary data"),
        (request(tensor(data=[1, 2])), b"\0", "1 bytes of binary data"),
        (request(binary_input("x", "FP32", [2], -8)), b"", "non-negative integer"),
        (request(binary_input("x", "FP32", [2], "8")), b"\0" * 8, "non-negative integer"),
        (
            request(tensor(data=[1, 2], parameters={"binary_data_size": 8})),
            b"\0" * 8,
            "both data and binary_data_size",
        ),
        (request(binary_input("b", "BOOL", [2], 2)), b"\x01\x02", "BOOL bytes must be 0 or 1"),
        (request(binary_input("s", "BYTES", [2], 5)), bytes_blob([b"a"]), "cannot hold 2"),
        (
            request(binary_input("s", "BYTES", [1], 6)),
            struct.pack("<I", 9) + b"ab",
            "declares 9 bytes",
        ),
        (
            request(binary_input("s", "BYTES", [1], 7)),
            bytes_blob([b"a"]) + b"zz",
            "holds 2 bytes after 1 elements",
        ),
        (request(binary_input("s", "BYTES", [1], 5)), bytes_blob([b"\xff"]), "not UTF-8"),
    ],
)
def test_bad_binary_sections_are_refused(header: bytes, binary: bytes, message: str) -> None:
    assert message in refused(header, binary)


@pytest.mark.parametrize(
    "item",
    [
        binary_input("x", "FP32", [1 << 20, 1 << 20], 4 << 40),  # a 4 TiB tensor
        binary_input("x", "FP32", [2], 1 << 62),
        binary_input("s", "BYTES", [1 << 40], 16),
        tensor(shape=[1 << 31, 1 << 31], data=[1.0]),
    ],
)
def test_huge_declared_sizes_allocate_nothing(item: dict[str, Any]) -> None:
    header = request(item)
    tracemalloc.start()
    try:
        refused(header, b"\0" * 16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


# --- model checks ------------------------------------------------------------------------

MODEL_INPUTS = (
    TensorMeta("x", "tensor(float)", (-1, 3, -1)),
    TensorMeta("n", "tensor(int64)", None),
)
MODEL_OUTPUTS = (TensorMeta("y", "tensor(float)", (-1,)), TensorMeta("z", "tensor(int64)", None))


def inputs_for(*items: dict[str, Any]) -> tuple[oip.InputTensor, ...]:
    return oip.parse_infer_request(request(*items)).inputs


def test_check_inputs_accepts_dynamic_dimensions_and_unknown_rank() -> None:
    ok = inputs_for(
        tensor("x", "FP32", [2, 3, 5], data=[0.0] * 30), tensor("n", "INT64", [], data=[1])
    )
    oip.check_inputs(ok, MODEL_INPUTS)


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([tensor("x", "FP32", [1, 3, 1], data=[0, 0, 0])], "missing ['n']"),
        (
            [
                tensor("x", "FP32", [1, 3, 1], data=[0, 0, 0]),
                tensor("n", "INT64", [1], data=[1]),
                tensor("q", "INT64", [1], data=[1]),
            ],
            "unknown ['q']",
        ),
        (
            [tensor("x", "FP64", [1, 3, 1], data=[0, 0, 0]), tensor("n", "INT64", [], data=[1])],
            "datatype FP64, the model takes FP32",
        ),
        (
            [tensor("x", "FP32", [3, 1], data=[0, 0, 0]), tensor("n", "INT64", [], data=[1])],
            "has rank 2, the model takes rank 3",
        ),
        (
            [tensor("x", "FP32", [1, 4, 1], data=[0] * 4), tensor("n", "INT64", [], data=[1])],
            "has 4 at axis 1",
        ),
    ],
)
def test_check_inputs_refuses_what_the_model_does_not_take(
    items: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(ProtocolError) as info:
        oip.check_inputs(inputs_for(*items), MODEL_INPUTS)
    assert message in info.value.message


def test_output_names() -> None:
    everything = oip.parse_infer_request(request(tensor(data=[1, 2])))
    assert oip.output_names(everything, MODEL_OUTPUTS) == ["y", "z"]
    some = oip.parse_infer_request(request(tensor(data=[1, 2]), outputs=[{"name": "z"}]))
    assert oip.output_names(some, MODEL_OUTPUTS) == ["z"]
    wrong = oip.parse_infer_request(request(tensor(data=[1, 2]), outputs=[{"name": "w"}]))
    with pytest.raises(ProtocolError, match=r"no outputs \['w'\]"):
        oip.output_names(wrong, MODEL_OUTPUTS)


# --- responses ---------------------------------------------------------------------------


def test_encode_response_json_and_binary() -> None:
    y = np.arange(6, dtype=np.float32).reshape(2, 3)
    s = np.array(["a", "wörld"], dtype=object)
    encoded = oip.encode_infer_response(
        model_name="m",
        model_version="2",
        request_id="r",
        outputs=[("y", y, True), ("s", s, False), ("t", s, True)],
    )
    assert encoded.binary
    assert encoded.content_type == "application/octet-stream"
    doc = json.loads(encoded.json)
    assert doc["model_name"] == "m"
    assert doc["model_version"] == "2"
    assert doc["id"] == "r"
    y_doc, s_doc, t_doc = doc["outputs"]
    assert y_doc == {
        "name": "y",
        "datatype": "FP32",
        "shape": [2, 3],
        "parameters": {"binary_data_size": 24},
    }
    assert s_doc == {"name": "s", "datatype": "BYTES", "shape": [2], "data": ["a", "wörld"]}
    assert bytes(encoded.buffers[0]) == y.tobytes()
    assert bytes(encoded.buffers[1]) == bytes_blob([b"a", "wörld".encode()])
    assert t_doc["parameters"]["binary_data_size"] == len(encoded.buffers[1])
    assert encoded.content_length == len(encoded.json) + 24 + len(encoded.buffers[1])
    plain = oip.encode_infer_response(model_name="m", model_version=None, outputs=[("y", y, False)])
    assert not plain.binary
    assert plain.content_type == "application/json"
    assert "model_version" not in json.loads(plain.json)


def test_non_utf8_bytes_output_needs_binary() -> None:
    raw = np.array([b"\xff"], dtype=object)
    with pytest.raises(ProtocolError, match="not UTF-8"):
        oip.encode_infer_response(model_name="m", model_version="1", outputs=[("s", raw, False)])
    ok = oip.encode_infer_response(model_name="m", model_version="1", outputs=[("s", raw, True)])
    assert bytes(ok.buffers[0]) == bytes_blob([b"\xff"])


def response_as_request(encoded: oip.EncodedResponse) -> oip.InferRequest:
    """Feed a response's outputs back in as inputs (what was sent is what is read)."""
    doc: dict[str, Any] = json.loads(encoded.json)
    binary = b"".join(bytes(b) for b in encoded.buffers)
    return oip.parse_infer_request(oip.dumps({"inputs": doc["outputs"]}), binary)


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from([oip.DATATYPES[name] for name in NUMERIC]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
    binary=st.booleans(),
    data=st.data(),
)
def test_round_trip_is_bit_exact(
    dtype: np.dtype[Any], shape: tuple[int, ...], binary: bool, data: st.DataObject
) -> None:
    array = data.draw(hnp.arrays(dtype, shape))
    encoded = oip.encode_infer_response(
        model_name="m", model_version="1", outputs=[("x", array, binary)]
    )
    (back,) = response_as_request(encoded).inputs
    assert back.data.dtype == dtype
    assert back.data.shape == array.shape
    if binary or dtype.kind != "f":
        assert back.data.tobytes() == array.tobytes()
    else:  # JSON keeps every value, -0.0 and infinities included; NaN payloads are not kept
        nan = np.isnan(array)
        assert np.array_equal(np.isnan(back.data), nan)
        assert back.data[~nan].tobytes() == array[~nan].tobytes()


@given(values=st.lists(st.text(), max_size=5), binary=st.booleans())
def test_bytes_round_trip(values: list[str], binary: bool) -> None:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    encoded = oip.encode_infer_response(
        model_name="m", model_version="1", outputs=[("s", array, binary)]
    )
    (back,) = response_as_request(encoded).inputs
    assert back.data.tolist() == values


# --- other documents ---------------------------------------------------------------------


def test_metadata_and_index_documents() -> None:
    doc = oip.model_metadata("m", "3", MODEL_INPUTS, MODEL_OUTPUTS)
    assert doc == {
        "name": "m",
        "versions": ["3"],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [-1, 3, -1]},
            {"name": "n", "datatype": "INT64", "shape": [-1]},
        ],
        "outputs": [
            {"name": "y", "datatype": "FP32", "shape": [-1]},
            {"name": "z", "datatype": "INT64", "shape": [-1]},
        ],
    }
    entry = oip.RepositoryEntry("m", None, "UNAVAILABLE", "left out: memory budget")
    assert entry.to_dict() == {
        "name": "m",
        "state": "UNAVAILABLE",
        "reason": "left out: memory budget",
    }
    assert oip.parse_index_request(b"") is False
    assert oip.parse_index_request(b'{"ready": true}') is True
    with pytest.raises(ProtocolError):
        oip.parse_index_request(b'{"ready": 1}')
    assert json.loads(oip.error_body("boom")) == {"error": "boom"}
