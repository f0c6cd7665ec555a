"""What a rollout is (``RolloutSpec``, authored as YAML or built from CLI flags), where it
stands (``RolloutState``, JSON that the driver persists after every step), and what the
engine exchanges with its driver: observations in, actions and events out.

Semantics of every field: docs/rollouts.md. Everything here is pure data; the engine
(``hub.rollout.engine``) is the only code that moves a state.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    field_validator,
    model_validator,
)

from contract.base import ManifestModel
from contract.manifests import ModelSetRef, Name, Selector, Version
from contract.yaml_source import load_document
from hub.errors import RolloutError
from hub.rollout.windows import MaintenanceWindow

ROLLOUT_SCHEMA: Literal["edgefleet.rollout/1"] = "edgefleet.rollout/1"
STATE_FORMAT = 1
"""Version of the persisted ``RolloutState`` JSON; a newer one is refused on load."""

# --- durations and percentages, as operators write them -----------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """Seconds from a number or a string: ``90``, ``"90"``, ``"45s"``, ``"10m"``,
    ``"1h30m"``, ``"1.5h"``, ``"2d"``, ``"250ms"``. ``ValueError`` otherwise."""
    if isinstance(value, bool):
        raise ValueError("expected a duration (seconds, or like 10m, 1h30m)")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            pos, total = 0, 0.0
            for match in _DURATION_PART.finditer(text):
                if match.start() != pos:
                    break
                total += float(match.group(1)) * _UNIT_S[match.group(2)]
                pos = match.end()
            if pos != len(text) or not text:
                raise ValueError(
                    f"{value!r} is not a duration (seconds, or like 45s, 10m, 1h30m, 2d)"
                ) from None
            seconds = total
    else:
        raise ValueError("expected a duration (seconds, or like 10m, 1h30m)")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{value!r} is not a duration of zero or more seconds")
    return seconds


def parse_percent(value: object) -> float:
    """A percentage from a number or a string: ``10``, ``12.5``, ``"10%"``."""
    if isinstance(value, bool):
        raise ValueError("expected a percentage")
    if isinstance(value, str):
        text = value.strip().removesuffix("%").strip()
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{value!r} is not a percentage (like 10 or 10%)") from None
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError("expected a percentage")
    return float(value)


Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
"""Seconds; YAML and flags may say ``10m``, ``1h30m``."""
Percent = Annotated[float, BeforeValidator(parse_percent), Field(gt=0, le=100)]
"""A share of devices, (0, 100]; YAML and flags may say ``10%``."""
Tolerance = Annotated[float, BeforeValidator(parse_percent), Field(ge=0, le=100)]
"""A tolerated share, [0, 100]; ``0`` tolerates nothing."""


# --- the spec ------------------------------------------------------------------------------


class Canary(ManifestModel):
    """The first cohort: ``count`` devices, or ``percent`` of the target devices rounded up
    (at least one device when there is any)."""

    count: PositiveInt | None = None
    percent: Percent | None = None
    bake_s: Duration | None = Field(
        default=None, description="Bake after the canary; None: the cohorts' bake_s."
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        """``canary: 5`` is a count, ``canary: "1%"`` a percentage."""
        if isinstance(data, int) and not isinstance(data, bool):
            return {"count": data}
        if isinstance(data, str):
            text = data.strip()
            return {"percent": text} if text.endswith("%") else {"count": int(text)}
        return data

    @model_validator(mode="after")
    def _one_size(self) -> Canary:
        if (self.count is None) == (self.percent is None):
            raise ValueError("give the canary either a count or a percent")
        return self


class Batch(ManifestModel):
    """A batch: the *cumulative* share of the target devices on the new version once this
    batch is switched (the canary included)."""

    percent: Percent
    bake_s: Duration | None = Field(
        default=None, description="Bake after this batch; None: the cohorts' bake_s."
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        """``- 25`` or ``- "25%"`` is ``{percent: 25}``."""
        if isinstance(data, int | float | str) and not isinstance(data, bool):
            return {"percent": data}
        return data


class Cohorts(ManifestModel):
    """Canary first (optional), then batches at cumulative percentages ending at 100."""

    canary: Canary | None = None
    batches: list[Batch] = Field(default_factory=lambda: [Batch(percent=100.0)], min_length=1)
    bake_s: Duration = Field(default=0.0, description="Default bake after every cohort.")

    @field_validator("batches", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        """``"25,50,100"`` (a CLI flag) is ``[25, 50, 100]``."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",")]
        return value

    @model_validator(mode="after")
    def _increasing_to_100(self) -> Cohorts:
        steps = [b.percent for b in self.batches]
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise ValueError(f"batch percentages must increase strictly: {steps}")
        if steps[-1] != 100:
            raise ValueError(f"the last batch must be 100 (percent of the devices): {steps}")
        return self

    def bake_of(self, index: int) -> float:
        """Bake seconds after cohort ``index`` (0 is the canary when there is one)."""
        if self.canary is not None:
            if index == 0:
                return self.canary.bake_s if self.canary.bake_s is not None else self.bake_s
            index -= 1
        own = self.batches[index].bake_s
        return own if own is not None else self.bake_s


class Gates(ManifestModel):
    """When a cohort passes and when the rollout fails (docs/rollouts.md, "Gates")."""

    success_threshold: Percent = Field(
        default=100.0,
        description="Share of a cohort that must be applied and healthy (per cohort).",
    )
    error_threshold: Tolerance | None = Field(
        default=None,
        description="Highest tolerated share of failed among finished devices (whole "
        "rollout); evaluated once min_finished devices have finished. None: off.",
    )
    min_finished: PositiveInt = Field(
        default=1, description="Finished devices needed before error_threshold is evaluated."
    )
    max_failures: NonNegativeInt | None = Field(
        default=None, description="Most failed devices tolerated (whole rollout). None: off."
    )


class HealthAnalysis(ManifestModel):
    """The canary cohort against the baseline cohort during the canary's bake."""

    window_s: Duration = Field(default=300.0, gt=0, description="Trailing analysis window.")
    interval_s: Duration = Field(default=60.0, gt=0, description="Time between evaluations.")
    latency_tolerance: float = Field(
        default=1.5, ge=1, description="Canary p95 may be at most this many times the baseline's."
    )
    latency_margin_ms: float = Field(
        default=0.0, ge=0, description="Added to the allowed p95 (absolute slack)."
    )
    error_rate_tolerance: float = Field(
        default=2.0, ge=1, description="Canary error rate may be this many times the baseline's"
    )
    error_rate_margin: float = Field(
        default=0.01, ge=0, le=1, description="... plus this absolute rate (0.01 = 1 point)."
    )
    min_requests: PositiveInt = Field(
        default=50, description="Requests each side needs in the window to be compared."
    )
    max_missing_data: NonNegativeInt = Field(
        default=3, description="Consecutive evaluations without data tolerated; one more fails."
    )
    max_failed: NonNegativeInt = Field(
        default=0, description="Failed evaluations tolerated; one more fails the gate."
    )
    models: list[Name] = Field(
        default_factory=list, description="Compare only these models; empty: every model."
    )


class Offline(ManifestModel):
    """Devices that stay offline do not stall a cohort."""

    grace_s: Duration = Field(
        default=900.0, description="Offline this long during a cohort: unreachable."
    )
    unreachable_fails: bool = Field(
        default=False,
        description="Count unreachable devices as failed (true) or leave them out (false).",
    )


OnFailure = Literal["rollback", "hold"]


class RolloutSpec(ManifestModel):
    """A rollout as an operator authors it (``edgefleet.rollout/1``)."""

    schema_: Literal["edgefleet.rollout/1"] = Field(default=ROLLOUT_SCHEMA, alias="schema")
    name: Name
    policy: Name = Field(description="The policy whose model set the rollout moves.")
    target: Version = Field(description="The model-set version to move to.")
    model_set: Name | None = Field(
        default=None, description="Target model-set name; None: the baseline's name."
    )
    baseline: ModelSetRef | None = Field(
        default=None,
        description="The policy's model set when the rollout started (set by bind()).",
    )
    selector: Selector | None = Field(
        default=None, description="Narrow the rollout to the policy's devices that match."
    )
    cohorts: Cohorts = Field(default_factory=Cohorts)
    gates: Gates = Field(default_factory=Gates)
    health: HealthAnalysis | None = None
    device_timeout_s: Duration = Field(
        default=3600.0, gt=0, description="A switched device must finish within this."
    )
    cohort_timeout_s: Duration | None = Field(
        default=None,
        gt=0,
        description="From a cohort's first switch to its success gate; None: no limit.",
    )
    offline: Offline = Field(default_factory=Offline)
    windows: list[MaintenanceWindow] = Field(
        default_factory=list, description="Switch devices only inside one of these."
    )
    only_when_idle: bool = Field(
        default=False, description="Switch a device only while it serves no inference."
    )
    idle_max_rps: float = Field(
        default=0.0, ge=0, description="A device at or below this request rate is idle."
    )
    on_failure: OnFailure = Field(
        default="rollback",
        description="rollback: a failed gate unpins every touched device; hold: keep them.",
    )
    promote: bool | None = Field(
        default=None,
        description="On success make the target the policy's own model set and drop the "
        "pins. None: promote unless a selector narrows the rollout.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> RolloutSpec:
        if self.health is not None and self.cohorts.canary is None:
            raise ValueError("health analysis compares the canary cohort: give a canary")
        if self.promote and self.selector is not None:
            raise ValueError(
                "promote would move the policy's devices outside the selector too: "
                "leave promote unset or false with a selector"
            )
        if self.baseline is not None and self.baseline == self._target_or_none():
            raise ValueError(f"the policy already runs {self.baseline.name} {self.target}")
        return self

    def _target_or_none(self) -> ModelSetRef | None:
        name = self.model_set or (self.baseline.name if self.baseline is not None else None)
        return None if name is None else ModelSetRef(name=name, version=self.target)

    @property
    def target_ref(self) -> ModelSetRef:
        """The model set devices move to; ``RolloutError`` before ``bind`` without a name."""
        ref = self._target_or_none()
        if ref is None:
            raise RolloutError(f"rollout {self.name}: bind it to its policy first")
        return ref

    @property
    def baseline_ref(self) -> ModelSetRef:
        if self.baseline is None:
            raise RolloutError(f"rollout {self.name}: bind it to its policy first")
        return self.baseline

    @property
    def promotes(self) -> bool:
        """Whether success promotes the target to the policy's own model set."""
        return self.promote if self.promote is not None else self.selector is None

    def bind(self, policy_name: str, current: ModelSetRef) -> RolloutSpec:
        """This spec with ``baseline`` set to the policy's current model set. Refuses another
        policy, a baseline that differs from one already bound, and a target equal to it."""
        if policy_name != self.policy:
            raise RolloutError(
                f"rollout {self.name} is for policy {self.policy}, not {policy_name}"
            )
        if self.baseline is not None and self.baseline != current:
            raise RolloutError(
                f"rollout {self.name} was bound to {self.baseline.name} {self.baseline.version}; "
                f"policy {policy_name} now names {current.name} {current.version}"
            )
        target = ModelSetRef(name=self.model_set or current.name, version=self.target)
        if target == current:
            raise RolloutError(
                f"policy {policy_name} already runs {current.name} {current.version}: "
                "nothing to roll out"
            )
        return self.model_copy(update={"baseline": current})


def load_spec(text: str, source: str) -> RolloutSpec:
    """A rollout spec (``edgefleet.rollout/1``) from YAML text; ``ManifestError`` names the
    file, line and field of the first problem."""
    return load_document(text, source, RolloutSpec)


# --- gate results --------------------------------------------------------------------------

GateStatus = Literal["passed", "failed", "pending"]


class GateResult(BaseModel):
    """One evaluation of one gate. ``value`` and ``threshold`` are in the gate's unit
    (percent for shares, a count, a latency ratio); ``checks`` hold the parts of a composite
    gate (the health gate's per-profile, per-model comparisons)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    status: GateStatus
    value: float | None = None
    threshold: float | None = None
    reason: str = ""
    checks: tuple[GateResult, ...] = ()


# --- the state -----------------------------------------------------------------------------

Phase = Literal["pending", "running", "paused", "succeeded", "aborted", "rolled_back", "failed"]
DeviceStatus = Literal[
    "waiting", "switched", "applied", "healthy", "failed", "timed_out", "unreachable", "skipped"
]
CohortStatus = Literal["pending", "active", "baking", "passed", "failed", "skipped"]

TERMINAL_PHASES: frozenset[str] = frozenset({"succeeded", "aborted", "rolled_back", "failed"})
IN_PROGRESS: frozenset[str] = frozenset({"switched", "applied"})
"""Devices pinned to the target and not finished: they count toward neither side."""
FINISHED: frozenset[str] = frozenset({"healthy", "failed", "timed_out"})


class _StateModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeviceAssignment(BaseModel):
    """One device of the rollout: its cohort and how far it got. Replaced, never mutated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cohort: int
    status: DeviceStatus = "waiting"
    pinned: bool = False
    """The rollout holds a pin to the target on this device (abort/rollback unpin it)."""
    switched_at: float | None = None
    generation: int | None = None
    """The first hub generation observed carrying the target for this device."""
    finished_at: float | None = None
    reason: str = ""


class HealthTrack(_StateModel):
    """The health analysis of a baking canary: when it is due next, what it found."""

    due_at: float
    evaluations: int = 0
    passed: int = 0
    failed: int = 0
    consecutive_missing: int = 0


class CohortState(_StateModel):
    index: int
    name: str
    devices: tuple[str, ...]
    status: CohortStatus = "pending"
    started_at: float | None = None
    grace_from: float | None = None
    """Offline grace counts from here (the cohort's start, or the last resume)."""
    first_switch_at: float | None = None
    deadline_at: float | None = None
    """Cohort timeout: the success gate must pass before this (set at the first switch)."""
    gate_passed_at: float | None = None
    bake_until: float | None = None
    finished_at: float | None = None
    health: HealthTrack | None = None
    gates: dict[str, GateResult] = Field(default_factory=dict)


class GateRecord(BaseModel):
    """A gate evaluation kept in the history: when its status changed, and every health
    analysis evaluation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    at: float
    cohort: int | None
    result: GateResult


class Transition(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    at: float
    from_phase: Phase
    to_phase: Phase
    cohort: int | None
    reason: str


class RolloutState(_StateModel):
    """Where a rollout stands; ``model_dump(mode="json")`` is what the driver persists and
    ``RolloutState.model_validate`` what it loads (``load_state`` checks the format)."""

    format: int = STATE_FORMAT
    rollout: str
    phase: Phase = "pending"
    cohort: int = 0
    """Index of the current cohort; ``len(cohorts)`` once every cohort has passed."""
    cohorts: list[CohortState] = Field(default_factory=list)
    devices: dict[str, DeviceAssignment] = Field(default_factory=dict)
    gates: dict[str, GateResult] = Field(default_factory=dict)
    """The rollout-wide gates (error_threshold, max_failures), latest evaluation."""
    history: list[GateRecord] = Field(default_factory=list)
    transitions: list[Transition] = Field(default_factory=list)
    held: str | None = None
    """Why switching is held right now (a closed maintenance window), or None."""
    paused_at: float | None = None
    paused_from: Phase | None = None
    promoted: bool = False
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    reason: str = ""
    """The reason of the last transition."""


def load_state(data: Mapping[str, Any]) -> RolloutState:
    """A persisted state; ``RolloutError`` for a format this code does not know."""
    found = data.get("format", STATE_FORMAT)
    if found != STATE_FORMAT:
        raise RolloutError(f"rollout state format {found} is not supported ({STATE_FORMAT})")
    return RolloutState.model_validate(data)


# --- observations (driver -> engine) -------------------------------------------------------


@dataclass(frozen=True)
class HealthFigures:
    """One model on one device (or summed over devices) over the analysis window: sums that
    add up across devices, as in the store's per-minute rollups."""

    requests: int = 0
    errors: int = 0
    latency_p95_wsum: float = 0.0
    """Sum of interval p95 latencies (ms) weighted by ``latency_weight``."""
    latency_weight: int = 0

    @classmethod
    def from_p95(cls, requests: int, errors: int, p95_ms: float | None) -> HealthFigures:
        """From a request count and one p95 (weighted by the requests)."""
        if p95_ms is None or requests == 0:
            return cls(requests=requests, errors=errors)
        return cls(requests, errors, p95_ms * requests, requests)

    def __add__(self, other: HealthFigures) -> HealthFigures:
        return HealthFigures(
            self.requests + other.requests,
            self.errors + other.errors,
            self.latency_p95_wsum + other.latency_p95_wsum,
            self.latency_weight + other.latency_weight,
        )

    @property
    def latency_p95_ms(self) -> float | None:
        return self.latency_p95_wsum / self.latency_weight if self.latency_weight else None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None


@dataclass(frozen=True)
class DeviceObservation:
    """What the driver read about one device of the rollout just before a step.

    ``applied`` and ``issued`` are the model sets the device's applied generation and the
    hub's newest generation for it use *for the rollout's policy*; generations are the
    hub's desired-state generations. A device missing from the observations counts as
    offline and silent.
    """

    online: bool = False
    last_seen: float | None = None
    profile: str | None = None
    applied: ModelSetRef | None = None
    applied_generation: int = 0
    phase: str | None = None
    """The reported ``State.phase``: idle, staging, loading, probation, committed,
    rolled_back, failed."""
    ready: bool = False
    """Every model of the applied generation reported ready."""
    issued: ModelSetRef | None = None
    issued_generation: int = 0
    failed_generation: int | None = None
    """The newest generation the device failed to apply, rolled back or refused
    (``State.last_error.generation`` / ``refused_generation``), if any."""
    error: str | None = None
    """The device's last error, for the record (``code: message``)."""
    request_rate: float | None = None
    """Inference requests per second recently (all models); None: unknown (not idle)."""
    health: Mapping[str, HealthFigures] = field(default_factory=dict)
    """Per model, over ``Observations.window``; empty when no window was asked for."""


@dataclass(frozen=True)
class Window:
    """A time window [since, until) in Unix seconds."""

    since: float
    until: float


@dataclass(frozen=True)
class Observations:
    devices: Mapping[str, DeviceObservation]
    window: Window | None = None
    """The window the ``health`` figures cover; None when the driver read none."""


# --- actions and events (engine -> driver) -------------------------------------------------


@dataclass(frozen=True)
class Pin:
    """Pin ``policy`` to ``model_set`` on one device (``set_pins``, rollout = ``rollout``)."""

    device_id: str
    policy: str
    model_set: ModelSetRef
    rollout: str


@dataclass(frozen=True)
class Unpin:
    """Drop the rollout's pin of ``policy`` on one device: it follows the policy again."""

    device_id: str
    policy: str
    rollout: str


@dataclass(frozen=True)
class Promote:
    """Make ``model_set`` the policy's own model set (a new policy version), but only if the
    policy still names ``expected``; otherwise the driver refuses (``RolloutConflict``)."""

    policy: str
    model_set: ModelSetRef
    expected: ModelSetRef
    rollout: str


Action = Pin | Unpin | Promote


class RolloutEvent(BaseModel):
    """Something that happened to a rollout, with its reason (docs/rollouts.md, "Events")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    at: float
    rollout: str
    reason: str
    cohort: int | None = None
    device_id: str | None = None
    data: dict[str, float | int | str | bool | None] = Field(default_factory=dict)


@dataclass(frozen=True)
class StepResult:
    """A step's outcome: persist ``state`` first, then execute ``actions`` in order, then
    record ``events``. ``wake_at``: the next time the engine has something to do without
    new observations (a bake end, a timeout, a window opening), or None."""

    state: RolloutState
    actions: tuple[Action, ...] = ()
    events: tuple[RolloutEvent, ...] = ()
    wake_at: float | None = None
