"""Firmware profiles (one per device class) and the hardware facts they are matched against."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, NonNegativeInt, PositiveInt, field_validator, model_validator

from contract.base import ManifestModel, WireModel
from contract.validation import refuse_duplicates

PROFILE_SCHEMA = "edgefleet.profile/1"

Precision = Literal["int8", "fp16", "fp32"]
ProfileName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]


class MemoryRange(ManifestModel):
    """Total system memory, in MiB, that a device of this class has."""

    min_mb: NonNegativeInt = 0
    max_mb: PositiveInt | None = None

    @model_validator(mode="after")
    def _ordered(self) -> MemoryRange:
        if self.max_mb is not None and self.max_mb < self.min_mb:
            raise ValueError("max_mb must be at least min_mb")
        return self


class ProfileMatch(ManifestModel):
    """How to recognise a device class from its facts. Empty lists match anything."""

    architectures: list[str] = Field(default_factory=list)
    device_tree_model: list[str] = Field(
        default_factory=list, description="Regular expressions over the device-tree model."
    )
    cpu_model: list[str] = Field(
        default_factory=list, description="Regular expressions over the CPU model name."
    )
    memory: MemoryRange = Field(default_factory=MemoryRange)
    providers: list[str] = Field(
        default_factory=list,
        description="ONNX Runtime providers of which at least one must be available.",
    )


class Budgets(ManifestModel):
    model_memory_mb: PositiveInt
    storage_mb: PositiveInt
    threads: PositiveInt


class Thermal(ManifestModel):
    sensor: str = Field(description="sysfs file with the temperature in millidegrees Celsius.")
    throttle_c: float = Field(gt=0, lt=150)
    critical_c: float = Field(gt=0, lt=150)

    @model_validator(mode="after")
    def _ordered(self) -> Thermal:
        if self.critical_c < self.throttle_c:
            raise ValueError("critical_c must be at least throttle_c")
        return self


class FirmwareProfile(ManifestModel):
    schema_: Literal["edgefleet.profile/1"] = Field(alias="schema")
    name: ProfileName
    description: str
    fallback: bool = Field(default=False, description="Chosen only when no other profile matches.")
    match: ProfileMatch
    budgets: Budgets
    providers: list[str] = Field(min_length=1, description="Execution providers, preferred first.")
    variant_preference: list[Precision] = Field(min_length=1)
    thermal: Thermal | None = None

    @field_validator("providers")
    @classmethod
    def _unique_providers(cls, providers: list[str]) -> list[str]:
        refuse_duplicates(providers, "provider")
        return providers

    @field_validator("variant_preference")
    @classmethod
    def _unique_precisions(cls, precisions: list[Precision]) -> list[Precision]:
        refuse_duplicates(precisions, "precision")
        return precisions


class HardwareFacts(WireModel):
    """What a device reads about itself; recorded in tests, reported in the birth message."""

    architecture: str
    device_tree_model: str | None = None
    cpu_model: str | None = None
    cpu_count: PositiveInt
    memory_total_mb: NonNegativeInt
    memory_available_mb: NonNegativeInt | None = None
    storage_free_mb: NonNegativeInt | None = None
    providers: list[str] = Field(default_factory=list)
    thermal_zones: dict[str, float] = Field(
        default_factory=dict, description="sysfs temperature file -> degrees Celsius."
    )
