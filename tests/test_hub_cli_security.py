"""``edgefleet-hub ca|device|broker-config`` as real subprocesses (docs/enrollment.md), and
the controller leaving revoked devices alone even when they send a birth again."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from contract.topics import Kind, down_topic
from hub.artifacts import ArtifactStore
from hub.broker import MosquittoBroker
from hub.ca import CertificateAuthority, Role
from hub.config import HubConfig
from hub.enroll import REVOKED_META_PREFIX, revoke_device, revoked_devices
from hub.init import init_hub
from hub.keys import Keyring
from hub.service import HubService
from hub.store import Store
from support import hub_samples
from support.fleet import mqtt_tap
from support.hub_fleet import RecordingPublisher
from support.inference import save_add_model

EXE = str(Path(sys.executable).parent / "edgefleet-hub")


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    return subprocess.run(
        [EXE, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stderr == ""
    return result.stdout


def error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgefleet-hub: error: "), result.stderr
    return lines[0]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def hub_config(tmp_path: Path) -> HubConfig:
    return init_hub(tmp_path / "hub", hub_id="hub-sec").config


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "ca"
    ok(run("ca", "init", str(directory)))
    return directory


def test_ca_init_creates_the_ca_and_refuses_a_second_one(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    out = ok(run("ca", "init", str(directory), "--common-name", "test fleet CA"))
    assert f"created the fleet CA in {directory}" in out
    assert (directory / "ca.crt").is_file() and (directory / "crl.pem").is_file()
    assert mode(directory / "private" / "ca.key") == 0o600
    hub_cert = directory / "private" / "hub" / "edgefleet-hub.crt"
    assert hub_cert.is_file() and str(hub_cert) in out
    ca = CertificateAuthority(directory)
    assert ca.certificate().subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "test fleet CA"
    )
    assert "exist" in error(run("ca", "init", str(directory)))


def test_ca_crl_re_signs_the_revocation_list(ca_dir: Path) -> None:
    out = ok(run("ca", "crl", str(ca_dir), "--days", "30"))
    assert "re-signed" in out and str(ca_dir / "crl.pem") in out
    expires = CertificateAuthority(ca_dir).crl_expires_at
    assert 29 * 86400 < expires - time.time() < 31 * 86400
    assert f"{datetime.fromtimestamp(expires, UTC):%Y-%m-%d}" in out
    assert "no CA" in error(run("ca", "crl", str(ca_dir.parent / "nothing")))


def test_device_enroll_writes_the_bundle(
    ca_dir: Path, hub_config: HubConfig, tmp_path: Path
) -> None:
    assert hub_config.source is not None
    config = str(hub_config.source)
    out_dir = tmp_path / "pi-0042"
    out = ok(
        run(
            "device",
            "enroll",
            "pi-0042",
            "--ca",
            str(ca_dir),
            "--out",
            str(out_dir),
            "--broker-url",
            "mqtts://mqtt.example.com:8883",
            "--labels",
            "site=plant-3,line=2",
            "--days",
            "30",
            "--config",
            config,
        )
    )
    assert "enrolled pi-0042" in out
    names = {p.name for p in out_dir.iterdir()}
    assert names == {"agent.toml", "device.crt", "device.key", "ca.crt", "hub-keys.json"}
    assert mode(out_dir) == 0o700 and mode(out_dir / "device.key") == 0o600
    agent_toml = (out_dir / "agent.toml").read_text()
    assert 'device_id = "pi-0042"' in agent_toml and "plant-3" in agent_toml
    cert = x509.load_pem_x509_certificate((out_dir / "device.crt").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pi-0042"
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds() / 86400
    assert 29 < days < 31.1
    # enrolled already: refused; --replace re-keys and revokes the earlier certificate
    again = tmp_path / "pi-0042-b"
    base = ["device", "enroll", "pi-0042", "--ca", str(ca_dir), "--out", str(again)]
    url = ["--broker-url", "mqtts://mqtt.example.com:8883", "--config", config]
    assert "enrolled already" in error(run(*base, *url))
    replaced = ok(run(*base, *url, "--replace"))
    assert "revoked the earlier certificate" in replaced
    # a bad URL and bad labels are one line each
    assert "mqtts" in error(
        run(
            "device",
            "enroll",
            "x1",
            "--ca",
            str(ca_dir),
            "--out",
            str(tmp_path / "x1"),
            "--broker-url",
            "http://nope",
            "--config",
            config,
        )
    )
    assert "label" in error(
        run(
            "device",
            "enroll",
            "x2",
            "--ca",
            str(ca_dir),
            "--out",
            str(tmp_path / "x2"),
            "--broker-url",
            "mqtts://h:8883",
            "--labels",
            "no-equals",
            "--config",
            config,
        )
    )


def test_device_enroll_with_a_csr_keeps_the_key_on_the_device(
    ca_dir: Path, hub_config: HubConfig, tmp_path: Path
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "whatever")]))
        .sign(key, hashes.SHA256())
    )
    csr_path = tmp_path / "dev.csr"
    csr_path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    out_dir = tmp_path / "bundle"
    ok(
        run(
            "device",
            "enroll",
            "cam-7",
            "--ca",
            str(ca_dir),
            "--out",
            str(out_dir),
            "--broker-url",
            "mqtts://mqtt.example.com",
            "--csr",
            str(csr_path),
            "--config",
            str(hub_config.source),
        )
    )
    assert not (out_dir / "device.key").exists()
    cert = x509.load_pem_x509_certificate((out_dir / "device.crt").read_bytes())
    assert cert.public_key() == key.public_key()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cam-7"


def test_device_revoke_puts_it_on_the_crl_and_marks_it(
    ca_dir: Path, hub_config: HubConfig, tmp_path: Path
) -> None:
    config = str(hub_config.source)
    ok(
        run(
            "device",
            "enroll",
            "pi-1",
            "--ca",
            str(ca_dir),
            "--out",
            str(tmp_path / "b"),
            "--broker-url",
            "mqtts://h:8883",
            "--config",
            config,
        )
    )
    with Store(hub_config.store_path) as store:
        store.record_birth(hub_samples.birth("pi-1"), hub_samples.TS)
    out = ok(
        run(
            "device",
            "revoke",
            "pi-1",
            "--ca",
            str(ca_dir),
            "--reason",
            "key_compromise",
            "--config",
            config,
        )
    )
    assert "revoked pi-1: 1 certificate(s)" in out and "device evict pi-1" in out
    ca = CertificateAuthority(ca_dir)
    (record,) = ca.find("pi-1")
    assert record.revoked
    assert ca.crl().get_revoked_certificate_by_serial_number(record.serial) is not None
    with Store(hub_config.store_path) as store:
        assert revoked_devices(store) == {"pi-1"}
        assert store.find_device("pi-1") is None
    # twice is harmless; an unknown reason or device is one line
    assert "no new certificate" in ok(
        run("device", "revoke", "pi-1", "--ca", str(ca_dir), "--config", config)
    )
    bad = run("device", "revoke", "pi-1", "--ca", str(ca_dir), "--reason", "boredom")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    assert "'nobody' is not enrolled" in error(
        run("device", "revoke", "nobody", "--ca", str(ca_dir), "--config", config)
    )


def test_device_evict_clears_the_retained_document(broker: MosquittoBroker, tmp_path: Path) -> None:
    config = init_hub(tmp_path / "hub", broker_url=broker.url).config
    topic = down_topic("pi-9", Kind.DESIRED)
    with mqtt_tap(broker) as tap:
        tap.publish(topic, b'{"stale": true}', retain=True)
    out = ok(run("device", "evict", "pi-9", "--config", str(config.source)))
    assert "evicted pi-9" in out
    with mqtt_tap(broker, topic) as tap:
        time.sleep(1.0)
        assert [r for r in tap.received if r.payload] == []
    # no broker there: one line naming it
    assert config.source is not None
    text = config.source.read_text().replace(broker.url, "mqtt://127.0.0.1:9")
    config.source.write_text(text)
    assert "cannot evict pi-9" in error(
        run("device", "evict", "pi-9", "--config", str(config.source), "--timeout", "2")
    )


def test_broker_config_writes_mosquitto_files(ca_dir: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "mosquitto"
    out = ok(
        run(
            "broker-config",
            str(out_dir),
            "--ca",
            str(ca_dir),
            "--fleet-size",
            "500",
            "--server-name",
            "mqtt.example.com",
            "--server-name",
            "10.0.0.5",
            "--plain-port",
            "18830",
            "--run-as-root",
        )
    )
    assert "mqtt.example.com, 10.0.0.5" in out and "up to 550 connections" in out
    conf = (out_dir / "mosquitto.conf").read_text()
    assert "listener 8883" in conf and "listener 8884 127.0.0.1" in conf
    assert "listener 18830 127.0.0.1" in conf and "user root" in conf
    assert str(ca_dir / "crl.pem") in conf
    assert "pattern write edgefleet/v1/dev/%u/up/#" in (out_dir / "acl").read_text()
    assert mode(out_dir / "server.key") == 0o600
    assert (out_dir / "hub-password").is_file()
    assert "fleet size must be at least 1" in error(
        run("broker-config", str(out_dir), "--ca", str(ca_dir), "--fleet-size", "0")
    )


# --- the controller and revoked devices --------------------------------------------------------


@pytest.fixture
def service(tmp_path: Path) -> Iterator[HubService]:
    config = init_hub(tmp_path / "hub", hub_id="hub-sec").config
    store = Store(config.store_path)
    service = HubService(
        config,
        store,
        artifacts=ArtifactStore(config.artifacts_dir),
        keys=Keyring(config.keys_dir, config.public_keys_path),
        publisher=RecordingPublisher(),
    )
    try:
        path = save_add_model(tmp_path / "m.onnx", 1.0, width=4)
        (record,) = service.add_model(path, name="m", version="1", measure=False)
        service.apply_model_set(
            "schema: edgefleet.modelset/1\nname: app\nversion: '1'\nmodels:\n"
            "  - name: m\n    version: '1'\n    priority: 1\n    variants:\n"
            "      - name: fp32\n        precision: fp32\n"
            f"        artifact: {{sha256: {record.sha256}, size: {record.size}}}\n"
            "        requires: {memory_mb: 10}\n",
            "app.yaml",
        )
        yield service
    finally:
        store.close()


def test_a_revoked_device_gets_no_desired_state_even_after_a_birth(
    service: HubService, tmp_path: Path
) -> None:
    publisher = service.publisher
    assert isinstance(publisher, RecordingPublisher)
    store = service.store
    for device_id in ("pi-1", "pi-2"):
        store.record_birth(hub_samples.birth(device_id), hub_samples.TS)
    service.apply_policy(
        "schema: edgefleet.policy/1\nname: all\nselector: {}\n"
        "model_set: {name: app, version: '1'}\n",
        "all.yaml",
    )
    assert sorted(store.latest_desired_all()) == ["pi-1", "pi-2"]
    publisher.take()
    ca_dir = tmp_path / "ca"
    ok(run("ca", "init", str(ca_dir)))
    CertificateAuthority(ca_dir).issue("pi-1", Role.DEVICE)
    revoke_device(ca_dir, "pi-1", store=store)
    assert store.latest_desired("pi-1") is None
    # the broker has not reloaded its CRL yet: pi-1 connects and sends a birth
    store.record_birth(hub_samples.birth("pi-1", session=2), hub_samples.TS + 10)
    report = service.reconcile(["pi-1", "pi-2"])
    assert "pi-1" not in report.outcomes and report.outcomes["pi-2"] == "unchanged"
    report = service.reconcile()
    assert "pi-1" not in report.outcomes
    assert service.controller.republish(["pi-1"]) == 0
    assert service.publish_pending() == 0
    assert store.latest_desired("pi-1") is None
    assert publisher.take() == []
    # enrolled again (the mark is cleared): it is served again
    store.delete_meta(REVOKED_META_PREFIX + "pi-1")
    report = service.reconcile(["pi-1"])
    assert report.outcomes["pi-1"] == "published"
    assert [p.topic for p in publisher.take()] == [down_topic("pi-1", Kind.DESIRED)]
