"""The broker test matrix: a real mosquitto with the configuration `broker-config` writes,
real TLS connections from paho with the certificates `device enroll` issues.

Each row of docs/security.md "Broker access" names one of these tests. Absence checks use
a sentinel: after the forbidden message, an allowed one goes the same way; once the
sentinel has arrived, the forbidden one would have arrived before it (mosquitto keeps a
client's messages in order).
"""

from __future__ import annotations

import itertools
import os
import queue
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.config import load_config
from agent.link import BrokerSettings, Incoming, MqttLink, Publication
from contract.messages import DESIRED_MAX_BYTES
from contract.topics import HUB_STATE_TOPIC, down_topic, up_topic
from hub.broker import find_mosquitto, free_port
from hub.broker_config import BrokerFiles, write_broker_config
from hub.ca import CertificateAuthority, Role, ca_init, write_pair
from hub.config import parse_config
from hub.enroll import enroll_device, evict_device, revoke_device
from hub.keys import Keyring
from hub.store import Store
from support import hub_samples
from support.tls_broker import ConfiguredMosquitto, Probe, TlsFiles

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed"),
]

NOT_AUTHORIZED = "Not authorized"
HUB_CLIENT_ID = "edgefleet-hub-hub"
PROTOCOLS = ["5", "3.1.1"]


@dataclass
class Fleet:
    root: Path
    ca_dir: Path
    broker: ConfiguredMosquitto
    files: BrokerFiles
    hub_port: int
    plain_port: int
    devices: dict[str, TlsFiles]
    bundles: dict[str, Path]
    hub_tls: TlsFiles
    rogue: TlsFiles
    server_as_client: TlsFiles

    def device(self, name: str, client_id: str | None = None, protocol: str = "5") -> Probe:
        return Probe(
            client_id or name, self.broker.port, tls=self.devices[name], protocol=protocol
        ).start()

    def hub(self, client_id: str = "hub-probe") -> Probe:
        return Probe(client_id, self.hub_port, tls=self.hub_tls).start()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("pki")
    ca_dir = root / "ca"
    init = ca_init(ca_dir)
    ring = Keyring.create(root / "keys", root / "hub-keys.json")
    port, hub_port, plain_port = free_port(), free_port(), free_port()
    devices: dict[str, TlsFiles] = {}
    bundles: dict[str, Path] = {}
    for name in ("A", "B", "C", "D"):
        bundle = enroll_device(
            ca_dir,
            name,
            root / "bundles" / name,
            broker_url=f"mqtts://127.0.0.1:{port}",
            hub_keys_file=ring.public_file,
        )
        bundles[name] = bundle.directory
        devices[name] = TlsFiles(bundle.files["ca"], bundle.files["cert"], bundle.files["key"])
    revoke_device(ca_dir, "C", reason="key_compromise")  # before the broker starts
    # An unenrolled device: a certificate with CN "A" from another CA.
    other = ca_init(root / "other-ca")
    rogue = CertificateAuthority(other.directory).issue("A", Role.DEVICE)
    write_pair(root / "rogue.crt", root / "rogue.key", rogue)
    workdir = root / "broker"
    files = write_broker_config(
        workdir,
        ca_dir,
        fleet_size=4,
        server_names=["localhost", "127.0.0.1"],
        port=port,
        hub_port=hub_port,
        plain_port=plain_port,
        log_file=workdir / "mosquitto.log",
        run_as_root=os.geteuid() == 0,
    )
    broker = ConfiguredMosquitto(
        workdir=workdir, port=port, config_path=files.config, other_ports=(hub_port, plain_port)
    )
    ca_file = ca_dir / "ca.crt"
    with broker:
        yield Fleet(
            root=root,
            ca_dir=ca_dir,
            broker=broker,
            files=files,
            hub_port=hub_port,
            plain_port=plain_port,
            devices=devices,
            bundles=bundles,
            hub_tls=TlsFiles(ca_file, init.hub_cert, init.hub_key),
            rogue=TlsFiles(ca_file, root / "rogue.crt", root / "rogue.key"),
            server_as_client=TlsFiles(ca_file, files.server_cert, files.server_key),
        )


def refused(probe: Probe) -> bool:
    """The broker did not let the client in (TLS refused, or a failed CONNACK)."""
    return not probe.connected and (
        probe.connect_error is not None
        or probe.wait_for(lambda: bool(probe.disconnects) or probe.connack is not None)
    )


# --- positive controls --------------------------------------------------------------------


def test_device_uses_its_own_topics(fleet: Fleet) -> None:
    with fleet.hub() as hub, fleet.device("A") as a:
        assert a.connected and hub.connected
        hub.subscribe("edgefleet/v1/dev/A/up/#")
        a.subscribe(down_topic("A", "desired"), HUB_STATE_TOPIC)
        assert str(a.publish(up_topic("A", "telemetry"))) in ("Success", "No matching subscribers")
        assert hub.received(up_topic("A", "telemetry"))
        hub.publish(down_topic("A", "desired"), b"desired-for-A", retain=True)
        hub.publish(HUB_STATE_TOPIC, b"online", retain=True)
        assert a.received(down_topic("A", "desired"))
        assert a.received(HUB_STATE_TOPIC)


def test_hub_account_reads_every_device_through_a_shared_subscription(fleet: Fleet) -> None:
    with fleet.hub() as hub, fleet.device("A") as a, fleet.device("B") as b:
        hub.subscribe("$share/hub/edgefleet/v1/dev/+/up/#", "$SYS/broker/uptime")
        a.publish(up_topic("A", "telemetry"))
        b.publish(up_topic("B", "telemetry"))
        assert hub.received(up_topic("A", "telemetry")) and hub.received(up_topic("B", "telemetry"))


def test_agent_link_connects_with_its_enrollment_bundle(fleet: Fleet) -> None:
    """The agent's own configuration loader and MQTT link, on the bundle as written."""
    config = load_config(fleet.bundles["A"] / "agent.toml", {})
    assert config.client_id == "A" and config.broker.tls
    settings = BrokerSettings(
        host=config.broker.host,
        port=config.broker.port,
        client_id=config.client_id,
        tls=True,
        ca_file=str(config.broker.ca_file),
        cert_file=str(config.broker.cert_file),
        key_file=str(config.broker.key_file),
        protocol=config.broker.protocol,
    )
    inbox: queue.Queue[Incoming] = queue.Queue()
    status = up_topic("A", "status")
    link = MqttLink(
        settings,
        subscriptions=[(down_topic("A", "desired"), 1)],
        next_session=itertools.count(1).__next__,
        will=lambda session: Publication(status, b"offline", retain=True),
        on_connected=lambda session: [Publication(status, b"online", retain=True)],
        on_message=inbox.put,
    )
    with fleet.hub() as hub:
        hub.subscribe(status)
        link.start()
        try:
            assert link.wait_connected(5.0)
            assert hub.received(status)
            hub.publish(down_topic("A", "desired"), b"desired-for-the-agent", retain=True)
            deadline = time.monotonic() + 5.0
            while True:
                message = inbox.get(timeout=max(0.01, deadline - time.monotonic()))
                if message.payload == b"desired-for-the-agent":
                    break
        finally:
            link.stop()


# --- device A against device B ------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_device_cannot_publish_on_another_devices_topics(fleet: Fleet, protocol: str) -> None:
    with fleet.hub() as hub, fleet.device("A", protocol=protocol) as a:
        hub.subscribe("edgefleet/v1/dev/+/up/#")
        for kind in ("birth", "status", "telemetry", "state", "events", "result"):
            rc = a.publish(up_topic("B", kind), b"forged")
            if protocol == "5":
                assert str(rc) == NOT_AUTHORIZED, kind
        sentinel = up_topic("A", "telemetry")
        a.publish(sentinel, b"sentinel")
        assert hub.received(sentinel)
        assert not [t for t in hub.topics() if "/dev/B/" in t]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_device_cannot_read_another_devices_desired_state(fleet: Fleet, protocol: str) -> None:
    with fleet.hub() as hub:
        hub.publish(down_topic("B", "desired"), b"secret-desired-for-B", retain=True)
        with fleet.device("A", protocol=protocol) as a:
            # Subscriptions are granted (mosquitto checks reads on delivery), but nothing of
            # B's is ever delivered, retained or live.
            a.subscribe(
                down_topic("B", "desired"), "edgefleet/v1/dev/+/down/#", "edgefleet/v1/#", "#"
            )
            hub.publish(down_topic("B", "desired"), b"live-desired-for-B", retain=True)
            hub.publish(down_topic("B", "cmd"), b"cmd-for-B")
            sentinel = down_topic("A", "cmd")
            hub.publish(sentinel, b"sentinel")
            assert a.received(sentinel)
            time.sleep(0.2)  # retained deliveries come in tree order, not publish order
            assert not [t for t in a.topics() if "/dev/B/" in t]
            assert not [m for m in a.messages if b"for-B" in m.payload]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_device_cannot_publish_desired_state_or_commands(fleet: Fleet, protocol: str) -> None:
    with fleet.hub() as hub, fleet.device("B") as b:
        hub.subscribe("edgefleet/v1/#")
        b.subscribe("edgefleet/v1/dev/B/down/#")
        with fleet.device("A", protocol=protocol) as a:
            forged = [
                down_topic("A", "desired"),
                down_topic("A", "cmd"),
                down_topic("B", "desired"),
                down_topic("B", "cmd"),
                HUB_STATE_TOPIC,
            ]
            for topic in forged:
                rc = a.publish(topic, b"forged", retain=topic.endswith("desired"))
                if protocol == "5":
                    assert str(rc) == NOT_AUTHORIZED, topic
            sentinel = up_topic("A", "events")
            a.publish(sentinel, b"sentinel")
            assert hub.received(sentinel)
        sentinel_b = down_topic("B", "cmd")
        hub.publish(sentinel_b, b"sentinel-from-hub")
        assert b.received(sentinel_b)
        assert not [m for m in hub.messages + b.messages if m.payload == b"forged"]
    # Nothing forged was retained either: a fresh reader sees only the hub's documents.
    with fleet.hub("hub-reader") as reader:
        reader.subscribe(down_topic("A", "desired"), down_topic("B", "desired"), HUB_STATE_TOPIC)
        time.sleep(0.3)
        assert not [m for m in reader.messages if m.payload == b"forged"]


# --- who may connect at all ---------------------------------------------------------------


@pytest.mark.parametrize(
    "case", ["other CA, CN A", "no client certificate", "broker certificate as client"]
)
def test_unenrolled_certificate_cannot_connect(fleet: Fleet, case: str) -> None:
    tls = {
        "other CA, CN A": fleet.rogue,
        "no client certificate": TlsFiles(fleet.hub_tls.ca, None, None),
        "broker certificate as client": fleet.server_as_client,
    }[case]
    with Probe("A", fleet.broker.port, tls=tls).start() as probe:
        assert refused(probe), case
    with Probe("A", fleet.hub_port, tls=tls).start() as probe:
        assert refused(probe), f"{case} (hub listener)"


def test_revoked_certificate_cannot_connect(fleet: Fleet) -> None:
    with fleet.device("C") as c:
        assert refused(c)
    assert "certificate verify failed" in fleet.broker.log()


def test_revocation_reload_and_evict_cut_a_connected_device(fleet: Fleet) -> None:
    """D is connected when revoked: the CRL counts after a reload, evict ends the live
    connection and clears its retained desired document, the store forgets it."""
    with Store(fleet.root / "hub.db") as store:
        store.record_birth(hub_samples.birth("D"), time.time())
        store.record_desired(
            "D", 1, "0" * 64, {"payload": {}}, issued_at=time.time(), expires_at=time.time() + 60
        )
        with fleet.hub() as hub, fleet.device("D") as d:
            assert d.connected
            hub.publish(down_topic("D", "desired"), b"desired-for-D", retain=True)
            revocation = revoke_device(fleet.ca_dir, "D", store=store, reason="key_compromise")
            assert revocation.revoked and revocation.desired_removed == 1
            assert revocation.device_removed and store.latest_desired("D") is None
            assert d.connected  # mosquitto never drops a connected client for its CRL
            fleet.broker.reload()
            with Probe("D", fleet.broker.port, tls=fleet.devices["D"]).start() as again:
                assert refused(again)
            config = parse_config(
                f"""
[broker]
url = "mqtts://127.0.0.1:{fleet.hub_port}"
ca_file = "{fleet.hub_tls.ca}"
cert_file = "{fleet.hub_tls.cert}"
key_file = "{fleet.hub_tls.key}"
""",
                fleet.root / "hub.toml",
            )
            evict_device(config, "D")
            assert d.wait_for(lambda: bool(d.disconnects))
        with fleet.hub("hub-reader") as reader:
            reader.subscribe(down_topic("D", "desired"))
            time.sleep(0.3)
            assert not [m for m in reader.messages if m.payload]


# --- client id versus certificate CN --------------------------------------------------------


def test_client_id_other_than_the_cn_is_replaced_by_the_cn(fleet: Fleet) -> None:
    with fleet.hub(HUB_CLIENT_ID) as hub, fleet.device("B") as b:
        hub.subscribe("edgefleet/v1/dev/+/up/#")
        with fleet.device("A", client_id="B") as a_as_b:
            assert a_as_b.connected
            # B keeps its connection: A's connection is known to the broker as "A".
            assert not b.wait_for(lambda: bool(b.disconnects), timeout=0.5)
            assert str(a_as_b.publish(up_topic("B", "telemetry"), b"forged")) == NOT_AUTHORIZED
            a_as_b.publish(up_topic("A", "telemetry"), b"sentinel")
            assert hub.received(up_topic("A", "telemetry"))
        with fleet.device("A", client_id=HUB_CLIENT_ID) as a_as_hub:
            assert a_as_hub.connected
            assert not hub.wait_for(lambda: bool(hub.disconnects), timeout=0.5)
        assert b.connected and hub.connected
        assert not [m for m in hub.messages if m.payload == b"forged"]
    log = fleet.broker.log()
    assert re.search(r"as A \([^)]*u'A'\)", log)
    assert not re.search(r"as (B|edgefleet-hub-hub) \([^)]*u'A'\)", log)


# --- the hub's accounts and the limits ------------------------------------------------------


def test_plain_listener_admits_only_the_hub_account(fleet: Fleet) -> None:
    assert fleet.files.hub_password_file is not None
    password = fleet.files.hub_password_file.read_text().strip()
    with Probe("hub-plain", fleet.plain_port, username="edgefleet-hub", password=password) as hub:
        assert hub.start().connected
    for username, secret in ((None, None), ("edgefleet-hub", "wrong"), ("A", "")):
        with Probe("intruder", fleet.plain_port, username=username, password=secret) as probe:
            assert refused(probe.start()), username


def test_a_desired_document_of_the_largest_accepted_size_passes(fleet: Fleet) -> None:
    """The broker's packet limit leaves room for the topic and headers of a 1 MiB document."""
    with fleet.hub("hub-big") as hub, fleet.device("B") as b:
        b.subscribe(down_topic("B", "desired"))
        hub.publish(down_topic("B", "desired"), b"x" * DESIRED_MAX_BYTES)
        assert b.wait_for(
            lambda: any(len(m.payload) == DESIRED_MAX_BYTES for m in b.messages), timeout=10
        )
        assert hub.connected and b.connected


def test_oversized_packet_is_refused(fleet: Fleet) -> None:
    with fleet.device("A") as a:
        a.client.publish(up_topic("A", "telemetry"), b"x" * (2 * 1024 * 1024), qos=1)
        assert a.wait_for(lambda: bool(a.disconnects))
