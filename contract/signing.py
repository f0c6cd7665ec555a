"""Ed25519 signatures over canonical JSON, with key ids so that keys can rotate."""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from contract.base import WireModel
from contract.canonical import canonical_json
from contract.errors import BadSignature, KeyFormatError, MissingSignature, UnknownKey


class Signature(WireModel):
    keyid: str
    sig: str


class PublicKey(WireModel):
    """A public key as published to agents: raw Ed25519 bytes in base64."""

    keyid: str
    public_key: str


def key_id(raw_public_key: bytes) -> str:
    """The key id: hex sha256 of the raw 32-byte public key."""
    return hashlib.sha256(raw_public_key).hexdigest()


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise KeyFormatError(f"{what} is not valid base64") from exc


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class SigningKey:
    """A private Ed25519 key that signs payloads."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        raw = _raw_public(private_key.public_key())
        self.public = PublicKey(keyid=key_id(raw), public_key=base64.b64encode(raw).decode())

    @property
    def keyid(self) -> str:
        return self.public.keyid

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: bytes) -> SigningKey:
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyFormatError("not an unencrypted PEM private key") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFormatError("private key is not Ed25519")
        return cls(key)

    def to_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def sign(self, payload: Mapping[str, Any]) -> Signature:
        sig = self._key.sign(canonical_json(payload))
        return Signature(keyid=self.keyid, sig=base64.b64encode(sig).decode())


class TrustedKeys:
    """The public keys an agent accepts signatures from, by key id."""

    def __init__(self, keys: Iterable[PublicKey] = ()) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}
        for key in keys:
            self.add(key)

    def add(self, key: PublicKey) -> None:
        raw = _b64decode(key.public_key, f"public key {key.keyid}")
        if len(raw) != 32:
            raise KeyFormatError(f"public key {key.keyid} is {len(raw)} bytes, expected 32")
        if key_id(raw) != key.keyid:
            raise KeyFormatError(f"key id {key.keyid} does not match its public key")
        self._keys[key.keyid] = Ed25519PublicKey.from_public_bytes(raw)

    @property
    def keyids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def __contains__(self, keyid: object) -> bool:
        return keyid in self._keys

    def verify(self, payload: Mapping[str, Any], signatures: Sequence[Signature]) -> str:
        """Return the id of a trusted key whose signature over ``payload`` is valid.

        Raises MissingSignature when there is none at all, UnknownKey when no signature is
        from a trusted key, BadSignature when a trusted key's signature does not verify.
        """
        if not signatures:
            raise MissingSignature("document carries no signature")
        trusted = [s for s in signatures if s.keyid in self._keys]
        if not trusted:
            ids = ", ".join(sorted(s.keyid[:12] for s in signatures))
            raise UnknownKey(f"no signature from a trusted key (signed by {ids})")
        message = canonical_json(payload)
        for signature in trusted:
            raw = _b64decode(signature.sig, f"signature by {signature.keyid}")
            try:
                self._keys[signature.keyid].verify(raw, message)
            except InvalidSignature:
                continue
            return signature.keyid
        raise BadSignature(f"signature by {trusted[0].keyid[:12]} does not match the document")
