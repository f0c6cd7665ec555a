"""The rollout engine: a deterministic state machine, pure code with the clock passed in.

A driver (an apscheduler job and ingest events; not here) runs, for every active rollout::

    window = health_window(spec, state, now)          # None: no health figures needed
    observations = <read the rollout's devices from the store (and figures for window)>
    result = step(spec, state, observations, now)
    <persist result.state, then execute result.actions in order, then record result.events>

and the operators' commands call ``pause``, ``resume``, ``abort`` and ``rollback``, which
return a ``StepResult`` the same way. Nothing here reads a clock, a file, the store or the
network; the same inputs always give the same outputs, and a state loaded from its JSON
gives the same next step as the state it was saved from.

Lifecycle (docs/rollouts.md has the whole story)::

    pending ──step──> running ──every cohort passed, nothing in progress──> succeeded
       │                 │ └──a gate failed──> failed (on_failure: rollback unpins)
       └──pause──> paused <──resume── ...       abort ──> aborted      rollback ──> rolled_back

Per cohort: pending -> active (devices are switched: ``Pin``) -> baking (the success gate
passed; the bake runs, and for the canary the health analysis) -> passed; or failed /
skipped (empty). Per device: waiting -> switched -> applied -> healthy | failed | timed_out,
or waiting -> unreachable (offline past the grace) -> waiting again when it returns, and
waiting -> skipped when the rollout ends without switching it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

from contract.manifests import ModelSetRef, Policy
from hub.errors import InvalidTransition, RolloutConflict, RolloutError
from hub.resolve import DeviceView, selector_matches
from hub.rollout import gates
from hub.rollout.gates import Counts, HealthKey
from hub.rollout.model import (
    FINISHED,
    IN_PROGRESS,
    TERMINAL_PHASES,
    Action,
    CohortState,
    DeviceAssignment,
    DeviceObservation,
    DeviceStatus,
    GateRecord,
    GateResult,
    HealthFigures,
    HealthTrack,
    Observations,
    Phase,
    Pin,
    Promote,
    RolloutEvent,
    RolloutSpec,
    RolloutState,
    StepResult,
    Transition,
    Unpin,
    Window,
)
from hub.rollout.windows import any_open, next_open

ACTIVE_PHASES: frozenset[str] = frozenset({"pending", "running", "paused"})
WINDOW_CLOSED = "maintenance window closed"
_OFFLINE = DeviceObservation()


# --- planning ------------------------------------------------------------------------------


def cohort_names(spec: RolloutSpec) -> list[str]:
    """``canary`` (when there is one), then ``batch 1`` ... ``batch N``."""
    names = ["canary"] if spec.cohorts.canary is not None else []
    return names + [f"batch {i}" for i in range(1, len(spec.cohorts.batches) + 1)]


def cohort_sizes(spec: RolloutSpec, total: int) -> list[int]:
    """How many of ``total`` devices each cohort gets.

    The canary: ``count`` (at most ``total``), or ``percent`` of ``total`` rounded up, at
    least one device when ``total`` > 0. A batch's percentage is cumulative: after batch i,
    ceil(percent_i x total / 100) devices have been assigned (the canary included), so a
    batch that the canary already covers is empty. The sizes add up to ``total``.
    """
    sizes: list[int] = []
    assigned = 0
    canary = spec.cohorts.canary
    if canary is not None:
        if canary.count is not None:
            size = min(canary.count, total)
        else:
            size = min(total, max(1, math.ceil(Fraction(repr(canary.percent)) * total / 100)))
            if total == 0:
                size = 0
        sizes.append(size)
        assigned = size
    for batch in spec.cohorts.batches:
        upto = min(total, math.ceil(Fraction(repr(batch.percent)) * total / 100))
        size = max(0, upto - assigned)
        sizes.append(size)
        assigned += size
    return sizes


def plan_cohorts(spec: RolloutSpec, devices: Iterable[str], seed: str) -> list[list[str]]:
    """Split ``devices`` into the cohorts of ``spec`` (canary first, then the batches;
    empty cohorts kept so that indexes match ``cohort_names``). Deterministic: devices are
    ordered by sha256(seed, device id), then id, whatever order they come in; another seed
    picks another canary."""
    unique = sorted(set(devices), key=lambda d: (_rank(seed, d), d))
    cohorts: list[list[str]] = []
    start = 0
    for size in cohort_sizes(spec, len(unique)):
        cohorts.append(unique[start : start + size])
        start += size
    return cohorts


def _rank(seed: str, device_id: str) -> str:
    return hashlib.sha256(f"{seed}\x00{device_id}".encode()).hexdigest()


def select_targets(spec: RolloutSpec, policy: Policy, devices: Iterable[DeviceView]) -> list[str]:
    """The devices a rollout of ``policy`` moves: the policy's selector matches, and the
    rollout's own selector (if any) too. Sorted ids."""
    if policy.name != spec.policy:
        raise RolloutError(f"rollout {spec.name} is for policy {spec.policy}, not {policy.name}")
    return sorted(
        d.device_id
        for d in devices
        if selector_matches(policy.selector, d)
        and (spec.selector is None or selector_matches(spec.selector, d))
    )


def new_rollout(
    spec: RolloutSpec, devices: Iterable[str], now: float, *, seed: str | None = None
) -> RolloutState:
    """A pending rollout over ``devices`` (usually ``select_targets``), planned into cohorts
    with ``seed`` (default: the rollout's name). The spec must be bound (``spec.bind``).
    With no device the first ``step`` fails it ("no device")."""
    _bound(spec)
    planned = plan_cohorts(spec, devices, spec.name if seed is None else seed)
    names = cohort_names(spec)
    cohorts = [
        CohortState(index=i, name=names[i], devices=tuple(ids)) for i, ids in enumerate(planned)
    ]
    assignments = {d: DeviceAssignment(cohort=c.index) for c in cohorts for d in c.devices}
    return RolloutState(rollout=spec.name, cohorts=cohorts, devices=assignments, created_at=now)


# --- what the driver asks between steps ----------------------------------------------------


def claimed_devices(state: RolloutState) -> frozenset[str]:
    """The devices this rollout holds: all of them while it is pending, running or paused;
    the ones it still pins while it is failed with ``on_failure: hold``; none otherwise."""
    if state.phase in ACTIVE_PHASES:
        return frozenset(state.devices)
    if state.phase == "failed":
        return frozenset(d for d, a in state.devices.items() if a.pinned)
    return frozenset()


def check_conflicts(devices: Iterable[str], others: Mapping[str, RolloutState]) -> None:
    """``RolloutConflict`` when another rollout (``others``: name -> state) holds any of
    ``devices``: two rollouts never touch a device at once."""
    taken: dict[str, str] = {}
    claims = {name: claimed_devices(state) for name, state in sorted(others.items())}
    for device in sorted(set(devices)):
        for name, claimed in claims.items():
            if device in claimed:
                taken[device] = name
                break
    if taken:
        shown = ", ".join(f"{d} ({r})" for d, r in list(taken.items())[:5])
        more = f" and {len(taken) - 5} more" if len(taken) > 5 else ""
        raise RolloutConflict(
            f"{len(taken)} device(s) are held by other rollouts: {shown}{more}", taken
        )


def expected_pins(spec: RolloutSpec, state: RolloutState) -> dict[str, ModelSetRef]:
    """Device -> model set for every pin this rollout holds now. After a restart the driver
    makes the controller's pins of this rollout equal to this (actions executed after the
    state was persisted may have been lost)."""
    target = spec.target_ref
    return {d: target for d in sorted(state.devices) if state.devices[d].pinned}


def health_window(spec: RolloutSpec, state: RolloutState, now: float) -> Window | None:
    """The window whose per-device health figures the next ``step`` needs, or None.

    Only while the canary bakes under a health analysis and an evaluation is due: then the
    trailing ``window_s`` seconds, not before the bake started, up to ``now``.
    """
    analysis = spec.health
    if analysis is None or state.phase != "running" or state.cohort >= len(state.cohorts):
        return None
    cohort = state.cohorts[state.cohort]
    if cohort.status != "baking" or cohort.health is None or now < cohort.health.due_at:
        return None
    started = cohort.gate_passed_at if cohort.gate_passed_at is not None else now
    since = max(started, now - analysis.window_s)
    return Window(since=since, until=now)


@dataclass(frozen=True)
class CohortProgress:
    """One cohort for a status display: devices by status, and its latest gate results."""

    index: int
    name: str
    status: str
    total: int
    by_status: Mapping[str, int]
    gates: Mapping[str, GateResult]
    bake_until: float | None


def progress(state: RolloutState) -> list[CohortProgress]:
    """Every cohort with its devices counted by status (for ``status --watch``)."""
    out = []
    for cohort in state.cohorts:
        by_status: dict[str, int] = {}
        for device in cohort.devices:
            status = state.devices[device].status
            by_status[status] = by_status.get(status, 0) + 1
        out.append(
            CohortProgress(
                index=cohort.index,
                name=cohort.name,
                status=cohort.status,
                total=len(cohort.devices),
                by_status=dict(sorted(by_status.items())),
                gates=dict(cohort.gates),
                bake_until=cohort.bake_until,
            )
        )
    return out


# --- the step ------------------------------------------------------------------------------


def step(
    spec: RolloutSpec, state: RolloutState, observations: Observations, now: float
) -> StepResult:
    """Move the rollout as far as ``observations`` at ``now`` allow.

    Order within a step: start a pending rollout (or fail it when it has no device); update
    every switched device from its observation (applied, healthy, failed, timed out); while
    running, evaluate the rollout-wide gates, then the current cohort: start it, mark
    offline devices unreachable, switch eligible devices, evaluate its success gate, run
    its bake and health analysis, and go on to the next cohort as often as each finishes in
    this same step. Terminal phases return the state unchanged.
    """
    run = _Run(spec, state, now, observations)
    if run.state.phase in TERMINAL_PHASES:
        return run.result()
    if run.state.phase == "pending":
        if not run.state.devices:
            run.transition("failed", "no device matches the rollout's policy and selector")
            return run.result()
        run.state.started_at = now
        run.transition("running", "started")
    run.observe()
    if run.state.phase == "running" and run.rollout_gates():
        run.advance()
    return run.result()


def pause(spec: RolloutSpec, state: RolloutState, now: float, reason: str) -> StepResult:
    """Hold a pending or running rollout: no device is switched and no gate decides until
    ``resume``; switched devices are still followed (device timeouts run on)."""
    run = _Run(spec, state, now, None)
    if run.state.phase not in ("pending", "running"):
        raise InvalidTransition(spec.name, "pause", run.state.phase)
    run.state.paused_from = run.state.phase
    run.state.paused_at = now
    run.transition("paused", reason)
    return run.result()


def resume(spec: RolloutSpec, state: RolloutState, now: float, reason: str) -> StepResult:
    """Continue a paused rollout where it was. The current cohort's timeout, bake and
    health schedule are shifted by the time spent paused, and its offline grace restarts."""
    run = _Run(spec, state, now, None)
    st = run.state
    if st.phase != "paused":
        raise InvalidTransition(spec.name, "resume", st.phase)
    paused_for = now - (st.paused_at if st.paused_at is not None else now)
    if st.cohort < len(st.cohorts):
        cohort = st.cohorts[st.cohort]
        if cohort.deadline_at is not None:
            cohort.deadline_at += paused_for
        if cohort.bake_until is not None:
            cohort.bake_until += paused_for
        if cohort.health is not None:
            cohort.health.due_at += paused_for
        if cohort.grace_from is not None:
            cohort.grace_from = now
    back: Phase = st.paused_from or "running"
    st.paused_at = None
    st.paused_from = None
    run.transition(back, reason)
    return run.result()


def abort(spec: RolloutSpec, state: RolloutState, now: float, reason: str) -> StepResult:
    """Stop the rollout and send every device it pinned back to the baseline (``Unpin``,
    windows not waited for). From pending, running, paused, or failed while it still holds
    pins (``on_failure: hold``); ends ``aborted``."""
    run = _Run(spec, state, now, None)
    st = run.state
    holding = any(a.pinned for a in st.devices.values())
    if st.phase not in ACTIVE_PHASES and not (st.phase == "failed" and holding):
        raise InvalidTransition(spec.name, "abort", st.phase)
    run.unpin_all()
    run.transition("aborted", reason)
    return run.result()


def rollback(spec: RolloutSpec, state: RolloutState, now: float, reason: str) -> StepResult:
    """Send every device the rollout moved back to the baseline: undo a promotion
    (``Promote`` back to the baseline, expecting the target), then ``Unpin`` every pinned
    device. From running, paused, succeeded, or failed while it still holds pins; ends
    ``rolled_back``. (A pending rollout has moved nothing: abort it.)"""
    run = _Run(spec, state, now, None)
    st = run.state
    holding = any(a.pinned for a in st.devices.values())
    allowed = st.phase in ("running", "paused", "succeeded") or (st.phase == "failed" and holding)
    if not allowed or (st.phase == "succeeded" and not (holding or st.promoted)):
        raise InvalidTransition(spec.name, "roll back", st.phase)
    if st.promoted:
        run.actions.append(
            Promote(
                policy=spec.policy,
                model_set=spec.baseline_ref,
                expected=spec.target_ref,
                rollout=spec.name,
            )
        )
        st.promoted = False
    run.unpin_all()
    run.transition("rolled_back", reason)
    return run.result()


# --- the machinery -------------------------------------------------------------------------


def _bound(spec: RolloutSpec) -> None:
    if spec.baseline is None:
        raise RolloutError(f"rollout {spec.name}: bind it to its policy first (no baseline)")


def _working_copy(state: RolloutState) -> RolloutState:
    """A copy the step may change: containers copied, frozen items shared."""
    cohorts = [
        c.model_copy(
            update={
                "gates": dict(c.gates),
                "health": c.health.model_copy() if c.health is not None else None,
            }
        )
        for c in state.cohorts
    ]
    return state.model_copy(
        update={
            "cohorts": cohorts,
            "devices": dict(state.devices),
            "gates": dict(state.gates),
            "history": list(state.history),
            "transitions": list(state.transitions),
        }
    )


class _Run:
    """One call's working state: the copy being moved, the actions and events so far."""

    def __init__(
        self, spec: RolloutSpec, state: RolloutState, now: float, obs: Observations | None
    ) -> None:
        _bound(spec)
        if state.rollout != spec.name:
            raise RolloutError(f"state of rollout {state.rollout} given with spec {spec.name}")
        self.spec = spec
        self.state = _working_copy(state)
        self.now = now
        self.obs: Mapping[str, DeviceObservation] = obs.devices if obs is not None else {}
        self.window = obs.window if obs is not None else None
        self.target = spec.target_ref
        self.actions: list[Action] = []
        self.events: list[RolloutEvent] = []

    # --- output --------------------------------------------------------------------------

    def result(self) -> StepResult:
        return StepResult(
            state=self.state,
            actions=tuple(self.actions),
            events=tuple(self.events),
            wake_at=self._wake_at(),
        )

    def emit(
        self,
        kind: str,
        reason: str,
        *,
        cohort: int | None = None,
        device_id: str | None = None,
        data: Mapping[str, float | int | str | bool | None] | None = None,
    ) -> None:
        self.events.append(
            RolloutEvent(
                kind=kind,
                at=self.now,
                rollout=self.spec.name,
                reason=reason,
                cohort=cohort,
                device_id=device_id,
                data=dict(data or {}),
            )
        )

    def transition(self, to: Phase, reason: str) -> None:
        st = self.state
        cohort = st.cohort if st.cohort < len(st.cohorts) else None
        st.transitions.append(
            Transition(at=self.now, from_phase=st.phase, to_phase=to, cohort=cohort, reason=reason)
        )
        st.phase = to
        st.reason = reason
        if to in TERMINAL_PHASES:
            st.finished_at = self.now
            st.held = None
        self.emit(f"rollout.{to}", reason, cohort=cohort)

    def set_device(self, device_id: str, **changes: object) -> DeviceAssignment:
        updated = self.state.devices[device_id].model_copy(update=changes)
        self.state.devices[device_id] = updated
        return updated

    def unpin_all(self) -> None:
        for device_id in self._ordered_devices():
            if self.state.devices[device_id].pinned:
                self.actions.append(Unpin(device_id, self.spec.policy, self.spec.name))
                self.set_device(device_id, pinned=False)

    def _ordered_devices(self) -> Iterator[str]:
        for cohort in self.state.cohorts:
            yield from cohort.devices

    def _started_devices(self) -> Iterator[tuple[CohortState, str]]:
        """Devices of the cohorts up to the current one (those that may be switched)."""
        st = self.state
        for cohort in st.cohorts[: st.cohort + 1]:
            for device_id in cohort.devices:
                yield cohort, device_id

    # --- devices -------------------------------------------------------------------------

    def observe(self) -> None:
        """Move every switched device on from what the driver observed."""
        for device_id in self._ordered_devices():
            assignment = self.state.devices[device_id]
            if assignment.status in IN_PROGRESS:
                self._observe_one(device_id, assignment)

    def _observe_one(self, device_id: str, a: DeviceAssignment) -> None:
        o = self.obs.get(device_id, _OFFLINE)
        generation = a.generation
        if generation is None and o.issued == self.target and o.issued_generation > 0:
            generation = o.issued_generation
        status: DeviceStatus = a.status
        reason = a.reason
        if generation is not None:
            if o.failed_generation is not None and o.failed_generation >= generation:
                status = "failed"
                reason = f"generation {o.failed_generation} failed" + (
                    f": {o.error}" if o.error else ""
                )
            elif o.applied_generation >= generation and o.applied == self.target:
                if o.phase == "committed" and o.ready:
                    status, reason = "healthy", ""
                else:
                    status = "applied"
        timeout = self.spec.device_timeout_s
        switched_at = a.switched_at
        if status in IN_PROGRESS and switched_at is not None and self.now >= switched_at + timeout:
            status = "timed_out"
            reason = f"not finished {timeout:g}s after it was switched"
        if status == a.status and generation == a.generation:
            return
        finished = self.now if status in FINISHED else None
        self.set_device(
            device_id, status=status, generation=generation, reason=reason, finished_at=finished
        )
        if status in ("failed", "timed_out"):
            self.emit(f"device.{status}", reason, cohort=a.cohort, device_id=device_id)

    def reach(self) -> None:
        """Offline devices waiting past the grace become unreachable; unreachable devices
        that are online again wait to be switched."""
        st = self.state
        current = st.cohorts[st.cohort]
        grace_from = current.grace_from if current.grace_from is not None else self.now
        for cohort, device_id in self._started_devices():
            a = st.devices[device_id]
            if a.status not in ("waiting", "unreachable"):
                continue
            o = self.obs.get(device_id, _OFFLINE)
            if a.status == "unreachable":
                if o.online:
                    self.set_device(device_id, status="waiting", reason="")
                    self.emit(
                        "device.reachable", "online again", cohort=cohort.index, device_id=device_id
                    )
                continue
            if o.online:
                continue
            since = max(grace_from, o.last_seen if o.last_seen is not None else grace_from)
            if self.now >= since + self.spec.offline.grace_s:
                why = f"offline for {self.spec.offline.grace_s:g}s while its cohort ran"
                self.set_device(device_id, status="unreachable", reason=why)
                self.emit("device.unreachable", why, cohort=cohort.index, device_id=device_id)

    def switch(self) -> None:
        """Pin every eligible waiting device: online, inside a maintenance window, and idle
        when ``only_when_idle``."""
        st = self.state
        candidates = [
            (cohort, d)
            for cohort, d in self._started_devices()
            if st.devices[d].status == "waiting" and self.obs.get(d, _OFFLINE).online
        ]
        if not candidates:
            return
        if not any_open(self.spec.windows, self.now):
            if st.held != WINDOW_CLOSED:
                st.held = WINDOW_CLOSED
                self.emit("switching.held", WINDOW_CLOSED, cohort=st.cohort)
            return
        if st.held is not None:
            st.held = None
            self.emit("switching.resumed", "maintenance window open", cohort=st.cohort)
        for cohort, device_id in candidates:
            if self.spec.only_when_idle and not self._idle(device_id):
                continue
            self.actions.append(Pin(device_id, self.spec.policy, self.target, self.spec.name))
            self.set_device(device_id, status="switched", pinned=True, switched_at=self.now)
            if cohort.first_switch_at is None:
                cohort.first_switch_at = self.now
                if self.spec.cohort_timeout_s is not None:
                    cohort.deadline_at = self.now + self.spec.cohort_timeout_s

    def _idle(self, device_id: str) -> bool:
        rate = self.obs.get(device_id, _OFFLINE).request_rate
        return rate is not None and rate <= self.spec.idle_max_rps

    # --- gates ---------------------------------------------------------------------------

    def counts(self, devices: Iterable[str]) -> Counts:
        total = healthy = failed = unreachable = 0
        for device_id in devices:
            status = self.state.devices[device_id].status
            total += 1
            if status == "healthy":
                healthy += 1
            elif status in ("failed", "timed_out"):
                failed += 1
            elif status == "unreachable":
                unreachable += 1
        return Counts(total=total, healthy=healthy, failed=failed, unreachable=unreachable)

    def record(self, result: GateResult, cohort: CohortState | None) -> None:
        """Keep the latest result; history and an event when its status changes."""
        gates_now = cohort.gates if cohort is not None else self.state.gates
        before = gates_now.get(result.name)
        gates_now[result.name] = result
        if before is None or before.status != result.status:
            index = cohort.index if cohort is not None else None
            self.state.history.append(GateRecord(at=self.now, cohort=index, result=result))
            if result.status != "pending":
                self.emit(
                    f"gate.{result.status}",
                    f"{result.name}: {result.reason}",
                    cohort=index,
                    data={
                        "gate": result.name,
                        "value": result.value,
                        "threshold": result.threshold,
                    },
                )

    def rollout_gates(self) -> bool:
        """The rollout-wide gates over every device; False when one failed (and the
        rollout with it)."""
        g = self.spec.gates
        counts = self.counts(self.state.devices)
        failed = counts.failed + (counts.unreachable if self.spec.offline.unreachable_fails else 0)
        finished = counts.healthy + failed
        results = []
        if g.error_threshold is not None:
            results.append(
                gates.error_threshold_gate(failed, finished, g.error_threshold, g.min_finished)
            )
        if g.max_failures is not None:
            results.append(gates.max_failures_gate(failed, g.max_failures))
        for result in results:
            self.record(result, None)
        for result in results:
            if result.status == "failed":
                self.fail(f"gate {result.name} failed: {result.reason}")
                return False
        return True

    def fail(self, reason: str) -> None:
        st = self.state
        if st.cohort < len(st.cohorts):
            cohort = st.cohorts[st.cohort]
            cohort.status = "failed"
            cohort.finished_at = self.now
            self.emit("cohort.failed", reason, cohort=cohort.index)
        if self.spec.on_failure == "rollback":
            self.unpin_all()
        self.transition("failed", reason)

    # --- cohorts -------------------------------------------------------------------------

    def advance(self) -> None:
        st = self.state
        while st.phase == "running":
            if st.cohort >= len(st.cohorts):
                self.finish()
                return
            cohort = st.cohorts[st.cohort]
            if cohort.status == "pending":
                if not cohort.devices:
                    cohort.status = "skipped"
                    cohort.started_at = cohort.finished_at = self.now
                    self.emit("cohort.skipped", "no device in this cohort", cohort=cohort.index)
                    st.cohort += 1
                    continue
                cohort.status = "active"
                cohort.started_at = cohort.grace_from = self.now
                self.emit(
                    "cohort.started",
                    f"{cohort.name}: {len(cohort.devices)} device(s)",
                    cohort=cohort.index,
                    data={"devices": len(cohort.devices)},
                )
            self.reach()
            self.switch()
            if cohort.status == "active" and not self._active(cohort):
                return
            if cohort.status == "baking" and not self._baking(cohort):
                return
            if cohort.status == "passed":
                st.cohort += 1

    def _active(self, cohort: CohortState) -> bool:
        """Evaluate the success gate; True when the cohort went on to bake."""
        result = gates.success_gate(
            self.counts(cohort.devices),
            self.spec.gates.success_threshold,
            unreachable_fails=self.spec.offline.unreachable_fails,
            require_healthy=cohort.name == "canary",
        )
        self.record(result, cohort)
        if result.status == "failed":
            self.fail(f"{cohort.name}: success gate failed: {result.reason}")
            return False
        if result.status == "pending":
            if cohort.deadline_at is not None and self.now >= cohort.deadline_at:
                self.fail(
                    f"{cohort.name}: cohort timeout: success gate not met "
                    f"{self.spec.cohort_timeout_s:g}s after its first switch ({result.reason})"
                )
            return False
        bake = self.spec.cohorts.bake_of(cohort.index)
        cohort.status = "baking"
        cohort.gate_passed_at = self.now
        cohort.bake_until = self.now + bake
        if self.spec.health is not None and cohort.name == "canary":
            cohort.health = HealthTrack(due_at=self.now + self.spec.health.interval_s)
        self.emit(
            "cohort.baking",
            f"{cohort.name}: success gate passed ({result.reason}); baking {bake:g}s",
            cohort=cohort.index,
        )
        return True

    def _baking(self, cohort: CohortState) -> bool:
        """Run the bake (and health analysis); True when the cohort passed."""
        track = cohort.health
        if track is not None:
            if not self._analyse(cohort, track):
                return False
            if track.passed == 0:
                return False
        if cohort.bake_until is not None and self.now < cohort.bake_until:
            return False
        cohort.status = "passed"
        cohort.finished_at = self.now
        counts = self.counts(cohort.devices)
        self.emit(
            "cohort.passed",
            f"{cohort.name}: baked; {counts.healthy}/{counts.total} healthy",
            cohort=cohort.index,
            data={
                "healthy": counts.healthy,
                "failed": counts.failed,
                "unreachable": counts.unreachable,
                "total": counts.total,
            },
        )
        return True

    def _analyse(self, cohort: CohortState, track: HealthTrack) -> bool:
        """One health evaluation when due and the driver brought figures; False when the
        health gate failed (and the rollout with it)."""
        analysis = self.spec.health
        if analysis is None or self.now < track.due_at or self.window is None:
            return True
        canary, baseline = self._health_groups(cohort)
        result = gates.health_gate(canary, baseline, analysis)
        track.evaluations += 1
        track.due_at = self.now + analysis.interval_s
        failure: str | None = None
        if result.status == "failed":
            track.failed += 1
            track.consecutive_missing = 0
            if track.failed > analysis.max_failed:
                failure = f"health analysis failed: {result.reason}"
        elif result.status == "pending":
            track.consecutive_missing += 1
            if track.consecutive_missing > analysis.max_missing_data:
                failure = (
                    f"health analysis: no data for {track.consecutive_missing} consecutive "
                    f"evaluations ({result.reason})"
                )
        else:
            track.passed += 1
            track.consecutive_missing = 0
        if failure is not None:
            result = result.model_copy(update={"status": "failed", "reason": failure})
        cohort.gates[result.name] = result
        self.state.history.append(GateRecord(at=self.now, cohort=cohort.index, result=result))
        self.emit(
            f"health.{result.status}",
            result.reason,
            cohort=cohort.index,
            data={
                "value": result.value,
                "threshold": result.threshold,
                "evaluation": track.evaluations,
            },
        )
        if failure is not None:
            self.fail(f"{cohort.name}: {failure}")
            return False
        return True

    def _health_groups(
        self, cohort: CohortState
    ) -> tuple[dict[HealthKey, HealthFigures], dict[HealthKey, HealthFigures]]:
        """Figures summed per (profile, model): the canary's healthy devices, and the
        baseline cohort (devices not switched that run the baseline, same profiles)."""
        st = self.state
        baseline_ref = self.spec.baseline_ref
        canary: dict[HealthKey, HealthFigures] = {}
        profiles: set[str] = set()
        for device_id in cohort.devices:
            if st.devices[device_id].status != "healthy":
                continue
            o = self.obs.get(device_id, _OFFLINE)
            profile = o.profile or ""
            profiles.add(profile)
            _add_figures(canary, profile, o.health)
        baseline: dict[HealthKey, HealthFigures] = {}
        for device_id in self._ordered_devices():
            if st.devices[device_id].status not in ("waiting", "unreachable", "skipped"):
                continue
            o = self.obs.get(device_id, _OFFLINE)
            profile = o.profile or ""
            if profile in profiles and o.applied == baseline_ref:
                _add_figures(baseline, profile, o.health)
        return canary, baseline

    def finish(self) -> None:
        """Every cohort passed: once no switched device is still working, succeed."""
        st = self.state
        if any(a.status in IN_PROGRESS for a in st.devices.values()):
            return
        for device_id in self._ordered_devices():
            if st.devices[device_id].status == "waiting":
                self.set_device(device_id, status="skipped", reason="not switched by the end")
        counts = self.counts(st.devices)
        if counts.healthy == 0:
            self.fail(
                f"no device reached the target: {counts.failed} failed, "
                f"{counts.unreachable} unreachable, {counts.in_progress} not switched"
            )
            return
        if self.spec.promotes:
            self.actions.append(
                Promote(
                    policy=self.spec.policy,
                    model_set=self.target,
                    expected=self.spec.baseline_ref,
                    rollout=self.spec.name,
                )
            )
            st.promoted = True
            self.unpin_all()
        self.transition(
            "succeeded",
            f"every cohort passed: {counts.healthy}/{counts.total} healthy, "
            f"{counts.failed} failed, {counts.unreachable} unreachable",
        )

    # --- wake-up -------------------------------------------------------------------------

    def _wake_at(self) -> float | None:
        st = self.state
        if st.phase not in ("running", "paused"):
            return None
        times: list[float] = []
        for a in st.devices.values():
            if a.status in IN_PROGRESS and a.switched_at is not None:
                times.append(a.switched_at + self.spec.device_timeout_s)
        if st.phase == "running" and st.cohort < len(st.cohorts):
            cohort = st.cohorts[st.cohort]
            for t in (cohort.deadline_at, cohort.bake_until):
                if t is not None:
                    times.append(t)
            if cohort.health is not None and cohort.status == "baking":
                times.append(cohort.health.due_at)
            grace_from = cohort.grace_from if cohort.grace_from is not None else self.now
            for _, device_id in self._started_devices():
                if st.devices[device_id].status != "waiting":
                    continue
                o = self.obs.get(device_id, _OFFLINE)
                if not o.online:
                    seen = o.last_seen if o.last_seen is not None else grace_from
                    times.append(max(grace_from, seen) + self.spec.offline.grace_s)
            if st.held == WINDOW_CLOSED:
                opens = next_open(self.spec.windows, self.now)
                if opens is not None:
                    times.append(opens)
        future = [t for t in times if t > self.now]
        return min(future) if future else None


def _add_figures(
    into: dict[HealthKey, HealthFigures], profile: str, figures: Mapping[str, HealthFigures]
) -> None:
    for model, f in figures.items():
        key = (profile, model)
        into[key] = into[key] + f if key in into else f


def device_ids(state: RolloutState) -> list[str]:
    """Every device of the rollout in plan order (cohort by cohort): what to observe."""
    return [d for cohort in state.cohorts for d in cohort.devices]


def counts_of(state: RolloutState, devices: Sequence[str] | None = None) -> dict[str, int]:
    """Devices by status (all of the rollout's, or ``devices``)."""
    out: dict[str, int] = {}
    for device_id in devices if devices is not None else state.devices:
        status = state.devices[device_id].status
        out[status] = out.get(status, 0) + 1
    return dict(sorted(out.items()))
