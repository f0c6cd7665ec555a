"""The JSON bodies of the hub's HTTP API (``hub.api`` serves them, ``hub.client`` reads them).

Pydantic only, no web framework: the CLI imports these without FastAPI. Device state,
facts, profiles, telemetry, model sets, policies and plans are the contract's own models,
so the OpenAPI document describes them exactly as the wire and the manifests do.
"""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from contract.manifests import ModelSet, ModelSetRef, Policy
from contract.messages import InventoryItem, State, Telemetry
from contract.profile import FirmwareProfile, HardwareFacts
from contract.select import Plan
from hub.rollout.model import RolloutSpec

T = TypeVar("T")


class ErrorDetail(BaseModel):
    """What went wrong: a stable ``code``, a one-line ``message``; for a manifest, where."""

    code: str = Field(description="Stable machine-readable code, e.g. not_found, conflict.")
    message: str
    field: str | None = Field(default=None, description="Manifest errors: the dotted field.")
    line: int | None = Field(default=None, description="Manifest errors: the line in the file.")


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


class _Out(BaseModel):
    """Built from the store's records (dataclasses) by attribute."""

    model_config = ConfigDict(from_attributes=True)


class Page(BaseModel, Generic[T]):
    """One page of a list; pass ``next_cursor`` as ``?cursor=`` for the next (null: done)."""

    items: list[T]
    next_cursor: str | None = None


class Health(BaseModel):
    """The hub answers: its id and versions."""

    status: Literal["ok"] = "ok"
    hub_id: str | None
    version: str = Field(description="The hub's software version.")
    schema_version: int = Field(description="The store's schema version.")


class DeviceModel(BaseModel):
    """A model as the device reports it in its state."""

    name: str
    version: str
    variant: str | None = None
    precision: str | None = None
    provider: str | None = None
    ready: bool


class DeviceSummary(BaseModel):
    """A device in a list: identity, liveness, generations, what it runs."""

    device_id: str
    labels: dict[str, str]
    profile: str | None = Field(description="Name of the firmware profile it reported.")
    agent_version: str | None
    online: bool
    first_seen: float
    last_seen: float
    applied_generation: int
    desired_generation: int = Field(description="Newest generation the device reported.")
    phase: str | None
    models: list[DeviceModel] = Field(description="The models of its last reported state.")


class DesiredSummary(BaseModel):
    """The newest signed desired document the hub holds for a device."""

    generation: int
    content_hash: str
    issued_at: float
    expires_at: float
    published_at: float | None = Field(description="When the broker acknowledged it.")
    model_set: ModelSetRef | None = None


class TelemetryItem(BaseModel):
    """One telemetry message as the device sent it, and when the hub received it."""

    session: int
    seq: int
    ts: float
    received_at: float
    message: Telemetry


class DeviceDetail(DeviceSummary):
    """A device in full: the facts and profile of its birth, reported and desired state,
    and its newest telemetry."""

    profile_source: str | None
    facts: HardwareFacts | None
    profile_document: FirmwareProfile | None
    capabilities: list[str]
    inventory: list[InventoryItem]
    session: int
    born_at: float | None
    state: State | None = Field(description="The last reported state message.")
    state_at: float | None
    desired: DesiredSummary | None
    last_telemetry: TelemetryItem | None


class ModelVariant(_Out):
    """One variant of one model version, its artifact and what the hub measured."""

    name: str
    version: str
    variant: str
    precision: str
    sha256: str
    size: int
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    opset: int | None
    load_memory_mb: float | None
    latency_ms: float | None
    drift: dict[str, Any] | None
    metadata: dict[str, Any]
    created_at: float


class ModelDetail(BaseModel):
    """One model: its versions and every variant of them."""

    name: str
    versions: list[str]
    variants: list[ModelVariant]


class ModelSetOut(BaseModel):
    """A stored model set; ``document`` is the manifest as validated."""

    name: str
    version: str
    published: bool
    created_at: float
    published_at: float | None
    document: ModelSet


class PolicyOut(BaseModel):
    """A stored policy version; ``document`` is the manifest as validated."""

    name: str
    version: int
    active: bool
    created_at: float
    document: Policy


class PlanRowOut(BaseModel):
    """One row of the plan table: a model on a device, or the device alone."""

    device: str
    profile: str | None
    model: str | None
    version: str | None
    policy: str | None
    outcome: str
    variant: str | None
    precision: str | None
    provider: str | None
    memory_mb: int | None
    reason: str | None
    message: str


class PlanWarning(BaseModel):
    """Something the layered resolution noticed (priority ties, unused pins, ...)."""

    code: str
    message: str


class PlanDevice(BaseModel):
    """What one device would run: its layered resolution and the contract's ``select``."""

    device_id: str
    status: str = Field(description="planned, not_reported or unassigned.")
    message: str
    profile: str | None
    policy: str | None = Field(description="The top policy (runtime and model set).")
    policies: list[str]
    model_set: ModelSetRef | None
    warnings: list[PlanWarning]
    plan: Plan | None
    rows: list[PlanRowOut]


class PlanOut(BaseModel):
    """Every device the selector matches (not paginated: narrow the selector instead)."""

    items: list[PlanDevice]


class EventOut(_Out):
    """A discrete event a device reported (``id`` grows with arrival)."""

    id: int
    device_id: str
    session: int
    seq: int
    ts: float
    kind: str
    generation: int | None
    message: str
    data: dict[str, Any]
    received_at: float


class TelemetryPage(BaseModel):
    """Telemetry oldest first; ``next_cursor`` is never null: pass it to get what came after."""

    items: list[TelemetryItem]
    next_cursor: str


# --- rollouts ------------------------------------------------------------------------------


class GateCheckOut(BaseModel):
    """One part of a composite gate (the health gate's per-profile, per-model comparison)."""

    name: str
    status: str = Field(description="passed, failed or pending.")
    value: float | None = None
    threshold: float | None = None
    reason: str = ""


class GateOut(GateCheckOut):
    """A gate's latest evaluation: ``value`` and ``threshold`` in the gate's unit (percent
    for shares, a count, a latency ratio)."""

    checks: list[GateCheckOut] = Field(default_factory=list)


class CohortOut(BaseModel):
    """One cohort of a rollout: its devices counted by status and its gates."""

    index: int
    name: str = Field(description="canary, batch 1, batch 2, ...")
    status: str = Field(description="pending, active, baking, passed, failed or skipped.")
    total: int
    healthy: int
    failed: int = Field(description="Failed and timed out devices.")
    by_status: dict[str, int]
    gates: list[GateOut]
    started_at: float | None
    bake_until: float | None
    finished_at: float | None
    health_evaluations: int | None = Field(
        default=None, description="Health analysis evaluations so far (the canary)."
    )


class TransitionOut(BaseModel):
    """A phase transition of a rollout, with its reason."""

    at: float
    from_phase: str
    to_phase: str
    cohort: int | None
    reason: str


class RolloutEventOut(BaseModel):
    """Something that happened to a rollout (``id`` grows with time)."""

    id: int
    ts: float
    kind: str = Field(description="rollout.running, cohort.started, gate.failed, ...")
    reason: str
    cohort: int | None = None
    device_id: str | None = None
    data: dict[str, Any]


class RolloutDeviceOut(BaseModel):
    """One device of a rollout and how far it got."""

    device_id: str
    cohort: int
    status: str = Field(
        description="waiting, switched, applied, healthy, failed, timed_out, unreachable or "
        "skipped."
    )
    pinned: bool
    generation: int | None
    switched_at: float | None
    finished_at: float | None
    reason: str


class RolloutSummary(BaseModel):
    """A rollout in a list: what moves where, its phase and its devices by status."""

    id: int
    name: str
    policy: str
    model_set: ModelSetRef = Field(description="The target.")
    baseline: ModelSetRef | None = Field(description="The policy's model set at the start.")
    phase: str = Field(
        description="pending, running, paused, succeeded, failed, aborted or rolled_back."
    )
    reason: str = Field(description="The reason of the last transition.")
    cohort: int = Field(description="Index of the current cohort (= cohorts once all passed).")
    cohort_name: str | None
    cohorts: int
    devices: int
    counts: dict[str, int] = Field(description="Devices by status.")
    held: str | None = Field(description="Why switching is held now (a closed window).")
    promoted: bool
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None


class RolloutDetail(RolloutSummary):
    """A rollout in full: its spec, every cohort with its gates, the rollout-wide gates,
    its transitions and newest events, and with ``?devices=true`` every device."""

    spec: RolloutSpec
    cohort_progress: list[CohortOut]
    gates: list[GateOut] = Field(description="error_threshold and max_failures.")
    transitions: list[TransitionOut]
    events: list[RolloutEventOut] = Field(description="Newest first.")
    device_progress: list[RolloutDeviceOut] | None = None


class RolloutCommand(BaseModel):
    """The body of pause, resume, abort and rollback (optional)."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="", max_length=500, description="Why; kept in the event.")
