"""The rollout engine, pure, with an injected clock: planning, every gate inside a running
rollout, offline devices, timeouts, windows, idleness, pause/resume/abort/rollback, and
restarts from the persisted JSON giving identical next steps."""

from __future__ import annotations

import ast
import copy
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contract.manifests import ModelSetRef, Policy
from hub.errors import InvalidTransition, RolloutConflict, RolloutError
from hub.resolve import DeviceView
from hub.rollout import (
    Action,
    DeviceObservation,
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
    abort,
    check_conflicts,
    claimed_devices,
    cohort_sizes,
    counts_of,
    device_ids,
    expected_pins,
    health_window,
    load_state,
    new_rollout,
    pause,
    plan_cohorts,
    progress,
    resume,
    rollback,
    select_targets,
    step,
)

ROOT = Path(__file__).resolve().parent.parent
BASE = ModelSetRef(name="ocr", version="1")
TARGET = ModelSetRef(name="ocr", version="2")


def make_spec(**overrides: Any) -> RolloutSpec:
    data: dict[str, Any] = {"name": "ocr-2", "policy": "base", "target": "2"}
    data.update(overrides)
    return RolloutSpec.model_validate(data).bind("base", BASE)


# --- a pure simulated fleet --------------------------------------------------------------------


@dataclass
class Dev:
    """A device as the hub sees it; ``behaviour`` says what it does with a new generation."""

    behaviour: str = "good"  # good | fail | silent | slow
    online: bool = True
    profile: str = "rpi4"
    last_seen: float = 0.0
    applied: ModelSetRef = BASE
    applied_generation: int = 1
    phase: str = "committed"
    issued: ModelSetRef = BASE
    issued_generation: int = 1
    failed_generation: int | None = None
    request_rate: float | None = 0.0
    pinned: ModelSetRef | None = None


@dataclass
class Fleet:
    devices: dict[str, Dev]
    policy_ref: ModelSetRef = BASE
    promotions: list[Promote] = field(default_factory=list)

    @classmethod
    def of(cls, n: int, behaviours: Mapping[int, str] | None = None, **dev: Any) -> Fleet:
        behaviours = behaviours or {}
        return cls({f"d{i:03d}": Dev(behaviour=behaviours.get(i, "good"), **dev) for i in range(n)})

    @property
    def ids(self) -> list[str]:
        return sorted(self.devices)

    def execute(self, actions: Iterable[Action]) -> None:
        for action in actions:
            if isinstance(action, Pin):
                dev = self.devices[action.device_id]
                assert dev.pinned is None, f"{action.device_id} pinned twice"
                dev.pinned = action.model_set
                self._issue(dev)
            elif isinstance(action, Unpin):
                dev = self.devices[action.device_id]
                assert dev.pinned is not None, f"{action.device_id} unpinned but not pinned"
                dev.pinned = None
                self._issue(dev)
            else:
                assert action.expected == self.policy_ref
                self.policy_ref = action.model_set
                self.promotions.append(action)
                for dev in self.devices.values():
                    self._issue(dev)

    def _issue(self, dev: Dev) -> None:
        wanted = dev.pinned or self.policy_ref
        if wanted != dev.issued:
            dev.issued = wanted
            dev.issued_generation += 1

    def settle(self, now: float) -> None:
        """Online devices act on their newest generation."""
        for dev in self.devices.values():
            if not dev.online:
                continue
            dev.last_seen = now
            if dev.issued_generation <= dev.applied_generation:
                continue
            if dev.failed_generation == dev.issued_generation:
                continue
            if dev.issued == BASE or dev.behaviour in ("good", "slow"):
                dev.applied, dev.applied_generation = dev.issued, dev.issued_generation
                dev.phase = "committed"
            elif dev.behaviour == "fail":
                dev.failed_generation = dev.issued_generation
                dev.phase = "rolled_back"
            else:
                dev.phase = "staging"

    def observe(self, window: Window | None = None, *, data: bool = True) -> Observations:
        observed = {}
        for device_id, dev in self.devices.items():
            health: dict[str, HealthFigures] = {}
            if window is not None and data and dev.online:
                p95 = 12.0 * (3 if dev.behaviour == "slow" and dev.applied == TARGET else 1)
                health["det"] = HealthFigures.from_p95(120, 0, p95)
            observed[device_id] = DeviceObservation(
                online=dev.online,
                last_seen=dev.last_seen,
                profile=dev.profile,
                applied=dev.applied,
                applied_generation=dev.applied_generation,
                phase=dev.phase,
                ready=dev.phase == "committed",
                issued=dev.issued,
                issued_generation=dev.issued_generation,
                failed_generation=dev.failed_generation,
                error="smoke_test_failed: output mismatch" if dev.failed_generation else None,
                request_rate=dev.request_rate,
                health=health,
            )
        return Observations(observed, window)


def tick(
    spec: RolloutSpec, state: RolloutState, fleet: Fleet, now: float, *, data: bool = True
) -> StepResult:
    """One driver round: observe (with health figures when asked), step, execute, settle."""
    window = health_window(spec, state, now)
    result = step(spec, state, fleet.observe(window, data=data), now)
    fleet.execute(result.actions)
    fleet.settle(now)
    return result


def run_until(
    spec: RolloutSpec,
    state: RolloutState,
    fleet: Fleet,
    start: float,
    end: float,
    *,
    every: float = 30.0,
    data: bool = True,
) -> tuple[RolloutState, list[StepResult]]:
    results = []
    now = start
    while now <= end:
        result = tick(spec, state, fleet, now, data=data)
        results.append(result)
        state = result.state
        if state.phase in ("succeeded", "failed", "aborted", "rolled_back"):
            break
        now += every
    return state, results


def kinds(results: Iterable[StepResult]) -> list[str]:
    return [e.kind for r in results for e in r.events]


def pins(result: StepResult) -> list[str]:
    return [a.device_id for a in result.actions if isinstance(a, Pin)]


def unpins(result: StepResult) -> list[str]:
    return [a.device_id for a in result.actions if isinstance(a, Unpin)]


# --- planning ----------------------------------------------------------------------------------


def test_plan_is_deterministic_canary_first_and_order_independent() -> None:
    spec = make_spec(cohorts={"canary": {"count": 2}, "batches": [25, 50, 100]})
    devices = [f"dev-{i}" for i in range(40)]
    plan = plan_cohorts(spec, devices, "seed")
    assert plan == plan_cohorts(spec, list(reversed(devices)) + devices[:5], "seed")
    assert [len(c) for c in plan] == [2, 8, 10, 20]
    assert sorted(d for c in plan for d in c) == sorted(devices)
    assert plan_cohorts(spec, devices, "other")[0] != plan[0]


@pytest.mark.parametrize(
    ("cohorts", "total", "sizes"),
    [
        ({"canary": "1%", "batches": [10, 50, 100]}, 10, [1, 0, 4, 5]),  # 1% of 10 rounds to 1
        ({"canary": "1%", "batches": [10, 50, 100]}, 1000, [10, 90, 400, 500]),
        ({"canary": {"count": 5}}, 3, [3, 0]),
        ({"canary": "1%"}, 0, [0, 0]),
        ({"batches": [33.3, 66.7, 100]}, 3, [1, 2, 0]),
        ({"batches": [33.3, 66.7, 100]}, 1000, [333, 334, 333]),
        ({"canary": "50%", "batches": [25, 100]}, 7, [4, 0, 3]),
    ],
)
def test_cohort_sizes_round_up(cohorts: dict[str, Any], total: int, sizes: list[int]) -> None:
    assert cohort_sizes(make_spec(cohorts=cohorts), total) == sizes


def test_select_targets_uses_the_policy_and_the_rollout_selector() -> None:
    policy = Policy.model_validate(
        {
            "schema": "edgefleet.policy/1",
            "name": "base",
            "selector": {"labels": {"fleet": "x"}},
            "model_set": {"name": "ocr", "version": "1"},
        }
    )
    views = [
        DeviceView("a", {"fleet": "x", "site": "lab"}),
        DeviceView("b", {"fleet": "x", "site": "shop"}),
        DeviceView("c", {"fleet": "y", "site": "lab"}),
    ]
    assert select_targets(make_spec(), policy, views) == ["a", "b"]
    narrowed = make_spec(selector={"labels": {"site": "lab"}})
    assert select_targets(narrowed, policy, views) == ["a"]
    with pytest.raises(RolloutError, match="not other"):
        select_targets(make_spec(), policy.model_copy(update={"name": "other"}), views)


def test_an_unbound_spec_is_refused() -> None:
    spec = RolloutSpec.model_validate({"name": "r", "policy": "base", "target": "2"})
    with pytest.raises(RolloutError, match="bind it"):
        new_rollout(spec, ["a"], 0.0)


# --- the happy path ----------------------------------------------------------------------------


def test_canary_and_three_batches_to_100_percent() -> None:
    spec = make_spec(cohorts={"canary": {"count": 1}, "batches": [25, 50, 100], "bake_s": 300})
    fleet = Fleet.of(40)
    state = new_rollout(spec, fleet.ids, 0.0)
    assert state.phase == "pending"
    state, results = run_until(spec, state, fleet, 0.0, 10_000.0)

    assert state.phase == "succeeded"
    assert [c.status for c in state.cohorts] == ["passed"] * 4
    assert [len(c.devices) for c in state.cohorts] == [1, 9, 10, 20]
    # Each cohort started only after the previous one's success gate plus its bake.
    for before, after in zip(state.cohorts, state.cohorts[1:], strict=False):
        assert before.gate_passed_at is not None and after.started_at is not None
        assert after.started_at >= before.gate_passed_at + 300
    # Every device was pinned once, then promoted and unpinned at the end.
    pinned = [d for r in results for d in pins(r)]
    assert sorted(pinned) == fleet.ids
    last = results[-1]
    assert isinstance(last.actions[0], Promote)
    assert last.actions[0] == Promote("base", TARGET, BASE, "ocr-2")
    assert sorted(unpins(last)) == fleet.ids
    assert fleet.policy_ref == TARGET
    assert all(d.applied == TARGET for d in fleet.devices.values())
    assert expected_pins(spec, state) == {}
    assert state.promoted
    assert counts_of(state) == {"healthy": 40}
    assert [t.to_phase for t in state.transitions] == ["running", "succeeded"]
    assert kinds(results).count("cohort.started") == 4
    assert kinds(results)[-1] == "rollout.succeeded"
    assert last.wake_at is None
    assert claimed_devices(state) == frozenset()


def test_bake_time_is_respected() -> None:
    spec = make_spec(cohorts={"canary": {"count": 1, "bake_s": 600}, "batches": [100]})
    fleet = Fleet.of(5)
    state = new_rollout(spec, fleet.ids, 0.0)
    first = tick(spec, state, fleet, 0.0)
    assert pins(first) == list(first.state.cohorts[0].devices)
    passed = tick(spec, first.state, fleet, 10.0)
    canary = passed.state.cohorts[0]
    assert canary.status == "baking"
    assert canary.bake_until == 610.0
    assert passed.wake_at == 610.0
    early = tick(spec, passed.state, fleet, 609.9)
    assert early.actions == ()
    assert early.state.cohorts[1].status == "pending"
    on_time = tick(spec, early.state, fleet, 610.0)
    assert sorted(pins(on_time)) == sorted(on_time.state.cohorts[1].devices)
    assert len(pins(on_time)) == 4


def test_empty_cohort_is_skipped_without_bake() -> None:
    # 1% of 10 devices is 1 canary; batch 1 (10%) is then already covered: empty.
    spec = make_spec(cohorts={"canary": "1%", "batches": [10, 50, 100], "bake_s": 60})
    fleet = Fleet.of(10)
    state, results = run_until(spec, new_rollout(spec, fleet.ids, 0.0), fleet, 0.0, 5000.0)
    assert state.phase == "succeeded"
    assert [c.status for c in state.cohorts] == ["passed", "skipped", "passed", "passed"]
    assert "cohort.skipped" in kinds(results)
    assert state.cohorts[2].started_at == state.cohorts[0].finished_at


def test_a_rollout_without_devices_fails_at_once() -> None:
    spec = make_spec()
    result = step(spec, new_rollout(spec, [], 0.0), Observations({}), 5.0)
    assert result.state.phase == "failed"
    assert result.state.reason == "no device matches the rollout's policy and selector"
    assert result.actions == ()
    assert [e.kind for e in result.events] == ["rollout.failed"]


def test_terminal_rollouts_do_not_move() -> None:
    spec = make_spec()
    failed = step(spec, new_rollout(spec, [], 0.0), Observations({}), 5.0).state
    again = step(spec, failed, Observations({}), 50.0)
    assert again.state == failed
    assert again.actions == ()
    assert again.events == ()


# --- success threshold, error threshold, max failures inside a rollout ------------------------


def test_success_threshold_lets_the_cohort_bake_with_devices_still_working() -> None:
    spec = make_spec(gates={"success_threshold": 80}, cohorts={"batches": [100]})
    fleet = Fleet.of(10, {0: "silent", 1: "silent"})
    state = tick(spec, new_rollout(spec, fleet.ids, 0.0), fleet, 0.0).state
    result = tick(spec, state, fleet, 30.0)
    assert result.state.cohorts[0].gates["success"].status == "passed"
    assert result.state.cohorts[0].gates["success"].value == 80.0
    # The silent devices keep the rollout from finishing until they time out.
    assert result.state.phase == "running"
    assert result.state.cohort == 1
    assert counts_of(result.state) == {"healthy": 8, "switched": 2}


def test_one_failed_device_fails_a_100_percent_canary_and_rolls_it_back() -> None:
    spec = make_spec(cohorts={"canary": {"count": 2}, "batches": [100]})
    fleet = Fleet.of(10)
    state = new_rollout(spec, fleet.ids, 0.0)
    fleet.devices[state.cohorts[0].devices[1]].behaviour = "fail"
    state, results = run_until(spec, state, fleet, 0.0, 1000.0)
    assert state.phase == "failed"
    assert state.reason.startswith("canary: success gate failed")
    assert state.cohorts[0].status == "failed"
    failed = state.devices[state.cohorts[0].devices[1]]
    assert failed.status == "failed"
    assert "smoke_test_failed" in failed.reason
    assert sorted(unpins(results[-1])) == sorted(state.cohorts[0].devices)
    assert all(d.issued == BASE for d in fleet.devices.values())
    assert "device.failed" in kinds(results)
    assert state.cohorts[1].status == "pending"


def test_on_failure_hold_keeps_the_pins_until_abort() -> None:
    spec = make_spec(cohorts={"canary": {"count": 2}, "batches": [100]}, on_failure="hold")
    fleet = Fleet.of(6)
    state = new_rollout(spec, fleet.ids, 0.0)
    canary = state.cohorts[0].devices
    fleet.devices[canary[0]].behaviour = "fail"
    state, results = run_until(spec, state, fleet, 0.0, 1000.0)
    assert state.phase == "failed"
    assert unpins(results[-1]) == []
    assert set(expected_pins(spec, state)) == set(canary)
    assert claimed_devices(state) == frozenset(canary)
    with pytest.raises(InvalidTransition):
        resume(spec, state, 2000.0, "try again")
    aborted = abort(spec, state, 2000.0, "operator gave up")
    assert sorted(unpins(aborted)) == sorted(canary)
    assert aborted.state.phase == "aborted"


def test_error_threshold_waits_for_min_finished() -> None:
    spec = make_spec(
        cohorts={"batches": [100]},
        gates={"success_threshold": 50, "error_threshold": 10, "min_finished": 5},
    )
    fleet = Fleet.of(10, {0: "fail", 1: "fail", **{i: "silent" for i in range(2, 10)}})
    state = tick(spec, new_rollout(spec, fleet.ids, 0.0), fleet, 0.0).state
    state = tick(spec, state, fleet, 30.0).state
    gate = state.gates["error_threshold"]
    assert gate.status == "pending"
    assert gate.value == 100.0  # 2 of 2 finished failed, but 2 < min_finished
    assert state.phase == "running"
    for i in (2, 3, 4):  # three more devices finish: 5 finished, 2 failed = 40% > 10%
        dev = fleet.devices[f"d{i:03d}"]
        dev.behaviour = "good"
        dev.applied, dev.applied_generation = dev.issued, dev.issued_generation
        dev.phase = "committed"
    result = tick(spec, state, fleet, 60.0)
    assert result.state.phase == "failed"
    assert result.state.gates["error_threshold"].status == "failed"
    assert "2/5 finished failed" in result.state.reason
    assert len(unpins(result)) == 10


def test_max_failures_is_absolute_across_cohorts() -> None:
    spec = make_spec(
        cohorts={"canary": {"count": 2}, "batches": [50, 100]},
        gates={"success_threshold": 50, "max_failures": 1},
    )
    fleet = Fleet.of(10)
    state = new_rollout(spec, fleet.ids, 0.0)
    fleet.devices[state.cohorts[0].devices[0]].behaviour = "fail"
    fleet.devices[state.cohorts[1].devices[0]].behaviour = "fail"
    state, _ = run_until(spec, state, fleet, 0.0, 1000.0)
    assert state.phase == "failed"
    assert state.cohorts[0].status == "passed"  # 1 failure tolerated, 1/2 healthy >= 50%
    assert state.cohorts[1].status == "failed"
    assert state.reason == "gate max_failures failed: 2 failed (> 1 tolerated)"
    failures = [r for r in state.history if r.result.name == "max_failures"]
    assert [r.result.status for r in failures] == ["passed", "failed"]


# --- timeouts ----------------------------------------------------------------------------------


def test_device_timeout() -> None:
    spec = make_spec(
        cohorts={"batches": [100]}, device_timeout_s=300, gates={"success_threshold": 50}
    )
    fleet = Fleet.of(4, {0: "silent"})
    state = tick(spec, new_rollout(spec, fleet.ids, 0.0), fleet, 0.0).state
    before = tick(spec, state, fleet, 299.0)
    assert before.state.devices["d000"].status == "switched"
    assert before.wake_at == 300.0
    at = tick(spec, before.state, fleet, 300.0)
    assert at.state.devices["d000"].status == "timed_out"
    assert at.state.devices["d000"].finished_at == 300.0
    assert [e.kind for e in at.events][:1] == ["device.timed_out"]
    assert at.state.phase == "succeeded"
    assert counts_of(at.state) == {"healthy": 3, "timed_out": 1}


def test_timed_out_devices_count_as_failed() -> None:
    spec = make_spec(cohorts={"batches": [100]}, device_timeout_s=300)
    fleet = Fleet.of(3, {2: "silent"})
    state, _ = run_until(spec, new_rollout(spec, fleet.ids, 0.0), fleet, 0.0, 1000.0, every=100.0)
    assert state.phase == "failed"
    assert state.transitions[-1].at == 300.0
    assert "1 failed" in state.reason


def test_cohort_timeout() -> None:
    spec = make_spec(cohorts={"batches": [100]}, cohort_timeout_s=600, device_timeout_s=3600)
    fleet = Fleet.of(3, {0: "silent"})
    state = tick(spec, new_rollout(spec, fleet.ids, 100.0), fleet, 100.0).state
    assert state.cohorts[0].deadline_at == 700.0
    state = tick(spec, state, fleet, 699.0).state
    assert state.phase == "running"
    result = tick(spec, state, fleet, 700.0)
    assert result.state.phase == "failed"
    assert "cohort timeout" in result.state.reason
    assert result.state.cohorts[0].status == "failed"


# --- offline devices ---------------------------------------------------------------------------


def test_all_devices_offline_become_unreachable_and_the_cohort_does_not_stall() -> None:
    spec = make_spec(cohorts={"canary": {"count": 1}, "batches": [100]}, offline={"grace_s": 120})
    fleet = Fleet.of(6)
    state = new_rollout(spec, fleet.ids, 0.0)
    for device_id in state.cohorts[1].devices:
        fleet.devices[device_id].online = False
    state, results = run_until(spec, state, fleet, 0.0, 2000.0, every=10.0)
    assert state.phase == "succeeded"
    batch = state.cohorts[1]
    assert batch.status == "passed"
    assert batch.gates["success"].reason == "no reachable device (5 unreachable, left out)"
    assert all(state.devices[d].status == "unreachable" for d in batch.devices)
    assert batch.finished_at == batch.started_at + 120  # type: ignore[operator]
    assert kinds(results).count("device.unreachable") == 5
    assert [d for r in results for d in pins(r)] == list(state.cohorts[0].devices)


def test_an_unreachable_canary_fails_the_rollout() -> None:
    spec = make_spec(cohorts={"canary": {"count": 2}, "batches": [100]}, offline={"grace_s": 120})
    fleet = Fleet.of(4, online=False)
    state = tick(spec, new_rollout(spec, fleet.ids, 0.0), fleet, 0.0).state
    state = tick(spec, state, fleet, 119.0).state
    assert state.phase == "running"
    result = tick(spec, state, fleet, 120.0)
    assert result.state.phase == "failed"
    assert "no reachable device" in result.state.reason
    assert result.actions == ()


def test_a_rollout_where_no_device_got_the_target_fails() -> None:
    spec = make_spec(cohorts={"batches": [100]}, offline={"grace_s": 60})
    fleet = Fleet.of(3, online=False)
    state, _ = run_until(spec, new_rollout(spec, fleet.ids, 0.0), fleet, 0.0, 500.0)
    assert state.phase == "failed"
    assert state.reason.startswith("no device reached the target")


def test_unreachable_can_fail_the_gate() -> None:
    spec = make_spec(cohorts={"batches": [100]}, offline={"grace_s": 60, "unreachable_fails": True})
    fleet = Fleet.of(4)
    fleet.devices["d001"].online = False
    state, _ = run_until(spec, new_rollout(spec, fleet.ids, 0.0), fleet, 0.0, 500.0)
    assert state.phase == "failed"
    assert state.transitions[-1].at == 60.0
    assert "3/4 healthy" in state.reason


def test_offline_grace_counts_from_last_seen_and_returning_devices_are_switched() -> None:
    spec = make_spec(cohorts={"batches": [100]}, offline={"grace_s": 100})
    fleet = Fleet.of(2)
    fleet.devices["d001"].online = False
    fleet.devices["d001"].last_seen = 50.0
    state = tick(spec, new_rollout(spec, fleet.ids, 0.0), fleet, 0.0).state
    assert state.devices["d001"].status == "waiting"
    assert tick(spec, state, fleet, 149.0).state.devices["d001"].status == "waiting"
    result = tick(spec, state, fleet, 150.0)
    assert result.state.devices["d001"].status == "unreachable"
    # The cohort passed without it; the rollout finishes with it unreachable ...
    assert result.state.phase == "succeeded"
    # ... but while a cohort still runs, a device that comes back is switched.
    spec2 = make_spec(cohorts={"batches": [100]}, offline={"grace_s": 100}, device_timeout_s=10_000)
    fleet2 = Fleet.of(3, {2: "silent"})
    fleet2.devices["d001"].online = False
    state2 = tick(spec2, new_rollout(spec2, fleet2.ids, 0.0), fleet2, 0.0).state
    state2 = tick(spec2, state2, fleet2, 100.0).state
    assert state2.devices["d001"].status == "unreachable"
    fleet2.devices["d001"].online = True
    back = tick(spec2, state2, fleet2, 130.0)
    assert pins(back) == ["d001"]
    assert "device.reachable" in [e.kind for e in back.events]


def test_an_unobserved_device_counts_as_offline() -> None:
    spec = make_spec(cohorts={"batches": [100]}, offline={"grace_s": 60})
    state = new_rollout(spec, ["a", "b"], 0.0)
    ok = DeviceObservation(online=True, applied=BASE, issued=BASE, issued_generation=1)
    result = step(spec, state, Observations({"a": ok}), 0.0)
    assert pins(result) == ["a"]
    later = step(spec, result.state, Observations({"a": ok}), 60.0)
    assert later.state.devices["b"].status == "unreachable"


# --- maintenance windows and idleness -----------------------------------------------------------


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_closed_window_holds_pins_and_open_window_switches() -> None:
    spec = make_spec(cohorts={"batches": [100]}, windows=[{"cron": "* 2-3 * * *"}])
    fleet = Fleet.of(3)
    night = utc("2024-06-01T01:00")
    held = tick(spec, new_rollout(spec, fleet.ids, night), fleet, night)
    assert pins(held) == []
    assert held.state.held == "maintenance window closed"
    assert "switching.held" in [e.kind for e in held.events]
    assert held.wake_at == utc("2024-06-01T02:00")
    still = tick(spec, held.state, fleet, utc("2024-06-01T01:59:59"))
    assert pins(still) == []
    assert still.events == ()
    opened = tick(spec, still.state, fleet, utc("2024-06-01T02:00"))
    assert sorted(pins(opened)) == fleet.ids
    assert opened.state.held is None
    assert "switching.resumed" in [e.kind for e in opened.events]


def test_abort_does_not_wait_for_a_window() -> None:
    spec = make_spec(cohorts={"batches": [100]}, windows=[{"cron": "* 2 * * *"}])
    fleet = Fleet.of(2)
    state = tick(spec, new_rollout(spec, fleet.ids, 0.0), fleet, utc("2024-06-01T02:30")).state
    result = abort(spec, state, utc("2024-06-01T12:00"), "stop")
    assert sorted(unpins(result)) == fleet.ids


def test_only_when_idle() -> None:
    spec = make_spec(cohorts={"batches": [100]}, only_when_idle=True, idle_max_rps=0.5)
    fleet = Fleet.of(4)
    fleet.devices["d000"].request_rate = 0.0
    fleet.devices["d001"].request_rate = 0.5
    fleet.devices["d002"].request_rate = 12.0
    fleet.devices["d003"].request_rate = None  # unknown is not idle
    first = tick(spec, new_rollout(spec, fleet.ids, 0.0), fleet, 0.0)
    assert pins(first) == [d for d in first.state.cohorts[0].devices if d in ("d000", "d001")]
    fleet.devices["d002"].request_rate = 0.0
    second = tick(spec, first.state, fleet, 30.0)
    assert pins(second) == ["d002"]
    assert second.state.devices["d003"].status == "waiting"


# --- health analysis ---------------------------------------------------------------------------


def health_spec(**overrides: Any) -> RolloutSpec:
    data: dict[str, Any] = {
        "cohorts": {"canary": {"count": 2, "bake_s": 120}, "batches": [100]},
        "health": {"window_s": 300, "interval_s": 60, "min_requests": 100, "max_missing_data": 1},
    }
    data.update(overrides)
    return make_spec(**data)


def test_health_window_is_asked_for_only_when_an_evaluation_is_due() -> None:
    spec = health_spec()
    fleet = Fleet.of(10)
    state = new_rollout(spec, fleet.ids, 0.0)
    assert health_window(spec, state, 0.0) is None
    state = tick(spec, state, fleet, 0.0).state
    state = tick(spec, state, fleet, 400.0).state  # canary healthy: baking from 400
    assert state.cohorts[0].status == "baking"
    assert health_window(spec, state, 459.0) is None
    assert health_window(spec, state, 460.0) == Window(400.0, 460.0)
    assert health_window(spec, state, 800.0) == Window(500.0, 800.0)
    # A step without figures does not evaluate (and does not count as missing data).
    skipped = step(spec, state, fleet.observe(None), 460.0)
    assert skipped.state.cohorts[0].health is not None
    assert skipped.state.cohorts[0].health.evaluations == 0


def test_health_gate_passes_and_the_rollout_goes_on() -> None:
    spec = health_spec()
    fleet = Fleet.of(10)
    state, results = run_until(spec, new_rollout(spec, fleet.ids, 0.0), fleet, 0.0, 2000.0)
    assert state.phase == "succeeded"
    canary = state.cohorts[0]
    assert canary.gates["health"].status == "passed"
    assert canary.gates["health"].value == pytest.approx(1.0)
    assert canary.health is not None and canary.health.passed >= 1
    assert "health.passed" in kinds(results)


def test_health_gate_fails_a_canary_three_times_slower() -> None:
    spec = health_spec()
    fleet = Fleet.of(10)
    state = new_rollout(spec, fleet.ids, 0.0)
    for device_id in state.cohorts[0].devices:
        fleet.devices[device_id].behaviour = "slow"
    state, results = run_until(spec, state, fleet, 0.0, 2000.0)
    assert state.phase == "failed"
    assert "health analysis failed" in state.reason
    assert "3.00x" in state.reason
    assert state.cohorts[0].gates["health"].value == pytest.approx(3.0)
    assert sorted(unpins(results[-1])) == sorted(state.cohorts[0].devices)
    assert state.cohorts[1].status == "pending"


def test_health_gate_tolerates_failures_up_to_max_failed() -> None:
    spec = health_spec(
        health={"window_s": 300, "interval_s": 60, "min_requests": 100, "max_failed": 1}
    )
    fleet = Fleet.of(10)
    state = new_rollout(spec, fleet.ids, 0.0)
    canary = state.cohorts[0].devices
    for device_id in canary:
        fleet.devices[device_id].behaviour = "slow"
    state = tick(spec, state, fleet, 0.0).state
    state = tick(spec, state, fleet, 30.0).state
    state = tick(spec, state, fleet, 90.0).state  # first evaluation fails: tolerated
    assert state.phase == "running"
    assert state.cohorts[0].health is not None and state.cohorts[0].health.failed == 1
    for device_id in canary:
        fleet.devices[device_id].behaviour = "good"
    state = tick(spec, state, fleet, 150.0).state  # passes; bake ends at 150
    assert state.cohorts[0].status == "passed"


def test_missing_health_data_counts_toward_max_missing_data_then_fails() -> None:
    spec = health_spec()
    fleet = Fleet.of(10)
    state = tick(spec, new_rollout(spec, fleet.ids, 0.0), fleet, 0.0).state
    state = tick(spec, state, fleet, 30.0).state
    first = tick(spec, state, fleet, 90.0, data=False)
    track = first.state.cohorts[0].health
    assert track is not None and track.consecutive_missing == 1
    assert first.state.phase == "running"
    assert first.state.cohorts[0].gates["health"].status == "pending"
    # The bake is over at 150, but without one passing evaluation the canary waits.
    second = tick(spec, first.state, fleet, 150.0, data=False)
    assert second.state.phase == "failed"
    assert "no data for 2 consecutive evaluations" in second.state.reason


def test_health_data_resets_the_missing_count() -> None:
    spec = health_spec()
    fleet = Fleet.of(10)
    state = tick(spec, new_rollout(spec, fleet.ids, 0.0), fleet, 0.0).state
    state = tick(spec, state, fleet, 30.0).state
    state = tick(spec, state, fleet, 90.0, data=False).state
    state = tick(spec, state, fleet, 150.0).state
    assert state.cohorts[0].status == "passed"
    health = [r.result.status for r in state.history if r.result.name == "health"]
    assert health == ["pending", "passed"]


# --- pause, resume, abort, rollback -------------------------------------------------------------


def test_pause_holds_everything_and_resume_shifts_the_bake() -> None:
    spec = make_spec(cohorts={"canary": {"count": 1, "bake_s": 600}, "batches": [100]})
    fleet = Fleet.of(5)
    state = tick(spec, new_rollout(spec, fleet.ids, 0.0), fleet, 0.0).state
    state = tick(spec, state, fleet, 30.0).state
    assert state.cohorts[0].bake_until == 630.0
    paused = pause(spec, state, 100.0, "operator: lunch")
    assert paused.state.phase == "paused"
    assert [e.kind for e in paused.events] == ["rollout.paused"]
    assert paused.events[0].reason == "operator: lunch"
    during = tick(spec, paused.state, fleet, 700.0)
    assert during.actions == ()
    assert during.state.cohorts[1].status == "pending"
    with pytest.raises(InvalidTransition, match="is paused: cannot pause"):
        pause(spec, during.state, 800.0, "again")
    resumed = resume(spec, during.state, 1000.0, "back")
    assert resumed.state.phase == "running"
    assert resumed.state.cohorts[0].bake_until == 1530.0
    assert tick(spec, resumed.state, fleet, 1529.0).actions == ()
    assert len(pins(tick(spec, resumed.state, fleet, 1530.0))) == 4
    assert [t.to_phase for t in resumed.state.transitions] == ["running", "paused", "running"]


def test_paused_rollouts_follow_devices_but_decide_nothing() -> None:
    spec = make_spec(cohorts={"batches": [100]}, device_timeout_s=100)
    fleet = Fleet.of(2, {0: "silent"})
    state = tick(spec, new_rollout(spec, fleet.ids, 0.0), fleet, 0.0).state
    state = pause(spec, state, 10.0, "look").state
    result = tick(spec, state, fleet, 100.0)
    assert result.state.devices["d000"].status == "timed_out"
    assert result.state.devices["d001"].status == "healthy"
    assert result.state.phase == "paused"  # the failed success gate decides after resume
    assert result.state.cohorts[0].gates["success"].status == "pending"
    resumed = resume(spec, result.state, 200.0, "go").state
    assert tick(spec, resumed, fleet, 200.0).state.phase == "failed"


def test_pause_before_start() -> None:
    spec = make_spec()
    fleet = Fleet.of(2)
    state = pause(spec, new_rollout(spec, fleet.ids, 0.0), 1.0, "not yet").state
    assert tick(spec, state, fleet, 2.0).actions == ()
    state = resume(spec, state, 3.0, "go").state
    assert state.phase == "pending"
    assert len(pins(tick(spec, state, fleet, 4.0))) == 2


def test_abort_unpins_every_touched_device() -> None:
    spec = make_spec(cohorts={"canary": {"count": 2}, "batches": [50, 100]}, device_timeout_s=9999)
    fleet = Fleet.of(10, {9: "silent"})
    state, _ = run_until(spec, new_rollout(spec, fleet.ids, 0.0), fleet, 0.0, 60.0)
    touched = [d for d, a in state.devices.items() if a.pinned]
    assert len(touched) == 5
    result = abort(spec, state, 100.0, "operator: wrong version")
    assert result.state.phase == "aborted"
    assert sorted(unpins(result)) == sorted(touched)
    assert unpins(result) == [d for d in device_ids(state) if d in touched]  # plan order
    assert result.state.reason == "operator: wrong version"
    assert [e.kind for e in result.events] == ["rollout.aborted"]
    fleet.execute(result.actions)
    fleet.settle(100.0)
    assert all(d.issued == BASE for d in fleet.devices.values())
    after = step(spec, result.state, fleet.observe(), 200.0)
    assert after.actions == ()
    assert after.events == ()
    assert claimed_devices(result.state) == frozenset()
    with pytest.raises(InvalidTransition):
        abort(spec, result.state, 300.0, "again")
    with pytest.raises(InvalidTransition):
        rollback(spec, result.state, 300.0, "again")


def test_rollback_after_success_undoes_the_promotion() -> None:
    spec = make_spec(cohorts={"batches": [100]})
    fleet = Fleet.of(3)
    state, _ = run_until(spec, new_rollout(spec, fleet.ids, 0.0), fleet, 0.0, 500.0)
    assert state.phase == "succeeded" and fleet.policy_ref == TARGET
    result = rollback(spec, state, 600.0, "regression found in the field")
    assert result.actions == (Promote("base", BASE, TARGET, "ocr-2"),)
    assert result.state.phase == "rolled_back"
    fleet.execute(result.actions)
    assert fleet.policy_ref == BASE
    with pytest.raises(InvalidTransition):
        rollback(spec, result.state, 700.0, "twice")


def test_rollback_of_a_narrowed_rollout_unpins() -> None:
    spec = make_spec(cohorts={"batches": [100]}, selector={"labels": {"site": "lab"}})
    fleet = Fleet.of(3)
    state, results = run_until(spec, new_rollout(spec, fleet.ids, 0.0), fleet, 0.0, 500.0)
    assert state.phase == "succeeded"
    assert not any(isinstance(a, Promote) for r in results for a in r.actions)
    assert set(expected_pins(spec, state)) == set(fleet.ids)
    result = rollback(spec, state, 600.0, "undo")
    assert sorted(unpins(result)) == fleet.ids
    assert not any(isinstance(a, Promote) for a in result.actions)


def test_rollback_while_running() -> None:
    spec = make_spec(cohorts={"canary": {"count": 1}, "batches": [100]})
    fleet = Fleet.of(3)
    state = tick(spec, new_rollout(spec, fleet.ids, 0.0), fleet, 0.0).state
    result = rollback(spec, state, 10.0, "undo")
    assert result.state.phase == "rolled_back"
    assert unpins(result) == list(state.cohorts[0].devices)
    with pytest.raises(InvalidTransition, match="cannot roll back"):
        rollback(spec, new_rollout(spec, fleet.ids, 0.0), 0.0, "nothing moved")


def test_every_transition_is_an_event_with_its_reason() -> None:
    spec = make_spec(cohorts={"batches": [100]})
    fleet = Fleet.of(2)
    state = tick(spec, new_rollout(spec, fleet.ids, 0.0), fleet, 0.0).state
    events: list[RolloutEvent] = []
    for operation, reason in ((pause, "p"), (resume, "r"), (abort, "a")):
        result = operation(spec, state, 10.0, reason)
        state = result.state
        events.extend(result.events)
    assert [(e.kind, e.reason) for e in events] == [
        ("rollout.paused", "p"),
        ("rollout.running", "r"),
        ("rollout.aborted", "a"),
    ]
    assert [(t.from_phase, t.to_phase, t.reason) for t in state.transitions] == [
        ("pending", "running", "started"),
        ("running", "paused", "p"),
        ("paused", "running", "r"),
        ("running", "aborted", "a"),
    ]


# --- conflicts, reconciliation, progress ---------------------------------------------------------


def test_two_rollouts_may_not_hold_the_same_device() -> None:
    first_spec = make_spec(name="first")
    first = new_rollout(first_spec, ["a", "b", "c"], 0.0)
    check_conflicts(["d", "e"], {"first": first})
    with pytest.raises(RolloutConflict) as caught:
        check_conflicts(["c", "d", "b"], {"first": first})
    assert caught.value.devices == {"b": "first", "c": "first"}
    done = abort(first_spec, first, 1.0, "x").state
    check_conflicts(["a", "b", "c"], {"first": done})


def test_state_and_spec_must_belong_together() -> None:
    state = new_rollout(make_spec(name="one"), ["a"], 0.0)
    with pytest.raises(RolloutError, match="state of rollout one"):
        step(make_spec(name="two"), state, Observations({}), 0.0)


def test_progress_counts_devices_per_cohort() -> None:
    spec = make_spec(cohorts={"canary": {"count": 1}, "batches": [100]})
    fleet = Fleet.of(4)
    state = tick(spec, new_rollout(spec, fleet.ids, 0.0), fleet, 0.0).state
    rows = progress(state)
    assert [(r.name, r.status, r.total, dict(r.by_status)) for r in rows] == [
        ("canary", "active", 1, {"switched": 1}),
        ("batch 1", "pending", 3, {"waiting": 3}),
    ]
    assert rows[0].gates["success"].status == "pending"


def test_the_spec_round_trips_as_the_rollout_document() -> None:
    spec = make_spec(
        cohorts={"canary": "2%", "batches": "25,50,100", "bake_s": "10m"},
        health={"window_s": "5m"},
        windows=[{"cron": "* 1-4 * * *", "timezone": "Europe/Berlin", "duration_s": 60}],
        selector={"labels": {"site": "lab"}},
    )
    document = json.loads(json.dumps(spec.model_dump(mode="json", by_alias=True)))
    assert document["schema"] == "edgefleet.rollout/1"
    assert RolloutSpec.model_validate(document) == spec


def test_load_state_refuses_a_newer_format() -> None:
    state = new_rollout(make_spec(), ["a"], 0.0)
    data = state.model_dump(mode="json")
    assert load_state(data) == state
    with pytest.raises(RolloutError, match="format 2"):
        load_state({**data, "format": 2})


# --- restart: the persisted JSON gives identical next steps ---------------------------------------

BEHAVIOURS = st.sampled_from(["good"] * 8 + ["fail", "silent", "slow"])
OPERATIONS = st.sampled_from([None] * 24 + ["pause", "resume", "abort", "rollback"])


def reload(state: RolloutState) -> RolloutState:
    text = json.dumps(state.model_dump(mode="json"), sort_keys=True)
    return load_state(json.loads(text))


def apply(
    spec: RolloutSpec, state: RolloutState, fleet: Fleet, now: float, operation: str | None
) -> StepResult | str:
    if operation is None:
        return tick(spec, state, fleet, now)
    try:
        result = {"pause": pause, "resume": resume, "abort": abort, "rollback": rollback}[
            operation
        ](spec, state, now, f"operator: {operation}")
    except InvalidTransition as exc:
        return str(exc)
    fleet.execute(result.actions)
    return result


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_reloaded_state_gives_identical_next_steps(data: st.DataObject) -> None:
    spec = make_spec(
        cohorts={"canary": {"count": 1, "bake_s": 60}, "batches": [50, 100], "bake_s": 30},
        gates={
            "success_threshold": data.draw(st.sampled_from([50, 100])),
            "error_threshold": 50,
            "min_finished": 2,
            "max_failures": data.draw(st.sampled_from([None, 2])),
        },
        health=data.draw(
            st.sampled_from([None, {"window_s": 120, "interval_s": 30, "min_requests": 100}])
        ),
        device_timeout_s=200,
        cohort_timeout_s=data.draw(st.sampled_from([None, 300])),
        offline={"grace_s": 90, "unreachable_fails": data.draw(st.booleans())},
        on_failure=data.draw(st.sampled_from(["rollback", "hold"])),
        only_when_idle=data.draw(st.booleans()),
    )
    n = data.draw(st.integers(1, 8))
    operations = data.draw(st.booleans())
    flaky = data.draw(st.booleans())
    behaviours = data.draw(st.lists(BEHAVIOURS, min_size=n, max_size=n))
    live = Fleet.of(n, dict(enumerate(behaviours)))
    restarted = copy.deepcopy(live)
    state = new_rollout(spec, live.ids, 0.0)
    saved = reload(state)
    now = 0.0
    for _ in range(data.draw(st.integers(1, 40))):
        now += data.draw(st.sampled_from([30.0, 61.0, 0.0, 1.0, 95.0, 250.0]))
        toggled = data.draw(st.sets(st.sampled_from(live.ids), max_size=1)) if flaky else set()
        for device_id in toggled:
            for fleet in (live, restarted):
                fleet.devices[device_id].online = not fleet.devices[device_id].online
        for device_id in data.draw(st.sets(st.sampled_from(live.ids), max_size=2)):
            for fleet in (live, restarted):
                dev = fleet.devices[device_id]
                dev.request_rate = 0.0 if dev.request_rate else 3.0
        operation = data.draw(OPERATIONS) if operations else None
        pinned_before = set(expected_pins(spec, state))
        a = apply(spec, state, live, now, operation)
        b = apply(spec, saved, restarted, now, operation)
        if isinstance(a, str) or isinstance(b, str):
            assert a == b
            continue
        assert a.actions == b.actions
        assert a.events == b.events
        assert a.wake_at == b.wake_at
        assert a.state.model_dump(mode="json") == b.state.model_dump(mode="json")
        # Pins and unpins are consistent with what the rollout held.
        for action in a.actions:
            if isinstance(action, Pin):
                assert action.device_id not in pinned_before
                pinned_before.add(action.device_id)
            elif isinstance(action, Unpin):
                assert action.device_id in pinned_before
                pinned_before.discard(action.device_id)
        assert pinned_before == set(expected_pins(spec, a.state))
        if a.state.phase in ("aborted", "rolled_back") or (
            a.state.phase == "failed" and spec.on_failure == "rollback"
        ):
            assert expected_pins(spec, a.state) == {}
        state, saved = a.state, reload(b.state)


# --- purity -----------------------------------------------------------------------------------

IMPURE = {
    "asyncio", "http", "io", "logging", "multiprocessing", "os", "paho", "pathlib", "random",
    "requests", "secrets", "shutil", "socket", "sqlite3", "sqlite_utils", "subprocess", "sys",
    "tempfile", "threading", "time", "urllib", "apscheduler", "hub.store", "hub.controller",
    "hub.service", "hub.ingest",
}  # fmt: skip
CLOCK_CALLS = {"now", "utcnow", "today", "time", "monotonic", "perf_counter"}


def test_the_rollout_package_is_pure() -> None:
    offenders = []
    for path in sorted((ROOT / "hub" / "rollout").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in CLOCK_CALLS
            ):
                offenders.append(f"{path.name}:{node.lineno} calls .{node.func.attr}()")
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in {"open", "print", "input"}
            ):
                offenders.append(f"{path.name}:{node.lineno} calls {node.func.id}()")
            for name in names:
                if any(name == m or name.startswith(m + ".") for m in IMPURE):
                    offenders.append(f"{path.name}:{getattr(node, 'lineno', 0)} imports {name}")
    assert not offenders, "\n".join(offenders)
