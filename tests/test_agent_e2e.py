"""The agent end to end: a real broker, real OCR models over loopback HTTP, real sessions."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from agent.config import load_config
from agent.daemon import Agent
from contract.manifests import ModelRuntime, RuntimePolicy
from contract.messages import Birth, Event, State, Status, Telemetry
from contract.signing import SigningKey
from hub.broker import MosquittoBroker
from hub.demo import nan_model
from support.fleet import (
    Tap,
    agent_toml,
    desired_state,
    mqtt_tap,
    ocr_specs,
    sha256_of,
    signed,
    spec_for,
)
from support.http_server import ArtifactServer, Fault

DEVICE = "e2e-dev-1"


@dataclass
class Rig:
    agent: Agent
    tap: Tap
    files: ArtifactServer
    key: SigningKey
    models: dict[str, Path]
    tmp: Path

    @property
    def base_urls(self) -> list[str]:
        return [self.files.url("/artifacts")]

    def serve_file(self, path: Path, fault: Fault | None = None) -> None:
        self.files.add(f"/artifacts/{sha256_of(path)}", path, fault=fault)

    def states(self) -> list[State]:
        return [m for m in self.tap.messages("state") if isinstance(m, State)]

    def events(self) -> list[Event]:
        return [m for m in self.tap.messages("events") if isinstance(m, Event)]

    def wait_state(self, predicate: Any, what: str, timeout: float = 60.0) -> State:
        def check(tap: Tap) -> State | None:
            for state in reversed(self.states()):
                if predicate(state):
                    return state
            return None

        result: State = self.tap.wait_for(check, timeout, what)
        return result

    def wait_event(self, kind: str, generation: int, timeout: float = 60.0) -> Event:
        def check(tap: Tap) -> Event | None:
            for event in self.events():
                if event.kind == kind and event.generation == generation:
                    return event
            return None

        result: Event = self.tap.wait_for(check, timeout, f"event {kind} for {generation}")
        return result


@pytest.fixture
def rig(broker: MosquittoBroker, tmp_path: Path, ocr_models: dict[str, Path]) -> Iterator[Rig]:
    key = SigningKey.generate()
    config_path = tmp_path / "agent.toml"
    config_path.write_text(
        agent_toml(device_id=DEVICE, broker=broker, state_dir=tmp_path / "state", key=key)
        + "\n[artifacts]\nupdate_retry_s = 0.5\nupdate_retry_max_s = 1.0\n"
    )
    config = load_config(config_path, {})
    with (
        ArtifactServer() as files,
        mqtt_tap(broker, f"edgefleet/v1/dev/{DEVICE}/up/#") as tap,
    ):
        for path in ocr_models.values():
            files.add(f"/artifacts/{sha256_of(path)}", path)
        agent = Agent(config, environ={})
        agent.start()
        try:
            yield Rig(agent, tap, files, key, ocr_models, tmp_path)
        finally:
            agent.stop()


def ocr_input(name: str) -> np.ndarray:
    shapes = {"det": (1, 3, 320, 320), "cls": (1, 3, 48, 192), "rec": (1, 3, 48, 320)}
    return np.random.default_rng(7).random(shapes[name], dtype=np.float32)


def test_birth_and_online_status_on_connect(rig: Rig) -> None:
    births = rig.tap.wait_for(lambda t: t.messages("birth"), 20, "birth")
    birth = births[-1]
    assert isinstance(birth, Birth)
    assert birth.device_id == DEVICE
    assert birth.profile.name == "generic"
    assert birth.profile_source == "override"
    assert birth.facts.cpu_count >= 1
    statuses = [m for m in rig.tap.messages("status") if isinstance(m, Status)]
    assert statuses and statuses[-1].state == "online"
    assert statuses[-1].session == birth.session


def test_apply_serve_report_and_refuse(rig: Rig) -> None:
    rig.tap.wait_for(lambda t: t.messages("birth"), 20, "birth")
    specs = ocr_specs(rig.models)
    rig.tap.publish_desired(
        DEVICE, signed(desired_state(DEVICE, 1, specs, base_urls=rig.base_urls), rig.key)
    )

    state = rig.wait_state(
        lambda s: s.applied_generation == 1 and s.phase == "committed", "generation 1 committed"
    )
    assert sorted(m.name for m in state.models if m.ready) == ["cls", "det", "rec"]
    rig.wait_event("update.activated", 1)

    # The models answer in-process, exactly as ONNX Runtime does on the same input.
    for name, path in rig.models.items():
        x = ocr_input(name)
        served = rig.agent.host.infer(name, {"x": x})
        raw = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            None, {"x": x}
        )
        np.testing.assert_array_equal(next(iter(served.values())), raw[0])

    telemetry = rig.tap.wait_for(
        lambda t: [m for m in t.messages("telemetry") if isinstance(m, Telemetry) and m.models],
        30,
        "telemetry with models",
    )[-1]
    assert set(telemetry.models) == {"cls", "det", "rec"}
    assert telemetry.agent.applied_generation == 1
    assert telemetry.system.memory_available_mb > 0

    def refused(generation: int, payload: bytes, code: str) -> None:
        rig.tap.publish_desired(DEVICE, payload)
        event = rig.wait_event("desired.refused", generation)
        assert event.data["code"] == code, event
        assert rig.agent.applier.applied_generation == 1

    # Bad signature: signed by a key the device does not trust.
    intruder = SigningKey.generate()
    refused(
        2, signed(desired_state(DEVICE, 2, specs, base_urls=rig.base_urls), intruder), "unknown_key"
    )
    # The applied generation again, with other content.
    refused(
        1,
        signed(desired_state(DEVICE, 1, specs[:1], base_urls=rig.base_urls), rig.key),
        "stale_generation",
    )
    # Expired.
    expired = desired_state(DEVICE, 3, specs, base_urls=rig.base_urls, now=time.time() - 7200)
    refused(3, signed(expired, rig.key), "expired")

    def failed(generation: int, specs_: list[Any], code_part: str) -> None:
        doc = desired_state(DEVICE, generation, specs_, base_urls=rig.base_urls)
        rig.tap.publish_desired(DEVICE, signed(doc, rig.key))
        event = rig.wait_event("update.failed", generation)
        assert event.data["code"] == code_part, event
        assert rig.agent.applier.applied_generation == 1
        assert rig.agent.host.infer("cls", {"x": ocr_input("cls")})

    # Hash mismatch: the server has other bytes under the hash the document names.
    garbage = rig.tmp / "garbage.onnx"
    garbage.write_bytes(b"\0" * 4096)
    padded = rig.tmp / "padded.onnx"
    padded.write_bytes(rig.models["cls"].read_bytes() + b"\1" * 512)
    wrong = spec_for("cls", padded, version="2.0.0", hints={"x": [1, 3, 48, 192]})
    rig.serve_file(padded, Fault(body=b"x" * padded.stat().st_size))
    failed(4, [wrong], "hash_mismatch")
    # Truncated download: the server announces and sends only half of the file.
    blob = rig.tmp / "blob.onnx"
    blob.write_bytes(rig.models["cls"].read_bytes() + b"\0" * 1024)
    half = spec_for("cls", blob, version="2.1.0", hints={"x": [1, 3, 48, 192]})
    rig.serve_file(blob, Fault(body=blob.read_bytes()[: blob.stat().st_size // 2]))
    failed(5, [half], "size_mismatch")
    # A model that fails to load.
    rig.serve_file(garbage)
    failed(6, [spec_for("cls", garbage, version="3.0.0")], "model_load_error")
    # A model whose output is NaN.
    nan = nan_model(rig.tmp / "nan.onnx")
    rig.serve_file(nan)
    failed(7, [spec_for("cls", nan, version="4.0.0")], "smoke_test_error")

    final = rig.wait_state(
        lambda s: s.last_error is not None and s.last_error.generation == 7, "state after failures"
    )
    assert final.applied_generation == 1
    assert sorted(m.name for m in final.models if m.ready) == ["cls", "det", "rec"]
    # none of these failures can pass on its own: none is tried again
    assert not [e for e in rig.events() if e.kind == "update.retry_scheduled"]


def test_an_update_that_failed_for_a_passing_reason_is_tried_again(rig: Rig) -> None:
    """The artifact server answers 503 until the downloader gives up: the generation fails
    with fetch_error, and the agent tries the same document again later, unasked."""
    rig.tap.wait_for(lambda t: t.messages("birth"), 20, "birth")
    cls_path = rig.models["cls"]
    down = Fault(status=503)
    rig.files.push_faults(f"/artifacts/{sha256_of(cls_path)}", *([down] * 4))
    doc = desired_state(DEVICE, 1, ocr_specs(rig.models), base_urls=rig.base_urls)
    rig.tap.publish_desired(DEVICE, signed(doc, rig.key))

    failed = rig.wait_event("update.failed", 1)
    assert failed.data["code"] == "fetch_error", failed
    scheduled = rig.wait_event("update.retry_scheduled", 1)
    assert scheduled.data == {"code": "fetch_error", "retry_in_s": 0.5}
    state = rig.wait_state(
        lambda s: s.applied_generation == 1 and s.phase == "committed", "generation 1 committed"
    )
    assert sorted(m.name for m in state.models if m.ready) == ["cls", "det", "rec"]
    assert [e.kind for e in rig.events() if e.generation == 1].count("update.started") == 2


def test_probation_breach_rolls_back_and_refuses(rig: Rig) -> None:
    rig.tap.wait_for(lambda t: t.messages("birth"), 20, "birth")
    specs = ocr_specs({"cls": rig.models["cls"]})
    rig.tap.publish_desired(
        DEVICE, signed(desired_state(DEVICE, 1, specs, base_urls=rig.base_urls), rig.key)
    )
    rig.wait_state(lambda s: s.applied_generation == 1 and s.phase == "committed", "gen 1")

    strict = RuntimePolicy(
        probation_s=120,
        telemetry_interval_s=1.0,
        min_requests_for_probation=5,
        models={"cls": ModelRuntime(max_latency_p95_ms=0.001)},
    )
    v2 = ocr_specs({"cls": rig.models["cls"]}, version="2.0.0")
    doc = desired_state(DEVICE, 2, v2, base_urls=rig.base_urls, runtime=strict)
    rig.tap.publish_desired(DEVICE, signed(doc, rig.key))
    rig.wait_state(
        lambda s: s.applied_generation == 2 and s.phase == "probation", "gen 2 on probation"
    )
    for _ in range(10):
        rig.agent.host.infer("cls", {"x": ocr_input("cls")})
    rig.wait_event("update.rolled_back", 2)
    state = rig.wait_state(lambda s: s.phase == "rolled_back", "rolled back")
    assert state.applied_generation == 1
    assert state.refused_generation == 2
    assert rig.agent.host.table["cls"].version == "1.0.0"

    # The same generation again is refused; a newer one is applied.
    rig.tap.publish_desired(DEVICE, signed(doc, rig.key))
    assert rig.wait_event("desired.refused", 2).data["code"] in ("rolled_back", "stale_generation")
    relaxed = desired_state(DEVICE, 3, v2, base_urls=rig.base_urls)
    rig.tap.publish_desired(DEVICE, signed(relaxed, rig.key))
    rig.wait_state(lambda s: s.applied_generation == 3 and s.phase == "committed", "gen 3")


def test_an_empty_model_set_unloads_everything(rig: Rig) -> None:
    rig.tap.wait_for(lambda t: t.messages("birth"), 20, "birth")
    specs = ocr_specs({"cls": rig.models["cls"]})
    rig.tap.publish_desired(
        DEVICE, signed(desired_state(DEVICE, 1, specs, base_urls=rig.base_urls), rig.key)
    )
    rig.wait_state(lambda s: s.applied_generation == 1, "generation 1")
    rig.tap.publish_desired(DEVICE, signed(desired_state(DEVICE, 2, []), rig.key))
    state = rig.wait_state(
        lambda s: s.applied_generation == 2 and s.phase == "committed", "generation 2"
    )
    assert state.models == []
    assert dict(rig.agent.host.table) == {}
