"""Open Inference Protocol (KServe V2) codec: JSON tensors and Triton's binary tensor
extension to and from numpy, and the protocol's small response documents.

Pure: no sockets, no model host. The transport hands :func:`parse_infer_request` the JSON
header and the binary section that followed it (already split at
``Inference-Header-Content-Length``) and sends what :func:`encode_infer_response`
returns. Every refusal is a :class:`ProtocolError` carrying the HTTP status.

Datatypes are the protocol's names; each maps to one numpy dtype and one ONNX Runtime
type string (BF16 is reported in metadata only: numpy has no bfloat16, so it cannot be
served). Binary tensors are little-endian and row-major; a BYTES element is a 4-byte
little-endian length followed by that many bytes, which must be UTF-8 because ONNX
Runtime's string tensors are text.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.host import TensorMeta

Array = npt.NDArray[Any]
Buffer = bytes | bytearray | memoryview

DATATYPES: Mapping[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(np.object_),
}
"""Protocol datatype -> numpy dtype (little-endian: the binary extension's byte order)."""

OIP_TO_ORT: Mapping[str, str] = {
    "BOOL": "tensor(bool)",
    "UINT8": "tensor(uint8)",
    "UINT16": "tensor(uint16)",
    "UINT32": "tensor(uint32)",
    "UINT64": "tensor(uint64)",
    "INT8": "tensor(int8)",
    "INT16": "tensor(int16)",
    "INT32": "tensor(int32)",
    "INT64": "tensor(int64)",
    "FP16": "tensor(float16)",
    "FP32": "tensor(float)",
    "FP64": "tensor(double)",
    "BYTES": "tensor(string)",
}
"""Protocol datatype -> ONNX Runtime type string."""

ORT_TO_OIP: Mapping[str, str] = {
    **{ort: oip for oip, ort in OIP_TO_ORT.items()},
    "tensor(bfloat16)": "BF16",
}
"""ONNX Runtime type string -> protocol datatype (BF16 for metadata only)."""

_KIND_TO_OIP: Mapping[tuple[str, int], str] = {
    (dt.kind, dt.itemsize): name for name, dt in DATATYPES.items() if name != "BYTES"
}
_LENGTH = struct.Struct("<I")


class ProtocolError(ValueError):
    """A request (or a result) the protocol cannot carry; ``status`` is the HTTP status."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        self.message = message
        self.status = status
        super().__init__(message)


# --- datatypes -------------------------------------------------------------------------


def oip_datatype(ort_type: str) -> str:
    """The protocol datatype of an ONNX Runtime type; types it lacks are returned as they are."""
    return ORT_TO_OIP.get(ort_type, ort_type)


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The numpy dtype of a protocol datatype; ProtocolError (400) for an unknown one."""
    try:
        return DATATYPES[datatype]
    except (KeyError, TypeError):
        raise ProtocolError(
            f"unknown datatype {datatype!r} (known: {', '.join(DATATYPES)})"
        ) from None


def datatype_of(array: Array) -> str:
    """The protocol datatype of a numpy array; ProtocolError (500) when there is none."""
    dt = array.dtype
    if dt.kind in "OUS":
        return "BYTES"
    name = _KIND_TO_OIP.get((dt.kind, dt.itemsize))
    if name is None:
        raise ProtocolError(f"numpy dtype {dt} has no protocol datatype", status=500)
    return name


def element_count(shape: Sequence[int]) -> int:
    """The number of elements of ``shape`` (an exact Python int, however large)."""
    return math.prod(shape)


# --- request ---------------------------------------------------------------------------


@dataclass(frozen=True)
class InputTensor:
    """One decoded input: its array already has the declared shape and datatype."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Array = field(repr=False, compare=False)
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestedOutput:
    """An output the request names; ``binary_data`` None means "as the request says"."""

    name: str
    binary_data: bool | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InferRequest:
    """A decoded inference request."""

    inputs: tuple[InputTensor, ...]
    outputs: tuple[RequestedOutput, ...] | None = None
    """The outputs asked for, in order; None: every output of the model."""
    id: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)

    @property
    def binary_data_output(self) -> bool:
        """The request-wide ``binary_data_output`` parameter (default false)."""
        return self.parameters.get("binary_data_output") is True

    def feeds(self) -> dict[str, Array]:
        """Input name -> array, as ``session.run`` takes them."""
        return {tensor.name: tensor.data for tensor in self.inputs}

    def output_binary(self, name: str) -> bool:
        """Whether output ``name`` goes back in the binary section."""
        if self.outputs is not None:
            for output in self.outputs:
                if output.name == name and output.binary_data is not None:
                    return output.binary_data
        return self.binary_data_output


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object, not {type(value).__name__}")
    return value


def _parameters(doc: Mapping[str, Any], what: str) -> dict[str, Any]:
    value = doc.get("parameters", {})
    params = _object(value, f"{what} parameters")
    for key in params:
        if key.startswith("shared_memory"):
            raise ProtocolError(f"{what}: shared memory ({key!r}) is not supported")
    return params


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


MAX_RANK = 32
"""The most dimensions a tensor may have (numpy 1.x's limit; models stay far below it)."""
_MAX_EXTENT = 1 << 56
"""Bound on the product of a shape's non-zero dimensions: numpy refuses (ValueError) a shape
whose extent overflows, even for an array of zero elements."""


def _shape(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(_is_int(d) and d >= 0 for d in value):
        raise ProtocolError(f"{what}: shape must be a list of non-negative integers, got {value!r}")
    if len(value) > MAX_RANK:
        raise ProtocolError(f"{what}: shape has {len(value)} dimensions, at most {MAX_RANK}")
    if math.prod(max(d, 1) for d in value) > _MAX_EXTENT:
        raise ProtocolError(f"{what}: shape {str(value)[:80]} is larger than any tensor can be")
    return tuple(value)


def _flatten_strings(data: Any, what: str) -> list[str]:
    flat: list[str] = []
    stack = [iter(data if isinstance(data, list) else [data])]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            if not isinstance(item, str):
                raise ProtocolError(f"{what}: BYTES data must be strings, got {item!r}")
            flat.append(item)
        else:
            stack.pop()
    return flat


def _first_non_number(data: Any) -> str | None:
    """The first leaf of nested lists ``data`` that is not a bool, int or float (shown
    short), or None when every leaf is one."""
    stack = [iter(data if isinstance(data, list) else [data])]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            if not isinstance(item, int | float):
                return "null" if item is None else repr(item)[:40]
        else:
            stack.pop()
    return None


def _json_array(data: Any, datatype: str, shape: tuple[int, ...], what: str) -> Array:
    """A JSON ``data`` value (flat or nested, row-major) as an array of ``shape``."""
    count = element_count(shape)
    dtype = DATATYPES[datatype]
    if datatype == "BYTES":
        strings = _flatten_strings(data, what)
        if len(strings) != count:
            raise ProtocolError(
                f"{what}: data has {len(strings)} values, shape {list(shape)} needs {count}"
            )
        array = np.empty(len(strings), dtype=object)
        array[:] = strings
        return array.reshape(shape)
    want = {"b": "true/false", "i": "integers", "u": "integers"}.get(dtype.kind, "numbers")
    odd = _first_non_number(data)
    if odd is not None:
        # Checked before numpy sees the data: one long string among many short ones would
        # make np.asarray allocate (longest string) x (count) bytes.
        raise ProtocolError(f"{what}: {datatype} data must be {want}, got {odd}")
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ProtocolError(f"{what}: data is not a regular list of numbers ({exc})") from None
    if raw.size != count:
        raise ProtocolError(
            f"{what}: data has {raw.size} values, shape {list(shape)} needs {count}"
        )
    kind = raw.dtype.kind
    if count == 0:
        return np.empty(shape, dtype=dtype)
    if dtype.kind in "iu" and kind in "fO":
        return _exact_integers(data, datatype, dtype, shape, what)
    if dtype.kind == "b":
        ok = kind == "b"
    elif dtype.kind in "iu":
        ok = kind in "iu"
    else:
        ok = kind in "iuf"
    if not ok:
        raise ProtocolError(f"{what}: {datatype} data must be {want}, got {raw.dtype} values")
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        low, high = int(raw.min()), int(raw.max())
        if low < info.min or high > info.max:
            raise ProtocolError(
                f"{what}: values from {low} to {high} do not fit {datatype} "
                f"({info.min} to {info.max})"
            )
    try:
        with np.errstate(over="raise"):
            return raw.astype(dtype, copy=False).reshape(shape)
    except FloatingPointError:
        # Infinities and NaN cast without overflow; the culprit is the largest finite value.
        culprit = np.abs(raw[np.isfinite(raw)]).max()
        raise ProtocolError(
            f"{what}: values up to {culprit:g} do not fit {datatype} "
            f"(largest {np.finfo(dtype).max:g})"
        ) from None


def _exact_integers(
    data: Any, datatype: str, dtype: np.dtype[Any], shape: tuple[int, ...], what: str
) -> Array:
    """Integers numpy promoted to float or object (e.g. UINT64 beside negatives), one by one."""
    values = np.asarray(data, dtype=object).reshape(-1).tolist()
    if not all(type(v) is int for v in values):
        raise ProtocolError(f"{what}: {datatype} data must be integers")
    try:
        return np.array(values, dtype=dtype).reshape(shape)
    except OverflowError:
        raise ProtocolError(f"{what}: values do not fit {datatype}") from None


def _binary_array(chunk: memoryview, datatype: str, shape: tuple[int, ...], what: str) -> Array:
    """A binary section chunk (its size already checked to be in the body) as an array."""
    count = element_count(shape)
    dtype = DATATYPES[datatype]
    if datatype == "BYTES":
        return _binary_strings(chunk, count, shape, what)
    expected = count * dtype.itemsize
    if len(chunk) != expected:
        raise ProtocolError(
            f"{what}: binary_data_size {len(chunk)} does not match shape {list(shape)} of "
            f"{datatype} ({expected} bytes)"
        )
    array: Array = np.frombuffer(chunk, dtype=dtype)
    if dtype.kind == "b" and count and int(array.view(np.uint8).max()) > 1:
        raise ProtocolError(f"{what}: BOOL bytes must be 0 or 1")
    if not array.flags.aligned:
        array = array.copy()
    return array.reshape(shape)


def _binary_strings(chunk: memoryview, count: int, shape: tuple[int, ...], what: str) -> Array:
    size = len(chunk)
    if count * _LENGTH.size > size:
        raise ProtocolError(
            f"{what}: {size} bytes cannot hold {count} BYTES elements (4-byte length each)"
        )
    values = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if offset + _LENGTH.size > size:
            raise ProtocolError(f"{what}: BYTES element {i} runs past binary_data_size {size}")
        (length,) = _LENGTH.unpack_from(chunk, offset)
        offset += _LENGTH.size
        if offset + length > size:
            raise ProtocolError(
                f"{what}: BYTES element {i} declares {length} bytes, "
                f"only {size - offset} remain of binary_data_size {size}"
            )
        try:
            values[i] = str(chunk[offset : offset + length], "utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"{what}: BYTES element {i} is not UTF-8") from None
        offset += length
    if offset != size:
        raise ProtocolError(
            f"{what}: binary_data_size {size} holds {size - offset} bytes after {count} elements"
        )
    return values.reshape(shape)


def _load_json(header: Buffer, what: str) -> Any:
    try:
        return json.loads(bytes(header) if isinstance(header, memoryview) else header)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"{what} is not valid JSON: {exc}") from None


def parse_infer_request(header: Buffer, binary: Buffer = b"") -> InferRequest:
    """Decode an inference request: ``header`` is the JSON, ``binary`` what followed it.

    Inputs with a ``binary_data_size`` parameter take their bytes from ``binary`` in the
    order they are listed; every size is checked against what is there before anything is
    allocated, and the binary section must be used up exactly.
    """
    doc = _object(_load_json(header, "the inference request"), "the inference request")
    params = _parameters(doc, "the request")
    if "binary_data_output" in params and not isinstance(params["binary_data_output"], bool):
        raise ProtocolError("parameter binary_data_output must be true or false")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(f"id must be a string, got {request_id!r}")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError("inputs must be a non-empty list")
    view = memoryview(binary).cast("B")
    offset = 0
    inputs: list[InputTensor] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_inputs):
        item = _object(raw, f"inputs[{index}]")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise ProtocolError(f"inputs[{index}]: name must be a non-empty string")
        what = f"input {name!r}"
        if name in seen:
            raise ProtocolError(f"{what} is given twice")
        seen.add(name)
        datatype = item.get("datatype")
        if not isinstance(datatype, str):
            raise ProtocolError(f"{what}: datatype must be a string, got {datatype!r}")
        numpy_dtype(datatype)
        shape = _shape(item.get("shape"), what)
        tensor_params = _parameters(item, what)
        size = tensor_params.get("binary_data_size")
        if size is not None:
            if not _is_int(size) or size < 0:
                raise ProtocolError(f"{what}: binary_data_size must be a non-negative integer")
            if "data" in item:
                raise ProtocolError(f"{what} has both data and binary_data_size")
            if offset + size > len(view):
                raise ProtocolError(
                    f"{what}: binary_data_size {size} at offset {offset} runs past the "
                    f"{len(view)} bytes of binary data after the JSON header"
                )
            array = _binary_array(view[offset : offset + size], datatype, shape, what)
            offset += size
        elif "data" in item:
            array = _json_array(item["data"], datatype, shape, what)
        else:
            raise ProtocolError(f"{what} has neither data nor binary_data_size")
        inputs.append(InputTensor(name, datatype, shape, array, tensor_params))
    if offset != len(view):
        raise ProtocolError(
            f"{len(view) - offset} bytes of binary data after the JSON header belong to no input"
        )
    return InferRequest(
        inputs=tuple(inputs),
        outputs=_requested_outputs(doc.get("outputs")),
        id=request_id,
        parameters=params,
    )


def _requested_outputs(raw: Any) -> tuple[RequestedOutput, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise ProtocolError("outputs must be a list")
    outputs: list[RequestedOutput] = []
    seen: set[str] = set()
    for index, entry in enumerate(raw):
        item = _object(entry, f"outputs[{index}]")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise ProtocolError(f"outputs[{index}]: name must be a non-empty string")
        if name in seen:
            raise ProtocolError(f"output {name!r} is asked for twice")
        seen.add(name)
        params = _parameters(item, f"output {name!r}")
        if params.get("classification"):
            raise ProtocolError(f"output {name!r}: the classification extension is not supported")
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise ProtocolError(f"output {name!r}: binary_data must be true or false")
        outputs.append(RequestedOutput(name, binary, params))
    return tuple(outputs)


def check_inputs(inputs: Sequence[InputTensor], expected: Sequence[TensorMeta]) -> None:
    """Refuse (400) inputs the model does not take: names, datatypes, ranks, fixed dims."""
    wanted = {meta.name: meta for meta in expected}
    given = {tensor.name for tensor in inputs}
    unknown = sorted(given - set(wanted))
    missing = sorted(set(wanted) - given)
    if unknown or missing:
        raise ProtocolError(
            f"the model takes inputs {sorted(wanted)}; unknown {unknown}, missing {missing}"
        )
    for tensor in inputs:
        meta = wanted[tensor.name]
        want_type = oip_datatype(meta.datatype)
        if tensor.datatype != want_type:
            raise ProtocolError(
                f"input {tensor.name!r}: datatype {tensor.datatype}, the model takes {want_type}"
            )
        if meta.shape is None:
            continue
        if len(tensor.shape) != len(meta.shape):
            raise ProtocolError(
                f"input {tensor.name!r}: shape {list(tensor.shape)} has rank "
                f"{len(tensor.shape)}, the model takes rank {len(meta.shape)} {list(meta.shape)}"
            )
        for axis, (dim, want) in enumerate(zip(tensor.shape, meta.shape, strict=True)):
            if want not in (-1, dim):
                raise ProtocolError(
                    f"input {tensor.name!r}: shape {list(tensor.shape)} has {dim} at axis "
                    f"{axis}, the model takes {list(meta.shape)}"
                )


def output_names(request: InferRequest, available: Sequence[TensorMeta]) -> list[str]:
    """The outputs to compute: those asked for (404-free: unknown ones are a 400), or all."""
    names = [meta.name for meta in available]
    if request.outputs is None:
        return names
    unknown = sorted(o.name for o in request.outputs if o.name not in names)
    if unknown:
        raise ProtocolError(f"the model has no outputs {unknown} (it has {names})")
    return [o.name for o in request.outputs]


# --- response --------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedResponse:
    """An inference response ready to send: the JSON, then the binary buffers in order."""

    json: bytes
    buffers: tuple[memoryview, ...] = ()
    binary: bool = False
    """Whether any output is binary: then ``Inference-Header-Content-Length`` is len(json)."""

    @property
    def content_length(self) -> int:
        return len(self.json) + sum(len(b) for b in self.buffers)

    @property
    def content_type(self) -> str:
        return "application/octet-stream" if self.binary else "application/json"


def _string_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


def _encode_output(name: str, value: Any, binary: bool) -> tuple[dict[str, Any], memoryview | None]:
    array = np.asarray(value)
    datatype = datatype_of(array)
    doc: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
    flat = array.reshape(-1)
    if binary:
        if datatype == "BYTES":
            parts = [_string_bytes(v) for v in flat.tolist()]
            data = b"".join(_LENGTH.pack(len(p)) + p for p in parts)
            chunk = memoryview(data)
        else:
            wire = np.ascontiguousarray(flat, dtype=DATATYPES[datatype])
            chunk = wire.view(np.uint8).data
        doc["parameters"] = {"binary_data_size": len(chunk)}
        return doc, chunk
    if datatype == "BYTES":
        try:
            doc["data"] = [
                v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in flat.tolist()
            ]
        except UnicodeDecodeError:
            raise ProtocolError(
                f"output {name!r} holds bytes that are not UTF-8: ask for binary_data"
            ) from None
    else:
        doc["data"] = flat.tolist()
    return doc, None


def encode_infer_response(
    *,
    model_name: str,
    model_version: str | None,
    outputs: Sequence[tuple[str, Any, bool]],
    request_id: str | None = None,
) -> EncodedResponse:
    """Encode ``(name, array, binary)`` outputs as the protocol's inference response."""
    docs: list[dict[str, Any]] = []
    buffers: list[memoryview] = []
    for name, value, binary in outputs:
        doc, chunk = _encode_output(name, value, binary)
        docs.append(doc)
        if chunk is not None:
            buffers.append(chunk)
    response: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        response["model_version"] = model_version
    if request_id is not None:
        response["id"] = request_id
    response["outputs"] = docs
    body = dumps(response)
    return EncodedResponse(json=body, buffers=tuple(buffers), binary=bool(buffers))


# --- other documents -------------------------------------------------------------------


def dumps(doc: Any) -> bytes:
    """Compact JSON bytes (non-finite floats as NaN/Infinity, as Triton's clients read them)."""
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


def error_body(message: str) -> bytes:
    """The protocol's error document."""
    return dumps({"error": message})


def tensor_metadata(meta: TensorMeta) -> dict[str, Any]:
    """An input or output as model metadata lists it; an unknown rank is shown as [-1]."""
    shape = [-1] if meta.shape is None else list(meta.shape)
    return {"name": meta.name, "datatype": oip_datatype(meta.datatype), "shape": shape}


def model_metadata(
    name: str, version: str | None, inputs: Sequence[TensorMeta], outputs: Sequence[TensorMeta]
) -> dict[str, Any]:
    """The model metadata document."""
    return {
        "name": name,
        "versions": [] if version is None else [version],
        "platform": "onnxruntime_onnx",
        "inputs": [tensor_metadata(m) for m in inputs],
        "outputs": [tensor_metadata(m) for m in outputs],
    }


@dataclass(frozen=True)
class Readiness:
    """Whether the agent may serve (the desired set loaded and smoke-tested); if not, why."""

    ready: bool
    reason: str | None = None


@dataclass(frozen=True)
class RepositoryEntry:
    """One line of the repository index: a model the agent should host, and its state.

    ``state`` is Triton's vocabulary: READY, UNAVAILABLE, LOADING, UNLOADING; ``reason``
    says why a model is not READY (left out by selection, shed under pressure, ...).
    """

    name: str
    version: str | None
    state: str
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The index entry as Triton writes it (version omitted when unknown)."""
        doc: dict[str, Any] = {"name": self.name}
        if self.version is not None:
            doc["version"] = self.version
        doc["state"] = self.state
        doc["reason"] = self.reason
        return doc


def parse_index_request(body: Buffer) -> bool:
    """The repository index request's ``ready`` flag (an empty body means false)."""
    if not bytes(body).strip():
        return False
    doc = _object(_load_json(body, "the repository index request"), "the index request")
    ready = doc.get("ready", False)
    if not isinstance(ready, bool):
        raise ProtocolError("ready must be true or false")
    return ready
