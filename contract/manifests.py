"""Model sets and policies as operators author them (YAML) and as the hub resolves them."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, field_validator

from contract.base import ManifestModel
from contract.profile import Precision, ProfileName
from contract.validation import refuse_duplicates

MODELSET_SCHEMA = "edgefleet.modelset/1"
POLICY_SCHEMA = "edgefleet.policy/1"

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
VERSION_PATTERN = r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"

Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Version = Annotated[str, Field(pattern=VERSION_PATTERN)]
Sha256 = Annotated[str, Field(pattern=SHA256_PATTERN)]


class Artifact(ManifestModel):
    """A content-addressed file. The hash is what is trusted; the location is a hint."""

    sha256: Sha256
    size: PositiveInt
    url: str | None = Field(
        default=None,
        description="Absolute URL, or None to fetch by hash from the desired state's base URLs.",
    )


class Requirements(ManifestModel):
    """What a device needs to run a variant."""

    architectures: list[str] = Field(default_factory=list, description="Empty: any.")
    providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        min_length=1,
        description="Execution providers this variant can run on.",
    )
    memory_mb: PositiveInt

    @field_validator("providers")
    @classmethod
    def _unique_providers(cls, providers: list[str]) -> list[str]:
        refuse_duplicates(providers, "provider")
        return providers


class Variant(ManifestModel):
    """One build of a model (a precision, an artifact) and what it needs to run."""

    name: Name
    precision: Precision
    artifact: Artifact
    requires: Requirements


class InputHint(ManifestModel):
    """Concrete shape for an input whose dimensions are dynamic in the ONNX file."""

    shape: list[PositiveInt] = Field(min_length=1)


class Golden(ManifestModel):
    """An .npz artifact with arrays ``input:<name>`` and ``output:<name>`` for a smoke test."""

    artifact: Artifact
    rtol: float = Field(default=1e-3, ge=0)
    atol: float = Field(default=1e-4, ge=0)


class ModelSpec(ManifestModel):
    """A model in a set: its variants, unique by name, and how important it is."""

    name: Name
    version: Version
    priority: int = Field(description="Higher is more important; kept first under pressure.")
    inputs: dict[str, InputHint] = Field(default_factory=dict)
    golden: Golden | None = None
    variants: list[Variant] = Field(min_length=1)

    @field_validator("variants")
    @classmethod
    def _unique_variant_names(cls, variants: list[Variant]) -> list[Variant]:
        refuse_duplicates((v.name for v in variants), "variant name", suffix=("name",))
        return variants


class ModelSet(ManifestModel):
    """A versioned set of models, unique by name, that a policy assigns to devices."""

    schema_: Literal["edgefleet.modelset/1"] = Field(alias="schema")
    name: Name
    version: Version
    models: list[ModelSpec] = Field(min_length=1)

    @field_validator("models")
    @classmethod
    def _unique_model_names(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        refuse_duplicates((m.name for m in models), "model name", suffix=("name",))
        return models


OverloadAction = Literal["reject", "queue"]


class ModelRuntime(ManifestModel):
    max_concurrency: PositiveInt = 1
    queue_depth: NonNegativeInt = 8
    on_overload: OverloadAction = "queue"
    max_latency_p95_ms: PositiveFloat | None = None


class RuntimePolicy(ManifestModel):
    telemetry_interval_s: PositiveFloat = 10.0
    probation_s: float = Field(default=120.0, ge=0)
    max_error_rate: float = Field(default=0.05, ge=0, le=1)
    min_requests_for_probation: NonNegativeInt = 20
    memory_floor_mb: NonNegativeInt = 64
    models: dict[str, ModelRuntime] = Field(
        default_factory=dict, description="Per-model limits; missing models get the defaults."
    )
    default_model: ModelRuntime = Field(default_factory=ModelRuntime)

    def for_model(self, name: str) -> ModelRuntime:
        return self.models.get(name, self.default_model)


class Selector(ManifestModel):
    """All given parts must match; an empty selector matches every device."""

    labels: dict[str, str] = Field(default_factory=dict)
    profiles: list[ProfileName] = Field(default_factory=list)
    devices: list[str] = Field(default_factory=list)


class ModelSetRef(ManifestModel):
    name: Name
    version: Version


class Policy(ManifestModel):
    schema_: Literal["edgefleet.policy/1"] = Field(alias="schema")
    name: Name
    priority: int = 0
    selector: Selector = Field(default_factory=Selector)
    model_set: ModelSetRef
    runtime: RuntimePolicy = Field(default_factory=RuntimePolicy)
