"""The rollout driver (``hub.rollouts``) on a real store file, the real ``HubService`` (registry,
controller, signed documents), a recording publisher and an injected clock. Devices are
simulated by writing what an agent would report straight into the store
(``record_state``, ``record_telemetry``): the smallest fake that answers a desired document;
tests/test_rollout_e2e.py runs the same with real agents."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from contract.errors import ManifestError
from contract.manifests import ModelSetRef
from contract.messages import (
    Desired,
    LastError,
    Latency,
    ModelReport,
    ModelStats,
    Telemetry,
    decode,
)
from hub.api import create_app
from hub.artifacts import ArtifactStore
from hub.controller import PINS_PREFIX
from hub.enroll import REVOKED_META_PREFIX
from hub.errors import Conflict, InvalidTransition, NotFound, RolloutConflict, RolloutError
from hub.init import init_hub
from hub.keys import Keyring
from hub.rollout import RolloutState, load_state
from hub.rollouts import RolloutDriver, RolloutView
from hub.service import HubService
from hub.store import ROLLOUT_EVENT_DEVICE, Store, TelemetryIn
from support import hub_samples
from support.hub_api import TOKEN, ApiServer, StoreService, seed_devices
from support.hub_fleet import RecordingPublisher
from support.inference import save_add_model

START = 1_750_000_000.0
DEVICES = [f"dev-{n}" for n in range(6)]
BASE = ModelSetRef(name="app", version="1.0")
NEW = ModelSetRef(name="app", version="2.0")


class Clock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def modelset_yaml(version: str, model_version: str, sha256: str, size: int) -> str:
    return f"""schema: edgefleet.modelset/1
name: app
version: "{version}"
models:
  - name: m
    version: "{model_version}"
    priority: 10
    variants:
      - name: fp32
        precision: fp32
        artifact: {{sha256: {sha256}, size: {size}}}
        requires: {{memory_mb: 10}}
"""


POLICY = """schema: edgefleet.policy/1
name: base
selector: {labels: {site: lab}}
model_set: {name: app, version: "1.0"}
runtime: {probation_s: 0, telemetry_interval_s: 1}
"""


def rollout_yaml(name: str = "r1", **fields: object) -> str:
    spec: dict[str, object] = {
        "name": name,
        "policy": "base",
        "target": "2.0",
        "cohorts": {"canary": 1, "batches": [50, 100], "bake_s": 0},
    }
    spec.update(fields)
    return json.dumps(spec)  # JSON is YAML


@dataclass
class Rig:
    store: Store
    service: HubService
    publisher: RecordingPublisher
    clock: Clock
    seq: dict[str, int] = field(default_factory=dict)
    applied: dict[str, int] = field(default_factory=dict)

    @property
    def driver(self) -> RolloutDriver:
        return self.service.rollouts

    def report(self, device_id: str, generation: int, *, ok: bool = True) -> None:
        """What an agent reports after applying (or failing) ``generation``."""
        document = self.store.latest_desired(device_id)
        assert document is not None
        record = next(
            d for d in self.store.desired_history(device_id, 100) if d.generation == generation
        )
        version = record.document["payload"]["models"][0]["version"]
        self.seq[device_id] = self.seq.get(device_id, 10) + 1
        if ok:
            self.applied[device_id] = generation
            state = hub_samples.state(
                device_id,
                seq=self.seq[device_id],
                applied=generation,
                ts=self.clock(),
                models=[ModelReport(name="m", version=version, ready=True)],
            )
        else:
            state = hub_samples.state(
                device_id,
                seq=self.seq[device_id],
                applied=self.applied.get(device_id, 0),
                ts=self.clock(),
                desired_generation=generation,
                phase="failed",
                last_error=LastError(generation=generation, code="smoke_test_error", message="NaN"),
                models=[ModelReport(name="m", version="1", ready=True)],
            )
        assert self.store.record_state(state, self.clock())

    def answer(self, fail: Iterable[str] = ()) -> list[str]:
        """Every device whose newest document is newer than what it applied reports it
        (``fail``: reports a failure instead). Returns who answered."""
        failing = set(fail)
        answered = []
        for device_id in DEVICES:
            latest = self.store.latest_desired(device_id)
            if latest is None or latest.generation <= self.applied.get(device_id, 0):
                continue
            state = self.store.get_device(device_id).state or {}
            if (state.get("last_error") or {}).get("generation") == latest.generation:
                continue
            self.report(device_id, latest.generation, ok=device_id not in failing)
            answered.append(device_id)
        return answered

    def drive(self, name: str, *, fail: Iterable[str] = (), rounds: int = 30) -> RolloutView:
        """Tick, let the devices answer, one second later again, until the rollout is no
        longer pending, running or paused."""
        for _ in range(rounds):
            self.driver.tick()
            view = self.driver.view(name)
            if view.state.phase not in ("pending", "running", "paused"):
                return view
            self.answer(fail)
            self.clock.now += 1.0
        raise AssertionError(f"rollout {name} still {self.driver.view(name).state.phase}")

    def model_set_of(self, device_id: str) -> ModelSetRef:
        """The model set of the device's newest (signed) document."""
        latest = self.store.latest_desired(device_id)
        assert latest is not None
        return ModelSetRef.model_validate(latest.document["payload"]["model_set"])

    def policy_model_set(self) -> ModelSetRef:
        return ModelSetRef.model_validate(self.store.get_policy("base").document["model_set"])


def make_service(
    store: Store, root: Path, publisher: RecordingPublisher, clock: Clock
) -> HubService:
    from hub.config import load_config

    config = load_config(root / "hub" / "hub.toml")
    return HubService(
        config,
        store,
        artifacts=ArtifactStore(config.artifacts_dir),
        keys=Keyring(config.keys_dir, config.public_keys_path, clock=clock),
        publisher=publisher,
        clock=clock,
    )


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    config = init_hub(tmp_path / "hub", hub_id="hub-test").config
    clock = Clock()
    store = Store(config.store_path, clock=clock)
    publisher = RecordingPublisher()
    service = make_service(store, tmp_path, publisher, clock)
    try:
        for version, constant in (("1", 1.0), ("2", 2.0)):
            path = save_add_model(tmp_path / f"m{version}.onnx", constant, width=4)
            (record,) = service.add_model(path, name="m", version=version, measure=False)
            service.apply_model_set(
                modelset_yaml(f"{version}.0", version, record.sha256, record.size),
                f"app-{version}.yaml",
            )
        for device_id in DEVICES:
            store.record_birth(hub_samples.birth(device_id, labels={"site": "lab"}), START)
        store.record_birth(hub_samples.birth("elsewhere", labels={"site": "far"}), START)
        service.apply_policy(POLICY, "policy.yaml")
        rig = Rig(store, service, publisher, clock)
        assert sorted(rig.answer()) == DEVICES
        publisher.take()
        yield rig
    finally:
        store.close()


def events_of(rig: Rig, name: str) -> list[tuple[str, str]]:
    record = rig.store.find_rollout(name)
    assert record is not None
    return [
        (e.kind, e.message) for e in reversed(rig.store.list_rollout_events(record.id, limit=500))
    ]


# --- the way through ---------------------------------------------------------------------------


def test_a_good_version_goes_through_canary_and_batches_and_is_promoted(rig: Rig) -> None:
    view = rig.driver.start(rollout_yaml(), "r1.yaml")
    assert view.spec.baseline == BASE
    assert [len(c.devices) for c in view.state.cohorts] == [1, 2, 3]
    canary = view.state.cohorts[0].devices[0]
    # the first step pinned the canary, and only it got a new (signed) document
    sent = [decode(Desired, p.payload) for p in rig.publisher.take()]
    assert [d.payload.device_id for d in sent] == [canary]
    assert sent[0].payload.model_set == NEW and sent[0].payload.rollout == "r1"
    pins = rig.service.get_pins(canary)
    assert pins is not None and pins.model_sets == {"base": NEW} and pins.rollout == "r1"
    assert rig.driver.watching(canary) and not rig.driver.watching("elsewhere")

    done = rig.drive("r1")
    assert done.state.phase == "succeeded", done.state.reason
    assert done.state.promoted
    assert {a.status for a in done.state.devices.values()} == {"healthy"}
    # promoted: the policy names 2.0 (a new version), the pins are gone, documents unchanged
    assert rig.policy_model_set() == NEW
    assert rig.store.get_policy("base").version == 2
    assert all(rig.service.get_pins(d) is None for d in DEVICES)
    assert all(rig.model_set_of(d) == NEW for d in DEVICES)
    assert rig.store.list_meta(PINS_PREFIX) == {}
    assert not rig.driver.watching(canary)
    kinds = [k for k, _ in events_of(rig, "r1")]
    assert kinds[:3] == ["rollout.created", "rollout.running", "cohort.started"]
    assert kinds[-1] == "rollout.succeeded"
    assert kinds.count("cohort.passed") == 3
    # rollout events carry the marker device id "" and never touch the devices table
    record = rig.store.find_rollout("r1")
    assert record is not None
    stored = rig.store.list_rollout_events(record.id, limit=500)
    assert {e.device_id for e in stored} == {ROLLOUT_EVENT_DEVICE}
    assert {e.session for e in stored} == {record.id}
    assert [e.seq for e in reversed(stored)] == list(range(1, len(stored) + 1))
    assert rig.store.find_device(ROLLOUT_EVENT_DEVICE) is None
    assert all(e.data["rollout"] == "r1" for e in stored)
    # a finished rollout is read from the store when asked for, not kept in memory
    assert rig.driver._cache == {}
    assert rig.driver.view("r1").state == done.state
    assert rig.driver._cache == {}


def test_the_content_cache_keeps_only_the_generations_devices_name(rig: Rig) -> None:
    """Per device, the driver keeps the contents of its applied and issued generations
    only, and nothing once the rollout has ended: a hub rolling for months stays flat."""
    rig.driver.start(rollout_yaml(), "r1.yaml")
    cached_at_most = 0
    for _ in range(30):
        rig.driver.tick()
        snapshots = rig.store.device_snapshots(list(rig.driver._contents))
        for device_id, generations in rig.driver._contents.items():
            s = snapshots[device_id]
            assert set(generations) <= {s.applied_generation, s.issued_generation}
            cached_at_most = max(cached_at_most, len(generations))
        if rig.driver.view("r1").state.phase not in ("pending", "running", "paused"):
            break
        rig.answer()
        rig.clock.now += 1.0
    assert rig.driver.view("r1").state.phase == "succeeded"
    assert cached_at_most == 2  # a device between two documents
    assert rig.driver._contents == {}


def test_a_failing_canary_stops_the_rollout_and_is_sent_back(rig: Rig) -> None:
    view = rig.driver.start(rollout_yaml(), "r1.yaml")
    canary = view.state.cohorts[0].devices[0]
    done = rig.drive("r1", fail=[canary])
    assert done.state.phase == "failed"
    assert "canary: success gate failed" in done.state.reason
    assert done.state.devices[canary].status == "failed"
    assert "smoke_test_error" in done.state.devices[canary].reason
    # on_failure rollback: the canary's pin is gone and it got the baseline again
    assert rig.service.get_pins(canary) is None
    assert rig.model_set_of(canary) == BASE
    assert rig.policy_model_set() == BASE
    others = [d for d in DEVICES if d != canary]
    assert all(rig.model_set_of(d) == BASE for d in others)
    assert all(done.state.devices[d].status == "waiting" for d in others)
    kinds = [k for k, _ in events_of(rig, "r1")]
    assert "device.failed" in kinds and "cohort.failed" in kinds and kinds[-1] == "rollout.failed"


def test_hold_keeps_the_pins_until_abort(rig: Rig) -> None:
    view = rig.driver.start(rollout_yaml(on_failure="hold"), "r1.yaml")
    canary = view.state.cohorts[0].devices[0]
    done = rig.drive("r1", fail=[canary])
    assert done.state.phase == "failed"
    pins = rig.service.get_pins(canary)
    assert pins is not None and pins.model_sets == {"base": NEW}
    # a failed rollout that holds pins still claims its pinned device
    with pytest.raises(RolloutConflict) as caught:
        rig.driver.start(rollout_yaml("r2"), "r2.yaml")
    assert caught.value.devices == {canary: "r1"}
    aborted = rig.driver.abort("r1", "  looked at it,\n enough ")
    assert aborted.state.phase == "aborted" and aborted.state.reason == "looked at it, enough"
    assert rig.service.get_pins(canary) is None and rig.model_set_of(canary) == BASE
    assert ("rollout.aborted", "looked at it, enough") in events_of(rig, "r1")


def test_pins_of_other_policies_are_kept(rig: Rig) -> None:
    view = rig.driver.start(rollout_yaml(), "r1.yaml")
    canary = view.state.cohorts[0].devices[0]
    other = ModelSetRef(name="app", version="1.0")
    rig.service.set_pins(canary, {"base": NEW, "another": other}, rollout="r1")
    rig.driver.abort("r1")
    pins = rig.service.get_pins(canary)
    assert pins is not None and pins.model_sets == {"another": other} and pins.rollout is None


# --- refusals ----------------------------------------------------------------------------------


def test_what_start_refuses(rig: Rig) -> None:
    rig.driver.start(rollout_yaml(), "r1.yaml")
    with pytest.raises(Conflict, match="exists already"):
        rig.driver.start(rollout_yaml(), "again.yaml")
    with pytest.raises(RolloutConflict, match="held by other rollouts"):
        rig.driver.start(rollout_yaml("r2"), "r2.yaml")
    with pytest.raises(RolloutError, match="no active policy 'nope'"):
        rig.driver.start(rollout_yaml("r3", policy="nope"), "r3.yaml")
    with pytest.raises(RolloutError, match="not published"):
        rig.driver.start(rollout_yaml("r4", target="9.9"), "r4.yaml")
    with pytest.raises(RolloutError, match="nothing to roll out"):
        rig.driver.start(rollout_yaml("r5", target="1.0"), "r5.yaml")
    with pytest.raises(ManifestError) as caught:
        rig.driver.start(
            "name: r6\npolicy: base\ntarget: 2.0\ncohorts: {batches: [50]}\n", "r6.yml"
        )
    assert "r6.yml" in str(caught.value)
    with pytest.raises(NotFound):
        rig.driver.view("r9")
    with pytest.raises(NotFound):
        rig.driver.pause("r9")
    with pytest.raises(RolloutError, match="unknown rollout operation"):
        rig.driver.operate("r1", "explode")
    assert [v.name for v in rig.driver.list_views()] == ["r1"]


def test_revoked_devices_are_left_out(rig: Rig) -> None:
    rig.store.set_meta(REVOKED_META_PREFIX + "dev-0", repr(START))
    view = rig.driver.start(rollout_yaml(), "r1.yaml")
    assert sorted(view.state.devices) == DEVICES[1:]


def test_pause_and_resume_with_their_reasons(rig: Rig) -> None:
    rig.driver.start(rollout_yaml(cohorts={"canary": 1, "batches": [100], "bake_s": 30}), "r.yaml")
    for _ in range(5):
        rig.driver.tick()
        rig.answer()
        rig.clock.now += 1
    assert rig.driver.view("r1").state.cohorts[0].status == "baking"
    paused = rig.driver.pause("r1", "lunch")
    assert paused.state.phase == "paused"
    with pytest.raises(InvalidTransition, match="is paused: cannot pause"):
        rig.driver.pause("r1")
    rig.clock.now += 600  # the bake does not run while paused
    rig.driver.tick()
    assert rig.driver.view("r1").state.phase == "paused"
    resumed = rig.driver.resume("r1", "back")
    assert resumed.state.phase == "running"
    assert resumed.state.cohorts[0].status == "baking"  # 26 s of bake left
    done = rig.drive("r1", rounds=60)
    assert done.state.phase == "succeeded"
    transitions = [(t.to_phase, t.reason) for t in done.state.transitions]
    assert ("paused", "lunch") in transitions and ("running", "back") in transitions
    with pytest.raises(InvalidTransition):
        rig.driver.abort("r1")


def test_rollback_after_success_restores_the_baseline(rig: Rig) -> None:
    rig.driver.start(rollout_yaml(), "r1.yaml")
    assert rig.drive("r1").state.phase == "succeeded"
    assert rig.policy_model_set() == NEW
    back = rig.driver.rollback("r1", "customers complained")
    assert back.state.phase == "rolled_back"
    assert rig.policy_model_set() == BASE
    assert rig.store.get_policy("base").version == 3
    assert all(rig.model_set_of(d) == BASE for d in DEVICES)


def test_a_policy_changed_meanwhile_is_not_promoted_over(rig: Rig) -> None:
    m1 = rig.store.list_models("m", "1")[0]
    rig.service.apply_model_set(modelset_yaml("3.0", "1", m1.sha256, m1.size), "app-3.yaml")
    rig.driver.start(rollout_yaml(cohorts={"batches": [100]}), "r1.yaml")
    # an operator points the policy at 3.0 while the rollout runs
    record = rig.store.get_policy("base")
    rig.store.put_policy(
        "base", {**record.document, "model_set": {"name": "app", "version": "3.0"}}
    )
    done = rig.drive("r1")
    assert done.state.phase == "succeeded" and done.state.promoted
    failures = [m for k, m in events_of(rig, "r1") if k == "driver.action_failed"]
    assert len(failures) == 1
    assert "promote base to app 2.0" in failures[0] and "it names app 3.0" in failures[0]
    assert ModelSetRef.model_validate(rig.store.get_policy("base").document["model_set"]) == (
        ModelSetRef(name="app", version="3.0")
    )
    assert all(rig.service.get_pins(d) is None for d in DEVICES)


# --- restart -----------------------------------------------------------------------------------


def test_a_new_driver_restores_lost_pins_and_goes_on(rig: Rig, tmp_path: Path) -> None:
    view = rig.driver.start(
        rollout_yaml(cohorts={"canary": 1, "batches": [50, 100], "bake_s": 5}), "r1.yaml"
    )
    for _ in range(4):
        rig.driver.tick()
        rig.answer()
        rig.clock.now += 1
    state = rig.driver.view("r1").state
    assert state.cohorts[0].status in ("baking", "passed")
    pinned = sorted(d for d, a in state.devices.items() if a.pinned)
    assert pinned
    # the hub died after persisting a step but before executing its pins
    for device_id in pinned:
        rig.store.delete_meta(PINS_PREFIX + device_id)
    # ... and the stale pin of a device the rollout does not pin survived
    spare = next(d for d in view.state.cohorts[2].devices)
    rig.service.set_pins(spare, {"base": NEW}, rollout="r1")

    service = make_service(rig.store, tmp_path, rig.publisher, rig.clock)
    assert isinstance(service.rollouts, RolloutDriver) and service.rollouts is not rig.driver
    changed = service.rollouts.recover()
    assert changed == sorted([*pinned, spare])
    for device_id in pinned:
        pins = service.get_pins(device_id)
        assert pins is not None and pins.model_sets == {"base": NEW} and pins.rollout == "r1"
    assert service.get_pins(spare) is None
    kinds = events_of(rig, "r1")
    assert any(k == "driver.recovered" and "pin(s) restored" in m for k, m in kinds)
    # the state continues exactly where it was
    loaded = load_state(rig.store.get_rollout(view.id).state)
    assert loaded == state
    rig.service = service
    assert rig.drive("r1").state.phase == "succeeded"
    assert rig.policy_model_set() == NEW


def test_recover_finishes_an_interrupted_promotion(rig: Rig, tmp_path: Path) -> None:
    rig.driver.start(rollout_yaml(), "r1.yaml")
    assert rig.drive("r1").state.phase == "succeeded"
    # pretend the promotion was lost: the policy names 1.0 again, the pins are there
    record = rig.store.get_policy("base")
    rig.store.put_policy("base", {**record.document, "model_set": BASE.model_dump()})
    service = make_service(rig.store, tmp_path, rig.publisher, rig.clock)
    service.rollouts.recover()
    assert ModelSetRef.model_validate(rig.store.get_policy("base").document["model_set"]) == NEW
    assert any(
        k == "driver.recovered" and "promoted to app 2.0" in m for k, m in events_of(rig, "r1")
    )


# --- the health gate from telemetry ------------------------------------------------------------


def telemetry(device_id: str, seq: int, ts: float, p95: float, requests: int = 100) -> TelemetryIn:
    message = Telemetry.model_validate(
        {
            **hub_samples.telemetry(device_id, seq=seq).model_dump(by_alias=True),
            "ts": ts,
            "interval_s": 1.0,
            "models": {
                "m": ModelStats(
                    version="1",
                    state="ready",
                    requests=requests,
                    errors=0,
                    latency_ms=Latency(p50=p95 / 2, p95=p95, p99=p95),
                ).model_dump(),
            },
        }
    )
    return TelemetryIn(message, message.model_dump_json(by_alias=True), ts)


def test_a_three_times_slower_canary_fails_the_health_gate(rig: Rig) -> None:
    health = {"window_s": 60, "interval_s": 5, "min_requests": 50, "max_missing_data": 30}
    view = rig.driver.start(
        rollout_yaml(cohorts={"canary": 1, "batches": [100], "bake_s": 120}, health=health),
        "slow.yaml",
    )
    canary = view.state.cohorts[0].devices[0]
    seq = 100
    for _ in range(80):
        rig.driver.tick()
        rig.answer()
        state = rig.driver.view("r1").state
        if state.phase != "running":
            break
        if state.cohorts[0].status == "baking":
            seq += 1
            for device_id in DEVICES:
                p95 = 30.0 if device_id == canary else 10.0
                rig.store.record_telemetry([telemetry(device_id, seq, rig.clock.now, p95)])
        rig.clock.now += 1
    final = rig.driver.view("r1", events=200)
    assert final.state.phase == "failed", final.state.reason
    assert "health analysis failed" in final.state.reason
    assert "p95 30.0 ms vs baseline 10.0 ms" in final.state.reason
    assert rig.service.get_pins(canary) is None and rig.model_set_of(canary) == BASE
    gate = final.state.cohorts[0].gates["health"]
    assert gate.status == "failed" and gate.value == pytest.approx(3.0)
    assert any(e.kind == "health.failed" for e in final.events)


def test_states_survive_the_json_round_trip(rig: Rig) -> None:
    rig.driver.start(rollout_yaml(), "r1.yaml")
    rig.driver.tick()
    record = rig.store.find_rollout("r1")
    assert record is not None
    assert RolloutState.model_validate(record.state) == rig.driver.view("r1").state


# --- the HTTP API and the CLI ------------------------------------------------------------------

MANIFESTS = Path(__file__).resolve().parent / "fixtures" / "manifests"
EXE = str(Path(sys.executable).parent / "edgefleet-hub")


@pytest.fixture
def api_server(tmp_path: Path) -> Iterator[tuple[ApiServer, StoreService]]:
    """The real API over ``StoreService`` (the real driver; reconcile only recorded) with six
    devices (the odd ones in the warehouse, offline), model sets ocr 2024.06.1 and
    2024.07.1, and policy warehouse-ocr on the first."""
    with Store(tmp_path / "hub.db") as store:
        service = StoreService(store, tmp_path / "artifacts")
        seed_devices(store, 6)
        text = (MANIFESTS / "modelset.yaml").read_text()
        service.apply_model_set(text, "modelset.yaml")
        service.apply_model_set(text.replace("2024.06.1", "2024.07.1"), "modelset-2.yaml")
        service.apply_policy((MANIFESTS / "policy.yaml").read_text(), "policy.yaml")
        with ApiServer(create_app(service, token=TOKEN)) as server:
            yield server, service


WAREHOUSE = """schema: edgefleet.rollout/1
name: july
policy: warehouse-ocr
target: 2024.07.1
cohorts: {canary: 1, batches: [100], bake_s: 10m}
"""


def test_the_rollout_routes(api_server: tuple[ApiServer, StoreService]) -> None:
    server, service = api_server
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as api:
        started = api.post("/v1/rollouts", params={"source": "july.yaml"}, content=WAREHOUSE)
        assert started.status_code == 200, started.text
        body = started.json()
        assert body["name"] == "july" and body["phase"] == "running"
        assert body["baseline"] == {"name": "ocr", "version": "2024.06.1"}
        assert body["model_set"] == {"name": "ocr", "version": "2024.07.1"}
        assert [c["total"] for c in body["cohort_progress"]] == [1, 2]
        assert body["devices"] == 3 and body["counts"] == {"waiting": 3}
        assert body["events"][0]["kind"] == "cohort.started"
        assert body["events"][-1]["kind"] == "rollout.created"
        assert body["device_progress"] is None
        # the warehouse devices are offline: nothing pinned, nothing reconciled
        assert service.reconciled == []

        again = api.post("/v1/rollouts", content=WAREHOUSE)
        assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"
        bad = api.post("/v1/rollouts", params={"source": "bad.yaml"}, content="name: x\nfoo: 1\n")
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_manifest"
        assert "bad.yaml" in bad.json()["error"]["message"]
        refused = api.post(
            "/v1/rollouts",
            content=WAREHOUSE.replace("july", "same").replace("2024.07.1", "2024.06.1"),
        )
        assert refused.status_code == 422 and "nothing to roll out" in refused.text

        page = api.get("/v1/rollouts", params={"phase": "running"}).json()
        assert [r["name"] for r in page["items"]] == ["july"] and page["next_cursor"] is None
        assert api.get("/v1/rollouts", params={"phase": "failed"}).json()["items"] == []
        shown = api.get("/v1/rollouts/july", params={"devices": "true", "events": 1}).json()
        assert len(shown["events"]) == 1 and shown["spec"]["policy"] == "warehouse-ocr"
        assert {d["device_id"] for d in shown["device_progress"]} == {
            "dev-001",
            "dev-003",
            "dev-005",
        }

        paused = api.post("/v1/rollouts/july/pause", json={"reason": "inventory day"})
        assert paused.status_code == 200 and paused.json()["phase"] == "paused"
        assert paused.json()["reason"] == "inventory day"
        twice = api.post("/v1/rollouts/july/pause")
        assert twice.status_code == 409 and twice.json()["error"]["code"] == "invalid_transition"
        assert api.post("/v1/rollouts/july/resume").json()["phase"] == "running"
        junk = api.post("/v1/rollouts/july/abort", json={"reason": 7, "other": 1})
        assert junk.status_code == 422
        aborted = api.post("/v1/rollouts/july/abort").json()
        assert aborted["phase"] == "aborted" and aborted["reason"] == "abort by an operator"
        # the rollout's events are in the hub's event list too, under the device id ""
        listed = api.get("/v1/events", params={"device": ""}).json()["items"]
        assert listed[0]["kind"] == "rollout.aborted" and listed[-1]["kind"] == "rollout.created"
        assert {e["device_id"] for e in listed} == {""}
        assert api.get("/v1/rollouts/nope").status_code == 404
        assert api.post("/v1/rollouts/nope/rollback").status_code == 404


def cli(server: ApiServer, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env.update({"COLUMNS": "200", "EDGEFLEET_HUB_URL": server.url, "EDGEFLEET_HUB_TOKEN": TOKEN})
    return subprocess.run(
        [EXE, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_the_rollout_commands(api_server: tuple[ApiServer, StoreService], tmp_path: Path) -> None:
    server, _ = api_server
    spec = tmp_path / "july.yaml"
    spec.write_text(WAREHOUSE)
    # FILE with flags on top: the canary becomes 2 devices, the bake 0
    started = cli(server, "rollout", "start", str(spec), "--canary", "2", "--bake", "0")
    assert started.returncode == 0, started.stderr
    assert "july (policy warehouse-ocr)" in started.stdout
    assert "ocr 2024.06.1 -> ocr 2024.07.1" in started.stdout
    assert "canary" in started.stdout and "0/2" in started.stdout
    shown = cli(server, "rollout", "status", "july", "--json", "--devices")
    assert shown.returncode == 0, shown.stderr
    detail = json.loads(shown.stdout)
    assert detail["spec"]["cohorts"]["canary"]["count"] == 2
    assert detail["spec"]["cohorts"]["bake_s"] == 0
    assert len(detail["device_progress"]) == 3
    listed = cli(server, "rollout", "list")
    assert listed.returncode == 0 and "july" in listed.stdout and "running" in listed.stdout
    paused = cli(server, "rollout", "pause", "july", "--reason", "not today")
    assert paused.returncode == 0 and paused.stdout.strip() == "rollout july: paused (not today)"
    refused = cli(server, "rollout", "pause", "july")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip() == "edgefleet-hub: error: rollout july is paused: cannot pause it"
    aborted = cli(server, "rollout", "abort", "july", "--json")
    assert aborted.returncode == 0 and json.loads(aborted.stdout)["phase"] == "aborted"
    # --watch of a rollout that ended: the final status, exit 1 (not succeeded)
    watched = cli(server, "rollout", "status", "july", "--watch", "--interval", "0.1")
    assert watched.returncode == 1 and "aborted" in watched.stdout
    # flags only: the name defaults to POLICY-VERSION-time
    flags = cli(
        server,
        "rollout",
        "start",
        "--policy",
        "warehouse-ocr",
        "--to",
        "2024.07.1",
        "--batches",
        "50,100",
        "--health",
        "--json",
    )
    assert flags.returncode == 2 and "health analysis compares the canary" in flags.stderr
    flags = cli(
        server, "rollout", "start", "--policy", "warehouse-ocr", "--to", "2024.07.1", "--json"
    )
    assert flags.returncode == 0, flags.stderr
    created = json.loads(flags.stdout)
    assert created["name"].startswith("warehouse-ocr-2024.07.1-")
    assert created["spec"]["cohorts"]["batches"] == [{"percent": 100.0, "bake_s": None}]
    nothing = cli(server, "rollout", "start")
    assert nothing.returncode == 2 and "give a rollout FILE" in nothing.stderr
    missing = cli(server, "rollout", "status", "nope")
    assert missing.returncode == 2 and "no rollout 'nope'" in missing.stderr


def test_every_start_flag_maps_onto_its_spec_field(tmp_path: Path) -> None:
    from hub.cli import build_parser, rollout_document
    from hub.rollout import load_spec

    flags = [
        *[
            "--policy",
            "base",
            "--to",
            "2.0",
            "--canary",
            "5%",
            "--batches",
            "25,50,100",
            "--bake",
            "10m",
        ],
        *["--success-threshold", "95", "--error-threshold", "5%", "--min-finished", "20"],
        *[
            "--max-failures",
            "3",
            "--device-timeout",
            "30m",
            "--cohort-timeout",
            "2h",
            "--offline-grace",
            "15m",
        ],
        *["--unreachable-fails", "--health-window", "10m", "--health-interval", "2m"],
        *["--latency-tolerance", "1.5", "--latency-margin-ms", "2", "--error-rate-tolerance", "2"],
        *["--error-rate-margin", "0.01", "--min-requests", "100", "--max-missing-data", "3"],
        *["--max-failed-evaluations", "1", "--timezone", "Europe/Berlin", "--only-when-idle"],
        *["--idle-max-rps", "0.5", "--on-failure", "hold", "--no-promote", "--label", "site=lab"],
        *["--profile", "rpi", "--device", "d1", "--name", "n1", "--model-set", "ocr2"],
        "--window",
        "* 1-4 * * *",
    ]
    spec = load_spec(*rollout_document(build_parser().parse_args(["rollout", "start", *flags])))
    assert spec.model_dump(mode="json", by_alias=True, exclude={"baseline"}) == {
        "schema": "edgefleet.rollout/1",
        "name": "n1",
        "policy": "base",
        "target": "2.0",
        "model_set": "ocr2",
        "selector": {"labels": {"site": "lab"}, "profiles": ["rpi"], "devices": ["d1"]},
        "cohorts": {
            "canary": {"count": None, "percent": 5.0, "bake_s": None},
            "batches": [
                {"percent": 25.0, "bake_s": None},
                {"percent": 50.0, "bake_s": None},
                {"percent": 100.0, "bake_s": None},
            ],
            "bake_s": 600.0,
        },
        "gates": {
            "success_threshold": 95.0,
            "error_threshold": 5.0,
            "min_finished": 20,
            "max_failures": 3,
        },
        "health": {
            "window_s": 600.0,
            "interval_s": 120.0,
            "latency_tolerance": 1.5,
            "latency_margin_ms": 2.0,
            "error_rate_tolerance": 2.0,
            "error_rate_margin": 0.01,
            "min_requests": 100,
            "max_missing_data": 3,
            "max_failed": 1,
            "models": [],
        },
        "device_timeout_s": 1800.0,
        "cohort_timeout_s": 7200.0,
        "offline": {"grace_s": 900.0, "unreachable_fails": True},
        "windows": [{"cron": "* 1-4 * * *", "timezone": "Europe/Berlin", "duration_s": None}],
        "only_when_idle": True,
        "idle_max_rps": 0.5,
        "on_failure": "hold",
        "promote": False,
    }
    # a file alone is sent as it is (errors name its lines); flags go on top of it
    path = tmp_path / "r.yaml"
    path.write_text(WAREHOUSE)
    assert rollout_document(build_parser().parse_args(["rollout", "start", str(path)])) == (
        WAREHOUSE,
        str(path),
    )
    text, source = rollout_document(
        build_parser().parse_args(["rollout", "start", str(path), "--to", "2"])
    )
    assert source == f"{path} (with flags)"
    merged = load_spec(text, source)
    assert merged.target == "2" and merged.cohorts.bake_s == 600 and merged.name == "july"
