"""Rollouts: move a policy's devices from one model-set version to another in cohorts,
behind gates, inside maintenance windows, with abort and rollback.

Pure code (no clock, file, store or network): ``model`` holds the spec, the persisted state
and what the engine exchanges with its driver; ``engine`` moves a state one step at a time;
``gates`` are the gate functions; ``windows`` the maintenance windows. The driver that reads
the store, executes the actions and records the events lives outside this package.
Semantics: docs/rollouts.md.
"""

from __future__ import annotations

from hub.rollout.engine import (
    ACTIVE_PHASES,
    CohortProgress,
    abort,
    check_conflicts,
    claimed_devices,
    cohort_names,
    cohort_sizes,
    counts_of,
    device_ids,
    expected_pins,
    health_window,
    new_rollout,
    pause,
    plan_cohorts,
    progress,
    resume,
    rollback,
    select_targets,
    step,
)
from hub.rollout.model import (
    ROLLOUT_SCHEMA,
    TERMINAL_PHASES,
    Action,
    DeviceObservation,
    GateResult,
    HealthFigures,
    Observations,
    Pin,
    Promote,
    RolloutEvent,
    RolloutSpec,
    RolloutState,
    StepResult,
    Unpin,
    Window,
    load_spec,
    load_state,
    parse_duration,
    parse_percent,
)
from hub.rollout.windows import MaintenanceWindow

__all__ = [
    "ACTIVE_PHASES",
    "ROLLOUT_SCHEMA",
    "TERMINAL_PHASES",
    "Action",
    "CohortProgress",
    "DeviceObservation",
    "GateResult",
    "HealthFigures",
    "MaintenanceWindow",
    "Observations",
    "Pin",
    "Promote",
    "RolloutEvent",
    "RolloutSpec",
    "RolloutState",
    "StepResult",
    "Unpin",
    "Window",
    "abort",
    "check_conflicts",
    "claimed_devices",
    "cohort_names",
    "cohort_sizes",
    "counts_of",
    "device_ids",
    "expected_pins",
    "health_window",
    "load_spec",
    "load_state",
    "new_rollout",
    "parse_duration",
    "parse_percent",
    "pause",
    "plan_cohorts",
    "progress",
    "resume",
    "rollback",
    "select_targets",
    "step",
]
