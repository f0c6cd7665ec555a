"""The hub's MQTT ingest against a real private mosquitto and a real SQLite store."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from contract.messages import Cmd, HubState, Message, decode, encode, topic_for
from contract.topics import HUB_STATE_TOPIC, Kind, down_topic, up_topic
from hub.broker import MosquittoBroker, free_port
from hub.config import HubConfig
from hub.errors import IngestError
from hub.ingest import Ingest, IngestHooks, SeqTracker
from hub.metrics import HubMetrics
from hub.store import DeviceCursor, Store
from support import hub_samples as samples

TIMEOUT = 10.0


def wait_until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def hub_config(mosquitto: MosquittoBroker, **changes: Any) -> HubConfig:
    data: dict[str, Any] = {
        "hub_id": "hub-test",
        "broker": {"url": mosquitto.url},
        "api": {"token": "t" * 32, "token_file": None},
        "ingest": {},
    }
    for section, values in changes.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return HubConfig.model_validate(data)


class Peer:
    """A plain MQTT client standing in for devices (and for operators watching topics)."""

    def __init__(self, broker: MosquittoBroker, client_id: str, protocol: str = "5") -> None:
        self.received: list[mqtt.MQTTMessage] = []
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5
            if protocol == "5"
            else MQTTProtocolVersion.MQTTv311,
        )
        self.client.on_message = lambda c, u, m: self.received.append(m)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def send(self, msg: Message, *, retain: bool = False, topic: str | None = None) -> None:
        self.raw(topic or topic_for(msg), encode(msg), retain=retain)

    def raw(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(TIMEOUT)

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, 1)
        time.sleep(0.2)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def peer(broker: MosquittoBroker) -> Iterator[Peer]:
    p = Peer(broker, "sim-devices")
    yield p
    p.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "hub.db")
    yield s
    s.close()


@contextmanager
def running(config: HubConfig, store: Store, hooks: IngestHooks | None = None) -> Iterator[Ingest]:
    ingest = Ingest(config, store, hooks=hooks)
    ingest.start()
    try:
        yield ingest
    finally:
        ingest.stop()


@pytest.fixture
def ingest(broker: MosquittoBroker, store: Store) -> Iterator[Ingest]:
    with running(hub_config(broker), store) as running_ingest:
        yield running_ingest


def stored(ingest: Ingest, kind: str) -> float:
    return ingest.metrics.stored(kind)


# --- what devices send ---------------------------------------------------------------------


def test_every_kind_of_message_is_stored_and_hooks_see_it(
    broker: MosquittoBroker, store: Store, peer: Peer
) -> None:
    seen: list[tuple[str, str, str]] = []
    hooks = IngestHooks()
    hooks.on_birth.append(lambda d, m: seen.append(("birth", d, m.agent_version)))
    hooks.on_status.append(lambda d, m: seen.append(("status", d, m.state)))
    hooks.on_state.append(lambda d, m: seen.append(("state", d, m.phase)))
    hooks.on_event.append(lambda d, m: seen.append(("event", d, m.kind)))
    hooks.on_result.append(lambda d, m: seen.append(("result", d, m.cmd_id)))
    hooks.on_telemetry.append(lambda d, m: seen.append(("telemetry", d, str(m.seq))))
    with running(hub_config(broker), store, hooks) as ingest:
        for msg in (
            samples.status("pi-1", 1, 0),
            samples.birth("pi-1", 1, 1),
            samples.telemetry("pi-1", 1, 2),
            samples.state("pi-1", 1, 3),
            samples.event("pi-1", 1, 4),
            samples.result("pi-1", 1, 5),
        ):
            peer.send(msg)
        assert wait_until(lambda: len(seen) == 6)
        assert ingest.flush()
    assert seen == [
        ("status", "pi-1", "online"),
        ("birth", "pi-1", "0.1.0"),
        ("telemetry", "pi-1", "2"),
        ("state", "pi-1", "committed"),
        ("event", "pi-1", "update.committed"),
        ("result", "pi-1", "c-1"),
    ]
    device = store.get_device("pi-1")
    assert (device.online, device.profile_name, device.applied_generation, device.last_seq) == (
        True,
        "raspberry-pi-4-4gb",
        1,
        5,
    )
    assert store.count_telemetry("pi-1") == 1
    assert [e.kind for e in store.list_events(device_id="pi-1")] == [
        "cmd.result",
        "update.committed",
    ]
    assert {r.model for r in store.telemetry_minutes("pi-1")} == {"", "det", "rec"}
    for kind in ("status", "birth", "telemetry", "state", "events", "result"):
        assert stored(ingest, kind) == 1


def test_bad_messages_are_counted_by_reason_while_good_ones_go_on(
    ingest: Ingest, store: Store, peer: Peer
) -> None:
    good = samples.telemetry("pi-1", 5, 10)
    wrong_major = json.loads(encode(samples.telemetry("pi-1", 5, 11)))
    wrong_major["schema"] = "edgefleet.telemetry/2"
    peer.send(samples.status("pi-1", 5, 1))
    peer.raw(up_topic("pi-1", Kind.TELEMETRY), os.urandom(300))
    peer.send(good)
    peer.raw(up_topic("pi-1", Kind.TELEMETRY), json.dumps(wrong_major).encode())
    peer.raw(up_topic("pi-1", Kind.TELEMETRY), b"{" + b" " * (300 * 1024) + b"}")
    peer.send(samples.telemetry("pi-2", 5, 12), topic=up_topic("pi-1", Kind.TELEMETRY))
    peer.raw("edgefleet/v1/dev/pi-1/up/bogus", b"{}")
    peer.send(samples.will("pi-1", 4))
    peer.send(samples.status("pi-1", 4, 0))
    peer.send(samples.telemetry("pi-1", 5, 13))

    metrics = ingest.metrics
    assert wait_until(lambda: stored(ingest, "telemetry") == 2)
    assert wait_until(lambda: metrics.dropped("stale_session") == 1)
    assert {
        reason: metrics.dropped(reason)
        for reason in (
            "decode",
            "schema_version",
            "too_large",
            "device_mismatch",
            "topic",
            "stale_will",
            "stale_session",
        )
    } == {
        "decode": 1,
        "schema_version": 1,
        "too_large": 1,
        "device_mismatch": 1,
        "topic": 1,
        "stale_will": 1,
        "stale_session": 1,
    }
    assert [r.seq for r in store.telemetry_tail("pi-1")] == [13, 10]
    assert store.find_device("pi-2") is None
    device = store.get_device("pi-1")
    assert (device.online, device.session) == (True, 5)
    assert b'edgefleet_hub_ingest_dropped_total{reason="too_large"} 1.0' in metrics.render()


def test_redeliveries_are_stored_once(ingest: Ingest, store: Store, peer: Peer) -> None:
    for _ in range(2):
        peer.send(samples.telemetry("pi-1", 1, 2))
        peer.send(samples.event("pi-1", 1, 3))
        peer.send(samples.result("pi-1", 1, 4))
    metrics = ingest.metrics
    assert wait_until(
        lambda: metrics.value("edgefleet_hub_ingest_duplicates_total", kind="result") == 1
    )
    assert wait_until(
        lambda: metrics.value("edgefleet_hub_ingest_duplicates_total", kind="telemetry") == 1
    )
    assert metrics.value("edgefleet_hub_ingest_duplicates_total", kind="events") == 1
    assert store.count_telemetry() == 1
    assert store.count_events() == 2
    minute = store.telemetry_minutes("pi-1", model="det")
    assert [m.samples for m in minute] == [1]


def _rebirths(watcher: Peer, device_id: str) -> list[Cmd]:
    topic = down_topic(device_id, Kind.CMD)
    return [decode(Cmd, bytes(m.payload)) for m in watcher.received if m.topic == topic]


def test_a_seq_gap_asks_the_device_for_a_rebirth(
    broker: MosquittoBroker, store: Store, peer: Peer
) -> None:
    watcher = Peer(broker, "watcher")
    try:
        watcher.subscribe(down_topic("pi-1", Kind.CMD))
        config = hub_config(broker, ingest={"gap_grace_s": 0.3, "rebirth_interval_s": 60.0})
        with running(config, store) as ingest:
            peer.send(samples.status("pi-1", 1, 0))
            peer.send(samples.birth("pi-1", 1, 1))
            peer.send(samples.telemetry("pi-1", 1, 3))  # 2 comes late, within the grace
            peer.send(samples.telemetry("pi-1", 1, 2))
            peer.send(samples.telemetry("pi-1", 1, 6))  # 4 and 5 never come
            assert wait_until(lambda: len(_rebirths(watcher, "pi-1")) == 1)
            (cmd,) = _rebirths(watcher, "pi-1")
            assert cmd.command == "rebirth" and cmd.cmd_id.startswith("rebirth-")
            metrics = ingest.metrics
            assert metrics.value("edgefleet_hub_ingest_seq_gaps_total") == 2
            assert metrics.value("edgefleet_hub_rebirth_requests_total", cause="seq_gap") == 1

            peer.send(samples.telemetry("pi-1", 1, 9))  # another gap: counted, not re-asked
            assert wait_until(lambda: metrics.value("edgefleet_hub_ingest_seq_gaps_total") == 4)
            time.sleep(0.5)
            assert len(_rebirths(watcher, "pi-1")) == 1
            assert wait_until(
                lambda: (
                    metrics.value("edgefleet_hub_publish_latency_seconds_count", kind="cmd") >= 1
                )
            )
    finally:
        watcher.close()


def test_a_session_without_a_birth_asks_for_one(
    broker: MosquittoBroker, store: Store, peer: Peer
) -> None:
    watcher = Peer(broker, "watcher")
    try:
        watcher.subscribe(down_topic("pi-7", Kind.CMD))
        config = hub_config(broker, ingest={"gap_grace_s": 0.3})
        with running(config, store) as ingest:
            peer.send(samples.status("pi-7", 3, 10))
            peer.send(samples.telemetry("pi-7", 3, 11))
            assert wait_until(lambda: len(_rebirths(watcher, "pi-7")) == 1)
            assert (
                ingest.metrics.value("edgefleet_hub_rebirth_requests_total", cause="no_birth") == 1
            )
            peer.send(samples.birth("pi-7", 3, 12))
            assert wait_until(lambda: store.get_device("pi-7").birth_session == 3)
    finally:
        watcher.close()


# --- the hub's connection ------------------------------------------------------------------


def test_hub_state_is_online_while_running_and_offline_after(
    broker: MosquittoBroker, store: Store
) -> None:
    watcher = Peer(broker, "watcher")
    try:
        with running(hub_config(broker), store) as ingest:
            # Subscribe only once the hub has published, so the broker hands the watcher
            # the retained copy (a live delivery carries retain=False).
            assert wait_until(
                lambda: (
                    ingest.metrics.value(
                        "edgefleet_hub_publish_latency_seconds_count", kind="hub_state"
                    )
                    >= 1
                )
            )
            watcher.subscribe(HUB_STATE_TOPIC)
            assert wait_until(lambda: len(watcher.received) >= 1)
            online = watcher.received[-1]
            assert online.retain and decode(HubState, bytes(online.payload)).state == "online"
            assert ingest.metrics.value("edgefleet_hub_mqtt_connected") == 1
        assert wait_until(
            lambda: decode(HubState, bytes(watcher.received[-1].payload)).state == "offline"
        )
        assert decode(HubState, bytes(watcher.received[-1].payload)).hub_id == "hub-test"
    finally:
        watcher.close()


def test_the_brokers_drop_counter_is_exported(ingest: Ingest) -> None:
    assert wait_until(
        lambda: (
            ingest.metrics.registry.get_sample_value("edgefleet_hub_broker_messages_dropped")
            is not None
            and b"edgefleet_hub_broker_messages_dropped 0.0" in ingest.metrics.render()
        ),
        timeout=5,
    )


def test_mqtt_3_1_1_uses_a_plain_subscription(broker: MosquittoBroker, store: Store) -> None:
    device = Peer(broker, "old-device", protocol="3.1.1")
    try:
        config = hub_config(broker, broker={"protocol": "3.1.1", "shared_group": ""})
        with running(config, store) as ingest:
            device.send(samples.birth("pi-3", 1, 1))
            device.send(samples.telemetry("pi-3", 1, 2))
            assert wait_until(lambda: stored(ingest, "telemetry") == 1)
        assert store.get_device("pi-3").birth_session == 1
    finally:
        device.close()


def test_retained_status_and_state_reach_a_shared_subscription(
    broker: MosquittoBroker, store: Store, peer: Peer
) -> None:
    peer.send(samples.status("pi-4", 2, 0), retain=True)
    peer.send(samples.state("pi-4", 2, 3, applied=7), retain=True)
    with running(hub_config(broker), store) as ingest:
        assert wait_until(lambda: stored(ingest, "state") == 1)
    device = store.get_device("pi-4")
    assert (device.online, device.applied_generation) == (True, 7)


def test_messages_sent_while_the_hub_is_down_wait_in_the_broker(
    broker: MosquittoBroker, store: Store, peer: Peer
) -> None:
    config = hub_config(broker)
    with running(config, store):
        pass
    for seq in range(2, 52):
        peer.send(samples.telemetry("pi-5", 1, seq))
    with running(config, store) as ingest:
        assert wait_until(lambda: stored(ingest, "telemetry") == 50)
    assert store.count_telemetry("pi-5") == 50


def test_an_unreachable_broker_is_an_ingest_error(tmp_path: Path, store: Store) -> None:
    config = HubConfig.model_validate(
        {
            "broker": {"url": f"mqtt://127.0.0.1:{free_port()}"},
            "api": {"token": "t" * 32, "token_file": None},
        }
    )
    with pytest.raises(IngestError, match="cannot connect"):
        Ingest(config, store).start(timeout=2)


def test_a_failing_hook_is_counted_and_ingest_goes_on(
    broker: MosquittoBroker, store: Store, peer: Peer
) -> None:
    def broken(device_id: str, msg: object) -> None:
        raise RuntimeError("boom")

    hooks = IngestHooks()
    hooks.on_event.append(broken)
    with running(hub_config(broker), store, hooks) as ingest:
        peer.send(samples.event("pi-6", 1, 4))
        peer.send(samples.telemetry("pi-6", 1, 5))
        assert wait_until(lambda: stored(ingest, "telemetry") == 1)
        # hooks run after their batch is committed: the count may lag the store a little
        assert wait_until(
            lambda: (
                ingest.metrics.value("edgefleet_hub_ingest_hook_errors_total", hook="on_event") == 1
            )
        )
    assert store.count_events("pi-6") == 1


def test_metrics_can_be_shared_with_the_rest_of_the_hub(
    broker: MosquittoBroker, store: Store
) -> None:
    metrics = HubMetrics()
    ingest = Ingest(hub_config(broker), store, metrics=metrics)
    assert ingest.metrics is metrics
    assert b"edgefleet_hub_devices_online 0.0" in metrics.render()


# --- sequence tracking ---------------------------------------------------------------------


def test_reordering_within_the_grace_period_is_no_gap() -> None:
    tracker = SeqTracker(grace_s=1.0, rebirth_interval_s=10.0)
    tracker.observe("d", 1, 1, 0.0, birth=True)
    tracker.observe("d", 1, 3, 0.1)
    tracker.observe("d", 1, 2, 0.5)
    assert tracker.due(5.0) == []


def test_a_gap_is_due_after_the_grace_and_rebirths_are_rate_limited() -> None:
    tracker = SeqTracker(grace_s=1.0, rebirth_interval_s=10.0)
    tracker.observe("d", 1, 1, 0.0, birth=True)
    tracker.observe("d", 1, 4, 0.0)
    assert tracker.due(0.5) == []
    assert tracker.due(1.0) == [("d", "seq_gap", 2)]
    tracker.observe("d", 1, 6, 2.0)
    assert tracker.due(3.0) == [("d", None, 1)]
    tracker.observe("d", 1, 8, 11.0)
    assert tracker.due(12.0) == [("d", "seq_gap", 1)]


def test_older_sessions_and_huge_jumps() -> None:
    tracker = SeqTracker(grace_s=0.0, rebirth_interval_s=0.0)
    tracker.load({"d": DeviceCursor(5, 5, 100, True)}, 0.0)
    tracker.observe("d", 4, 7, 0.0)  # an outbox replay of session 4
    assert tracker.due(1.0) == []
    tracker.observe("d", 5, 100 + 5000, 1.0)
    assert tracker.due(2.0) == [("d", "seq_gap", 1)]
    tracker.observe("d", 6, 1, 3.0)  # a new session without its birth yet
    assert tracker.due(4.0) == [("d", "no_birth", 0)]
    tracker.observe("d", 6, 2, 4.0, birth=True)
    assert tracker.due(5.0) == []


def test_a_busy_store_is_retried_and_a_poison_message_dropped_alone(
    broker: MosquittoBroker, store: Store, peer: Peer, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_telemetry = store.record_telemetry
    real_event = store.record_event
    busy = [True]

    def flaky_telemetry(items: Any) -> list[bool]:
        if busy[0]:
            busy[0] = False
            raise sqlite3.OperationalError("database is locked")
        return real_telemetry(items)

    def poisoned_event(event: Any, received_at: float) -> bool:
        if event.seq == 4:
            raise sqlite3.IntegrityError("refused")
        return real_event(event, received_at)

    monkeypatch.setattr(store, "record_telemetry", flaky_telemetry)
    monkeypatch.setattr(store, "record_event", poisoned_event)
    with running(hub_config(broker), store) as ingest:
        peer.send(samples.telemetry("pi-8", 1, 2))
        assert wait_until(lambda: stored(ingest, "telemetry") == 1)
        assert ingest.metrics.value("edgefleet_hub_ingest_store_retries_total") == 1
        peer.send(samples.event("pi-8", 1, 4))
        peer.send(samples.event("pi-8", 1, 5))
        assert wait_until(lambda: stored(ingest, "events") == 1)
        assert ingest.metrics.dropped("store_error") == 1
    assert [e.seq for e in store.list_events(device_id="pi-8")] == [5]
