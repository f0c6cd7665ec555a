"""``edgefleet-hub plan``: what each device would run, computed with the device's own code.

Pure: ``plan_device`` calls ``contract.select.select`` with the resolved models and the
profile and facts the device reported, exactly as the agent does on the device. A device
that has not reported them yet is marked ``not_reported``; nothing is guessed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from contract.profile import FirmwareProfile, HardwareFacts
from contract.select import Choice, Plan, select
from hub.resolve import Resolution

PlanStatus = Literal["planned", "not_reported", "unassigned"]
Outcome = Literal["chosen", "skipped", "not_reported", "unassigned"]

PLAN_COLUMNS = (
    "device",
    "profile",
    "model",
    "version",
    "policy",
    "outcome",
    "variant",
    "precision",
    "provider",
    "memory_mb",
    "reason",
    "message",
)
"""The fields of a ``PlanRow``, in the order a table shows them."""


@dataclass(frozen=True)
class DevicePlan:
    """The preview for one device: its resolution and, when it can be computed, the plan."""

    device_id: str
    status: PlanStatus
    message: str
    resolution: Resolution
    profile: str | None = None
    plan: Plan | None = None


@dataclass(frozen=True)
class PlanRow:
    """One table row: a model on a device, or the device alone when it has no models."""

    device: str
    profile: str | None
    model: str | None
    version: str | None
    policy: str | None
    outcome: Outcome
    variant: str | None = None
    precision: str | None = None
    provider: str | None = None
    memory_mb: int | None = None
    reason: str | None = None
    """Skip reason code (``does_not_fit_memory``, ...), or the outcome for a device."""
    message: str = ""

    def as_dict(self) -> dict[str, str | int | None]:
        """The row as a mapping of ``PLAN_COLUMNS`` (for ``--json``)."""
        return {column: getattr(self, column) for column in PLAN_COLUMNS}


def plan_device(
    resolution: Resolution, profile: FirmwareProfile | None, facts: HardwareFacts | None
) -> DevicePlan:
    """Preview what the device of ``resolution`` would run, given what it reported."""
    device_id = resolution.device_id
    name = profile.name if profile is not None else None
    if profile is None or facts is None:
        missing = " or ".join(
            what for what, value in (("facts", facts), ("profile", profile)) if value is None
        )
        message = f"the device has not reported its {missing} yet (no birth received)"
        if resolution.empty:
            message += "; no policy applies to it so far"
        return DevicePlan(device_id, "not_reported", message, resolution, name)
    if resolution.empty:
        return DevicePlan(
            device_id, "unassigned", "no policy applies to this device", resolution, name
        )
    plan = select(resolution.models, profile, facts)
    message = (
        f"{len(plan.chosen)} of {len(plan.entries)} models fit: "
        f"{plan.used_mb} MB of {plan.budget_mb} MB ({plan.budget_note})"
    )
    return DevicePlan(device_id, "planned", message, resolution, name, plan)


def render_plan_table(plans: Iterable[DevicePlan]) -> list[PlanRow]:
    """Rows for a table, device by device in the given order, models as ``select`` ranks
    them (unreported devices: by name)."""
    rows: list[PlanRow] = []
    for device in plans:
        rows.extend(_rows(device))
    return rows


def _rows(device: DevicePlan) -> list[PlanRow]:
    resolution = device.resolution
    if device.plan is None and not resolution.empty:
        return [
            PlanRow(
                device=device.device_id,
                profile=device.profile,
                model=spec.name,
                version=spec.version,
                policy=resolution.source(spec.name).policy,
                outcome="not_reported",
                reason="not_reported",
                message=device.message,
            )
            for spec in resolution.models
        ]
    if device.plan is None:
        outcome: Outcome = "not_reported" if device.status == "not_reported" else "unassigned"
        return [
            PlanRow(
                device=device.device_id,
                profile=device.profile,
                model=None,
                version=None,
                policy=None,
                outcome=outcome,
                reason=outcome,
                message=device.message,
            )
        ]
    rows = []
    for entry in device.plan.entries:
        chosen = entry if isinstance(entry, Choice) else None
        rows.append(
            PlanRow(
                device=device.device_id,
                profile=device.profile,
                model=entry.model,
                version=entry.version,
                policy=resolution.source(entry.model).policy,
                outcome=entry.outcome,
                variant=chosen.variant if chosen else None,
                precision=chosen.precision if chosen else None,
                provider=chosen.provider if chosen else None,
                memory_mb=chosen.memory_mb if chosen else None,
                reason=None if isinstance(entry, Choice) else entry.reason,
                message=entry.message,
            )
        )
    return rows
