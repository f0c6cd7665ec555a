"""Wire messages: round trips, unknown fields kept, bad versions and sizes refused, typed errors."""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contract import messages
from contract.errors import (
    BadSignature,
    MessageDecodeError,
    MessageTooLarge,
    UnsupportedSchemaVersion,
    WireError,
)
from contract.manifests import ModelSetRef, ModelSpec, RuntimePolicy
from contract.messages import (
    DEFAULT_MAX_BYTES,
    DESIRED_MAX_BYTES,
    MESSAGE_TYPES,
    MESSAGES,
    TOPIC_MESSAGES,
    AgentStats,
    Birth,
    Cmd,
    CmdResult,
    Desired,
    DesiredState,
    Event,
    EventKind,
    HubState,
    Latency,
    LinkStats,
    Message,
    ModelReport,
    ModelStats,
    State,
    Status,
    SystemStats,
    Telemetry,
    decode,
    decode_for_topic,
    encode,
    message_for_topic,
    message_type,
    split_schema,
    topic_for,
)
from contract.profile import FirmwareProfile, HardwareFacts
from contract.signing import SigningKey, TrustedKeys
from contract.topics import HUB_STATE_TOPIC, Direction, Kind, down_topic, parse_topic, up_topic

DEVICE = "pi-001"
TS = 1_750_000_000.25
SHA = "ab" * 32

PROFILE = FirmwareProfile.model_validate(
    {
        "schema": "edgefleet.profile/1",
        "name": "raspberry-pi-4-4gb",
        "description": "Raspberry Pi 4 Model B, 4 GB",
        "match": {"architectures": ["aarch64"]},
        "budgets": {"model_memory_mb": 1024, "storage_mb": 4096, "threads": 4},
        "providers": ["CPUExecutionProvider"],
        "variant_preference": ["int8", "fp32"],
    }
)
MODEL_SPEC = ModelSpec.model_validate(
    {
        "name": "det",
        "version": "4.0",
        "priority": 10,
        "variants": [
            {
                "name": "det-int8",
                "precision": "int8",
                "artifact": {"sha256": SHA, "size": 4_700_000},
                "requires": {"memory_mb": 64},
            }
        ],
    }
)


def desired_state(**changes: Any) -> DesiredState:
    fields: dict[str, Any] = {
        "device_id": DEVICE,
        "generation": 7,
        "issued_at": TS,
        "expires_at": TS + 86_400,
        "model_set": ModelSetRef(name="ocr", version="1.2.0"),
        "models": [MODEL_SPEC],
        "runtime": RuntimePolicy(),
        "artifact_base_urls": ["https://hub.example/artifacts/"],
        "rollout": "ocr-1.2.0",
    }
    fields.update(changes)
    return DesiredState(**fields)


SIGNER = SigningKey.generate()


def samples() -> dict[str, Message]:
    """One valid message of every type."""
    common: dict[str, Any] = {"device_id": DEVICE, "session": 3, "ts": TS}
    return {
        "birth": Birth(
            **common,
            seq=0,
            agent_version="0.1.0",
            facts=HardwareFacts(architecture="aarch64", cpu_count=4, memory_total_mb=3796),
            profile=PROFILE,
            profile_source="detected",
            labels={"site": "lab"},
            capabilities=["rebirth", "benchmark"],
            inventory=[
                messages.InventoryItem(
                    model="det",
                    version="4.0",
                    variant="det-int8",
                    precision="int8",
                    provider="CPUExecutionProvider",
                    sha256=SHA,
                )
            ],
            applied_generation=6,
        ),
        "status": Status(**common, state="offline"),
        "telemetry": Telemetry(
            **common,
            seq=5,
            interval_s=10.0,
            system=SystemStats(
                cpu_percent=37.5,
                load_1=0.9,
                load_5=0.7,
                load_15=0.5,
                memory_used_mb=1200,
                memory_available_mb=2500,
                disk_free_mb=20_000,
                temperature_c=61.2,
                uptime_s=3600.0,
            ),
            agent=AgentStats(
                version="0.1.0",
                rss_mb=48,
                applied_generation=7,
                desired_generation=7,
                phase="probation",
            ),
            models={
                "det": ModelStats(
                    version="4.0",
                    variant="det-int8",
                    provider="CPUExecutionProvider",
                    state="ready",
                    requests=120,
                    errors=1,
                    latency_ms=Latency(p50=31.0, p95=48.5, p99=70.1),
                ),
                "rec": ModelStats(version="4.0", state="shed"),
            },
            link=LinkStats(reconnects=1, outbox_depth=0, dropped=0),
        ),
        "state": State(
            **common,
            seq=6,
            applied_generation=7,
            desired_generation=8,
            phase="failed",
            models=[
                ModelReport(
                    name="det",
                    version="4.0",
                    variant="det-int8",
                    precision="int8",
                    provider="CPUExecutionProvider",
                    ready=True,
                ),
                ModelReport(name="rec", version="4.0", ready=False, reason="does not fit memory"),
            ],
            last_error=messages.LastError(generation=8, code="hash_mismatch", message="det"),
            refused_generation=8,
        ),
        "event": Event(
            **common,
            seq=7,
            kind=EventKind.UPDATE_ROLLED_BACK,
            generation=8,
            message="error rate 0.2 over 0.05",
            data={"error_rate": 0.2, "models": ["det"]},
        ),
        "desired": Desired.sign(desired_state(), SIGNER),
        "cmd": Cmd(cmd_id="c-42", command="benchmark", args={"model": "det"}, ts=TS),
        "cmd_result": CmdResult(**common, seq=8, cmd_id="c-42", ok=True, result={"p95_ms": 48.0}),
        "hub_state": HubState(state="online", hub_id="hub-1", ts=TS),
    }


SAMPLES = samples()


def as_dict(msg: Message) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(encode(msg))
    return value


def test_every_message_type_has_a_sample_and_a_topic() -> None:
    assert set(SAMPLES) == set(MESSAGES)
    assert [m.SHORT_NAME for m in MESSAGE_TYPES] == list(MESSAGES)
    assert len(TOPIC_MESSAGES) == len(MESSAGE_TYPES)
    assert Telemetry.SCHEMA == "edgefleet.telemetry/1"
    assert (Telemetry.SCHEMA_NAME, Telemetry.SCHEMA_MAJOR) == ("edgefleet.telemetry", 1)


@pytest.mark.parametrize("name", list(SAMPLES))
def test_round_trip(name: str) -> None:
    msg = SAMPLES[name]
    data = encode(msg)
    assert data.startswith(b'{"schema":"' + msg.SCHEMA.encode() + b'"')
    compact = json.dumps(json.loads(data), separators=(",", ":"), ensure_ascii=False)
    assert data == compact.encode()
    assert decode(type(msg), data) == msg
    assert decode(name, data) == msg
    assert decode(msg.SCHEMA, data) == msg
    assert encode(decode(type(msg), data)) == data


@pytest.mark.parametrize("name", list(SAMPLES))
def test_unknown_fields_survive_decode_and_encode(name: str) -> None:
    doc = as_dict(SAMPLES[name])
    doc["from_the_future"] = {"nested": [1, 2.5, None, "x"]}
    for part in ("system", "agent", "link", "payload", "facts"):
        if isinstance(doc.get(part), dict):
            doc[part]["newer"] = True
    data = json.dumps(doc).encode()
    msg = decode(name, data)
    assert msg.model_extra == {"from_the_future": {"nested": [1, 2.5, None, "x"]}}
    assert json.loads(encode(msg)) == doc


@pytest.mark.parametrize("name", list(SAMPLES))
def test_unknown_major_version_is_refused(name: str) -> None:
    doc = as_dict(SAMPLES[name])
    doc["schema"] = doc["schema"].replace("/1", "/2")
    with pytest.raises(UnsupportedSchemaVersion) as caught:
        decode(name, json.dumps(doc).encode())
    assert caught.value.schema == doc["schema"]
    assert caught.value.supported == SAMPLES[name].SCHEMA


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        (None, "missing 'schema' field"),
        (1, "'schema' is not a string"),
        ("edgefleet.telemetry", "malformed schema id 'edgefleet.telemetry'"),
        ("edgefleet.telemetry/1.1", "malformed schema id"),
        ("edgefleet.telemetry/x", "malformed schema id"),
        ("telemetry/1", "malformed schema id"),
        ("edgefleet.state/1", "expected schema 'edgefleet.telemetry/1', got 'edgefleet.state/1'"),
        ("edgefleet.state/9", "expected schema 'edgefleet.telemetry/1'"),
    ],
)
def test_schema_field_problems_are_decode_errors(schema: object, reason: str) -> None:
    doc = as_dict(SAMPLES["telemetry"])
    if schema is None:
        del doc["schema"]
    else:
        doc["schema"] = schema
    with pytest.raises(MessageDecodeError, match=reason):
        decode(Telemetry, json.dumps(doc).encode())


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "not JSON: Expecting value at line 1 column 1"),
        (b"\xff\xfe{}", "not UTF-8 \\(byte 0\\)"),
        (b'{"schema": "edgefleet.telemetry/1",', "not JSON"),
        (b"[1, 2]", "payload is not a JSON object"),
        (b'"edgefleet.telemetry/1"', "payload is not a JSON object"),
        (b'{"schema": "edgefleet.telemetry/1", "x": NaN}', "NaN is not allowed"),
        (b'{"schema": "edgefleet.telemetry/1", "x": -Infinity}', "-Infinity is not allowed"),
        (b'{"a":' * 5000 + b"1" + b"}" * 5000, "nested too deeply"),
        (b'{"a":' + b"[" * 64 + b"]" * 64 + b"}", "nested more than 64 levels deep"),
        (b'{"a": ' + b"9" * 5000 + b"}", "not JSON"),
        (b"\xef\xbb\xbf{}", "not JSON"),
    ],
)
def test_bad_payloads_are_decode_errors(payload: bytes, reason: str) -> None:
    with pytest.raises(MessageDecodeError, match=reason):
        decode(Telemetry, payload)


def test_deepest_allowed_nesting_round_trips() -> None:
    doc = as_dict(SAMPLES["event"])
    doc["data"] = {"x": json.loads("[" * (messages.MAX_DEPTH - 2) + "]" * (messages.MAX_DEPTH - 2))}
    msg = decode(Event, json.dumps(doc).encode())
    assert json.loads(encode(msg)) == doc


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ('"x": NaN', "NaN is not allowed"),
        ('"x": [Infinity]', "Infinity is not allowed"),
        ('"x": "\\ud800"', "lone UTF-16 surrogate"),
        ('"x": ' + "[" * 64 + "]" * 64, "nested more than 64 levels deep"),
    ],
)
def test_a_valid_message_with_a_bad_unknown_field_is_refused(extra: str, reason: str) -> None:
    """Unknown fields are kept unvalidated, so the checks before validation must see them."""
    payload = encode(SAMPLES["telemetry"])
    damaged = payload[:-1] + b", " + extra.encode() + b"}"
    with pytest.raises(MessageDecodeError, match=reason):
        decode(Telemetry, damaged)


def test_a_message_without_its_schema_is_refused_although_the_field_has_a_default() -> None:
    doc = as_dict(SAMPLES["telemetry"])
    del doc["schema"]
    with pytest.raises(MessageDecodeError, match="missing 'schema' field"):
        decode(Telemetry, json.dumps(doc).encode())


@pytest.mark.parametrize("ascii_only", [True, False], ids=["escaped", "utf8"])
def test_text_and_unknown_fields_decode_the_same_on_both_paths(ascii_only: bool) -> None:
    doc = as_dict(SAMPLES["event"])
    doc["data"] = {"note": "caf\u00e9 \U0001f600", "n": [1, 2.5, None, True, 10**30]}
    doc["newer_field"] = {"kept": [1, {"a": "b"}]}
    payload = json.dumps(doc, ensure_ascii=ascii_only).encode()
    msg = decode(Event, payload)
    assert msg == messages._decode_checked(Event, payload)
    assert json.loads(encode(msg)) == doc


def test_validation_failure_names_the_first_field() -> None:
    doc = as_dict(SAMPLES["telemetry"])
    doc["system"]["cpu_percent"] = "lots"
    doc["seq"] = -1
    with pytest.raises(MessageDecodeError) as caught:
        decode(Telemetry, json.dumps(doc).encode())
    text = str(caught.value)
    assert text.startswith("edgefleet.telemetry/1: seq: Input should be greater than or equal")
    assert text.endswith("(and 1 more)")
    assert "lots" not in text


def test_oversize_is_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_parsing(*args: object, **kwargs: object) -> object:
        raise AssertionError("json.loads must not be called")

    monkeypatch.setattr(json, "loads", no_parsing)
    with pytest.raises(MessageTooLarge) as caught:
        decode(Telemetry, b"{" * (DEFAULT_MAX_BYTES + 1))
    assert (caught.value.size, caught.value.limit) == (DEFAULT_MAX_BYTES + 1, DEFAULT_MAX_BYTES)
    with pytest.raises(MessageTooLarge):
        decode(Desired, b"{" * (DESIRED_MAX_BYTES + 1))
    with pytest.raises(MessageTooLarge):
        decode(Telemetry, b"{" * 101, max_bytes=100)


def test_desired_may_be_larger_than_other_messages() -> None:
    doc = as_dict(SAMPLES["desired"])
    doc["padding"] = "x" * (DEFAULT_MAX_BYTES + 10)
    data = json.dumps(doc).encode()
    assert decode(Desired, data).signed_payload() == doc["payload"]
    doc["schema"] = Telemetry.SCHEMA
    with pytest.raises(MessageTooLarge):
        decode(Telemetry, json.dumps(doc).encode())


def test_encode_refuses_what_a_peer_would_refuse() -> None:
    big = SAMPLES["event"].model_copy(update={"message": "x" * DEFAULT_MAX_BYTES})
    with pytest.raises(MessageTooLarge):
        encode(big)


def test_message_type_lookup() -> None:
    assert message_type("telemetry") is Telemetry
    assert message_type("edgefleet.cmd_result") is CmdResult
    assert message_type("edgefleet.hub_state/1") is HubState
    with pytest.raises(ValueError, match="no message type"):
        message_type("nope")
    with pytest.raises(ValueError, match="not a concrete message type"):
        decode(messages.DeviceMessage, b"{}")
    assert split_schema("edgefleet.cmd_result/12") == ("edgefleet.cmd_result", 12)


@pytest.mark.parametrize("name", list(SAMPLES))
def test_decode_for_topic(name: str) -> None:
    msg = SAMPLES[name]
    topic = topic_for(msg, device_id=DEVICE)
    parsed = parse_topic(topic)
    assert message_for_topic(parsed) is type(msg)
    assert decode_for_topic(parsed, encode(msg)) == msg


def test_topics_of_messages() -> None:
    assert topic_for(SAMPLES["telemetry"]) == up_topic(DEVICE, Kind.TELEMETRY)
    assert topic_for(SAMPLES["desired"]) == down_topic(DEVICE, Kind.DESIRED)
    assert topic_for(SAMPLES["cmd"], "gw-2") == "edgefleet/v1/dev/gw-2/down/cmd"
    assert topic_for(SAMPLES["hub_state"]) == HUB_STATE_TOPIC
    assert TOPIC_MESSAGES[(Direction.UP, Kind.STATE)] is State
    assert TOPIC_MESSAGES[(Direction.HUB, Kind.STATE)] is HubState


@pytest.mark.parametrize("name", ["telemetry", "status", "desired"])
def test_payload_device_id_must_match_the_topic(name: str) -> None:
    msg = SAMPLES[name]
    topic = topic_for(msg).replace(f"/{DEVICE}/", "/pi-002/")
    with pytest.raises(MessageDecodeError, match="does not match the topic's 'pi-002'"):
        decode_for_topic(parse_topic(topic), encode(msg))


def test_payload_of_another_topic_is_refused() -> None:
    parsed = parse_topic(up_topic(DEVICE, Kind.STATE))
    with pytest.raises(MessageDecodeError, match=re.escape("expected schema 'edgefleet.state/1'")):
        decode_for_topic(parsed, encode(SAMPLES["telemetry"]))


def test_desired_signature_survives_the_wire() -> None:
    trusted = TrustedKeys([SIGNER.public])
    received = decode(Desired, encode(SAMPLES["desired"]))
    assert received.verify(trusted) == SIGNER.keyid
    assert received.signed_payload() == desired_state().signable()


def test_a_signed_document_keeps_what_was_signed_and_verifies_before_the_wire() -> None:
    state = desired_state()
    document = Desired.sign(state, SIGNER)
    assert document.payload is state
    assert document.signed_payload() == state.signable()
    assert document.verify(TrustedKeys([SIGNER.public])) == SIGNER.keyid
    # what is kept is a copy: changing it changes nothing signed
    document.signed_payload()["generation"] = 99
    assert document.verify(TrustedKeys([SIGNER.public])) == SIGNER.keyid


def test_desired_signature_covers_what_was_received() -> None:
    doc = as_dict(SAMPLES["desired"])
    doc["payload"]["generation"] = 8
    with pytest.raises(BadSignature):
        decode(Desired, json.dumps(doc).encode()).verify(TrustedKeys([SIGNER.public]))
    doc = as_dict(SAMPLES["desired"])
    doc["payload"]["added_by_someone"] = 1
    with pytest.raises(BadSignature):
        decode(Desired, json.dumps(doc).encode()).verify(TrustedKeys([SIGNER.public]))


def test_desired_payload_from_a_newer_hub_verifies_with_its_unknown_fields() -> None:
    payload = desired_state().signable()
    payload["from_the_future"] = {"x": 1}
    envelope = {
        "schema": "edgefleet.desired/1",
        "payload": payload,
        "signatures": [SIGNER.sign(payload).model_dump()],
    }
    received = decode(Desired, json.dumps(envelope).encode())
    assert received.verify(TrustedKeys([SIGNER.public])) == SIGNER.keyid
    assert received.payload.model_extra == {"from_the_future": {"x": 1}}


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"expires_at": TS}, "expires_at must be after issued_at"),
        ({"models": [MODEL_SPEC, MODEL_SPEC]}, "model names must be unique"),
        ({"generation": 0}, "generation: Input should be greater than 0"),
        ({"device_id": "pi/1"}, "device_id: String should match pattern"),
    ],
)
def test_inconsistent_desired_state_is_refused(changes: dict[str, Any], reason: str) -> None:
    payload = desired_state().signable()
    payload.update(
        {k: v.model_dump() if hasattr(v, "model_dump") else v for k, v in changes.items()}
    )
    if "models" in changes:
        payload["models"] = [m.model_dump(by_alias=True) for m in changes["models"]]
    envelope = {"schema": "edgefleet.desired/1", "payload": payload, "signatures": []}
    with pytest.raises(MessageDecodeError, match=reason):
        decode(Desired, json.dumps(envelope).encode())


def test_failed_command_needs_an_error() -> None:
    doc = as_dict(SAMPLES["cmd_result"])
    doc["ok"] = False
    with pytest.raises(MessageDecodeError, match="error is required when ok is false"):
        decode(CmdResult, json.dumps(doc).encode())
    doc["error"] = "unknown model"
    assert decode(CmdResult, json.dumps(doc).encode()).error == "unknown model"


@pytest.mark.parametrize("kind", ["update", "Update.started", "update..x", "update.", "a b.c"])
def test_event_kinds_are_dotted(kind: str) -> None:
    doc = as_dict(SAMPLES["event"])
    doc["kind"] = kind
    with pytest.raises(MessageDecodeError, match="kind: String should match pattern"):
        decode(Event, json.dumps(doc).encode())


def test_a_newer_event_kind_is_kept_as_text() -> None:
    doc = as_dict(SAMPLES["event"])
    doc["kind"] = "thermal.fan_failed"
    assert decode(Event, json.dumps(doc).encode()).kind == "thermal.fan_failed"


def test_will_has_no_seq() -> None:
    will = decode(Status, encode(SAMPLES["status"]))
    assert will.seq is None
    assert will.state == "offline"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048), st.sampled_from(list(MESSAGES)))
def test_random_bytes_raise_only_wire_errors(payload: bytes, name: str) -> None:
    with contextlib.suppress(WireError):
        decode(name, payload)


@given(
    st.dictionaries(st.text(max_size=12), json_values, max_size=8), st.sampled_from(list(SAMPLES))
)
def test_random_objects_raise_only_wire_errors(doc: dict[str, Any], name: str) -> None:
    doc["schema"] = SAMPLES[name].SCHEMA
    with contextlib.suppress(WireError):
        decode(name, json.dumps(doc).encode())


@given(st.data(), st.sampled_from(list(SAMPLES)))
def test_damaged_messages_raise_only_wire_errors(data: st.DataObject, name: str) -> None:
    payload = bytearray(encode(SAMPLES[name]))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        index = data.draw(st.integers(min_value=0, max_value=len(payload) - 1))
        payload[index] = data.draw(st.integers(min_value=0, max_value=255))
    try:
        msg = decode(name, bytes(payload))
    except WireError:
        return
    assert decode(name, encode(msg)) == msg


@given(st.dictionaries(st.text(min_size=1, max_size=12), json_values, max_size=5))
def test_any_unknown_fields_round_trip(extra: dict[str, Any]) -> None:
    doc = as_dict(SAMPLES["telemetry"])
    for key, value in extra.items():
        doc.setdefault(key, value)
        doc["system"].setdefault(key, value)
    msg = decode(Telemetry, json.dumps(doc).encode())
    assert json.loads(encode(msg)) == doc
