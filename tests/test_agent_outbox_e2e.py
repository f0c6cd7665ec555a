"""Store-and-forward end to end: an in-process agent, a broker that goes away and comes back.

The subscriber is a telemetry pipeline with a persistent session on a broker with
persistence, so that what the agent sends while the pipeline is still reconnecting after
the restart waits for it in the broker: every message the agent delivered can be counted.
(The pipeline speaks MQTT 3.1.1 with clean_session false: mosquitto 2.0.11 does not bring
back an MQTT 5 session with a session expiry interval after a restart.)
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import paho.mqtt.client as mqtt
import pytest
from onnx import TensorProto, helper
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.config import load_config
from agent.daemon import Agent
from contract.manifests import RuntimePolicy
from contract.messages import Birth, Telemetry, decode
from contract.signing import SigningKey
from contract.topics import Kind, down_topic, up_topic
from hub.broker import MosquittoBroker
from support.fleet import agent_toml, desired_state, sha256_of, signed, spec_for
from support.http_server import ArtifactServer

DEVICE = "outbox-dev-1"
TELEMETRY = up_topic(DEVICE, Kind.TELEMETRY)
BIRTH = up_topic(DEVICE, Kind.BIRTH)


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class Arrival:
    topic: str
    payload: bytes
    at: float


@dataclass
class Pipeline:
    """A subscriber with a persistent session: the broker queues for it while it is away."""

    client: mqtt.Client
    arrivals: list[Arrival] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on(self, topic: str) -> list[Arrival]:
        with self.lock:
            return [a for a in self.arrivals if a.topic == topic]

    def telemetry_payloads(self) -> list[bytes]:
        return [a.payload for a in self.on(TELEMETRY)]

    def births(self) -> list[Birth]:
        return [decode(Birth, a.payload) for a in self.on(BIRTH)]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)


@contextmanager
def pipeline(broker: MosquittoBroker) -> Iterator[Pipeline]:
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id="telemetry-pipeline",
        protocol=MQTTProtocolVersion.MQTTv311,
        clean_session=False,
    )
    client.reconnect_delay_set(1, 1)
    tap = Pipeline(client)
    subscribed = threading.Event()

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with tap.lock:
            tap.arrivals.append(Arrival(msg.topic, bytes(msg.payload), time.time()))

    def on_subscribe(*args: Any) -> None:
        subscribed.set()

    client.on_message = on_message
    client.on_subscribe = on_subscribe
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.subscribe(f"edgefleet/v1/dev/{DEVICE}/up/#", qos=1)
        assert subscribed.wait(5), "subscription not acknowledged"
        yield tap
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.fixture
def durable_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A mosquitto that keeps sessions and their queued messages across a restart."""
    workdir = tmp_path / "broker"
    # Run as root, mosquitto drops to its own user and could not write under tmp_path.
    as_root = ["user root"] if os.geteuid() == 0 else []
    broker = MosquittoBroker(
        workdir=workdir,
        extra_config=[*as_root, "persistence true", f"persistence_location {workdir}/"],
    )
    with broker:
        yield broker


def tiny_model(path: Path) -> Path:
    """The smallest model worth applying: y = x, float32 [1, 4]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "tiny", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@dataclass
class Put:
    at: float
    topic: str
    payload: bytes


class Device:
    """An in-process agent whose outbox puts are recorded."""

    def __init__(self, broker: MosquittoBroker, tmp_path: Path, key: SigningKey, extra: str):
        path = tmp_path / "agent.toml"
        toml = agent_toml(device_id=DEVICE, broker=broker, state_dir=tmp_path / "state", key=key)
        path.write_text(toml + extra)
        self.agent = Agent(load_config(path, {}), environ={})
        # Retry quickly once the broker is back (the agent's default cap is 60 s).
        self.agent.link._backoff_cap = 0.5
        self.puts: list[Put] = []
        self._put = self.agent.outbox.put
        self.agent.outbox.put = self._record  # type: ignore[method-assign]

    def _record(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int | None:
        self.puts.append(Put(time.time(), topic, payload))
        return self._put(topic, payload, qos, retain)

    def telemetry_puts(self, since: float = 0.0, until: float = float("inf")) -> list[Put]:
        return [p for p in self.puts if p.topic == TELEMETRY and since <= p.at < until]


@contextmanager
def running(device: Device) -> Iterator[Agent]:
    device.agent.start()
    try:
        yield device.agent
    finally:
        device.agent.stop()


def outage(broker: MosquittoBroker, agent: Agent) -> float:
    """Stop the broker; return when the agent noticed (nothing it makes after can go out)."""
    wait_until(lambda: agent.outbox.depth == 0, "an empty outbox before the outage")
    broker.stop()
    wait_until(lambda: not agent.link.connected, "the agent to notice the outage")
    return time.time()


def in_order_without_repeats(payloads: list[bytes]) -> list[bytes]:
    """The stream as a seq-aware consumer keeps it: a repeated delivery is dropped."""
    seen: set[bytes] = set()
    kept = []
    for payload in payloads:
        if payload not in seen:
            seen.add(payload)
            kept.append(payload)
    return kept


def test_broker_outage_loses_no_telemetry_and_keeps_order(
    durable_broker: MosquittoBroker, tmp_path: Path
) -> None:
    key = SigningKey.generate()
    device = Device(durable_broker, tmp_path, key, "")
    model = tiny_model(tmp_path / "tiny.onnx")
    with (
        ArtifactServer() as files,
        pipeline(durable_broker) as tap,
        running(device) as agent,
    ):
        files.add(f"/artifacts/{sha256_of(model)}", model)
        wait_until(tap.births, "birth")
        # A generation whose runtime policy asks for telemetry five times a second.
        fast = RuntimePolicy(probation_s=0, telemetry_interval_s=0.2)
        spec = spec_for("tiny", model, hints={"x": [1, 4]})
        state = desired_state(DEVICE, 1, [spec], base_urls=[files.url("/artifacts")], runtime=fast)
        tap.publish(down_topic(DEVICE, Kind.DESIRED), signed(state, key), retain=True)
        wait_until(lambda: len(tap.on(TELEMETRY)) >= 3, "telemetry at the new interval")
        session = agent.link.session

        down = outage(durable_broker, agent)
        wait_until(lambda: len(device.telemetry_puts(since=down)) >= 8, "telemetry while down")
        up = time.time()
        durable_broker.start()
        assert agent.link.wait_connected(10)
        wait_until(lambda: agent.link.counters.reconnects >= 1, "the reconnect")
        reconnected = time.time()
        produced_in_outage = device.telemetry_puts(since=down, until=up)
        wait_until(
            lambda: {p.payload for p in produced_in_outage} <= set(tap.telemetry_payloads()),
            "every telemetry message of the outage",
        )
        wait_until(lambda: agent.outbox.depth == 0, "an empty outbox")
        assert agent.outbox.dropped == 0
        # One more report, made after the reconnect, tells of it.
        after = wait_until(lambda: device.telemetry_puts(since=reconnected), "a new report")[0]
        wait_until(lambda: after.payload in tap.telemetry_payloads(), "the new report")
        produced = device.telemetry_puts(until=after.at + 1e-9)

    # Everything produced arrived, in the order it was produced (at least once: a message
    # in flight when the broker went down may come twice).
    arrived = in_order_without_repeats(tap.telemetry_payloads())
    assert arrived[: len(produced)] == [p.payload for p in produced]
    messages = [decode(Telemetry, payload) for payload in arrived]
    seqs = [m.seq for m in messages]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    # Messages of the outage keep their original ts and seq, and the session of the last
    # connection (their seq is below the new birth's); they arrived after the reconnect.
    outage_messages = [decode(Telemetry, p.payload) for p in produced_in_outage]
    assert len(outage_messages) >= 8
    births = tap.births()
    new_birth = next(b for b in births if b.session > session)
    arrival_of = {a.payload: a.at for a in tap.on(TELEMETRY)}
    for put, message in zip(produced_in_outage, outage_messages, strict=True):
        assert message.ts <= put.at < up
        assert message.session == session
        assert message.seq < new_birth.seq
        assert arrival_of[put.payload] >= up
    assert decode(Telemetry, after.payload).link.reconnects >= 1


def test_outbox_bound_keeps_the_newest_and_counts_what_it_dropped(
    durable_broker: MosquittoBroker, tmp_path: Path
) -> None:
    key = SigningKey.generate()
    device = Device(durable_broker, tmp_path, key, "\n[telemetry]\noutbox_max_messages = 5\n")
    with pipeline(durable_broker) as tap, running(device) as agent:
        wait_until(tap.births, "birth")
        down = outage(durable_broker, agent)
        for _ in range(12):
            agent.publish_telemetry()
        up = time.time()
        in_outage = device.telemetry_puts(since=down, until=up)
        assert len(in_outage) >= 12
        assert agent.outbox.depth == 5
        assert agent.outbox.dropped == len(in_outage) - 5

        durable_broker.start()
        assert agent.link.wait_connected(10)
        wait_until(lambda: agent.outbox.depth == 0, "the outbox drained")
        newest = [p.payload for p in in_outage[-5:]]
        wait_until(lambda: set(newest) <= set(tap.telemetry_payloads()), "the newest five")
        # The next report says what was dropped.
        agent.publish_telemetry()
        wait_until(lambda: tap.telemetry_payloads()[-1] not in newest, "the next telemetry")

    arrived = in_order_without_repeats(tap.telemetry_payloads())
    dropped = {p.payload for p in in_outage[:-5]}
    assert not dropped & set(arrived)
    assert [p for p in arrived if p in {q.payload for q in in_outage}] == newest
    report = decode(Telemetry, arrived[-1])
    assert report.link.dropped == len(in_outage) - 5
    assert report.link.reconnects >= 1
    assert report.link.outbox_depth == 0


def test_outbox_survives_an_agent_restart_during_the_outage(
    durable_broker: MosquittoBroker, tmp_path: Path
) -> None:
    key = SigningKey.generate()
    first = Device(durable_broker, tmp_path, key, "")
    with pipeline(durable_broker) as tap:
        with running(first) as agent:
            wait_until(tap.births, "birth")
            down = outage(durable_broker, agent)
            for _ in range(4):
                agent.publish_telemetry()
        kept = [p.payload for p in first.telemetry_puts(since=down)]
        assert len(kept) == 4

        second = Device(durable_broker, tmp_path, key, "")
        with running(second) as agent:
            assert agent.outbox.depth == 4
            durable_broker.start()
            assert agent.link.wait_connected(10)
            wait_until(lambda: agent.outbox.depth == 0, "the outbox drained")
            wait_until(lambda: set(kept) <= set(tap.telemetry_payloads()), "the kept telemetry")
            agent.publish_telemetry()
            wait_until(lambda: len(second.telemetry_puts()) == 1, "a new telemetry")
            fresh = second.telemetry_puts()[0].payload
            wait_until(lambda: fresh in tap.telemetry_payloads(), "the new telemetry")

    arrived = in_order_without_repeats(tap.telemetry_payloads())
    assert arrived[-5:] == [*kept, fresh]
    seqs = [decode(Telemetry, p).seq for p in arrived[-5:]]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
