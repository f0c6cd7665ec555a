"""The compromised-broker matrix: an attacker who owns the broker publishes on the device's
``down/`` topics and serves the artifacts, and the device never installs or downgrades.

Each test starts an agent on a private mosquitto, applies generation 1 (the OCR direction
classifier, ``cls``) and then attacks it the way a broker owner can: publish anything,
retained, on ``down/desired`` and ``down/cmd``, and replay every genuine document the hub
ever published (a broker sees them all). What the attacker cannot do is sign: the hub's
private key is not on the broker. Each case checks the three outcomes the threat model
promises: the document or artifact is refused, the refusal is reported as an event
(``desired.refused`` or ``update.failed`` with its code), and the device keeps serving the
generation it had (the applied generation is unchanged and ``cls`` still answers).

Run: ``pytest tests/test_compromised_broker.py``; docs/security.md tables the cases.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import contract.messages
from agent.config import load_config
from agent.daemon import Agent
from contract.manifests import ModelSpec
from contract.messages import (
    DESIRED_MAX_BYTES,
    Cmd,
    CmdResult,
    Desired,
    DesiredState,
    Event,
    State,
    encode,
)
from contract.signing import SigningKey
from contract.topics import Kind, down_topic
from hub.broker import MosquittoBroker
from support.fake_broker import FakeBroker, publish_v5
from support.fleet import Tap, agent_toml, desired_state, mqtt_tap, sha256_of, signed, spec_for
from support.http_server import ArtifactServer, Fault

DEVICE = "victim-1"
DESIRED = down_topic(DEVICE, Kind.DESIRED)
CMD = down_topic(DEVICE, Kind.CMD)
CLS_HINTS = {"x": [1, 3, 48, 192]}
WAIT_S = 60.0


def cls_input() -> np.ndarray[Any, Any]:
    return np.random.default_rng(3).random((1, 3, 48, 192), dtype=np.float32)


@dataclass
class Rig:
    agent: Agent
    tap: Tap
    files: ArtifactServer
    key: SigningKey
    """The hub's signing key the device trusts now."""
    cls: Path
    tmp: Path
    applied: int = 0
    issued: dict[int, bytes] = field(default_factory=dict)
    """Every genuine document the hub published, by generation: the broker saw them all."""

    # -- the hub's side --

    @property
    def base_urls(self) -> list[str]:
        return [self.files.url("/artifacts")]

    def cls_spec(self, version: str = "1.0.0", **changes: Any) -> ModelSpec:
        changes.setdefault("memory_mb", 20)
        return spec_for("cls", self.cls, version=version, hints=CLS_HINTS, **changes)

    def state(
        self, generation: int, models: list[ModelSpec] | None = None, **changes: Any
    ) -> DesiredState:
        """A desired state for this device; ``changes``: desired_state's keywords, or
        fields of the state (``trusted_keys``)."""
        fields = {k: changes.pop(k) for k in list(changes) if k in DesiredState.model_fields}
        models = [self.cls_spec()] if models is None else models
        state = desired_state(DEVICE, generation, models, base_urls=self.base_urls, **changes)
        return state.model_copy(update=fields)

    def sign(self, state: DesiredState, *keys: SigningKey) -> bytes:
        payload = signed(state, *(keys or (self.key,)))
        self.issued.setdefault(state.generation, payload)
        return payload

    def serve(self, path: Path, fault: Fault | None = None) -> str:
        """Serve ``path`` by its hash (with ``fault``); returns the URL path."""
        route = f"/artifacts/{sha256_of(path)}"
        self.files.add(route, path, fault=fault)
        return route

    def apply(self, payload: bytes, generation: int) -> State:
        """Publish a genuine document and wait until the device serves it."""
        self.tap.publish(DESIRED, payload, retain=True)
        state = self.wait_state(
            lambda s: s.applied_generation == generation and s.phase == "committed",
            f"generation {generation} committed",
        )
        self.applied = generation
        return state

    # -- the attacker's side --

    def attack(self, payload: bytes, topic: str = DESIRED) -> int:
        """Publish ``payload`` (retained on down/desired, as a broker owner can); returns a
        mark for the messages that follow."""
        mark = self.mark()
        self.tap.publish(topic, payload, retain=topic == DESIRED)
        return mark

    # -- what the device says --

    def mark(self) -> int:
        with self.tap.lock:
            return len(self.tap.received)

    def events_since(self, mark: int) -> list[Event]:
        with self.tap.lock:
            items = self.tap.received[mark:]
        return [i.message for i in items if isinstance(i.message, Event)]

    def wait_event(self, mark: int, kind: str, timeout: float = WAIT_S) -> Event:
        def check(tap: Tap) -> Event | None:
            return next((e for e in self.events_since(mark) if e.kind == kind), None)

        event: Event = self.tap.wait_for(check, timeout, f"event {kind}")
        return event

    def wait_state(self, predicate: Callable[[State], bool], what: str) -> State:
        def check(tap: Tap) -> State | None:
            states = [m for m in tap.messages("state") if isinstance(m, State)]
            return states[-1] if states and predicate(states[-1]) else None

        state: State = self.tap.wait_for(check, WAIT_S, what)
        return state

    def assert_serving(self) -> None:
        """The device still serves the generation it had, and ``cls`` answers."""
        assert self.agent.applier.applied_generation == self.applied
        assert self.agent.state.last_applied() == self.applied
        outputs = self.agent.host.infer("cls", {"x": cls_input()})
        assert next(iter(outputs.values())).shape == (1, 2)
        self.wait_state(
            lambda s: s.applied_generation == self.applied and s.phase != "staging",
            f"state still at generation {self.applied}",
        )

    def refused(self, payload: bytes, code: str, generation: int | None) -> Event:
        """The attack is refused with ``code``, reported as an event; the device serves on."""
        before = self.agent.dropped_messages.get(f"desired_{code}", 0)
        event = self.wait_event(self.attack(payload), "desired.refused")
        assert event.data["code"] == code, event
        assert event.generation == generation, event
        assert self.agent.dropped_messages.get(f"desired_{code}", 0) == before + 1
        self.assert_serving()
        return event

    def failed(self, payload: bytes, code: str, generation: int) -> Event:
        """A genuine document whose artifacts betray it: update.failed, the old set serves."""
        event = self.wait_event(self.attack(payload), "update.failed")
        assert event.data["code"] == code, event
        assert event.generation == generation, event
        assert event.data["serving"] == self.applied, event
        state = self.wait_state(
            lambda s: s.last_error is not None and s.last_error.generation == generation,
            f"state reporting the failure of {generation}",
        )
        assert state.last_error is not None and state.last_error.code == code
        self.assert_serving()
        return event


@pytest.fixture
def rig(broker: MosquittoBroker, tmp_path: Path, ocr_models: dict[str, Path]) -> Iterator[Rig]:
    key = SigningKey.generate()
    config_path = tmp_path / "agent.toml"
    config_path.write_text(
        agent_toml(device_id=DEVICE, broker=broker, state_dir=tmp_path / "state", key=key)
    )
    config = load_config(config_path, {})
    with (
        ArtifactServer() as files,
        mqtt_tap(broker, f"edgefleet/v1/dev/{DEVICE}/up/#") as tap,
    ):
        agent = Agent(config, environ={})
        agent.start()
        try:
            rig = Rig(agent, tap, files, key, ocr_models["cls"], tmp_path)
            rig.serve(rig.cls)
            tap.wait_for(lambda t: t.messages("birth"), 20, "birth")
            rig.apply(rig.sign(rig.state(1)), 1)
            rig.assert_serving()
            yield rig
        finally:
            agent.stop()


def envelope(payload: bytes) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(payload)
    return doc


# --- the matrix ----------------------------------------------------------------------------


def test_unsigned_document_is_refused(rig: Rig) -> None:
    unsigned = encode(Desired(payload=rig.state(2), signatures=[]))
    rig.refused(unsigned, "missing_signature", 2)


def test_document_signed_by_an_unknown_key_is_refused(rig: Rig) -> None:
    attacker = SigningKey.generate()
    rig.refused(signed(rig.state(2), attacker), "unknown_key", 2)


def test_tampered_payload_or_signature_is_refused(rig: Rig) -> None:
    genuine = rig.sign(rig.state(2))
    # One byte of the payload changed after signing: the model set's name.
    assert genuine.count(b'"name":"ocr"') == 1
    rig.refused(genuine.replace(b'"name":"ocr"', b'"name":"ocs"'), "bad_signature", 2)
    # The signature itself damaged (first base64 character changed).
    doc = envelope(genuine)
    sig = doc["signatures"][0]["sig"]
    doc["signatures"][0]["sig"] = ("B" if sig[0] == "A" else "A") + sig[1:]
    rig.refused(json.dumps(doc).encode(), "bad_signature", 2)


def test_replayed_older_generation_is_refused(rig: Rig) -> None:
    rig.apply(rig.sign(rig.state(2, [rig.cls_spec("1.1.0")])), 2)
    # The hub's genuine generation 1, replayed: a downgrade attempt.
    rig.refused(rig.issued[1], "stale_generation", 1)
    assert rig.agent.host.table["cls"].version == "1.1.0"
    # The applied document itself, replayed (what a retained redelivery looks like), is a
    # no-op: no refusal, no reload. A garbage message after it proves the worker got there.
    mark = rig.attack(rig.issued[2])
    rig.wait_event(rig.attack(b"not json"), "desired.refused")
    assert [e.generation for e in rig.events_since(mark)] == [None]
    rig.assert_serving()


def test_expired_document_is_refused(rig: Rig) -> None:
    # The hub issued generation 2 with a short validity; the attacker held it back (a broker
    # can delay delivery) and releases it once it has expired.
    withheld = rig.sign(rig.state(2, validity_s=1.0))
    time.sleep(1.2)
    rig.refused(withheld, "expired", 2)


def test_same_generation_with_other_content_is_refused(rig: Rig) -> None:
    # The attacker cannot sign, so "generation 1 with other content" is either the applied
    # document edited (the signature no longer matches) ...
    doc = envelope(rig.issued[1])
    doc["payload"]["models"] = []
    rig.refused(json.dumps(doc).encode(), "bad_signature", 1)
    # ... or a second genuine document the hub signed for the same generation (a hub restored
    # from an old backup re-issues generation numbers): it is not newer, so it is refused.
    other = signed(rig.state(1, [rig.cls_spec("9.9.9")]), rig.key)
    rig.refused(other, "stale_generation", 1)
    assert rig.agent.host.table["cls"].version == "1.0.0"


def test_valid_signature_from_a_retired_key_is_refused(rig: Rig) -> None:
    old, new = rig.key, SigningKey.generate()
    # Rotation: generation 2, signed by the old key, names the new key as the only one.
    rig.apply(rig.sign(rig.state(2, trusted_keys=[new.public])), 2)
    assert rig.agent.state.trusted_keys() == [new.public.model_dump()]
    rig.key = new
    # A genuine signature by the retired key (stolen, or the hub's old key) is refused ...
    rig.refused(signed(rig.state(3, [rig.cls_spec("3.0.0")]), old), "unknown_key", 3)
    # ... while the new key's documents apply.
    rig.apply(rig.sign(rig.state(3)), 3)
    rig.assert_serving()


def test_swapped_artifact_is_refused(rig: Rig) -> None:
    # The hub's artifact for generation 2 (cls with trailing bytes), served by the attacker
    # with other bytes of the same length under its hash.
    genuine = rig.tmp / "cls-2.onnx"
    genuine.write_bytes(rig.cls.read_bytes() + b"\1" * 512)
    size = genuine.stat().st_size
    rig.serve(genuine, Fault(body=b"\x66" * size))
    spec = spec_for("cls", genuine, version="2.0.0", hints=CLS_HINTS, memory_mb=20)
    rig.failed(rig.sign(rig.state(2, [spec])), "hash_mismatch", 2)

    # The hash in the document cannot be swapped instead: it is signed.
    payload = rig.sign(rig.state(3, [spec.model_copy(update={"version": "3.0.0"})]))
    evil = rig.tmp / "evil.onnx"
    evil.write_bytes(b"\x66" * size)
    evil_route = rig.serve(evil)
    doc = envelope(payload)
    doc["payload"]["models"][0]["variants"][0]["artifact"]["sha256"] = sha256_of(evil)
    rig.refused(json.dumps(doc).encode(), "bad_signature", 3)
    assert rig.files.requests_for(evil_route) == [], "nothing is fetched for a refused document"


def other_cls(rig: Rig, name: str) -> Path:
    """A valid model with another hash: the classifier with another doc string."""
    model = onnx.load(str(rig.cls))
    model.doc_string = name
    path = rig.tmp / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def test_truncated_or_extended_artifact_is_refused(rig: Rig) -> None:
    blob = other_cls(rig, "cls-2")
    spec = spec_for("cls", blob, version="2.0.0", hints=CLS_HINTS, memory_mb=20)
    # Truncated: the right hash announced, half of the bytes served (and announced).
    rig.serve(blob, Fault(body=blob.read_bytes()[: blob.stat().st_size // 2]))
    rig.failed(rig.sign(rig.state(2, [spec])), "size_mismatch", 2)
    # Extended: the whole file and then more bytes.
    rig.serve(blob, Fault(extra=b"\0" * 4096))
    rig.failed(rig.sign(rig.state(3, [spec])), "size_mismatch", 3)


def test_cut_downloads_resume_and_are_verified(rig: Rig) -> None:
    # Every connection cut after a third of what it announced: the device resumes with
    # Range requests, verifies the whole, and only then loads it (an attacker on the path
    # can slow an update, not corrupt it).
    blob = other_cls(rig, "cls-3")
    route = rig.serve(blob, Fault(cut_after=blob.stat().st_size // 3))
    spec = spec_for("cls", blob, version="3.0.0", hints=CLS_HINTS, memory_mb=20)
    rig.apply(rig.sign(rig.state(2, [spec])), 2)
    requests = rig.files.requests_for(route)
    assert len(requests) >= 3, requests
    assert all("Range" in r.headers for r in requests[1:]), requests
    assert rig.agent.host.table["cls"].version == "3.0.0"
    rig.assert_serving()


def test_model_over_the_memory_budget_is_not_loaded(rig: Rig) -> None:
    # A genuine document whose only model needs more memory than the profile allows
    # (generic: 256 MB): nothing fits, the update fails and generation 1 serves on.
    greedy = rig.cls_spec("2.0.0", memory_mb=1_000_000)
    event = rig.failed(rig.sign(rig.state(2, [greedy])), "nothing_fits", 2)
    assert "does not fit" in event.message or "needs" in event.message, event.message

    # Beside a model that fits, the greedy one is left out (and never downloaded); the rest
    # is applied and the state says why the greedy one is not ready.
    huge = rig.tmp / "huge.onnx"
    huge.write_bytes(rig.cls.read_bytes() + b"\2" * 64)
    huge_route = rig.serve(huge)
    big = spec_for("big", huge, version="1.0.0", memory_mb=1_000_000)
    state = rig.apply(rig.sign(rig.state(3, [rig.cls_spec(), big])), 3)
    report = {m.name: m for m in state.models}
    assert report["cls"].ready
    assert not report["big"].ready
    assert report["big"].reason is not None and "does_not_fit_memory" in report["big"].reason
    assert rig.files.requests_for(huge_route) == []
    rig.assert_serving()


def test_huge_payload_is_refused_before_parsing(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[int] = []
    parse = contract.messages._parse_json

    def recording(payload: bytes) -> Any:
        parsed.append(len(payload))
        return parse(payload)

    monkeypatch.setattr(contract.messages, "_parse_json", recording)
    # Even genuinely signed: the size limit comes first.
    doc = envelope(rig.sign(rig.state(2)))
    doc["payload"]["padding"] = "x" * DESIRED_MAX_BYTES
    doc["signatures"] = [rig.key.sign(doc["payload"]).model_dump()]
    payload = json.dumps(doc).encode()
    assert len(payload) > DESIRED_MAX_BYTES
    event = rig.refused(payload, "malformed", None)
    assert "exceeds the limit" in event.message, event.message
    assert all(n <= DESIRED_MAX_BYTES for n in parsed), parsed


def test_a_packet_above_the_announced_maximum_is_reported_in_the_telemetry(
    tmp_path: Path,
) -> None:
    """A broker that ignores the agent's Maximum Packet Size: the daemon ends the connection
    unread, connects again, and its next telemetry says so upstream."""
    hostile = publish_v5(DESIRED, b"x" * 100, announced=64 << 20)
    fake = FakeBroker(levels=frozenset({5}), pushes=[hostile])
    key = SigningKey.generate()
    config_path = tmp_path / "agent.toml"
    config_path.write_text(
        agent_toml(device_id=DEVICE, broker=fake, state_dir=tmp_path / "state", key=key)
    )
    agent = Agent(load_config(config_path, {}), environ={})
    agent.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while agent.link.counters.connects < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert agent.link.counters.oversized == 1
        assert agent.link.counters.connects >= 2
        agent.publish_telemetry()
        sent: list[dict[str, Any]] = []
        while not sent and time.monotonic() < deadline:
            time.sleep(0.05)
            sent = [json.loads(p) for t, p in fake.published if t.endswith("/up/telemetry")]
        assert sent, "no telemetry reached the broker"
        assert sent[-1]["link"]["incoming_dropped"] == {"too_large": 1}
    finally:
        agent.stop()
        fake.close()


def test_another_devices_document_is_refused(rig: Rig) -> None:
    # A genuine document for another device, copied onto this device's topic.
    theirs = desired_state("neighbour-7", 2, [rig.cls_spec("2.0.0")], base_urls=rig.base_urls)
    rig.refused(signed(theirs, rig.key), "wrong_device", 2)


def test_garbage_and_unknown_schema_majors_are_dropped_and_counted(rig: Rig) -> None:
    genuine = envelope(rig.sign(rig.state(2)))
    genuine["schema"] = "edgefleet.desired/2"
    for payload in (b"\xff\xfe\x00garbage", b"{", b"[]", json.dumps(genuine).encode()):
        event = rig.refused(payload, "malformed", None)
    assert "not supported" in event.message, event.message

    counted = rig.agent.dropped_messages
    cmd_v2 = {"schema": "edgefleet.cmd/2", "cmd_id": "c-1", "command": "rebirth", "ts": 0}
    rig.attack(b"\x00garbage", CMD)
    rig.attack(json.dumps(cmd_v2).encode(), CMD)
    rig.tap.wait_for(
        lambda t: counted.get("cmd_decode") == 1 and counted.get("cmd_schema_version") == 1,
        20,
        "both commands counted",
    )
    # The worker is alive: a genuine command is answered, a genuine generation applied.
    rig.attack(encode(Cmd(cmd_id="c-2", command="rebirth", ts=time.time())), CMD)
    rig.tap.wait_for(
        lambda t: any(isinstance(m, CmdResult) and m.cmd_id == "c-2" for m in t.messages("result")),
        20,
        "the rebirth result",
    )
    rig.apply(rig.sign(rig.state(2)), 2)
    rig.assert_serving()


def test_garbage_burst_is_counted_and_the_inbox_keeps_working(rig: Rig) -> None:
    """300 random payloads on down/desired and down/cmd as fast as the broker takes them:
    each is counted in dropped_messages by reason; nothing stops the worker."""
    rng = random.Random(8)
    burst = 300
    before = sum(rig.agent.dropped_messages.values())
    for index in range(burst):
        payload = rng.randbytes(rng.randint(1, 400))
        if index % 3 == 0:
            payload = b'{"schema":' + payload
        rig.attack(payload, DESIRED if index % 2 else CMD)
    rig.tap.wait_for(
        lambda t: sum(rig.agent.dropped_messages.values()) - before == burst,
        60,
        f"all {burst} counted (so far {rig.agent.dropped_messages})",
    )
    reasons = set(rig.agent.dropped_messages)
    assert reasons <= {"desired_malformed", "cmd_decode", "cmd_too_large", "inbox_full"}, reasons
    assert rig.agent.link.counters.callback_errors == 0
    # the counts go upstream with the telemetry
    assert rig.agent.telemetry().link.incoming_dropped == rig.agent.dropped_messages
    rig.apply(rig.sign(rig.state(2)), 2)
    rig.assert_serving()


def test_broker_cannot_order_a_rollback(rig: Rig) -> None:
    rig.apply(rig.sign(rig.state(2, [rig.cls_spec("2.0.0")])), 2)
    mark = rig.attack(encode(Cmd(cmd_id="r-1", command="rollback", ts=time.time())), CMD)
    rig.tap.wait_for(
        lambda t: any(isinstance(m, CmdResult) and m.cmd_id == "r-1" for m in t.messages("result")),
        20,
        "the rollback result",
    )
    assert not [e for e in rig.events_since(mark) if e.kind == "update.rolled_back"]
    rig.assert_serving()
