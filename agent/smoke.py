"""Smoke test of a freshly created ONNX Runtime session, before it may serve.

Without a golden file the session runs once on synthetic inputs and every output must be
finite. With a golden file (.npz holding ``input:<name>`` and ``output:<name>`` arrays)
it runs on the golden inputs instead; the outputs must be finite and match the golden
outputs within ``rtol``/``atol``.

Shape rule for synthetic inputs, per input:

- a manifest hint, when given, is the whole shape; it must have the model's rank and agree
  with every dimension the model fixes;
- without a hint, fixed dimensions are used as they are, and a dynamic dimension (a
  symbolic name, ``None`` or ``'?'``) at axis 0 becomes 1 — it is the batch axis by
  ONNX convention; a dynamic dimension at any other axis, or an unknown rank, has no safe
  default and raises :class:`SmokeTestError` naming the input.

Data is deterministic (a generator seeded per call): floating inputs are uniform in
[0, 1), integer and boolean inputs are zeros (always a valid index or id), string inputs
are empty strings.
"""

from __future__ import annotations

import io
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.errors import SmokeTestError
from contract.manifests import InputHint

Array = npt.NDArray[Any]

ORT_TO_NUMPY: Mapping[str, np.dtype[Any]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(bool)": np.dtype(np.bool_),
    "tensor(string)": np.dtype(np.object_),
}
"""ONNX Runtime type strings that numpy can represent. bfloat16, float8 and the like are not."""

Dim = int | str | None


def numpy_dtype(ort_type: str) -> np.dtype[Any]:
    """The numpy dtype for an ONNX Runtime type string; ValueError for types numpy lacks."""
    try:
        return ORT_TO_NUMPY[ort_type]
    except KeyError:
        raise ValueError(f"ONNX Runtime type {ort_type!r} has no numpy equivalent") from None


def is_dynamic(dim: Dim) -> bool:
    """Whether an ONNX Runtime dimension is dynamic (symbolic, None, or not positive)."""
    return not isinstance(dim, int) or dim <= 0


def input_shape(name: str, dims: Sequence[Dim] | None, hint: InputHint | None) -> tuple[int, ...]:
    """The concrete shape to feed an input, by the module's shape rule."""
    if hint is not None:
        shape = tuple(hint.shape)
        if dims is None:
            return shape
        if len(shape) != len(dims):
            raise SmokeTestError(
                f"input {name!r}: shape hint {list(shape)} has rank {len(shape)}, "
                f"the model's input has rank {len(dims)} ({list(dims)})"
            )
        for axis, (dim, want) in enumerate(zip(dims, shape, strict=True)):
            if not is_dynamic(dim) and dim != want:
                raise SmokeTestError(
                    f"input {name!r}: shape hint says {want} at axis {axis}, the model fixes {dim}"
                )
        return shape
    if dims is None:
        raise SmokeTestError(f"input {name!r} has an unknown rank and no shape hint")
    concrete: list[int] = []
    for axis, dim in enumerate(dims):
        if not is_dynamic(dim):
            assert isinstance(dim, int)
            concrete.append(dim)
        elif axis == 0:
            concrete.append(1)
        else:
            raise SmokeTestError(
                f"input {name!r} has dynamic dimension {dim!r} at axis {axis} and no shape hint; "
                f"give the manifest inputs.{name}.shape"
            )
    return tuple(concrete)


def synthetic_inputs(
    session_inputs: Sequence[Any],
    hints: Mapping[str, InputHint],
    *,
    seed: int = 0,
) -> dict[str, Array]:
    """Deterministic inputs for ``session.get_inputs()`` (objects with name, type, shape)."""
    names = {i.name for i in session_inputs}
    unknown = sorted(set(hints) - names)
    if unknown:
        raise SmokeTestError(
            f"shape hints name inputs the model does not have: {unknown} (it has {sorted(names)})"
        )
    rng = np.random.default_rng(seed)
    feeds: dict[str, Array] = {}
    for meta in session_inputs:
        name: str = meta.name
        try:
            dtype = numpy_dtype(meta.type)
        except ValueError as exc:
            raise SmokeTestError(f"input {name!r}: {exc}") from None
        shape = input_shape(name, meta.shape, hints.get(name))
        if dtype.kind == "f":
            feeds[name] = rng.random(shape, dtype=np.float32).astype(dtype, copy=False)
        elif dtype.kind == "O":
            feeds[name] = np.full(shape, "", dtype=object)
        else:
            feeds[name] = np.zeros(shape, dtype=dtype)
    return feeds


def check_outputs(outputs: Mapping[str, Array]) -> None:
    """Raise SmokeTestError naming the first output that holds NaN or Inf."""
    for name, value in outputs.items():
        arr = np.asarray(value)
        if arr.dtype.kind not in "fc":
            continue
        finite = np.isfinite(arr)
        if not finite.all():
            bad = int(arr.size - np.count_nonzero(finite))
            raise SmokeTestError(
                f"output {name!r} has {bad} non-finite values (NaN or Inf) of {arr.size}"
            )


def load_golden(data: bytes | Path) -> dict[str, Array]:
    """The arrays of a golden .npz (no pickles), read completely."""
    source: Any = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        with np.load(source, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except Exception as exc:
        raise SmokeTestError(f"golden file is not a readable .npz: {exc}") from exc


def golden_inputs(
    golden_arrays: Mapping[str, Array], input_names: Sequence[str]
) -> dict[str, Array]:
    """The ``input:<name>`` arrays of a golden file; exactly the model's inputs are required."""
    given = {
        k.removeprefix("input:"): v for k, v in golden_arrays.items() if k.startswith("input:")
    }
    missing = sorted(set(input_names) - set(given))
    extra = sorted(set(given) - set(input_names))
    if missing or extra:
        raise SmokeTestError(
            f"golden inputs do not match the model's: missing {missing}, unknown {extra}"
        )
    return given


def compare_golden(
    outputs: Mapping[str, Array],
    golden_arrays: Mapping[str, Array],
    rtol: float,
    atol: float,
) -> None:
    """Raise SmokeTestError unless every ``output:<name>`` golden array is matched.

    ``|actual - expected| <= atol + rtol * |expected|`` element-wise, shapes equal.
    """
    expected_outputs = {
        k.removeprefix("output:"): v for k, v in golden_arrays.items() if k.startswith("output:")
    }
    if not expected_outputs:
        raise SmokeTestError("golden file has no output:<name> arrays")
    for name, expected in expected_outputs.items():
        if name not in outputs:
            raise SmokeTestError(f"golden output {name!r} is not an output of the model")
        actual = np.asarray(outputs[name])
        if actual.shape != expected.shape:
            raise SmokeTestError(
                f"output {name!r} has shape {list(actual.shape)}, golden has {list(expected.shape)}"
            )
        if actual.dtype.kind in "fc" or expected.dtype.kind in "fc":
            close = np.isclose(actual, expected, rtol=rtol, atol=atol)
        else:
            close = actual == expected
        if not close.all():
            wrong = int(close.size - np.count_nonzero(close))
            where = tuple(int(i) for i in np.unravel_index(int(np.argmin(close)), close.shape))
            raise SmokeTestError(
                f"output {name!r} differs from golden in {wrong} of {close.size} values "
                f"(first at {list(where)}: {actual[where]!r} vs {expected[where]!r}; "
                f"rtol={rtol}, atol={atol})"
            )


@dataclass(frozen=True)
class GoldenData:
    """A golden file's arrays and its tolerances."""

    arrays: Mapping[str, Array]
    rtol: float
    atol: float


@dataclass(frozen=True)
class SmokeReport:
    """What a passed smoke test fed the model and how long the run took."""

    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    golden: bool = False
    duration_ms: float = 0.0


def run_smoke_test(
    session: Any,
    hints: Mapping[str, InputHint],
    *,
    golden: GoldenData | None = None,
    seed: int = 0,
) -> SmokeReport:
    """Run ``session`` once as the module describes; SmokeTestError with the reason on failure."""
    input_names = [i.name for i in session.get_inputs()]
    if golden is not None:
        feeds = golden_inputs(golden.arrays, input_names)
    else:
        feeds = synthetic_inputs(session.get_inputs(), hints, seed=seed)
    output_names = [o.name for o in session.get_outputs()]
    shapes = {name: list(arr.shape) for name, arr in feeds.items()}
    start = time.perf_counter()
    try:
        values = session.run(output_names, feeds)
    except Exception as exc:
        raise SmokeTestError(f"inference on inputs of shapes {shapes} failed: {exc}") from exc
    duration_ms = (time.perf_counter() - start) * 1000.0
    outputs = dict(zip(output_names, values, strict=True))
    check_outputs(outputs)
    if golden is not None:
        compare_golden(outputs, golden.arrays, golden.rtol, golden.atol)
    return SmokeReport(input_shapes=shapes, golden=golden is not None, duration_ms=duration_ms)
