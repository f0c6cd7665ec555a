"""What an ONNX file declares, and what hosting it costs.

``inspect_model`` reads the file once, hashes exactly the bytes it parsed, and reports inputs
and outputs the way ONNX Runtime names them (``tensor(float)``), with dynamic dimensions as
``-1`` beside their symbolic names. It checks that the bytes are an ONNX model with a graph;
it does not run the ONNX checker — whether ONNX Runtime can load the model is what ``measure``
finds out.

``measure`` loads the model in a fresh Python subprocess, so that the hub's own memory (and
whatever ONNX Runtime already allocated in it) does not pollute the figure, and reports the
RSS growth of creating the session, the RSS growth after running it, and the latency of
``session.run`` on synthetic input. Inputs with dynamic dimensions need a concrete shape.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from hub.errors import MeasureError, MissingShapeHint, ModelFileError

DEFAULT_DOMAIN = "ai.onnx"
MIB = 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """A graph input or output.

    ``type`` is ONNX Runtime's name for it (``tensor(float)``, ``seq(tensor(int64))``).
    ``shape`` has ``-1`` for every dimension that is not a fixed size, and ``dim_names`` the
    symbolic name of each dimension (``None`` for fixed or unnamed ones); ``shape`` is None
    when the file does not declare the rank.
    """

    name: str
    type: str
    shape: tuple[int, ...] | None
    dim_names: tuple[str | None, ...] | None

    @property
    def dynamic(self) -> bool:
        """Whether a concrete shape must be supplied to feed this tensor."""
        return self.shape is None or any(size < 0 for size in self.shape)


@dataclass(frozen=True)
class ModelInfo:
    """The identity and interface of an ONNX file."""

    path: Path
    sha256: str
    size: int
    ir_version: int
    opsets: Mapping[str, int]
    producer: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    @property
    def opset(self) -> int | None:
        """The version of the default (``ai.onnx``) operator set, None if not imported."""
        return self.opsets.get(DEFAULT_DOMAIN)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (paths as strings, tuples as lists)."""
        data = asdict(self)
        data["path"] = str(self.path)
        data["opsets"] = dict(self.opsets)
        data["opset"] = self.opset
        return dict(_jsonable(data))


@dataclass(frozen=True)
class Measurement:
    """Cost of hosting a model, measured in a fresh process with ``threads`` intra-op threads.

    ``load_rss_bytes`` is the RSS growth of creating the session; ``steady_rss_bytes`` the
    growth after one warm-up and ``runs`` timed runs (weights plus ONNX Runtime's arena for
    these shapes) — the figure a device budget should use. Latencies are of ``session.run``.
    """

    input_shapes: Mapping[str, tuple[int, ...]]
    runs: int
    threads: int
    provider: str
    load_ms: float
    load_rss_bytes: int
    steady_rss_bytes: int
    latency_ms: float
    latency_min_ms: float
    latency_max_ms: float

    @property
    def load_memory_mb(self) -> int:
        """Memory to budget for hosting the model, in MiB, rounded up (at least 1)."""
        return max(1, math.ceil(max(self.load_rss_bytes, self.steady_rss_bytes) / MIB))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data, with ``load_memory_mb`` included."""
        data = dict(_jsonable(asdict(self)))
        data["load_memory_mb"] = self.load_memory_mb
        return data


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


# --- inspect ---------------------------------------------------------------------------------


def inspect_model(path: Path | str) -> ModelInfo:
    """Read an ONNX file: hash, size, IR version, opsets, producer, inputs and outputs.

    Raises ModelFileError (naming the file) when it cannot be read, is not ONNX, is corrupt,
    has no graph, or keeps tensors in external data files (an artifact is one file).
    """
    import onnx

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ModelFileError(path, f"cannot read: {err.strerror or err}") from err
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as err:  # protobuf's DecodeError, or anything a bad file provokes
        raise ModelFileError(path, f"not an ONNX model (protobuf decode failed: {err})") from err
    if model.ir_version <= 0:
        raise ModelFileError(path, "not an ONNX model (no IR version)")
    if not model.HasField("graph") or not model.graph.output:
        raise ModelFileError(path, "not an ONNX model (no graph or no graph outputs)")
    if not model.opset_import:
        raise ModelFileError(path, "not an ONNX model (imports no operator set)")
    external = [
        t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    if external:
        raise ModelFileError(
            path,
            f"keeps {len(external)} tensor(s) in external data files (e.g. {external[0]!r}); "
            "an artifact must be a single file",
        )

    initializers = {t.name for t in model.graph.initializer}
    producer = " ".join(p for p in (model.producer_name, model.producer_version) if p)
    return ModelInfo(
        path=path,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        ir_version=int(model.ir_version),
        opsets={(op.domain or DEFAULT_DOMAIN): int(op.version) for op in model.opset_import},
        producer=producer,
        # Before IR 4, initializers were also listed as inputs; they are not fed by callers.
        inputs=tuple(_tensor_info(v) for v in model.graph.input if v.name not in initializers),
        outputs=tuple(_tensor_info(v) for v in model.graph.output),
    )


def _tensor_info(value: Any) -> TensorInfo:
    kind = value.type.WhichOneof("value")
    shape: tuple[int, ...] | None = None
    names: tuple[str | None, ...] | None = None
    if kind == "tensor_type" and value.type.tensor_type.HasField("shape"):
        sizes: list[int] = []
        dim_names: list[str | None] = []
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value >= 0:
                sizes.append(int(dim.dim_value))
                dim_names.append(None)
            else:
                sizes.append(-1)
                dim_names.append(dim.dim_param or None)
        shape, names = tuple(sizes), tuple(dim_names)
    return TensorInfo(name=value.name, type=_type_name(value.type), shape=shape, dim_names=names)


def _type_name(type_proto: Any) -> str:
    """ONNX Runtime's spelling of a TypeProto: tensor(float), seq(...), map(k,v), ..."""
    import onnx

    def elem(elem_type: int) -> str:
        try:
            return str(onnx.TensorProto.DataType.Name(elem_type)).lower()
        except ValueError:
            return f"unknown{elem_type}"

    kind = type_proto.WhichOneof("value")
    if kind == "tensor_type":
        return f"tensor({elem(type_proto.tensor_type.elem_type)})"
    if kind == "sparse_tensor_type":
        return f"sparse_tensor({elem(type_proto.sparse_tensor_type.elem_type)})"
    if kind == "sequence_type":
        return f"seq({_type_name(type_proto.sequence_type.elem_type)})"
    if kind == "optional_type":
        return f"optional({_type_name(type_proto.optional_type.elem_type)})"
    if kind == "map_type":
        key = elem(type_proto.map_type.key_type)
        return f"map({key},{_type_name(type_proto.map_type.value_type)})"
    return "undefined"


# --- synthetic input -------------------------------------------------------------------------

_NUMPY_DTYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


def resolve_input_shapes(
    info: ModelInfo, input_shapes: Mapping[str, Sequence[int]] | None
) -> dict[str, tuple[int, ...]]:
    """A concrete shape for every input: the hint where given, else the declared shape.

    A hint must name an existing input, have the declared rank, agree with every fixed
    dimension, and be positive. Raises MissingShapeHint for a dynamic input without a hint,
    MeasureError for a hint that does not fit.
    """
    hints = dict(input_shapes or {})
    known = {t.name for t in info.inputs}
    unknown = sorted(set(hints) - known)
    if unknown:
        raise MeasureError(
            f"{info.path}: no input named {', '.join(map(repr, unknown))}; "
            f"the model's inputs are {', '.join(map(repr, sorted(known)))}"
        )
    shapes: dict[str, tuple[int, ...]] = {}
    for tensor in info.inputs:
        hint = hints.get(tensor.name)
        if hint is None:
            if tensor.shape is None or tensor.dim_names is None:
                raise MeasureError(
                    f"{info.path}: input {tensor.name!r} declares no shape; give one for it"
                )
            if tensor.dynamic:
                raise MissingShapeHint(tensor.name, list(tensor.shape), list(tensor.dim_names))
            shapes[tensor.name] = tensor.shape
            continue
        concrete = tuple(int(size) for size in hint)
        if any(size <= 0 for size in concrete):
            raise MeasureError(f"input {tensor.name!r}: shape {list(concrete)} must be positive")
        if tensor.shape is not None:
            if len(concrete) != len(tensor.shape):
                raise MeasureError(
                    f"input {tensor.name!r}: shape {list(concrete)} has rank {len(concrete)}, "
                    f"the model declares rank {len(tensor.shape)} ({list(tensor.shape)})"
                )
            for axis, (given, declared) in enumerate(zip(concrete, tensor.shape, strict=True)):
                if declared >= 0 and given != declared:
                    raise MeasureError(
                        f"input {tensor.name!r}: dimension {axis} is fixed at {declared}, "
                        f"the shape given has {given}"
                    )
        shapes[tensor.name] = concrete
    return shapes


def synthetic_inputs(
    info: ModelInfo,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    seed: int = 0,
) -> dict[str, npt.NDArray[Any]]:
    """One feed for the model: uniform [0, 1) for float inputs, zeros for integers and bools.

    Zeros keep integer inputs valid as indices. Raises MissingShapeHint / MeasureError as
    ``resolve_input_shapes`` does, and MeasureError for input types it cannot synthesize.
    """
    shapes = resolve_input_shapes(info, input_shapes)
    rng = np.random.default_rng(seed)
    feed: dict[str, npt.NDArray[Any]] = {}
    for tensor in info.inputs:
        dtype = _NUMPY_DTYPES.get(tensor.type)
        if dtype is None:
            raise MeasureError(
                f"{info.path}: cannot synthesize input {tensor.name!r} of type {tensor.type}"
            )
        shape = shapes[tensor.name]
        if np.issubdtype(dtype, np.floating):
            feed[tensor.name] = rng.random(shape, dtype=np.float64).astype(dtype)
        else:
            feed[tensor.name] = np.zeros(shape, dtype=dtype)
    return feed


# --- measure ---------------------------------------------------------------------------------

# Runs in a fresh interpreter that imports only numpy and onnxruntime. Reads a JSON request on
# stdin, writes one JSON line on stdout; any failure goes to stderr with exit status 3.
_CHILD = r"""
import gc, json, os, statistics, sys, time

def rss():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil
        return psutil.Process().memory_info().rss

req = json.load(sys.stdin)
try:
    import numpy as np
    import onnxruntime as ort
    with np.load(req["inputs"], allow_pickle=False) as npz:
        feed = {name: npz[f"arr_{i}"] for i, name in enumerate(req["names"])}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = req["threads"]
    opts.inter_op_num_threads = 1
    gc.collect()
    base = rss()
    t0 = time.perf_counter()
    sess = ort.InferenceSession(req["model"], opts, providers=["CPUExecutionProvider"])
    load_ms = (time.perf_counter() - t0) * 1000
    loaded = rss()
    sess.run(None, feed)
    times = []
    for _ in range(req["runs"]):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1000)
    steady = rss()
except Exception as err:
    print(f"{type(err).__name__}: {err}", file=sys.stderr)
    sys.exit(3)
print(json.dumps({
    "provider": sess.get_providers()[0],
    "load_ms": load_ms,
    "load_rss_bytes": loaded - base,
    "steady_rss_bytes": steady - base,
    "latency_ms": statistics.median(times),
    "latency_min_ms": min(times),
    "latency_max_ms": max(times),
}))
"""


def measure(
    path: Path | str,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None,
    runs: int,
    threads: int = 1,
    timeout_s: float = 300.0,
) -> Measurement:
    """Load ``path`` in a fresh subprocess on the CPU provider and measure memory and latency.

    ``input_shapes`` gives a concrete shape for inputs with dynamic dimensions (see
    ``resolve_input_shapes``); inputs are synthetic (``synthetic_inputs``). ``runs`` timed runs
    follow one untimed warm-up. Raises ModelFileError for a file that is not ONNX,
    MissingShapeHint for a dynamic input without a shape, and MeasureError when ONNX Runtime
    cannot load or run the model or the subprocess fails or exceeds ``timeout_s``.
    """
    if runs < 1:
        raise MeasureError(f"runs must be at least 1, not {runs}")
    if threads < 1:
        raise MeasureError(f"threads must be at least 1, not {threads}")
    info = inspect_model(path)
    feed = synthetic_inputs(info, input_shapes)
    with tempfile.TemporaryDirectory(prefix="edgefleet-measure-") as tmp:
        inputs = Path(tmp) / "inputs.npz"
        names = list(feed)
        np.savez(inputs, *(feed[name] for name in names))  # by position: names may be odd
        request = {
            "model": str(Path(path).resolve()),
            "inputs": str(inputs),
            "names": names,
            "runs": runs,
            "threads": threads,
        }
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        try:
            done = subprocess.run(  # cwd: nothing in the caller's directory shadows a module
                [sys.executable, "-c", _CHILD],
                cwd=tmp,
                input=json.dumps(request),
                capture_output=True,
                text=True,
                timeout=timeout_s,
                env=env,
                check=False,
            )
        except subprocess.TimeoutExpired as err:
            raise MeasureError(f"{path}: measuring took longer than {timeout_s:g} s") from err
    if done.returncode != 0:
        detail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise MeasureError(f"{path}: ONNX Runtime could not load or run it: {detail[0]}")
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError) as err:
        raise MeasureError(f"{path}: the measuring subprocess gave no result") from err
    return Measurement(
        input_shapes={name: tuple(feed[name].shape) for name in feed},
        runs=runs,
        threads=threads,
        provider=str(result["provider"]),
        load_ms=float(result["load_ms"]),
        load_rss_bytes=int(result["load_rss_bytes"]),
        steady_rss_bytes=int(result["steady_rss_bytes"]),
        latency_ms=float(result["latency_ms"]),
        latency_min_ms=float(result["latency_min_ms"]),
        latency_max_ms=float(result["latency_max_ms"]),
    )
