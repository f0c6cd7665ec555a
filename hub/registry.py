"""The registry: model files in, model sets and policies published.

- ``add_model`` inspects an ONNX file (``hub.onnx_inspect``), measures load memory and
  latency in a fresh process when every input has a concrete shape (declared, or given in
  ``input_shapes``), copies the file into the content-addressed artifact store and records
  the variant. With ``quantize_int8`` it also derives an int8 variant
  (``hub.quantize.quantize_int8``, on synthetic sample inputs), measures it, and records how
  far its outputs drift from the source's.
- ``apply_model_set`` reads a model-set YAML, checks that every artifact it names (variants
  and golden files) is stored with the size the file claims or carries its own ``url``, and
  publishes it: published model sets are immutable, so the same name and version again is
  accepted only with the same content.
- ``check_policy`` / ``apply_policy`` read a policy YAML, check that its model set is
  published, and store it as the policy's new active version.

Every refusal of a manifest is a ``ManifestRejected`` (also a ``contract`` ManifestError)
naming the file, the line and the field, like the YAML loader's own errors.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from contract.manifests import NAME_PATTERN, VERSION_PATTERN, Artifact, ModelSet, Policy
from contract.validation import Loc
from contract.yaml_source import format_field, load_model_set, load_policy
from hub.artifacts import ArtifactStore
from hub.errors import (
    Conflict,
    InvalidModelName,
    ModelFileError,
    ModelSetConflict,
    QuantizeError,
    UnknownArtifact,
    UnknownModelSet,
)
from hub.onnx_inspect import Measurement, ModelInfo, inspect_model, measure, synthetic_inputs
from hub.quantize import quantize_int8
from hub.store import ModelRecord, ModelSetRecord, PolicyRecord, Store

PRECISIONS = ("int8", "fp16", "fp32")
MEASURE_RUNS = 5
"""Timed runs of ``measure`` (after one warm-up)."""
QUANTIZE_SAMPLES = 4
"""Synthetic feeds the fp32 and int8 models are compared on."""
_NAME = re.compile(NAME_PATTERN)
_VERSION = re.compile(VERSION_PATTERN)
_NAME_MEANING = "lowercase letters, digits, '.', '_' or '-' (at most 64, starting alphanumeric)"
_VERSION_MEANING = "letters, digits, '.', '+', '_' or '-' (at most 64)"


class Registry:
    """Models, model sets and policies in one store and one artifact directory."""

    def __init__(
        self, store: Store, artifacts: ArtifactStore, *, measure_runs: int = MEASURE_RUNS
    ) -> None:
        self.store = store
        self.artifacts = artifacts
        self.measure_runs = measure_runs

    # --- models --------------------------------------------------------------------------

    def add_model(
        self,
        path: Path,
        *,
        name: str,
        version: str,
        variant: str | None = None,
        precision: str | None = None,
        quantize_int8: bool = False,
        input_shapes: Mapping[str, Sequence[int]] | None = None,
        memory_mb: int | None = None,
        measure: bool = True,
    ) -> list[ModelRecord]:
        """Register ``path`` as a variant of model ``name`` ``version``; with
        ``quantize_int8`` also an int8 variant derived from it. Returns the records, the
        given file's first.

        ``precision`` defaults to the variant name when that is a precision, else fp16 for
        a model with float16 inputs and fp32 otherwise; ``variant`` defaults to the
        precision. ``memory_mb`` replaces the measured load memory of the given file (the
        figure a model set's ``requires.memory_mb`` is written from). Registering the same
        file again returns what is stored; another file under the same name, version and
        variant is a Conflict.
        """
        path = Path(path)
        _check_name("name", name, _NAME, _NAME_MEANING)
        _check_name("version", version, _VERSION, _VERSION_MEANING)
        if variant is not None:
            _check_name("variant", variant, _NAME, _NAME_MEANING)
        if precision is not None and precision not in PRECISIONS:
            raise InvalidModelName("precision", precision, "one of " + ", ".join(PRECISIONS))
        if memory_mb is not None and memory_mb < 1:
            raise InvalidModelName("memory_mb", str(memory_mb), "a positive number of MiB")
        info = inspect_model(path)
        precision = precision or _precision_of(variant, info)
        variant = variant or precision
        if quantize_int8 and precision != "fp32":
            raise QuantizeError(path, f"only an fp32 model is quantized to int8, not {precision}")
        base = self._add_variant(
            path,
            info,
            name=name,
            version=version,
            variant=variant,
            precision=precision,
            input_shapes=input_shapes,
            memory_mb=memory_mb,
            measure_it=measure,
            extra={},
        )
        records = [base]
        if quantize_int8:
            records.append(self._add_int8(path, info, base, input_shapes, measure_it=measure))
        return records

    def _add_variant(
        self,
        path: Path,
        info: ModelInfo,
        *,
        name: str,
        version: str,
        variant: str,
        precision: str,
        input_shapes: Mapping[str, Sequence[int]] | None,
        memory_mb: int | None,
        measure_it: bool,
        extra: Mapping[str, Any],
        drift: Mapping[str, Any] | None = None,
    ) -> ModelRecord:
        existing = self.store.find_model(name, version, variant)
        if existing is not None:
            if existing.sha256 != info.sha256:
                raise Conflict(
                    f"model {name} {version} variant {variant} exists with another artifact "
                    f"({existing.sha256[:12]}, not {info.sha256[:12]}); give it a new version"
                )
            return existing
        measured = self._measure(path, info, input_shapes) if measure_it else None
        stored = self.artifacts.add_file(path)
        if stored.sha256 != info.sha256:
            raise ModelFileError(path, "the file changed while it was being added")
        self.store.add_artifact(stored.sha256, stored.size, str(stored.path))
        metadata: dict[str, Any] = {
            "file": path.name,
            "ir_version": info.ir_version,
            "opsets": dict(info.opsets),
            "producer": info.producer,
            "measurement": measured.to_dict() if measured is not None else None,
            "memory_source": (
                "operator" if memory_mb is not None else "measured" if measured else None
            ),
            **extra,
        }
        if input_shapes:
            metadata["input_shapes"] = {k: list(v) for k, v in input_shapes.items()}
        tensors = info.to_dict()
        return self.store.add_model(
            name=name,
            version=version,
            variant=variant,
            precision=precision,
            sha256=info.sha256,
            size=info.size,
            inputs=tensors["inputs"],
            outputs=tensors["outputs"],
            opset=info.opset,
            load_memory_mb=(
                float(memory_mb)
                if memory_mb is not None
                else float(measured.load_memory_mb)
                if measured is not None
                else None
            ),
            latency_ms=measured.latency_ms if measured is not None else None,
            drift=drift,
            metadata=metadata,
        )

    def _measure(
        self, path: Path, info: ModelInfo, input_shapes: Mapping[str, Sequence[int]] | None
    ) -> Measurement | None:
        """Measure when every input has a concrete shape; None when one is left dynamic."""
        given = set(input_shapes or {})
        if any(t.dynamic and t.name not in given for t in info.inputs):
            return None
        return measure(path, input_shapes=input_shapes, runs=self.measure_runs)

    def _add_int8(
        self,
        path: Path,
        info: ModelInfo,
        base: ModelRecord,
        input_shapes: Mapping[str, Sequence[int]] | None,
        *,
        measure_it: bool,
    ) -> ModelRecord:
        derived = _int8_name(base.variant)
        existing = self.store.find_model(base.name, base.version, derived)
        if existing is not None:
            source = existing.metadata.get("derived_from", {}).get("sha256")
            if source != base.sha256:
                raise Conflict(
                    f"model {base.name} {base.version} variant {derived} exists and was not "
                    f"derived from {base.sha256[:12]}; give it a new version"
                )
            return existing
        samples = [synthetic_inputs(info, input_shapes, seed=i) for i in range(QUANTIZE_SAMPLES)]
        with tempfile.TemporaryDirectory(prefix="edgefleet-int8-") as tmp:
            target = Path(tmp) / f"{path.stem}.int8.onnx"
            result = quantize_int8(path, target, sample_inputs=samples, sample_source="synthetic")
            int8_info = inspect_model(target)
            return self._add_variant(
                target,
                int8_info,
                name=base.name,
                version=base.version,
                variant=derived,
                precision="int8",
                input_shapes=input_shapes,
                memory_mb=None,
                measure_it=measure_it,
                extra={
                    "derived_from": {"variant": base.variant, "sha256": base.sha256},
                    "size_ratio": result.size_ratio,
                },
                drift=result.drift_dict(),
            )

    # --- model sets ----------------------------------------------------------------------

    def apply_model_set(self, text: str, source: str) -> ModelSetRecord:
        """Validate and publish a model set from YAML; see the module docstring."""
        model_set = load_model_set(text, source)
        document = model_set.model_dump(mode="json", by_alias=True)
        for loc, artifact in _artifacts_of(model_set):
            self._check_artifact(artifact, loc, text, source)
        existing = self.store.find_model_set(model_set.name, model_set.version)
        if existing is not None and existing.published and existing.document != document:
            raise ModelSetConflict(
                source,
                _line_of(text, ("version",)),
                "version",
                f"model set {model_set.name} {model_set.version} is published with other "
                "content and cannot change; give it a new version",
            )
        with self.store.transaction():
            self.store.put_model_set(model_set.name, model_set.version, document)
            return self.store.publish_model_set(model_set.name, model_set.version)

    def _check_artifact(self, artifact: Artifact, loc: Loc, text: str, source: str) -> None:
        stored = self.store.find_artifact(artifact.sha256)
        if stored is None and artifact.url is None:
            where = (*loc, "sha256")
            raise UnknownArtifact(
                source,
                _line_of(text, where),
                format_field(where),
                f"no artifact {artifact.sha256} in the hub; add the file with "
                "`edgefleet-hub model add` or give the artifact a url",
                sha256=artifact.sha256,
            )
        if stored is not None and stored.size != artifact.size:
            where = (*loc, "size")
            raise UnknownArtifact(
                source,
                _line_of(text, where),
                format_field(where),
                f"artifact {artifact.sha256[:12]} is {stored.size} bytes in the hub, "
                f"not {artifact.size}",
                sha256=artifact.sha256,
            )

    # --- policies ------------------------------------------------------------------------

    def check_policy(self, text: str, source: str) -> Policy:
        """Parse a policy and check that the model set it names is published."""
        policy = load_policy(text, source)
        ref = policy.model_set
        found = self.store.find_model_set(ref.name, ref.version)
        if found is None or not found.published:
            state = "is not published" if found is not None else "does not exist"
            raise UnknownModelSet(
                source,
                _line_of(text, ("model_set", "version")),
                "model_set",
                f"model set {ref.name} {ref.version} {state}; apply it first "
                "(`edgefleet-hub modelset apply`)",
                name=ref.name,
                version=ref.version,
            )
        return policy

    def apply_policy(self, text: str, source: str) -> PolicyRecord:
        """Store a checked policy as the active version of its name (a new version when the
        document differs from the newest)."""
        policy = self.check_policy(text, source)
        return self.store.put_policy(policy.name, policy.model_dump(mode="json", by_alias=True))


def _check_name(what: str, value: str, pattern: re.Pattern[str], meaning: str) -> None:
    if not pattern.match(value):
        raise InvalidModelName(what, value, meaning)


def _precision_of(variant: str | None, info: ModelInfo) -> str:
    if variant in PRECISIONS:
        return variant
    if any(t.type == "tensor(float16)" for t in info.inputs):
        return "fp16"
    return "fp32"


def _int8_name(variant: str) -> str:
    """The derived variant's name: ``fp32`` -> ``int8``, ``cls-fp32`` -> ``cls-int8``."""
    if "fp32" in variant:
        return variant.replace("fp32", "int8")
    return f"{variant}-int8"


def _artifacts_of(model_set: ModelSet) -> list[tuple[Loc, Artifact]]:
    found: list[tuple[Loc, Artifact]] = []
    for i, spec in enumerate(model_set.models):
        if spec.golden is not None:
            found.append((("models", i, "golden", "artifact"), spec.golden.artifact))
        for j, variant in enumerate(spec.variants):
            found.append((("models", i, "variants", j, "artifact"), variant.artifact))
    return found


def _line_of(text: str, loc: Loc) -> int | None:
    """The line of the deepest part of ``loc`` the YAML text has (1-based)."""
    try:
        node: yaml.Node | None = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    if node is None:
        return None
    line = int(node.start_mark.line) + 1
    for part in loc:
        child: yaml.Node | None = None
        if isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if 0 <= part < len(node.value):
                child = node.value[part]
                line = int(child.start_mark.line) + 1
        elif isinstance(node, yaml.MappingNode):
            for key, value in reversed(node.value):
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    child = value
                    line = int(key.start_mark.line) + 1
                    break
        if child is None:
            break
        node = child
    return line
