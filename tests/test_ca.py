"""The fleet CA, device enrollment bundles, revocation and the rendered broker configuration
(no broker here: tests/test_broker_acl.py runs the configuration against mosquitto)."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.config import hub_public_keys, load_config
from hub.broker import free_port
from hub.broker_config import (
    BrokerSettings,
    mosquitto_password_hash,
    render_acl,
    render_config,
    write_broker_config,
)
from hub.ca import CertificateAuthority, Role, ca_init, refresh_crl
from hub.config import parse_config
from hub.enroll import (
    REVOKED_META_PREFIX,
    enroll_device,
    evict_device,
    parse_labels,
    revoke_device,
    revoked_devices,
)
from hub.errors import BrokerConfigError, CAError, EnrollmentError
from hub.keys import Keyring
from hub.store import Store
from support import hub_samples

URL = "mqtts://mqtt.example.com:8883"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    cert.verify_directly_issued_by(issuer)
    return True


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    ca_init(tmp_path / "ca")
    return tmp_path / "ca"


@pytest.fixture
def hub_keys(tmp_path: Path) -> Keyring:
    return Keyring.create(tmp_path / "keys", tmp_path / "hub-keys.json")


# --- CA ----------------------------------------------------------------------------------


def test_ca_init_layout_modes_and_hub_certificate(tmp_path: Path) -> None:
    result = ca_init(tmp_path / "ca")
    ca = CertificateAuthority(result.directory)
    assert mode(result.directory) == 0o755 and mode(ca.private_dir) == 0o700
    assert mode(ca.key_path) == 0o600 and mode(ca.index_path) == 0o600
    assert mode(ca.cert_path) == 0o644 and mode(ca.crl_path) == 0o644
    assert mode(result.hub_key) == 0o600
    root = ca.certificate()
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = serialization.load_pem_private_key(ca.key_path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    hub = x509.load_pem_x509_certificate(result.hub_cert.read_bytes())
    assert cn(hub) == "edgefleet-hub" and eku(hub) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert signed_by(hub, root)
    crl = ca.crl()
    assert crl.is_signature_valid(root.public_key())  # type: ignore[arg-type]
    assert len(crl) == 0
    assert ca.crl_expires_at > time.time() + 300 * 86400


def test_ca_init_refuses_an_existing_ca(ca_dir: Path) -> None:
    before = (ca_dir / "private" / "ca.key").read_bytes()
    with pytest.raises(CAError, match="exists"):
        ca_init(ca_dir)
    assert (ca_dir / "private" / "ca.key").read_bytes() == before


def test_missing_ca_is_named(tmp_path: Path, hub_keys: Keyring) -> None:
    with pytest.raises(CAError, match=r"ca init"):
        enroll_device(
            tmp_path / "nope",
            "A",
            tmp_path / "b",
            broker_url=URL,
            hub_keys_file=hub_keys.public_file,
        )
    with pytest.raises(CAError, match=r"nope"):
        write_broker_config(tmp_path / "broker", tmp_path / "nope", fleet_size=1)


def test_device_certificate(ca_dir: Path) -> None:
    ca = CertificateAuthority(ca_dir)
    issued = ca.issue("pi-1.plant:3", Role.DEVICE, validity_days=30)
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    assert cn(cert) == "pi-1.plant:3"
    assert eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert signed_by(cert, ca.certificate())
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds() / 86400
    assert 30 <= days < 30.01
    assert issued.record.serial == cert.serial_number
    assert issued.record.sha256 == cert.fingerprint(hashes.SHA256()).hex()
    assert ca.verify(issued.cert_pem).name == "pi-1.plant:3"
    other = ca.issue("pi-2", Role.DEVICE)
    assert other.record.serial != issued.record.serial
    assert [r.name for r in ca.records()] == ["edgefleet-hub", "pi-1.plant:3", "pi-2"]


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "dev#", "with space", "x" * 65, "-lead"])
def test_bad_device_ids_are_refused(ca_dir: Path, bad: str) -> None:
    with pytest.raises(EnrollmentError, match="device id"):
        CertificateAuthority(ca_dir).issue(bad, Role.DEVICE)


def test_a_name_belongs_to_one_role(ca_dir: Path) -> None:
    with pytest.raises(EnrollmentError, match="hub certificate"):
        CertificateAuthority(ca_dir).issue("edgefleet-hub", Role.DEVICE)


def test_revoke_writes_the_crl_and_is_idempotent(ca_dir: Path) -> None:
    ca = CertificateAuthority(ca_dir)
    issued = ca.issue("A", Role.DEVICE)
    one = issued.record
    ca.issue("B", Role.DEVICE)
    number = ca.crl().extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    revoked = ca.revoke("A", reason="key_compromise")
    assert [r.serial for r in revoked] == [one.serial]
    crl = ca.crl()
    entry = crl.get_revoked_certificate_by_serial_number(one.serial)
    assert entry is not None
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason == x509.ReasonFlags.key_compromise
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > number
    assert ca.revoked_names() == {"A"} and ca.names(Role.DEVICE) == {"B"}
    with pytest.raises(CAError, match="revoked"):
        ca.verify(issued.cert_pem)
    assert ca.revoke("A") == []
    with pytest.raises(EnrollmentError, match="not enrolled"):
        ca.revoke("never")
    with pytest.raises(EnrollmentError, match="reason"):
        ca.revoke("B", reason="because")


def test_refresh_crl_moves_next_update(ca_dir: Path) -> None:
    ca = CertificateAuthority(ca_dir)
    before = ca.crl_expires_at
    refresh_crl(ca_dir, crl_days=730)
    assert ca.crl_expires_at > before + 300 * 86400
    later = CertificateAuthority(ca_dir, clock=lambda: time.time() + 10 * 86400)
    later.refresh_crl()
    assert later.crl_expires_at > time.time() + 739 * 86400


# --- enrollment bundle ---------------------------------------------------------------------


def test_enroll_writes_a_bundle_the_agent_loads(
    ca_dir: Path, hub_keys: Keyring, tmp_path: Path
) -> None:
    out = tmp_path / "bundle"
    bundle = enroll_device(
        ca_dir,
        "pi-7",
        out,
        broker_url=URL,
        hub_keys_file=hub_keys.public_file,
        labels=parse_labels("site=plant-3, line/no=2"),
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "agent.toml",
        "ca.crt",
        "device.crt",
        "device.key",
        "hub-keys.json",
    ]
    assert mode(out) == 0o700 and mode(out / "device.key") == 0o600
    config = load_config(bundle.agent_config, {})
    assert config.device_id == "pi-7" and config.client_id == "pi-7"
    assert config.broker.tls and config.broker.host == "mqtt.example.com"
    assert config.broker.port == 8883
    assert config.broker.cert_file == out.resolve() / "device.crt"
    assert config.labels == {"site": "plant-3", "line/no": "2"}
    assert hub_public_keys(config) == hub_keys.public_keys()
    cert = x509.load_pem_x509_certificate((out / "device.crt").read_bytes())
    ca_cert = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    assert cn(cert) == "pi-7" and signed_by(cert, ca_cert)
    key = serialization.load_pem_private_key((out / "device.key").read_bytes(), None)
    assert key.public_key() == cert.public_key()


def test_enroll_with_a_csr_certifies_the_devices_own_key(
    ca_dir: Path, hub_keys: Keyring, tmp_path: Path
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone-else")]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    out = tmp_path / "bundle"
    enroll_device(ca_dir, "pi-8", out, broker_url=URL, hub_keys_file=hub_keys.public_file, csr=csr)
    assert not (out / "device.key").exists()
    cert = x509.load_pem_x509_certificate((out / "device.crt").read_bytes())
    assert cn(cert) == "pi-8" and cert.public_key() == key.public_key()
    wrong_curve = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .sign(ec.generate_private_key(ec.SECP384R1()), hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    for bad, match in ((wrong_curve, "P-256"), (b"not a csr", "not a certificate signing")):
        with pytest.raises(EnrollmentError, match=match):
            enroll_device(
                ca_dir,
                "pi-9",
                tmp_path / "b9",
                broker_url=URL,
                hub_keys_file=hub_keys.public_file,
                csr=bad,
            )


def test_enroll_refusals(ca_dir: Path, hub_keys: Keyring, tmp_path: Path) -> None:
    keys = hub_keys.public_file
    enroll_device(ca_dir, "A", tmp_path / "a", broker_url=URL, hub_keys_file=keys)
    cases: list[tuple[dict[str, object], str]] = [
        ({"device_id": "A"}, "enrolled already"),
        ({"out_dir": tmp_path / "a"}, "not empty"),
        ({"broker_url": "mqtt://broker:1883"}, "mqtts://"),
        ({"broker_url": "mqtts://u:p@broker"}, "credentials"),
        ({"labels": {"bad label": "x"}}, "label 'bad label'"),
        ({"labels": {"site": "a\x7fb"}}, "control character"),
        ({"hub_keys_file": tmp_path / "missing.json"}, "missing.json"),
        ({"device_id": "a/b"}, "device id"),
    ]
    for changes, match in cases:
        args: dict[str, object] = {
            "device_id": "B",
            "out_dir": tmp_path / "b",
            "broker_url": URL,
            "hub_keys_file": keys,
        }
        args.update(changes)
        with pytest.raises(EnrollmentError, match=match):
            enroll_device(ca_dir, **args)  # type: ignore[arg-type]
        assert not (tmp_path / "b").exists()
    bad_keys = tmp_path / "bad-keys.json"
    bad_keys.write_text(json.dumps({"keys": [{"keyid": "00", "public_key": "AAAA"}]}))
    with pytest.raises(EnrollmentError, match=r"bad-keys\.json"):
        enroll_device(ca_dir, "B", tmp_path / "b", broker_url=URL, hub_keys_file=bad_keys)
    with pytest.raises(EnrollmentError, match="name=value"):
        parse_labels("site")
    # Nothing was issued for the refused enrollments.
    assert CertificateAuthority(ca_dir).find("B") == []


def test_enroll_replace_revokes_the_earlier_certificate(
    ca_dir: Path, hub_keys: Keyring, tmp_path: Path
) -> None:
    keys = hub_keys.public_file
    first = enroll_device(ca_dir, "A", tmp_path / "a1", broker_url=URL, hub_keys_file=keys)
    second = enroll_device(
        ca_dir, "A", tmp_path / "a2", broker_url=URL, hub_keys_file=keys, replace=True
    )
    assert [r.serial for r in second.replaced] == [first.certificate.serial]
    ca = CertificateAuthority(ca_dir)
    assert ca.crl().get_revoked_certificate_by_serial_number(first.certificate.serial)
    assert [r.serial for r in ca.active("A")] == [second.certificate.serial]


def test_revoke_device_cleans_the_store(ca_dir: Path, hub_keys: Keyring, tmp_path: Path) -> None:
    keys = hub_keys.public_file
    enroll_device(ca_dir, "A", tmp_path / "a", broker_url=URL, hub_keys_file=keys)
    enroll_device(ca_dir, "B", tmp_path / "b", broker_url=URL, hub_keys_file=keys)
    now = time.time()
    with Store(tmp_path / "hub.db") as store:
        for device in ("A", "B"):
            store.record_birth(hub_samples.birth(device), now)
            for generation in (1, 2):
                store.record_desired(
                    device, generation, "0" * 64, {}, issued_at=now, expires_at=now + 60
                )
        result = revoke_device(ca_dir, "A", store=store, reason="cessation_of_operation")
        assert result.desired_removed == 2 and result.device_removed
        assert store.latest_desired("A") is None and store.find_device("A") is None
        assert store.latest_desired("B") is not None and store.find_device("B") is not None
        assert revoked_devices(store) == {"A"}
        assert store.desired_expiring_before(now + 3600)[0].device_id == "B"
        again = revoke_device(ca_dir, "A", store=store)
        assert again.revoked == [] and again.desired_removed == 0
        with pytest.raises(EnrollmentError, match="not enrolled"):
            revoke_device(ca_dir, "nobody", store=store)
        enroll_device(
            ca_dir, "A", tmp_path / "a-new", broker_url=URL, hub_keys_file=keys, store=store
        )
        assert store.get_meta(REVOKED_META_PREFIX + "A") is None
        assert revoked_devices(store) == set()


def test_evict_names_an_unreachable_broker(ca_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    config = parse_config(f'[broker]\nurl = "mqtt://127.0.0.1:{port}"\n', tmp_path / "hub.toml")
    with pytest.raises(EnrollmentError, match=f"cannot evict A: broker 127.0.0.1:{port}"):
        evict_device(config, "A", timeout=2.0)


# --- broker configuration ------------------------------------------------------------------


def _settings(tmp_path: Path, **changes: object) -> BrokerSettings:
    fields: dict[str, object] = {
        "ca_file": tmp_path / "ca.crt",
        "crl_file": tmp_path / "crl.pem",
        "server_cert": tmp_path / "server.crt",
        "server_key": tmp_path / "server.key",
        "acl_file": tmp_path / "acl",
        "persistence_dir": tmp_path / "data",
        "fleet_size": 2000,
    }
    fields.update(changes)
    return BrokerSettings(**fields)  # type: ignore[arg-type]


def test_rendered_config_is_sized_for_the_fleet(tmp_path: Path) -> None:
    text = render_config(_settings(tmp_path))
    lines = set(text.splitlines())
    for line in (
        "allow_anonymous false",
        "listener 8883",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        f"crlfile {tmp_path / 'crl.pem'}",
        f"acl_file {tmp_path / 'acl'}",
        "persistence true",
        f"persistence_location {tmp_path / 'data'}/",
        "max_connections 2200",
        "max_queued_messages 500000",
        f"max_queued_bytes {1024**3}",
        "max_packet_size 1114112",
        "listener 8884 127.0.0.1",
    ):
        assert line in lines, line
    assert text.count("use_username_as_clientid true") == 1  # devices only, not the hub
    assert "user root" not in lines and "password_file" not in text
    small = render_config(_settings(tmp_path, fleet_size=3, hub_port=None))
    assert "max_queued_messages 1000" in small and "8884" not in small
    assert "max_connections 19" in small


def test_rendered_config_refuses_impossible_settings(tmp_path: Path) -> None:
    for changes, match in (
        ({"fleet_size": 0}, "fleet size"),
        ({"port": 9000, "hub_port": 9000}, "also port"),
        ({"plain_port": 1883}, "password_file"),
        ({"port": 70000}, "not a TCP port"),
        ({"max_packet_bytes": 10}, "max packet"),
    ):
        with pytest.raises(BrokerConfigError, match=match):
            render_config(_settings(tmp_path, **changes))


def test_acl_confines_devices_by_cn() -> None:
    acl = render_acl(["edgefleet-hub", "edgefleet-hub-2"]).splitlines()
    assert "pattern write edgefleet/v1/dev/%u/up/#" in acl
    assert "pattern read edgefleet/v1/dev/%u/down/#" in acl
    assert not [line for line in acl if "%c" in line]
    assert acl.count("topic readwrite edgefleet/v1/#") == 2
    assert "user edgefleet-hub-2" in acl
    with pytest.raises(BrokerConfigError):
        render_acl(["bad/name"])


def test_write_broker_config_keeps_a_matching_server_certificate(
    ca_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "broker"
    files = write_broker_config(
        out, ca_dir, fleet_size=10, server_names=["mqtt.example.com", "10.0.0.5"], plain_port=1883
    )
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    assert eku(cert) == [ExtendedKeyUsageOID.SERVER_AUTH]
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["mqtt.example.com"]
    assert mode(files.server_key) == 0o600
    assert files.hub_password_file is not None and mode(files.hub_password_file) == 0o600
    password = files.hub_password_file.read_text()
    first_cert = files.server_cert.read_bytes()
    assert files.password_file is not None
    assert files.password_file.read_text().startswith("edgefleet-hub:$7$101$")
    again = write_broker_config(
        out, ca_dir, fleet_size=10, server_names=["mqtt.example.com", "10.0.0.5"], plain_port=1883
    )
    assert again.server_cert.read_bytes() == first_cert
    assert again.hub_password_file is not None
    assert again.hub_password_file.read_text() == password
    renamed = write_broker_config(out, ca_dir, fleet_size=10, server_names=["mqtt2.example.com"])
    assert renamed.server_cert.read_bytes() != first_cert


def test_mosquitto_password_hash_format() -> None:
    digest = mosquitto_password_hash("secret", salt=b"\x00" * 12)
    assert digest.startswith("$7$101$AAAAAAAAAAAAAAAA$") and len(digest.split("$")) == 5
