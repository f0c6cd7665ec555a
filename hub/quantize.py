"""Derive an int8 variant of an fp32 ONNX model, and record how far its outputs drift.

Dynamic quantization (``onnxruntime.quantization.quantize_dynamic``, int8 weights, activations
quantized at run time) needs every weight it quantizes to be an initializer. Exporters such as
paddle2onnx emit weights as ``Constant`` nodes instead, and ``quantize_dynamic`` then refuses
the model ("Expected ... to be an initializer"). A pre-processing pass fixes that first:

- ``"constants"`` (default): turn each top-level ``Constant`` node into an initializer of the
  same name. Numerically a no-op for the fp32 graph, and needs nothing beyond ``onnx``.
- ``"ort"``: ``onnxruntime.quantization.quant_pre_process`` (ONNX Runtime graph optimization,
  which also folds BatchNormalization into Conv, plus ONNX shape inference; symbolic shape
  inference is skipped because it needs sympy).

int8 is not automatically better: on x86 CPUs without VNNI the int8 kernels can be slower
than fp32, and the outputs drift. The result therefore carries the drift of every output on
the caller's sample inputs, so that it is recorded beside the variant and shown to operators
(see docs/decisions/0006-int8-variants.md).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from hub.errors import QuantizeError
from hub.onnx_inspect import inspect_model

Preprocess = Literal["constants", "ort"]
Feed = Mapping[str, npt.NDArray[Any]]

# Tolerance for "each row of the last axis is a probability distribution".
_PROBABILITY_ATOL = 1e-3


@dataclass(frozen=True)
class OutputDrift:
    """How far one output of the quantized model is from the fp32 model's, over all samples.

    ``cosine`` is over the flattened output (1.0 when both are all zeros). Outputs that are
    near zero everywhere (a detection map of an empty image) can have a low cosine with tiny
    absolute differences: read it together with ``max_abs``. ``top1_agreement`` is the
    fraction of rows whose arg-max over the last axis agrees, for classification-like outputs
    (each row of the last axis a probability distribution in fp32), else None.
    """

    max_abs: float
    mean_abs: float
    cosine: float
    top1_agreement: float | None


@dataclass(frozen=True)
class QuantizeResult:
    """What ``quantize_int8`` wrote and how its outputs compare with the source's."""

    src: Path
    dst: Path
    size_before: int
    size_after: int
    weight_type: str
    op_types: tuple[str, ...] | None
    per_channel: bool
    preprocess: Preprocess
    samples: int
    sample_source: str
    drift: Mapping[str, OutputDrift]

    @property
    def size_ratio(self) -> float:
        """``size_after / size_before``."""
        return self.size_after / self.size_before

    def drift_dict(self) -> dict[str, Any]:
        """The drift record to persist beside the variant (plain JSON data)."""
        return {
            "method": "onnxruntime.quantize_dynamic",
            "weight_type": self.weight_type,
            "op_types": list(self.op_types) if self.op_types is not None else None,
            "per_channel": self.per_channel,
            "preprocess": self.preprocess,
            "samples": self.samples,
            "sample_source": self.sample_source,
            "outputs": {name: asdict(d) for name, d in self.drift.items()},
        }


def quantize_int8(
    src: Path | str,
    dst: Path | str,
    *,
    sample_inputs: Sequence[Feed],
    sample_source: str = "given",
    op_types: Sequence[str] | None = None,
    per_channel: bool = False,
    preprocess: Preprocess = "constants",
    classification_outputs: Collection[str] | None = None,
) -> QuantizeResult:
    """Write an int8 dynamic-quantized copy of ``src`` to ``dst`` and measure its drift.

    ``op_types`` restricts which operator types are quantized (e.g. ``["MatMul"]``); None
    quantizes every type ONNX Runtime supports. ``sample_inputs`` are feeds (input name ->
    array) run through both models; at least one is required. ``sample_source`` says where
    they came from (e.g. "synthetic", "operator:<file>") and is recorded with the drift:
    drift on synthetic noise can hide what real input shows (ADR 0006).
    ``classification_outputs`` names the outputs to report top-1 agreement for; None detects
    them (see OutputDrift).
    ``dst`` is written atomically (temporary file, then rename). Raises ModelFileError when
    ``src`` is not ONNX, QuantizeError when quantization fails, quantizes nothing, or the
    models cannot be run on the samples.
    """
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    info = inspect_model(src)
    if not sample_inputs:
        raise QuantizeError(src, "at least one sample input is needed to measure drift")
    if dst.resolve() == src.resolve():
        raise QuantizeError(src, "the destination is the source file")
    if preprocess not in ("constants", "ort"):
        raise QuantizeError(src, f"unknown pre-processing {preprocess!r}")
    if classification_outputs is not None:
        unknown = sorted(set(classification_outputs) - {o.name for o in info.outputs})
        if unknown:
            raise QuantizeError(src, f"no output named {', '.join(map(repr, unknown))}")

    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgefleet-quantize-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            if preprocess == "constants":
                _constants_to_initializers(src, prepared)
            else:
                from onnxruntime.quantization.shape_inference import quant_pre_process

                quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        except Exception as err:
            raise QuantizeError(src, f"pre-processing failed: {err}") from err

        fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".part", dir=dst.parent)
        os.close(fd)
        partial = Path(tmp_name)
        try:
            try:
                quantize_dynamic(
                    str(prepared),
                    str(partial),
                    weight_type=QuantType.QInt8,
                    op_types_to_quantize=list(op_types) if op_types is not None else None,
                    per_channel=per_channel,
                )
            except Exception as err:
                raise QuantizeError(src, f"quantize_dynamic failed: {err}") from err
            if not _has_int8_weights(partial):
                wanted = ", ".join(op_types) if op_types is not None else "any supported type"
                raise QuantizeError(src, f"nothing was quantized (no weights of {wanted})")
            outputs = [o.name for o in info.outputs]
            drift = _drift(
                ort, src, partial, sample_inputs, outputs=outputs, classes=classification_outputs
            )
            with open(partial, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(partial, dst)
        finally:
            partial.unlink(missing_ok=True)

    return QuantizeResult(
        src=src,
        dst=dst,
        size_before=info.size,
        size_after=dst.stat().st_size,
        weight_type="QInt8",
        op_types=tuple(op_types) if op_types is not None else None,
        per_channel=per_channel,
        preprocess=preprocess,
        samples=len(sample_inputs),
        sample_source=sample_source,
        drift=drift,
    )


def _constants_to_initializers(src: Path, dst: Path) -> int:
    """Copy ``src`` to ``dst`` with its top-level tensor Constant nodes as initializers.

    Returns how many nodes were converted. Constants inside subgraphs and string or sparse
    constants are left as they are.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    kept = []
    converted: list[onnx.TensorProto] = []
    for node in graph.node:
        tensor = _constant_value(node, numpy_helper) if node.op_type == "Constant" else None
        if tensor is None:
            kept.append(node)
            continue
        tensor.name = node.output[0]
        converted.append(tensor)
    if not converted:
        onnx.save(model, str(dst))
        return 0
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(converted)
    if model.ir_version < 4:  # initializers had to be graph inputs before IR 4
        graph.input.extend(
            helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in converted
        )
    onnx.save(model, str(dst))
    return len(converted)


def _constant_value(node: Any, numpy_helper: Any) -> Any:
    """The TensorProto a Constant node produces, or None for kinds left as nodes."""
    import onnx

    if node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
        return None
    attr = node.attribute[0]
    if attr.name == "value":
        tensor = onnx.TensorProto()
        tensor.CopyFrom(attr.t)
        return tensor
    scalars: dict[str, Any] = {
        "value_float": lambda: np.array(attr.f, dtype=np.float32),
        "value_floats": lambda: np.array(list(attr.floats), dtype=np.float32),
        "value_int": lambda: np.array(attr.i, dtype=np.int64),
        "value_ints": lambda: np.array(list(attr.ints), dtype=np.int64),
    }
    make = scalars.get(attr.name)
    return numpy_helper.from_array(make()) if make is not None else None


def _has_int8_weights(path: Path) -> bool:
    import onnx

    model = onnx.load(str(path))
    int8 = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    return any(t.data_type in int8 and len(t.dims) > 0 for t in model.graph.initializer)


def _drift(
    ort: Any,
    src: Path,
    quantized: Path,
    samples: Sequence[Feed],
    *,
    outputs: list[str],
    classes: Collection[str] | None,
) -> dict[str, OutputDrift]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    try:
        reference = ort.InferenceSession(str(src), options, providers=providers)
        candidate = ort.InferenceSession(str(quantized), options, providers=providers)
        pairs = [
            (reference.run(outputs, dict(feed)), candidate.run(outputs, dict(feed)))
            for feed in samples
        ]
    except Exception as err:
        raise QuantizeError(src, f"running the fp32 and int8 models on the samples: {err}") from err
    drift: dict[str, OutputDrift] = {}
    for index, name in enumerate(outputs):
        ref = [np.asarray(pair[0][index]) for pair in pairs]
        got = [np.asarray(pair[1][index]) for pair in pairs]
        for a, b in zip(ref, got, strict=True):
            if a.shape != b.shape:
                raise QuantizeError(
                    src, f"output {name!r} has shape {a.shape} in fp32 and {b.shape} in int8"
                )
        is_class = name in classes if classes is not None else all(_is_distribution(a) for a in ref)
        drift[name] = _compare(ref, got, top1=is_class)
    return drift


def _is_distribution(values: npt.NDArray[Any]) -> bool:
    if not np.issubdtype(values.dtype, np.floating) or values.ndim < 2 or values.shape[-1] < 2:
        return False
    if values.size == 0 or values.min() < -_PROBABILITY_ATOL:
        return False
    sums = values.astype(np.float64).sum(axis=-1)
    return bool(np.allclose(sums, 1.0, atol=_PROBABILITY_ATOL))


def _compare(
    ref: list[npt.NDArray[Any]], got: list[npt.NDArray[Any]], *, top1: bool
) -> OutputDrift:
    a = np.concatenate([r.astype(np.float64).ravel() for r in ref])
    b = np.concatenate([g.astype(np.float64).ravel() for g in got])
    diff = np.abs(a - b)
    norms = float(np.linalg.norm(a)) * float(np.linalg.norm(b))
    if norms == 0.0:
        cosine = 1.0 if not a.any() and not b.any() else 0.0
    else:
        cosine = float(np.dot(a, b) / norms)
    agreement: float | None = None
    if top1:
        hits = sum(
            int((r.argmax(axis=-1) == g.argmax(axis=-1)).sum())
            for r, g in zip(ref, got, strict=True)
        )
        rows = sum(int(np.prod(r.shape[:-1])) for r in ref)
        agreement = hits / rows if rows else None
    return OutputDrift(
        max_abs=float(diff.max()) if diff.size else 0.0,
        mean_abs=float(diff.mean()) if diff.size else 0.0,
        cosine=cosine,
        top1_agreement=agreement,
    )
