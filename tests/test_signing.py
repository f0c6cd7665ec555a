"""Canonical JSON and Ed25519 signatures: each kind of failure has its own error."""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contract.canonical import canonical_json
from contract.errors import BadSignature, KeyFormatError, MissingSignature, UnknownKey
from contract.signing import PublicKey, Signature, SigningKey, TrustedKeys

PAYLOAD: dict[str, Any] = {
    "device_id": "pi-001",
    "generation": 7,
    "expires_at": 1_800_000_000.5,
    "models": [{"name": "det", "sha256": "ab" * 32}],
    "note": "grüße",
}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


def test_canonical_form_is_sorted_and_compact() -> None:
    assert canonical_json({"b": 1, "a": [1.5, "x"]}) == b'{"a":[1.5,"x"],"b":1}'
    assert canonical_json({"é": "ü"}) == '{"é":"ü"}'.encode()


def test_canonical_refuses_nan() -> None:
    with pytest.raises(ValueError):
        canonical_json({"x": math.nan})


@given(json_values)
def test_canonical_survives_a_json_round_trip(value: Any) -> None:
    encoded = canonical_json(value)
    assert canonical_json(json.loads(encoded)) == encoded


def test_sign_then_verify_returns_the_key_id() -> None:
    key = SigningKey.generate()
    trusted = TrustedKeys([key.public])
    assert trusted.verify(PAYLOAD, [key.sign(PAYLOAD)]) == key.keyid


def test_verify_after_transport_as_json() -> None:
    key = SigningKey.generate()
    signature = key.sign(PAYLOAD)
    received = json.loads(json.dumps(PAYLOAD, indent=2))
    assert TrustedKeys([key.public]).verify(received, [signature]) == key.keyid


@pytest.mark.parametrize(
    "tamper",
    [
        lambda p: p.update(generation=8),
        lambda p: p.update(extra=None),
        lambda p: p["models"][0].update(sha256="cd" * 32),
        lambda p: p.update(note="grüsse"),
    ],
)
def test_a_tampered_payload_is_a_bad_signature(tamper: Any) -> None:
    key = SigningKey.generate()
    signature = key.sign(PAYLOAD)
    tampered = json.loads(json.dumps(PAYLOAD))
    tamper(tampered)
    with pytest.raises(BadSignature):
        TrustedKeys([key.public]).verify(tampered, [signature])


def test_a_flipped_signature_bit_is_a_bad_signature() -> None:
    key = SigningKey.generate()
    raw = bytearray(base64.b64decode(key.sign(PAYLOAD).sig))
    raw[0] ^= 1
    forged = Signature(keyid=key.keyid, sig=base64.b64encode(bytes(raw)).decode())
    with pytest.raises(BadSignature):
        TrustedKeys([key.public]).verify(PAYLOAD, [forged])


def test_wrong_key_is_an_unknown_key() -> None:
    trusted = SigningKey.generate()
    attacker = SigningKey.generate()
    with pytest.raises(UnknownKey):
        TrustedKeys([trusted.public]).verify(PAYLOAD, [attacker.sign(PAYLOAD)])


def test_wrong_key_claiming_a_trusted_key_id_is_a_bad_signature() -> None:
    trusted = SigningKey.generate()
    attacker = SigningKey.generate()
    forged = Signature(keyid=trusted.keyid, sig=attacker.sign(PAYLOAD).sig)
    with pytest.raises(BadSignature):
        TrustedKeys([trusted.public]).verify(PAYLOAD, [forged])


def test_missing_signature() -> None:
    key = SigningKey.generate()
    with pytest.raises(MissingSignature):
        TrustedKeys([key.public]).verify(PAYLOAD, [])


def test_one_good_signature_among_unknown_ones_is_enough() -> None:
    old, new = SigningKey.generate(), SigningKey.generate()
    signatures = [new.sign(PAYLOAD), old.sign(PAYLOAD)]
    assert TrustedKeys([old.public]).verify(PAYLOAD, signatures) == old.keyid


def test_pem_round_trip_keeps_the_key_id() -> None:
    key = SigningKey.generate()
    again = SigningKey.from_pem(key.to_pem())
    assert again.keyid == key.keyid
    assert TrustedKeys([key.public]).verify(PAYLOAD, [again.sign(PAYLOAD)]) == key.keyid


def test_garbage_pem_is_a_key_format_error() -> None:
    with pytest.raises(KeyFormatError):
        SigningKey.from_pem(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")


def test_public_key_whose_id_does_not_match_is_refused() -> None:
    key = SigningKey.generate()
    with pytest.raises(KeyFormatError):
        TrustedKeys([PublicKey(keyid="00" * 32, public_key=key.public.public_key)])


def test_public_key_of_wrong_length_is_refused() -> None:
    with pytest.raises(KeyFormatError):
        TrustedKeys([PublicKey(keyid="x", public_key=base64.b64encode(b"short").decode())])
