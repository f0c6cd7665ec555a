"""The hub's Ed25519 signing keys and their rotation.

Layout (``[keys]`` in hub.toml)::

    keys/                   mode 0700
        <keyid>.pem         one private key per active key, PKCS#8 PEM, mode 0600
        keyring.json        every key ever made: keyid, public key, state, times
    hub-keys.json           the active public keys for agents ({"keys": [{keyid, public_key}]})

Every *active* key signs each desired document and is listed in its ``trusted_keys``, so
rotation is: ``keys add`` (documents now carry both signatures and both public keys; agents
that apply one trust the new key), wait until every device has applied such a document
(``Store.devices_not_trusting``), then ``keys retire OLD`` (its private key file is deleted,
later documents drop it from ``trusted_keys``). The last active key cannot be retired.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from contract.errors import KeyFormatError
from contract.signing import PublicKey, SigningKey
from hub.errors import KeyringError

KeyState = Literal["active", "retired"]
KEYRING_FILE = "keyring.json"
MIN_PREFIX = 8
"""Shortest key id prefix accepted where a key id is asked for."""


@dataclass(frozen=True)
class KeyInfo:
    """One signing key as recorded in keyring.json (never the private part)."""

    keyid: str
    public_key: str
    state: KeyState
    created_at: float
    retired_at: float | None = None

    @property
    def public(self) -> PublicKey:
        return PublicKey(keyid=self.keyid, public_key=self.public_key)


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, with ``mode``."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def public_keys_document(keys: list[PublicKey]) -> dict[str, Any]:
    """The JSON agents read from ``trust.hub_public_keys_file``."""
    return {"keys": [k.model_dump(mode="json") for k in keys]}


class Keyring:
    """The signing keys in ``directory`` and the public key file for agents."""

    def __init__(
        self,
        directory: Path,
        public_file: Path,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory
        self.public_file = public_file
        self.clock = clock

    @classmethod
    def create(
        cls, directory: Path, public_file: Path, *, clock: Callable[[], float] = time.time
    ) -> Keyring:
        """A new keyring with one active key; KeyringError if ``directory`` holds one."""
        ring = cls(directory, public_file, clock=clock)
        if ring.index_path.exists():
            raise KeyringError(f"{directory}: a keyring exists already")
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
        except OSError as exc:
            raise KeyringError(f"{directory}: cannot create: {exc.strerror or exc}") from exc
        ring._save([])
        ring.add()
        return ring

    @property
    def index_path(self) -> Path:
        return self.directory / KEYRING_FILE

    def _pem_path(self, keyid: str) -> Path:
        return self.directory / f"{keyid}.pem"

    # --- reading -------------------------------------------------------------------------

    def keys(self) -> list[KeyInfo]:
        """Every key, active and retired, oldest first."""
        try:
            data = json.loads(self.index_path.read_text(encoding="utf-8"))
            return [KeyInfo(**entry) for entry in data["keys"]]
        except FileNotFoundError:
            raise KeyringError(
                f"{self.index_path}: no keyring here; run `edgefleet-hub init`"
            ) from None
        except OSError as exc:
            raise KeyringError(f"{self.index_path}: cannot read: {exc.strerror or exc}") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise KeyringError(f"{self.index_path}: not a keyring file: {exc}") from exc

    def active(self) -> list[KeyInfo]:
        """The keys that sign and that agents are told to trust, oldest first."""
        return [k for k in self.keys() if k.state == "active"]

    def public_keys(self) -> list[PublicKey]:
        """The active public keys: a desired document's ``trusted_keys``."""
        return [k.public for k in self.active()]

    def signing_keys(self) -> list[SigningKey]:
        """The active private keys, each checked against its recorded key id."""
        loaded = []
        for info in self.active():
            path = self._pem_path(info.keyid)
            try:
                key = SigningKey.from_pem(path.read_bytes())
            except OSError as exc:
                raise KeyringError(f"{path}: cannot read: {exc.strerror or exc}") from exc
            except KeyFormatError as exc:
                raise KeyringError(f"{path}: {exc}") from exc
            if key.keyid != info.keyid:
                raise KeyringError(f"{path}: holds key {key.keyid[:12]}, not {info.keyid[:12]}")
            loaded.append(key)
        return loaded

    def find(self, keyid: str) -> KeyInfo:
        """The key whose id is ``keyid`` or starts with it (at least 8 characters)."""
        keys = self.keys()
        exact = [k for k in keys if k.keyid == keyid]
        if exact:
            return exact[0]
        if len(keyid) < MIN_PREFIX:
            raise KeyringError(f"no key {keyid!r} (give at least {MIN_PREFIX} characters)")
        matches = [k for k in keys if k.keyid.startswith(keyid)]
        if not matches:
            raise KeyringError(f"no key {keyid!r}")
        if len(matches) > 1:
            raise KeyringError(f"key id prefix {keyid!r} is ambiguous; give more characters")
        return matches[0]

    # --- changing ------------------------------------------------------------------------

    def add(self) -> KeyInfo:
        """Generate a new active key (private file 0600) and republish the public file."""
        key = SigningKey.generate()
        info = KeyInfo(
            keyid=key.keyid,
            public_key=key.public.public_key,
            state="active",
            created_at=self.clock(),
        )
        keys = self.keys()
        try:
            write_atomic(self._pem_path(key.keyid), key.to_pem(), 0o600)
        except OSError as exc:
            raise KeyringError(
                f"{self._pem_path(key.keyid)}: cannot write: {exc.strerror or exc}"
            ) from exc
        self._save([*keys, info])
        self.write_public_file()
        return info

    def retire(self, keyid: str) -> KeyInfo:
        """Stop signing with a key and stop publishing it; its private file is deleted.

        KeyringError for an unknown or already retired key, or the last active one.
        """
        target = self.find(keyid)
        if target.state == "retired":
            raise KeyringError(f"key {target.keyid[:12]} is retired already")
        keys = self.keys()
        if sum(1 for k in keys if k.state == "active") <= 1:
            raise KeyringError(
                f"key {target.keyid[:12]} is the only active key; add another key first"
            )
        retired = KeyInfo(
            keyid=target.keyid,
            public_key=target.public_key,
            state="retired",
            created_at=target.created_at,
            retired_at=self.clock(),
        )
        self._save([retired if k.keyid == target.keyid else k for k in keys])
        self.write_public_file()
        self._pem_path(target.keyid).unlink(missing_ok=True)
        return retired

    def write_public_file(self) -> Path:
        """Write the active public keys for agents (mode 0644)."""
        data = json.dumps(public_keys_document(self.public_keys()), indent=2) + "\n"
        try:
            self.public_file.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.public_file, data.encode(), 0o644)
        except OSError as exc:
            raise KeyringError(f"{self.public_file}: cannot write: {exc.strerror or exc}") from exc
        return self.public_file

    def _save(self, keys: list[KeyInfo]) -> None:
        data = json.dumps({"keys": [asdict(k) for k in keys]}, indent=2) + "\n"
        try:
            write_atomic(self.index_path, data.encode(), 0o600)
        except OSError as exc:
            raise KeyringError(f"{self.index_path}: cannot write: {exc.strerror or exc}") from exc
