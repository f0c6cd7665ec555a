"""Desired-state documents: content hash, generations, re-signing, signatures."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hub.desired
from agent.desired import Accepted, Refusal, RefusalCode, judge_desired
from contract.manifests import ModelSet, ModelSetRef, ModelSpec, Policy
from contract.messages import Desired, DesiredState, decode, encode
from contract.signing import PublicKey, SigningKey, TrustedKeys
from hub.desired import (
    CONTENT_FIELDS,
    ContentHashes,
    Decision,
    DesiredContent,
    PreviousDesired,
    content_hash,
    desired_content,
    due_for_resign,
    next_document,
)
from hub.resolve import DeviceView, Resolution, resolve

KEY = SigningKey.generate()
SECOND_KEY = SigningKey.generate()
DEVICE = DeviceView("pi-1", labels={"site": "warehouse"}, profile="raspberry-pi-4-4gb")
T0 = 1_750_000_000.0
VALIDITY = 7 * 86400.0
RESIGN = 86400.0
URLS = ["https://hub.example.com/artifacts"]


def spec(name: str, version: str = "1") -> ModelSpec:
    digest = hashlib.sha256(f"{name}/{version}".encode()).hexdigest()
    return ModelSpec.model_validate(
        {
            "name": name,
            "version": version,
            "priority": 1,
            "variants": [
                {
                    "name": "fp32",
                    "precision": "fp32",
                    "artifact": {"sha256": digest, "size": 10},
                    "requires": {"memory_mb": 10},
                }
            ],
        }
    )


def model_set(version: str) -> ModelSet:
    return ModelSet.model_validate(
        {
            "schema": "edgefleet.modelset/1",
            "name": "ocr",
            "version": version,
            "models": [spec("det", version), spec("rec", version)],
        }
    )


SETS = {("ocr", v): model_set(v) for v in ("1", "2")}


def resolution(version: str = "1", probation_s: float = 120.0) -> Resolution:
    policy = Policy.model_validate(
        {
            "schema": "edgefleet.policy/1",
            "name": "ocr",
            "model_set": {"name": "ocr", "version": version},
            "runtime": {"probation_s": probation_s},
        }
    )
    return resolve(DEVICE, [policy], SETS)


def decide(previous: PreviousDesired | None, now: float = T0, **changes: Any) -> Decision:
    arguments: dict[str, Any] = {
        "device_id": "pi-1",
        "now": now,
        "validity_s": VALIDITY,
        "resign_before_s": RESIGN,
        "keys": [KEY],
        "trusted_keys": [],
        "base_urls": URLS,
    }
    result = changes.pop("resolution", None) or resolution()
    arguments.update(changes)
    return next_document(previous, result, **arguments)


def published(decision: Decision) -> Desired:
    assert decision.document is not None
    return decision.document


# --- content hash ---------------------------------------------------------------------


def test_content_hash_is_the_same_for_content_state_and_wire_payload() -> None:
    document = published(decide(None))
    content = desired_content(resolution(), base_urls=URLS, trusted_keys=[])
    wire = json.loads(encode(document))["payload"]
    assert content_hash(content) == content_hash(document.payload) == content_hash(wire)
    assert len(content_hash(content)) == 64


def test_content_hash_ignores_key_order_and_non_content_fields() -> None:
    payload = published(decide(None)).payload.signable()
    reordered = json.loads(json.dumps(_reverse_keys(payload)))
    assert list(reordered) != list(payload)
    assert content_hash(reordered) == content_hash(payload)
    other = dict(payload, generation=9, issued_at=1.0, expires_at=2.0, device_id="pi-2")
    assert content_hash(other) == content_hash(payload)


def _reverse_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _reverse_keys(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_reverse_keys(v) for v in value]
    return value


@settings(max_examples=40, deadline=None)
@given(st.randoms(use_true_random=False))
def test_content_hash_is_stable_under_any_key_order(rng: Any) -> None:
    payload = published(decide(None)).payload.signable()

    def shuffle(value: Any) -> Any:
        if isinstance(value, dict):
            keys = list(value)
            rng.shuffle(keys)
            return {k: shuffle(value[k]) for k in keys}
        if isinstance(value, list):
            return [shuffle(v) for v in value]
        return value

    assert content_hash(shuffle(payload)) == content_hash(payload)


def test_absent_optional_fields_hash_as_their_defaults() -> None:
    payload = published(decide(None)).payload.signable()
    bare = {k: v for k, v in payload.items() if k not in {"trusted_keys", "rollout"}}
    assert content_hash(bare) == content_hash(payload)
    with pytest.raises(ValueError, match="models"):
        content_hash({k: v for k, v in payload.items() if k != "models"})


def _variants() -> dict[str, DesiredContent]:
    base = desired_content(resolution(), base_urls=URLS, trusted_keys=[])
    other_spec = spec("det", "1").model_copy(update={"priority": 5})
    return {
        "model_set": base.model_copy(update={"model_set": ModelSetRef(name="ocr", version="2")}),
        "models": base.model_copy(update={"models": [other_spec, base.models[1]]}),
        "models-order": base.model_copy(update={"models": list(reversed(base.models))}),
        "runtime": desired_content(resolution(probation_s=5), base_urls=URLS, trusted_keys=[]),
        "artifact_base_urls": base.model_copy(update={"artifact_base_urls": ["https://cdn/"]}),
        "trusted_keys": base.model_copy(update={"trusted_keys": [KEY.public]}),
        "rollout": base.model_copy(update={"rollout": "r-1"}),
    }


@pytest.mark.parametrize("field", sorted(_variants()))
def test_content_hash_changes_with_every_content_field(field: str) -> None:
    base = desired_content(resolution(), base_urls=URLS, trusted_keys=[])
    assert content_hash(_variants()[field]) != content_hash(base)


def test_shared_content_hashes_agree_with_content_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    base = desired_content(resolution(), base_urls=URLS, trusted_keys=[])
    contents = [base, *_variants().values()]
    expected = [content_hash(c) for c in contents]
    computed: list[DesiredContent] = []

    def counting(content: DesiredContent) -> str:
        computed.append(content)
        return content_hash(content)

    monkeypatch.setattr(hub.desired, "content_hash", counting)
    hashes = ContentHashes()
    assert [hashes(c) for c in contents] == expected
    assert [hashes(c) for c in contents] == expected  # the second time from memory
    assert len(computed) == len(contents)
    # another device resolving to the same objects shares the hash
    again = desired_content(
        Resolution(**{**vars(resolution()), "device_id": "pi-2", "runtime": base.runtime}),
        base_urls=URLS,
        trusted_keys=[],
    )
    assert hashes(again) == expected[0] and len(computed) == len(contents)
    # equal content from other objects is hashed again, to the same value
    assert hashes(desired_content(resolution(), base_urls=URLS, trusted_keys=[])) == expected[0]
    assert len(computed) == len(contents) + 1


def test_every_content_field_is_covered() -> None:
    assert {f.split("-")[0] for f in _variants()} == set(CONTENT_FIELDS)
    assert set(CONTENT_FIELDS) == set(DesiredContent.model_fields)
    assert set(CONTENT_FIELDS) | {"device_id", "generation", "issued_at", "expires_at"} == set(
        DesiredState.model_fields
    )


# --- generations ----------------------------------------------------------------------


def test_first_document_is_generation_one_signed_by_every_key() -> None:
    decision = decide(None, keys=[KEY, SECOND_KEY])
    assert decision.kind == "publish"
    assert decision.content_changed
    assert decision.generation == 1
    document = published(decision)
    state = document.payload
    assert state.generation == 1
    assert state.device_id == "pi-1"
    assert state.issued_at == T0
    assert state.expires_at == T0 + VALIDITY
    assert state.artifact_base_urls == URLS
    assert [m.name for m in state.models] == ["det", "rec"]
    assert state.model_set == ModelSetRef(name="ocr", version="1")
    assert decision.content_hash == content_hash(state)
    assert {s.keyid for s in document.signatures} == {KEY.keyid, SECOND_KEY.keyid}
    for key in (KEY, SECOND_KEY):
        received = decode(Desired, encode(document))
        assert received.verify(TrustedKeys([key.public])) == key.keyid


def test_equal_content_publishes_nothing() -> None:
    previous = PreviousDesired.of(published(decide(None)))
    later = decide(previous, now=T0 + 3600)
    assert later.kind == "unchanged"
    assert not later.publishes
    assert not later.content_changed
    assert later.generation == 1
    assert later.content_hash == previous.content_hash


def test_changed_content_bumps_the_generation() -> None:
    previous = PreviousDesired.of(published(decide(None)))
    for change in (
        {"resolution": resolution(version="2")},
        {"resolution": resolution(probation_s=1)},
        {"base_urls": ["https://cdn.example.com/"]},
        {"trusted_keys": [KEY.public, SECOND_KEY.public]},
        {"rollout": "canary-1"},
    ):
        decision = decide(previous, now=T0 + 60, **change)
        assert decision.kind == "publish", change
        assert decision.content_changed
        assert decision.generation == 2
        assert published(decision).payload.generation == 2
        assert decision.content_hash != previous.content_hash


def test_near_expiry_resigns_with_a_new_generation_and_equal_content() -> None:
    first = published(decide(None))
    previous = PreviousDesired.of(first)
    now = first.payload.expires_at - RESIGN + 1
    decision = decide(previous, now=now)
    assert decision.kind == "resign"
    assert not decision.content_changed
    assert decision.generation == 2
    state = published(decision).payload
    assert state.generation == 2
    assert state.issued_at == now
    assert state.expires_at == now + VALIDITY
    assert content_hash(state) == previous.content_hash
    assert state.models == first.payload.models


def test_the_agent_accepts_a_resigned_document_and_refuses_an_equal_generation() -> None:
    first = published(decide(None))
    now = first.payload.expires_at - RESIGN / 2
    resigned = published(decide(PreviousDesired.of(first), now=now))
    trusted = TrustedKeys([KEY.public])

    def judge(document: Desired, last: int) -> Accepted | Refusal:
        return judge_desired(
            encode(document),
            device_id="pi-1",
            trusted=trusted,
            last_generation=last,
            refused_generations=[],
            now=now,
        )

    assert isinstance(judge(resigned, last=1), Accepted)
    stale = judge(first.model_copy(), last=1)
    assert isinstance(stale, Refusal) and stale.code is RefusalCode.STALE_GENERATION


def test_an_expired_document_is_resigned() -> None:
    first = published(decide(None))
    decision = decide(PreviousDesired.of(first), now=first.payload.expires_at + 10)
    assert decision.kind == "resign"
    assert "expired" in decision.reason


def test_due_for_resign() -> None:
    previous = PreviousDesired(generation=3, expires_at=T0 + 1000, content_hash="0" * 64)
    assert not due_for_resign(previous, T0, 999)
    assert due_for_resign(previous, T0, 1000)
    assert due_for_resign(previous, T0 + 2000, 0)


def test_content_a_device_rolled_back_from_is_held_not_resigned() -> None:
    first = published(decide(None))
    previous = PreviousDesired.of(first, rolled_back=True)
    held = decide(previous, now=first.payload.expires_at - 1)
    assert held.kind == "hold"
    assert not held.publishes
    assert held.generation == 1
    fixed = decide(previous, now=T0 + 60, resolution=resolution(version="2"))
    assert fixed.kind == "publish"
    assert fixed.generation == 2


def test_a_device_ahead_of_the_hubs_record_gets_a_generation_above_its_own() -> None:
    previous = PreviousDesired.of(published(decide(None)))
    decision = decide(previous, now=T0 + 60, device_generation=41)
    assert decision.kind == "publish"
    assert not decision.content_changed
    assert decision.generation == 42
    assert decide(None, device_generation=5).generation == 6


def test_unassigned_device_gets_nothing() -> None:
    empty = Resolution(device_id="pi-1")
    assert decide(None, resolution=empty).kind == "unassigned"
    previous = PreviousDesired(generation=4, expires_at=T0 - 1, content_hash="0" * 64)
    decision = decide(previous, resolution=empty)
    assert decision.kind == "unassigned"
    assert not decision.publishes
    assert decision.generation == 4
    assert decision.content_hash is None
    with pytest.raises(ValueError, match="no policy"):
        desired_content(empty, base_urls=[], trusted_keys=[])


def test_key_rotation_document_is_verified_by_either_key() -> None:
    rotating = [KEY.public, SECOND_KEY.public]
    document = published(decide(None, keys=[KEY, SECOND_KEY], trusted_keys=rotating))
    assert document.payload.trusted_keys == rotating
    assert document.verify(TrustedKeys([SECOND_KEY.public])) == SECOND_KEY.keyid


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"device_id": "pi-2"}, "resolution is for device pi-1"),
        ({"validity_s": 0}, "validity_s"),
        ({"resign_before_s": VALIDITY}, "resign_before_s"),
        ({"resign_before_s": -1}, "resign_before_s"),
        ({"keys": []}, "signing key"),
        ({"trusted_keys": [SECOND_KEY.public]}, "none of the signing keys"),
    ],
)
def test_inconsistent_arguments_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decide(None, **changes)


def test_next_document_is_pure() -> None:
    first, second = decide(None), decide(None)
    assert published(first).payload == published(second).payload
    assert published(first).signatures == published(second).signatures  # Ed25519 is deterministic


def test_previous_of_an_envelope_and_of_a_state_agree() -> None:
    document = published(decide(None))
    assert PreviousDesired.of(document) == PreviousDesired.of(document.payload)


def test_public_key_list_round_trips_into_the_hash() -> None:
    with_key = decide(None, trusted_keys=[KEY.public])
    wire = json.loads(encode(published(with_key)))["payload"]
    assert [PublicKey.model_validate(k) for k in wire["trusted_keys"]] == [KEY.public]
    assert content_hash(wire) == with_key.content_hash
