"""The fleet simulator against a real mosquitto: connect, birth, report, verify and apply
signed desired states, refuse bad ones, fail on purpose (exactly the planned devices),
answer commands, say goodbye; plus the pure planning and a scale smoke test."""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from contract.manifests import (
    Artifact,
    ModelRuntime,
    ModelSetRef,
    ModelSpec,
    Requirements,
    RuntimePolicy,
    Variant,
)
from contract.messages import (
    Birth,
    Cmd,
    CmdResult,
    Desired,
    DesiredState,
    Event,
    State,
    Status,
    Telemetry,
    encode,
)
from contract.profile import Precision
from contract.select import select
from contract.signing import Signature, SigningKey
from contract.topics import Kind, down_topic, up_filter
from hub.broker import MosquittoBroker
from hub.cli import build_parser
from hub.init import init_hub
from hub.keys import Keyring
from hub.simulate import (
    Failures,
    Simulation,
    SimulationConfig,
    SimulationError,
    add_simulate_arguments,
    facts_for,
    load_profiles,
    plan_devices,
    run_simulate,
)
from hub.simulate.model import base_latency_ms, parse_profile_weights, profile_weights
from support.fleet import Tap, mqtt_tap

KEY = SigningKey.generate()
PROFILES = {"raspberry-pi-4-4gb": 1, "jetson-orin-nano-8gb": 1, "generic": 1}
UP_ALL = up_filter()


# ---- helpers -------------------------------------------------------------------------


def variant(name: str, precision: Precision, memory_mb: int, *providers: str) -> Variant:
    return Variant(
        name=name,
        precision=precision,
        artifact=Artifact(
            sha256=hashlib.sha256(f"{name}/{memory_mb}".encode()).hexdigest(), size=1000
        ),
        requires=Requirements(memory_mb=memory_mb, providers=list(providers or ["CPU"])),
    )


CPU = "CPUExecutionProvider"
MODELS = [
    ModelSpec(
        name="det",
        version="1.0.0",
        priority=30,
        variants=[
            variant("int8", "int8", 60, CPU),
            variant("fp16", "fp16", 100, "TensorrtExecutionProvider", "CUDAExecutionProvider"),
            variant("fp32", "fp32", 120, CPU),
        ],
    ),
    ModelSpec(
        name="rec",
        version="1.0.0",
        priority=20,
        variants=[variant("int8", "int8", 80, CPU), variant("fp32", "fp32", 150, CPU)],
    ),
    ModelSpec(
        name="big", version="1.0.0", priority=10, variants=[variant("fp32", "fp32", 400, CPU)]
    ),
]


def document(
    device_id: str,
    generation: int,
    *,
    version: str = "1.0.0",
    runtime: RuntimePolicy | None = None,
    key: SigningKey = KEY,
    issued_at: float | None = None,
    validity_s: float = 3600.0,
    models: Sequence[ModelSpec] = MODELS,
) -> bytes:
    issued = time.time() if issued_at is None else issued_at
    state = DesiredState(
        device_id=device_id,
        generation=generation,
        issued_at=issued,
        expires_at=issued + validity_s,
        model_set=ModelSetRef(name="ocr", version=version),
        models=list(models),
        runtime=runtime or RuntimePolicy(probation_s=0),
    )
    return encode(Desired.sign(state, key))


def models_of(version: str) -> list[ModelSpec]:
    """MODELS as a new model-set version (new content: a re-signed equal set reloads nothing)."""
    return [m.model_copy(update={"version": version}) for m in MODELS]


def config(broker: MosquittoBroker, devices: int, **changes: Any) -> SimulationConfig:
    values: dict[str, Any] = {
        "broker_url": broker.url,
        "devices": devices,
        "trusted_keys": (KEY.public,),
        "profiles": PROFILES,
        "connect_rate": 5000.0,
        "apply_delay_s": 0.05,
        "telemetry_interval_s": 0.5,
        "keepalive": 10,
    }
    values.update(changes)
    return SimulationConfig(**values)


@contextmanager
def simulation(broker: MosquittoBroker, devices: int, **changes: Any) -> Iterator[Simulation]:
    sim = Simulation(config(broker, devices, **changes))
    sim.start()
    try:
        yield sim
    finally:
        sim.stop()


def of(tap: Tap, kind: Kind, cls: type[Any]) -> list[Any]:
    return [m for m in tap.messages(kind) if isinstance(m, cls)]


def by_device(messages: list[Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for m in messages:
        out.setdefault(m.device_id, []).append(m)
    return out


def events(tap: Tap, kind: str) -> list[Event]:
    return [e for e in of(tap, Kind.EVENTS, Event) if e.kind == kind]


def latest_states(tap: Tap) -> dict[str, State]:
    latest: dict[str, State] = {}
    for s in of(tap, Kind.STATE, State):
        if s.device_id not in latest or s.seq > latest[s.device_id].seq:
            latest[s.device_id] = s
    return latest


def publish_all(tap: Tap, documents: dict[str, bytes]) -> None:
    infos = [
        tap.client.publish(down_topic(d, Kind.DESIRED), p, qos=1, retain=True)
        for d, p in documents.items()
    ]
    for info in infos:
        info.wait_for_publish(10)


def retained(
    broker: MosquittoBroker, topic: str, expected: int, timeout: float = 10.0
) -> list[Any]:
    """Retained messages on ``topic`` (a filter) from a fresh subscriber."""
    with mqtt_tap(broker, topic) as tap:
        tap.wait_for(lambda t: len(t.received) >= expected, timeout, f"{expected} retained")
        time.sleep(0.2)
        return [r.message for r in tap.received if r.retain]


# ---- planning (no broker) ------------------------------------------------------------


def test_plan_is_deterministic_and_shares_are_exact() -> None:
    cfg = SimulationConfig(
        broker_url="mqtt://127.0.0.1:1",
        devices=200,
        trusted_keys=(KEY.public,),
        seed=7,
        failures=Failures(
            fail_apply=0.1, offline=0.05, slow=0.25, crash_version="2.0.0", crash=0.5
        ),
    )
    weights = [("raspberry-pi-4-4gb", 3), ("generic", 1)]
    specs = plan_devices(cfg, weights)
    assert specs == plan_devices(cfg, weights)
    assert [s.device_id for s in specs[:2]] == ["sim-00000", "sim-00001"]
    assert sum(s.fail_apply for s in specs) == 20
    assert sum(s.offline for s in specs) == 10
    assert sum(s.slow for s in specs) == 50
    assert sum(s.crash for s in specs) == 100
    assert sum(s.profile == "generic" for s in specs) == 50
    assert [s.profile for s in specs[:4]] == ["raspberry-pi-4-4gb"] * 3 + ["generic"]
    other = plan_devices(replace(cfg, seed=8), weights)
    assert {s.index for s in other if s.fail_apply} != {s.index for s in specs if s.fail_apply}


def test_profiles_and_facts() -> None:
    profiles = load_profiles()
    assert {"generic", "raspberry-pi-4-4gb", "jetson-orin-nano-8gb"} <= set(profiles)
    assert parse_profile_weights("raspberry-pi-4-4gb=3, generic") == {
        "raspberry-pi-4-4gb": 3,
        "generic": 1,
    }
    cfg = SimulationConfig(broker_url="mqtt://h", devices=1, trusted_keys=(KEY.public,))
    defaults = profile_weights(cfg, profiles)
    assert "generic" not in dict(defaults)  # the fallback only when named
    with pytest.raises(SimulationError, match="unknown profile nope"):
        Simulation(replace(cfg, profiles={"nope": 1}))
    with pytest.raises(SimulationError, match="fail_apply"):
        Simulation(replace(cfg, failures=Failures(fail_apply=2)))
    jetson = facts_for(profiles["jetson-orin-nano-8gb"])
    assert jetson.architecture == "aarch64"
    assert jetson.providers == profiles["jetson-orin-nano-8gb"].providers
    memory = profiles["jetson-orin-nano-8gb"].match.memory
    assert memory.min_mb <= jetson.memory_total_mb <= (memory.max_mb or 10**9)


# ---- on a broker ---------------------------------------------------------------------


def test_fleet_connects_births_and_reports(broker: MosquittoBroker) -> None:
    with mqtt_tap(broker, UP_ALL) as tap, simulation(broker, 120, labels={"site": "lab"}) as sim:
        assert sim.wait_connected(30)
        profiles = load_profiles()
        tap.wait_for(lambda t: len(of(t, Kind.BIRTH, Birth)) >= 120, 15, "120 births")
        births = {b.device_id: b for b in of(tap, Kind.BIRTH, Birth)}
        assert set(births) == set(sim.device_ids)
        for spec in sim.specs:
            birth = births[spec.device_id]
            assert birth.profile.name == spec.profile
            assert birth.facts == facts_for(profiles[spec.profile])
            assert birth.labels == {"site": "lab"}
            assert birth.session == 1 and birth.applied_generation == 0
        online = [s for s in of(tap, Kind.STATUS, Status) if s.state == "online"]
        assert len({s.device_id for s in online}) == 120
        tap.wait_for(lambda t: len(latest_states(t)) == 120, 10, "120 states")
        states = latest_states(tap)
        assert all(s.applied_generation == 0 and s.phase == "idle" for s in states.values())
        tap.wait_for(
            lambda t: len(by_device(of(t, Kind.TELEMETRY, Telemetry))) == 120, 15, "telemetry"
        )
        # seq grows per device over everything it sent
        with tap.lock:
            received = list(tap.received)
        seqs: dict[str, list[int]] = {}
        for item in received:
            msg = item.message
            seq = getattr(msg, "seq", None)
            if seq is not None:
                seqs.setdefault(msg.device_id, []).append(seq)  # type: ignore[union-attr]
        assert all(s == sorted(s) and len(set(s)) == len(s) for s in seqs.values())
        stats = sim.stats()
        assert stats.connected == 120 and stats.births == 120 and stats.errors == 0
        assert stats.ramp_s is not None


def test_signed_desired_is_verified_and_applied(broker: MosquittoBroker) -> None:
    with mqtt_tap(broker, UP_ALL) as tap, simulation(broker, 60) as sim:
        assert sim.wait_connected(30)
        publish_all(tap, {d: document(d, 1) for d in sim.device_ids})
        assert sim.wait_for(lambda s: s.commits == 60, 30), sim.stats()
        tap.wait_for(lambda t: len(events(t, "update.committed")) == 60, 10, "60 committed events")
        births = {b.device_id: b for b in of(tap, Kind.BIRTH, Birth)}
        tap.wait_for(
            lambda t: (
                [(s.applied_generation, s.phase) for s in latest_states(t).values()]
                == [(1, "committed")] * 60
            ),
            10,
            "60 committed states",
        )
        states = latest_states(tap)
        for device_id in sim.device_ids:
            state = states[device_id]
            birth = births[device_id]
            plan = select(MODELS, birth.profile, birth.facts)
            assert {(r.name, r.variant, r.provider, r.ready) for r in state.models} == {
                (
                    e.model,
                    getattr(e, "variant", None),
                    getattr(e, "provider", None),
                    e.model in {c.model for c in plan.chosen},
                )
                for e in plan.entries
            }
        kinds = [e.kind for e in by_device(of(tap, Kind.EVENTS, Event))[sim.device_ids[0]]]
        assert kinds == ["update.started", "update.activated", "update.committed"]
        # variants differ by profile: the Jetson runs det in fp16 on TensorRT
        jetson = next(s for s in sim.specs if s.profile == "jetson-orin-nano-8gb")
        det = next(r for r in states[jetson.device_id].models if r.name == "det")
        assert (det.variant, det.provider) == ("fp16", "TensorrtExecutionProvider")
        generic = next(s for s in sim.specs if s.profile == "generic")
        big = next(r for r in states[generic.device_id].models if r.name == "big")
        assert not big.ready and big.reason and big.reason.startswith("does_not_fit_memory")
        # telemetry now names the served models
        target = sim.device_ids[1]
        tap.wait_for(
            lambda t: any(
                m.device_id == target and "det" in m.models
                for m in of(t, Kind.TELEMETRY, Telemetry)
            ),
            10,
            "telemetry with models",
        )
        assert {v.generations.get(1) for v in [sim.stats()]} == {60}


def test_bad_documents_are_refused(broker: MosquittoBroker) -> None:
    other = SigningKey.generate()
    with mqtt_tap(broker, UP_ALL) as tap, simulation(broker, 6, profiles={"generic": 1}) as sim:
        assert sim.wait_connected(30)
        ids = sim.device_ids
        applied = document(ids[2], 2)
        envelope = json.loads(document(ids[1], 1))
        sig = base64.b64decode(envelope["signatures"][0]["sig"])
        envelope["signatures"] = [
            Signature(
                keyid=KEY.keyid, sig=base64.b64encode(bytes([sig[0] ^ 1]) + sig[1:]).decode()
            ).model_dump()
        ]
        publish_all(
            tap,
            {
                ids[0]: document(ids[0], 1, key=other),
                ids[1]: json.dumps(envelope).encode(),
                ids[2]: applied,
                ids[3]: document(ids[3], 1, issued_at=time.time() - 7200),
                ids[4]: document(ids[5], 1),
                ids[5]: b"{not json",
            },
        )
        tap.wait_for(lambda t: len(events(t, "desired.refused")) >= 5, 15, "5 refusals")
        tap.wait_for(lambda t: len(events(t, "update.committed")) >= 1, 15, "ids[2] applied")
        publish_all(tap, {ids[2]: document(ids[2], 1)})  # older than the applied one
        tap.wait_for(lambda t: len(events(t, "desired.refused")) >= 6, 15, "6 refusals")
        codes = {e.device_id: e.data["code"] for e in events(tap, "desired.refused")}
        assert codes == {
            ids[0]: "unknown_key",
            ids[1]: "bad_signature",
            ids[2]: "stale_generation",
            ids[3]: "expired",
            ids[4]: "wrong_device",
            ids[5]: "malformed",
        }
        assert latest_states(tap)[ids[0]].applied_generation == 0
        # the applied document redelivered on reconnect is not a refusal; the session grows
        publish_all(tap, {ids[2]: applied})
        time.sleep(0.3)
        before = len(events(tap, "desired.refused"))
        assert before == 6
        sim.set_offline([ids[2]], True, offline_for=0.2)
        tap.wait_for(
            lambda t: any(
                b.device_id == ids[2] and b.session == 2 for b in of(t, Kind.BIRTH, Birth)
            ),
            15,
            "a second session",
        )
        time.sleep(0.5)
        assert len(events(tap, "desired.refused")) == before
        wills = [
            s
            for s in of(tap, Kind.STATUS, Status)
            if s.device_id == ids[2] and s.state == "offline"
        ]
        assert [(w.session, w.seq) for w in wills] == [(1, None)]


def test_fail_apply_is_exactly_the_planned_share(broker: MosquittoBroker) -> None:
    failures = Failures(fail_apply=0.2, fail_code="hash_mismatch")
    with mqtt_tap(broker, UP_ALL) as tap, simulation(broker, 50, seed=3, failures=failures) as sim:
        assert sim.wait_connected(30)
        planned = set(sim.chosen("fail_apply"))
        assert len(planned) == 10
        publish_all(tap, {d: document(d, 1) for d in sim.device_ids})
        assert sim.wait_for(lambda s: s.applies_ok + s.applies_failed == 50, 30)
        tap.wait_for(lambda t: len(events(t, "update.failed")) == 10, 10, "10 failures")
        failed = events(tap, "update.failed")
        assert {e.device_id for e in failed} == planned
        assert {e.data["code"] for e in failed} == {"hash_mismatch"}
        tap.wait_for(
            lambda t: (
                sum(s.phase == "failed" for s in latest_states(t).values()) == 10
                and sum(s.phase == "committed" for s in latest_states(t).values()) == 40
            ),
            10,
            "final states",
        )
        states = latest_states(tap)
        for device_id in planned:
            state = states[device_id]
            assert (state.applied_generation, state.phase) == (0, "failed")
            assert state.last_error is not None and state.last_error.code == "hash_mismatch"
        assert all(states[d].applied_generation == 1 for d in set(sim.device_ids) - planned)
        assert sim.stats().generations == {0: 10, 1: 40}


def test_crash_on_version_fails_the_smoke_test_and_keeps_the_old_set(
    broker: MosquittoBroker,
) -> None:
    failures = Failures(crash_version="2.0.0", crash=0.5)
    with mqtt_tap(broker, UP_ALL) as tap, simulation(broker, 20, failures=failures) as sim:
        assert sim.wait_connected(30)
        publish_all(tap, {d: document(d, 1, version="1.0.0") for d in sim.device_ids})
        assert sim.wait_for(lambda s: s.commits == 20, 30)
        publish_all(
            tap,
            {d: document(d, 2, version="2.0.0", models=models_of("2.0.0")) for d in sim.device_ids},
        )
        assert sim.wait_for(lambda s: s.applies_failed == 10 and s.commits == 30, 30), sim.stats()
        failed = events(tap, "update.failed")
        assert {e.device_id for e in failed} == set(sim.chosen("crash"))
        assert {(e.generation, e.data["code"], e.data["serving"]) for e in failed} == {
            (2, "smoke_test_error", 1)
        }
        assert sim.stats().versions == {"1.0.0": 10, "2.0.0": 10}
        # the hub rolls back with a new generation of the old content: adopted, no apply
        crashed = sim.chosen("crash")
        publish_all(tap, {d: document(d, 3, version="1.0.0") for d in crashed})
        tap.wait_for(
            lambda t: all(
                (latest_states(t)[d].applied_generation, latest_states(t)[d].phase)
                == (3, "committed")
                for d in crashed
            ),
            10,
            "generation 3 adopted",
        )
        assert sim.stats().applies_ok == 30  # no new apply


def test_slow_share_reports_three_times_the_latency(broker: MosquittoBroker) -> None:
    failures = Failures(slow=0.5, slow_factor=3.0, slow_version="2.0.0")
    with (
        mqtt_tap(broker, UP_ALL) as tap,
        simulation(
            broker,
            10,
            profiles={"raspberry-pi-4-4gb": 1},
            failures=failures,
            telemetry_interval_s=0.2,
            request_rate=50.0,
        ) as sim,
    ):
        assert sim.wait_connected(30)
        slow = set(sim.chosen("slow"))
        assert len(slow) == 5

        def p95s(version: str) -> dict[bool, list[float]]:
            out: dict[bool, list[float]] = {True: [], False: []}
            for t in of(tap, Kind.TELEMETRY, Telemetry):
                det = t.models.get("det")
                if det and det.version == version and det.latency_ms:
                    out[t.device_id in slow].append(det.latency_ms.p95)
            return out

        def ratio(version: str) -> float:
            values = p95s(version)
            return (sum(values[True]) / len(values[True])) / (
                sum(values[False]) / len(values[False])
            )

        for generation, version in ((1, "1.0.0"), (2, "2.0.0")):
            publish_all(
                tap,
                {
                    d: document(d, generation, version=version, models=models_of(version))
                    for d in sim.device_ids
                },
            )

            def enough(t: Tap, v: str = version) -> bool:
                return all(len(x) >= 10 for x in p95s(v).values())

            tap.wait_for(enough, 15, f"telemetry of {version}")
        assert 0.9 < ratio("1.0.0") < 1.1
        assert 2.7 < ratio("2.0.0") < 3.3


def test_probation_rolls_back_where_the_latency_limit_breaks(broker: MosquittoBroker) -> None:
    profile = load_profiles()["raspberry-pi-4-4gb"]
    normal_p95 = base_latency_ms("det", "int8", profile) * 1.6
    runtime = RuntimePolicy(
        probation_s=1.0,
        min_requests_for_probation=5,
        models={"det": ModelRuntime(max_latency_p95_ms=normal_p95 * 2)},
    )
    failures = Failures(slow=0.3, slow_version="2.0.0")
    with (
        mqtt_tap(broker, UP_ALL) as tap,
        simulation(
            broker, 10, profiles={"raspberry-pi-4-4gb": 1}, failures=failures, request_rate=20.0
        ) as sim,
    ):
        assert sim.wait_connected(30)
        publish_all(tap, {d: document(d, 1, runtime=runtime) for d in sim.device_ids})
        assert sim.wait_for(lambda s: s.commits == 10, 30)
        second = models_of("2.0.0")
        publish_all(
            tap,
            {
                d: document(d, 2, version="2.0.0", runtime=runtime, models=second)
                for d in sim.device_ids
            },
        )
        assert sim.wait_for(lambda s: s.commits == 17 and s.rollbacks == 3, 30), sim.stats()
        tap.wait_for(lambda t: len(events(t, "update.rolled_back")) == 3, 10, "3 rollbacks")
        rolled = events(tap, "update.rolled_back")
        assert {e.device_id for e in rolled} == set(sim.chosen("slow"))
        assert all(e.data["restored"] == 1 and "latency p95" in e.message for e in rolled)
        tap.wait_for(
            lambda t: all(latest_states(t)[d].phase == "rolled_back" for d in sim.chosen("slow")),
            10,
            "rolled-back states",
        )
        states = latest_states(tap)
        for device_id in sim.chosen("slow"):
            s = states[device_id]
            assert (s.applied_generation, s.phase, s.refused_generation) == (1, "rolled_back", 2)


def test_offline_devices_never_connect_or_drop_out(broker: MosquittoBroker) -> None:
    never = Failures(offline=0.3)
    with mqtt_tap(broker, UP_ALL) as tap, simulation(broker, 30, failures=never) as sim:
        assert sim.wait_connected(30)
        time.sleep(0.5)
        births = {b.device_id for b in of(tap, Kind.BIRTH, Birth)}
        assert births == set(sim.device_ids) - set(sim.chosen("offline"))
        assert sim.stats().connected == 21
    after = Failures(offline=0.5, offline_mode="after", offline_after_s=0.3, offline_for_s=0.5)
    with (
        mqtt_tap(broker, UP_ALL) as tap,
        simulation(broker, 10, failures=after, id_prefix="flap") as sim,
    ):
        flapping = set(sim.chosen("offline"))
        tap.wait_for(
            lambda t: {b.device_id for b in of(t, Kind.BIRTH, Birth) if b.session == 2} == flapping,
            15,
            "flapping devices back in session 2",
        )
        wills = {
            s.device_id
            for s in of(tap, Kind.STATUS, Status)
            if s.state == "offline" and s.session == 1 and s.device_id.startswith("flap-")
        }
        assert wills == flapping
        assert sim.stats().dropped_on_purpose == 5


def test_offline_on_update_goes_away_mid_rollout_and_applies_later(
    broker: MosquittoBroker,
) -> None:
    failures = Failures(offline=0.5, offline_mode="on_update", offline_for_s=0.5)
    with mqtt_tap(broker, UP_ALL) as tap, simulation(broker, 10, failures=failures) as sim:
        assert sim.wait_connected(30)
        gone = set(sim.chosen("offline"))
        publish_all(tap, {d: document(d, 1) for d in sim.device_ids})
        tap.wait_for(
            lambda t: (
                {s.device_id for s in of(t, Kind.STATUS, Status) if s.state == "offline"} == gone
            ),
            10,
            "Wills of the devices gone mid-rollout",
        )
        assert sim.wait_for(lambda s: s.commits == 10, 30), sim.stats()
        second = {b.device_id for b in of(tap, Kind.BIRTH, Birth) if b.session == 2}
        assert second == gone


def test_rebirth_command_is_answered(broker: MosquittoBroker) -> None:
    with mqtt_tap(broker, UP_ALL) as tap, simulation(broker, 3) as sim:
        assert sim.wait_connected(30)
        device_id = sim.device_ids[0]
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.ResponseTopic = f"edgefleet/v1/dev/{device_id}/up/result"
        properties.CorrelationData = b"corr-1"
        cmd = Cmd(cmd_id="c1", command="rebirth", ts=time.time())
        tap.client.publish(
            down_topic(device_id, Kind.CMD), encode(cmd), qos=1, properties=properties
        ).wait_for_publish(5)
        tap.wait_for(
            lambda t: len([b for b in of(t, Kind.BIRTH, Birth) if b.device_id == device_id]) == 2,
            10,
            "a second birth",
        )
        results = of(tap, Kind.RESULT, CmdResult)
        assert [(r.cmd_id, r.ok) for r in results] == [("c1", True)]
        first, second = [b for b in of(tap, Kind.BIRTH, Birth) if b.device_id == device_id]
        assert second.session == first.session and second.seq > first.seq
        bad = Cmd(cmd_id="c2", command="dance", ts=time.time())
        tap.client.publish(down_topic(device_id, Kind.CMD), encode(bad), qos=1).wait_for_publish(5)
        tap.wait_for(lambda t: len(of(t, Kind.RESULT, CmdResult)) == 2, 10, "second result")
        refused = of(tap, Kind.RESULT, CmdResult)[1]
        assert not refused.ok and refused.error == "unknown command 'dance'"
        assert sim.stats().commands == 2


def test_stop_publishes_offline_for_everyone(broker: MosquittoBroker) -> None:
    sim = Simulation(config(broker, 200, threads=3))
    sim.start()
    assert sim.wait_connected(30)
    final = sim.stop()
    assert final.connected == 0
    statuses = retained(broker, up_filter(Kind.STATUS), 200)
    assert len(statuses) == 200
    bad = [s for s in statuses if not (isinstance(s, Status) and s.state == "offline" and s.seq)]
    assert not bad, bad
    assert sim.stop() is final  # idempotent


def test_devices_reconnect_after_the_broker_restarts(tmp_path: Path) -> None:
    first = MosquittoBroker(workdir=tmp_path / "first").start()
    second: MosquittoBroker | None = None
    try:
        with simulation(first, 50) as sim:
            assert sim.wait_connected(30)
            first.stop()
            assert sim.wait_for(lambda s: s.connected == 0, 10)
            second = MosquittoBroker(workdir=tmp_path / "second", port=first.port).start()
            with mqtt_tap(second, up_filter(Kind.BIRTH)) as tap:
                assert sim.wait_for(lambda s: s.connected == 50 and s.births == 100, 30)
                tap.wait_for(lambda t: len(t.received) == 50, 10, "50 births")
                # every attempt takes a new session number; refused ones while it was down too
                assert all(b.session >= 2 for b in of(tap, Kind.BIRTH, Birth))
            assert sim.stats().reconnects == 50
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_worker_processes(broker: MosquittoBroker) -> None:
    with (
        mqtt_tap(broker, UP_ALL) as tap,
        simulation(broker, 40, processes=2, failures=Failures(fail_apply=0.25)) as sim,
    ):
        assert sim.wait_connected(60)
        publish_all(tap, {d: document(d, 1) for d in sim.device_ids})
        assert sim.wait_for(lambda s: s.applies_ok == 30 and s.applies_failed == 10, 30)
        views = sim.devices()
        assert sorted(v.device_id for v in views) == sim.device_ids
        failed = {v.device_id for v in views if v.last_error_code == "fetch_error"}
        assert failed == set(sim.chosen("fail_apply"))
        assert sim.set_offline(sim.device_ids[:2]) == 2
        assert sim.wait_for(lambda s: s.connected == 38, 10)
    statuses = retained(broker, up_filter(Kind.STATUS), 40)
    assert {s.state for s in statuses} == {"offline"}


def test_isolated_single_worker(broker: MosquittoBroker) -> None:
    with simulation(broker, 5, isolate=True) as sim:
        assert sim.wait_connected(60)
        assert len(sim._workers) == 1
        assert sim.stats().births == 5
    assert sim.stats().connected == 0


def test_cli_runs_and_reports(broker: MosquittoBroker, tmp_path: Path) -> None:
    keys = tmp_path / "hub-keys.json"
    keys.write_text(json.dumps({"keys": [KEY.public.model_dump()]}))
    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)
    args = parser.parse_args(
        [
            *("--broker", broker.url, "--trust-keys", str(keys), "--devices", "20"),
            *("--profiles", "generic=1,raspberry-pi-4-4gb=1", "--fail-apply", "10%"),
            *("--duration", "1.5", "--report-interval", "0.5", "--json"),
        ]
    )
    assert args.handler is run_simulate
    out = io.StringIO()
    assert run_simulate(args, out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("simulating 20 devices (generic 10, raspberry-pi-4-4gb 10)")
    assert any("connected 20/20" in line for line in lines)
    final = json.loads(lines[-1])
    assert final["births"] == 20 and final["connected"] == 0
    bad = parser.parse_args(["--broker", broker.url, "--devices", "1"])
    with pytest.raises(SimulationError, match="trusted hub keys"):
        run_simulate(bad, io.StringIO())


def test_hub_cli_runs_from_hub_toml_until_interrupted(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    """``edgefleet-hub --config hub.toml simulate``: the broker and the keys come from the
    hub's files, two worker processes, SIGINT stops it and every device says offline."""
    assert build_parser().parse_args(["simulate", "--devices", "1"]).handler is run_simulate
    hub = init_hub(tmp_path / "hub", broker_url=broker.url)
    ring = Keyring(hub.config.keys_dir, hub.config.public_keys_path)
    command = [sys.executable, "-m", "hub.cli", "--config", str(hub.config_path)]
    command += ["simulate", "--devices", "30", "--processes", "2", "--report-interval", "0.3"]
    with mqtt_tap(broker, UP_ALL) as tap:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        try:
            assert process.stdout is not None
            lines = []
            for line in process.stdout:
                lines.append(line)
                if "connected 30/30" in line:
                    break
            assert "connected 30/30" in lines[-1], lines
            device_id = "sim-00017"  # in the second worker
            desired = document(device_id, 1, key=ring.signing_keys()[0])
            publish_all(tap, {device_id: desired})
            tap.wait_for(lambda t: events(t, "update.committed"), 15, "an applied document")
            process.send_signal(signal.SIGINT)
            rest = process.stdout.read()
            assert process.wait(30) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert "stopped: " in rest and "g1:1" in rest
    statuses = retained(broker, up_filter(Kind.STATUS), 30)
    assert {s.state for s in statuses} == {"offline"}


def test_scale_smoke_1000_devices(broker: MosquittoBroker) -> None:
    """1000 devices connect and say their birth; prints connects/s and messages/s."""
    received = [0]
    hub = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id="scale-counter",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    hub.on_message = lambda c, u, m: received.__setitem__(0, received[0] + 1)
    hub.connect(broker.host, broker.port)
    hub.subscribe(UP_ALL, 1)
    hub.loop_start()
    try:
        started = time.monotonic()
        with simulation(broker, 1000, connect_rate=2000.0, telemetry_interval_s=1.0) as sim:
            assert sim.wait_connected(60), sim.stats()
            ramp = time.monotonic() - started
            # device sockets sit above descriptor 1024: select()-based clients in this
            # process (this counter's paho loop_start) keep working beside the fleet
            high = [int(fd) for fd in os.listdir("/proc/self/fd") if int(fd) >= 1024]
            assert len(high) >= 1000
            stats = sim.stats()
            before, t0 = stats.published, time.monotonic()
            time.sleep(3.0)
            steady = (sim.stats().published - before) / (time.monotonic() - t0)
        print(
            f"\nsimulator: 1000 devices connected and born in {ramp:.2f}s "
            f"({1000 / ramp:.0f} connects/s, loop ramp {stats.ramp_s:.2f}s); "
            f"steady telemetry {steady:.0f} msg/s published; "
            f"{received[0]} messages reached a subscriber"
        )
        assert steady > 500  # 1000 devices at 1 s telemetry
    finally:
        hub.disconnect()
        hub.loop_stop()
