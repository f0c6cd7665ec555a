"""Enrolling and revoking devices: ``edgefleet-hub device enroll|revoke|evict``.

``enroll_device`` issues a client certificate whose CN is the device id (hub/ca.py) and
writes the agent bundle, a directory to copy to ``/etc/edgefleet/`` on the device::

    OUT/                mode 0700
        agent.toml      the agent's configuration (docs/configuration.md), relative paths
        device.crt      the device's certificate (CN = device id)
        device.key      its ECDSA P-256 key (0600); absent when the device sent a CSR
        ca.crt          the fleet CA: the agent checks the broker's certificate with it
        hub-keys.json   the hub's public signing keys (trust.hub_public_keys_file)

``revoke_device`` revokes the device's certificates (the CRL the broker reads is re-signed),
removes its desired state and its registry row from the store so the hub neither
re-signs nor re-publishes anything for it, and records ``revoked:<id>`` in ``hub_meta``.
The broker only reads the CRL on start and on SIGHUP, and never drops connected clients
for it: reload the broker, then ``evict_device`` (cuts the live connection and clears the
retained desired document).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import ssl
import tempfile
import threading
import time
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization

from contract.errors import KeyFormatError
from contract.signing import PublicKey, TrustedKeys
from contract.topics import down_topic
from hub.ca import (
    DEFAULT_DEVICE_DAYS,
    CertificateAuthority,
    IssuedCert,
    Role,
    load_csr,
)
from hub.config import HubConfig
from hub.errors import CAError, EnrollmentError
from hub.keys import public_keys_document, write_atomic
from hub.store import Store

AGENT_CONFIG = "agent.toml"
DEVICE_CERT = "device.crt"
DEVICE_KEY = "device.key"
CA_CERT = "ca.crt"
HUB_KEYS = "hub-keys.json"
REVOKED_META_PREFIX = "revoked:"
"""``hub_meta`` key prefix of revoked devices (value: revocation time); the controller can
skip these ids (``Store.list_meta(REVOKED_META_PREFIX)``)."""

_LABEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
MAX_LABEL_VALUE = 256
EVICT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Bundle:
    """What ``enroll_device`` wrote."""

    device_id: str
    directory: Path
    certificate: IssuedCert
    files: dict[str, Path]
    replaced: list[IssuedCert] = field(default_factory=list)
    """Earlier certificates of the device revoked by ``replace=True``."""

    @property
    def agent_config(self) -> Path:
        return self.files["agent_config"]


@dataclass(frozen=True)
class Revocation:
    """What ``revoke_device`` did."""

    device_id: str
    revoked: list[IssuedCert]
    """Certificates revoked now (empty when all were revoked before)."""
    crl: Path
    desired_removed: int
    device_removed: bool


# --- input checks ----------------------------------------------------------------------


def parse_labels(text: str) -> dict[str, str]:
    """``site=plant-3,line=2`` into a dict (the CLI's ``--labels``); EnrollmentError."""
    labels: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        if not sep:
            raise EnrollmentError(f"label {part!r}: expected name=value")
        labels[name.strip()] = value.strip()
    return check_labels(labels)


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """The labels, checked as the agent will check them (docs/configuration.md)."""
    for name, value in labels.items():
        if not _LABEL_NAME.match(name):
            raise EnrollmentError(
                f"label {name!r}: a name is 1 to 63 of letters, digits, '.', '_', '/' or '-', "
                "starting with a letter or digit"
            )
        if len(value) > MAX_LABEL_VALUE:
            raise EnrollmentError(f"label {name!r}: value longer than {MAX_LABEL_VALUE}")
        if any(unicodedata.category(c) == "Cc" for c in value):
            raise EnrollmentError(f"label {name!r}: value contains a control character")
    return dict(labels)


def check_broker_url(url: str) -> str:
    """An ``mqtts://host[:port]`` URL (a certificate is useless without TLS)."""
    expected = f"broker url: expected mqtts://host[:port], got {url!r}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise EnrollmentError(f"{expected} (bad port)") from None
    if parts.scheme != "mqtts" or not parts.hostname or port == 0:
        raise EnrollmentError(expected)
    if parts.username is not None or parts.password is not None:
        raise EnrollmentError(f"{expected} (no credentials)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise EnrollmentError(f"{expected} (no path or query)")
    return url


def read_hub_keys(path: Path) -> list[PublicKey]:
    """The hub's public keys from its ``hub-keys.json`` (``{"keys": [...]}`` or a list)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise EnrollmentError(f"{path}: cannot read the hub keys: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise EnrollmentError(f"{path}: not JSON: {exc}") from None
    if isinstance(data, dict) and set(data) == {"keys"}:
        data = data["keys"]
    if not isinstance(data, list) or not data:
        raise EnrollmentError(f"{path}: expected a non-empty list of hub keys")
    keys: list[PublicKey] = []
    for index, entry in enumerate(data):
        if not isinstance(entry, dict) or set(entry) != {"keyid", "public_key"}:
            raise EnrollmentError(
                f'{path}: [{index}]: expected {{"keyid": ..., "public_key": ...}}'
            )
        try:
            key = PublicKey(keyid=str(entry["keyid"]), public_key=str(entry["public_key"]))
            TrustedKeys([key])
        except (KeyFormatError, ValueError) as exc:
            raise EnrollmentError(f"{path}: [{index}]: {exc}") from None
        keys.append(key)
    return keys


def _toml_str(value: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's; non-ASCII is written as is)."""
    return json.dumps(value, ensure_ascii=False)


def render_agent_config(
    device_id: str,
    broker_url: str,
    labels: Mapping[str, str],
    *,
    with_key: bool = True,
) -> str:
    """The bundle's agent.toml; every path relative to the file."""
    lines = [
        f"# edgefleet agent configuration for device {device_id}",
        "# (written by `edgefleet-hub device enroll`). Install this directory as",
        "# /etc/edgefleet/ (docs/enrollment.md); relative paths are relative to this file.",
        f"device_id = {_toml_str(device_id)}",
        "",
        "[broker]",
        f"url = {_toml_str(broker_url)}",
        f"ca_file = {_toml_str(CA_CERT)}",
        f"cert_file = {_toml_str(DEVICE_CERT)}",
        f"key_file = {_toml_str(DEVICE_KEY)}"
        + ("" if with_key else "  # the key the device generated with its CSR"),
        "# client_id: the broker replaces it with the certificate's CN, the device id.",
        "",
        "[trust]",
        f"hub_public_keys_file = {_toml_str(HUB_KEYS)}",
    ]
    if labels:
        lines += ["", "[labels]"]
        lines += [f"{_toml_str(k)} = {_toml_str(v)}" for k, v in sorted(labels.items())]
    return "\n".join(lines) + "\n"


# --- enroll ----------------------------------------------------------------------------


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise EnrollmentError(f"{out_dir}: exists and is not a directory")
        if any(out_dir.iterdir()):
            raise EnrollmentError(f"{out_dir}: not empty; the bundle goes into a new directory")


def enroll_device(
    ca_dir: Path,
    device_id: str,
    out_dir: Path,
    *,
    broker_url: str,
    hub_keys_file: Path,
    labels: Mapping[str, str] | None = None,
    validity_days: int = DEFAULT_DEVICE_DAYS,
    csr: bytes | None = None,
    replace: bool = False,
    store: Store | None = None,
    clock: Callable[[], float] = time.time,
) -> Bundle:
    """``edgefleet-hub device enroll ID --out DIR --broker-url URL [--labels k=v,...]``.

    Issues a certificate with CN ``device_id`` from the CA in ``ca_dir`` and writes the
    bundle into ``out_dir`` (new or empty). With ``csr`` (PEM or DER, P-256) the device's
    own key is certified and no key is written. A device holding a valid certificate is
    refused unless ``replace``: then its earlier certificates are revoked (superseded)
    once the new bundle is written. With ``store``, a ``revoked:<id>`` mark is cleared.

    EnrollmentError (bad id, labels, URL, key file, directory; enrolled already) or
    CAError (the CA's files).
    """
    ca = CertificateAuthority(ca_dir, clock=clock)
    if not ca.exists():
        raise CAError(f"{ca_dir}: no CA here; run `edgefleet-hub ca init {ca_dir}`")
    labels = check_labels(labels or {})
    check_broker_url(broker_url)
    keys = read_hub_keys(hub_keys_file)
    public_key = load_csr(csr, f"CSR for {device_id}") if csr is not None else None
    _check_out_dir(out_dir)
    previous = ca.active(device_id, Role.DEVICE)
    if previous and not replace:
        serials = ", ".join(f"{r.serial:x}" for r in previous)
        raise EnrollmentError(
            f"device {device_id!r} is enrolled already (certificate {serials}); "
            "revoke it first, or enroll again with --replace"
        )
    ca_pem = ca.certificate().public_bytes(serialization.Encoding.PEM)
    issued = ca.issue(device_id, Role.DEVICE, validity_days=validity_days, public_key=public_key)
    files = {
        "agent_config": out_dir / AGENT_CONFIG,
        "cert": out_dir / DEVICE_CERT,
        "ca": out_dir / CA_CERT,
        "hub_keys": out_dir / HUB_KEYS,
    }
    if issued.key_pem is not None:
        files["key"] = out_dir / DEVICE_KEY
    contents: list[tuple[str, bytes, int]] = [
        (
            AGENT_CONFIG,
            render_agent_config(device_id, broker_url, labels, with_key=csr is None).encode(),
            0o644,
        ),
        (DEVICE_CERT, issued.cert_pem, 0o644),
        (CA_CERT, ca_pem, 0o644),
        (HUB_KEYS, (json.dumps(public_keys_document(keys), indent=2) + "\n").encode(), 0o644),
    ]
    if issued.key_pem is not None:
        contents.append((DEVICE_KEY, issued.key_pem, 0o600))
    try:
        _write_bundle(out_dir, contents)
    except OSError as exc:
        with contextlib.suppress(EnrollmentError, CAError):
            ca.revoke(device_id, Role.DEVICE, reason="superseded", serials=[issued.record.serial])
        raise EnrollmentError(
            f"{exc.filename or out_dir}: cannot write the bundle for {device_id}: "
            f"{exc.strerror or exc} (the new certificate was revoked)"
        ) from exc
    replaced: list[IssuedCert] = []
    if previous:
        replaced = ca.revoke(
            device_id, Role.DEVICE, reason="superseded", serials=[r.serial for r in previous]
        )
    if store is not None:
        store.delete_meta(REVOKED_META_PREFIX + device_id)
    return Bundle(device_id, out_dir, issued.record, files, replaced)


def _write_bundle(out_dir: Path, contents: list[tuple[str, bytes, int]]) -> None:
    """Write every file into a temporary sibling directory, then move it into place."""
    parent = out_dir.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=parent))
    try:
        os.chmod(tmp, 0o700)
        for name, data, mode in contents:
            write_atomic(tmp / name, data, mode)
        if out_dir.exists():
            out_dir.rmdir()  # empty: checked before
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- revoke ----------------------------------------------------------------------------


def revoke_device(
    ca_dir: Path,
    device_id: str,
    *,
    store: Store | None = None,
    reason: str = "unspecified",
    forget_device: bool = True,
    clock: Callable[[], float] = time.time,
) -> Revocation:
    """``edgefleet-hub device revoke ID [--reason R]``: revoke every certificate of the
    device and re-sign the CRL; with ``store``, delete its desired documents (nothing is
    re-signed or re-published for it), its registry row (``forget_device``; events and
    telemetry stay) and mark it ``revoked:<id>`` in hub_meta.

    Idempotent: revoking a revoked device re-signs the CRL and cleans the store again.
    EnrollmentError when the device was never enrolled or ``reason`` is unknown.
    """
    ca = CertificateAuthority(ca_dir, clock=clock)
    if not ca.exists():
        raise CAError(f"{ca_dir}: no CA here; run `edgefleet-hub ca init {ca_dir}`")
    revoked = ca.revoke(device_id, Role.DEVICE, reason=reason)
    removed = 0
    device_removed = False
    if store is not None:
        with store.transaction():
            removed = store.delete_desired(device_id)
            if forget_device and store.find_device(device_id) is not None:
                store.delete_device(device_id)
                device_removed = True
            store.set_meta(REVOKED_META_PREFIX + device_id, repr(clock()))
    return Revocation(device_id, revoked, ca.crl_path, removed, device_removed)


def revoked_devices(store: Store) -> set[str]:
    """The ids ``revoke_device`` marked (for the controller and the device list)."""
    return {key[len(REVOKED_META_PREFIX) :] for key in store.list_meta(REVOKED_META_PREFIX)}


# --- evict (after the broker reloaded the CRL) -----------------------------------------


def evict_device(config: HubConfig, device_id: str, *, timeout: float = EVICT_TIMEOUT_S) -> None:
    """``edgefleet-hub device evict ID``: through the hub's account, clear the device's
    retained desired document and end its live connection.

    The connection is ended by connecting with the device id as client id on the hub's
    listener (no ``use_username_as_clientid`` there): mosquitto closes the older
    connection of that id and, with a clean start, drops its session. ``config.broker``
    must point at that hub listener: on the device listener the broker would replace the
    client id with the hub's CN and nothing would be cut (mosquitto does not say so).
    Run it after the broker reloaded the CRL (SIGHUP), or the device reconnects at once.
    EnrollmentError when the broker cannot be reached or refuses.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    broker = config.broker
    v5 = broker.protocol == "5"
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=device_id,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        clean_session=None if v5 else True,
    )
    if broker.tls:
        client.tls_set(
            ca_certs=str(config.path(broker.ca_file)) if broker.ca_file else None,
            certfile=str(config.path(broker.cert_file)) if broker.cert_file else None,
            keyfile=str(config.path(broker.key_file)) if broker.key_file else None,
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    if broker.username is not None:
        client.username_pw_set(broker.username, config.broker_password())
    connected = threading.Event()
    outcome: dict[str, Any] = {}

    def on_connect(c: mqtt.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
        outcome["rc"] = rc
        connected.set()

    def on_disconnect(c: mqtt.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
        outcome.setdefault("rc", rc)
        connected.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    where = f"{broker.host}:{broker.port}"
    try:
        client.connect(broker.host, broker.port, keepalive=broker.keepalive)
    except (OSError, ssl.SSLError) as exc:
        raise EnrollmentError(f"cannot evict {device_id}: broker {where}: {exc}") from None
    client.loop_start()
    try:
        if not connected.wait(timeout):
            raise EnrollmentError(f"cannot evict {device_id}: no answer from {where}")
        rc = outcome.get("rc")
        if rc is None or getattr(rc, "is_failure", True):
            raise EnrollmentError(f"cannot evict {device_id}: broker {where} said {rc}")
        info = client.publish(down_topic(device_id, "desired"), b"", qos=1, retain=True)
        with contextlib.suppress(RuntimeError, ValueError):
            info.wait_for_publish(timeout)
        if not info.is_published():
            raise EnrollmentError(
                f"cannot evict {device_id}: broker {where} did not acknowledge clearing "
                "the retained desired document"
            )
    finally:
        client.disconnect()
        client.loop_stop()
