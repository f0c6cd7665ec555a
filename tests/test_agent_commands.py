"""Commands to a running agent (rebirth, unknown, malformed), result routing, MQTT 3.1.1,
and what the broker says when an agent process is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import load_config
from agent.daemon import Agent
from contract.messages import Birth, Cmd, CmdResult, State, Status, decode, encode
from contract.signing import SigningKey
from contract.topics import Kind, down_topic, up_topic
from hub.broker import MosquittoBroker
from support.fleet import agent_toml, mqtt_tap

DEVICE = "cmd-dev-1"
UP = f"edgefleet/v1/dev/{DEVICE}/up"
RESULT = up_topic(DEVICE, Kind.RESULT)
CMD = down_topic(DEVICE, Kind.CMD)


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class Heard:
    topic: str
    payload: bytes
    retain: bool
    correlation_data: bytes | None


@dataclass
class Hub:
    """The hub's side for these tests: an MQTT 5 client that sends commands and listens."""

    client: mqtt.Client
    heard: list[Heard] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on(self, topic: str) -> list[Heard]:
        with self.lock:
            return [h for h in self.heard if h.topic == topic]

    def births(self) -> list[Birth]:
        return [decode(Birth, h.payload) for h in self.on(f"{UP}/birth")]

    def statuses(self) -> list[Status]:
        return [decode(Status, h.payload) for h in self.on(f"{UP}/status")]

    def results(self, topic: str = RESULT) -> list[tuple[CmdResult, bytes | None]]:
        return [(decode(CmdResult, h.payload), h.correlation_data) for h in self.on(topic)]

    def command(
        self,
        command: str,
        cmd_id: str,
        *,
        reply_to: str | None = None,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        payload: bytes | None = None,
    ) -> None:
        properties = None
        if response_topic is not None or correlation is not None:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if response_topic is not None:
                properties.ResponseTopic = response_topic
            if correlation is not None:
                properties.CorrelationData = correlation
        if payload is None:
            cmd = Cmd(cmd_id=cmd_id, command=command, ts=time.time(), reply_to=reply_to)
            payload = encode(cmd)
        info = self.client.publish(CMD, payload, qos=1, properties=properties)
        info.wait_for_publish(5)


@contextmanager
def hub_client(broker: MosquittoBroker) -> Iterator[Hub]:
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"hub-{time.monotonic_ns()}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    hub = Hub(client)
    subscribed = threading.Event()

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        heard = Heard(
            msg.topic, bytes(msg.payload), bool(msg.retain), getattr(props, "CorrelationData", None)
        )
        with hub.lock:
            hub.heard.append(heard)

    def on_subscribe(*args: Any) -> None:
        subscribed.set()

    client.on_message = on_message
    client.on_subscribe = on_subscribe
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.subscribe(f"{UP}/#", qos=1)
        assert subscribed.wait(5), "subscription not acknowledged"
        yield hub
    finally:
        client.disconnect()
        client.loop_stop()


def write_config(broker: MosquittoBroker, tmp_path: Path, *, protocol: str = "5") -> Path:
    text = agent_toml(
        device_id=DEVICE,
        broker=broker,
        state_dir=tmp_path / "state",
        key=SigningKey.generate(),
        api_bind=f"unix:{tmp_path / 'api.sock'}",
    )
    text = text.replace("keepalive = 5\n", f'keepalive = 5\nprotocol = "{protocol}"\n')
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


@contextmanager
def in_process_agent(config_path: Path) -> Iterator[Agent]:
    agent = Agent(load_config(config_path, {}), environ={})
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()


@pytest.fixture
def logged_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A broker whose log is written (run as root, mosquitto drops to a user that cannot)."""
    as_root = ["user root"] if os.geteuid() == 0 else []
    with MosquittoBroker(workdir=tmp_path / "broker", extra_config=as_root) as broker:
        yield broker


# --------------------------------------------------------------------------- MQTT 5


def test_rebirth_answers_on_the_response_topic_with_the_correlation_data(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    with hub_client(broker) as hub, in_process_agent(write_config(broker, tmp_path)) as agent:
        first = wait_until(hub.births, "birth")[0]
        replies = f"{UP}/result/hub-7"
        hub.command("rebirth", "rb-1", response_topic=replies, correlation=b"\x01corr-1")

        births = wait_until(lambda: len(hub.births()) == 2 and hub.births(), "the rebirth")
        assert births[1].session == first.session == agent.link.session
        assert births[1].seq > first.seq
        assert agent.link.counters.reconnects == 0
        (result, correlation), *_ = wait_until(lambda: hub.results(replies), "the result")
        assert (result.cmd_id, result.ok, result.error) == ("rb-1", True, None)
        assert correlation == b"\x01corr-1"
        assert result.session == first.session and result.seq > first.seq
        assert hub.results() == []


def test_result_routing_unknown_and_malformed_commands(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    with hub_client(broker) as hub, in_process_agent(write_config(broker, tmp_path)) as agent:
        wait_until(hub.births, "birth")

        # reply_to in the command wins over the response topic.
        ops = f"{UP}/result/ops"
        hub.command("rebirth", "c-1", reply_to=ops, response_topic=f"{UP}/result/x")
        (result, _), *_ = wait_until(lambda: hub.results(ops), "the result on reply_to")
        assert (result.cmd_id, result.ok) == ("c-1", True)

        # A reply topic outside the device's up/ tree (where its ACL would not let it
        # publish) falls back to up/result; the correlation data still comes along.
        hub.command("rebirth", "c-2", response_topic="elsewhere/replies", correlation=b"c2")
        (result, correlation), *_ = wait_until(hub.results, "the result on up/result")
        assert (result.cmd_id, result.ok, correlation) == ("c-2", True, b"c2")

        # An unknown command is answered, not ok, with the reason.
        hub.command("warp", "c-3")
        failed = wait_until(lambda: [r for r, _ in hub.results() if r.cmd_id == "c-3"], "c-3")
        assert failed[0].ok is False
        assert failed[0].error is not None and "warp" in failed[0].error

        # A malformed command is dropped and counted, and the next one is answered.
        hub.command("rebirth", "c-4", payload=b'{"schema": "edgefleet.cmd/1", "cmd_id": 5}')
        hub.command("rebirth", "c-5")
        wait_until(lambda: [r for r, _ in hub.results() if r.cmd_id == "c-5"], "c-5")
        assert [r.cmd_id for r, _ in hub.results()] == ["c-2", "c-3", "c-5"]
        assert sum(n for k, n in agent.dropped_messages.items() if k.startswith("cmd_")) == 1
        assert not hub.on(f"{UP}/result/x") and not hub.on("elsewhere/replies")


# --------------------------------------------------------------------------- MQTT 3.1.1


def test_mqtt311_agent_births_and_answers_rebirth_on_up_result(
    logged_broker: MosquittoBroker, tmp_path: Path
) -> None:
    config = write_config(logged_broker, tmp_path, protocol="3.1.1")
    with hub_client(logged_broker) as hub, in_process_agent(config) as agent:
        first = wait_until(hub.births, "birth")[0]
        assert first.applied_generation == 0 and first.inventory == []
        online = wait_until(hub.statuses, "online status")[-1]
        assert (online.state, online.session) == ("online", first.session)
        state = decode(State, wait_until(lambda: hub.on(f"{UP}/state"), "state")[-1].payload)
        assert state.applied_generation == 0

        # 3.1.1 carries no response topic or correlation data: the result goes to up/result.
        hub.command("rebirth", "r-311", response_topic=f"{UP}/result/hub", correlation=b"x")
        births = wait_until(lambda: len(hub.births()) == 2 and hub.births(), "the rebirth")
        assert births[1].session == first.session and births[1].seq > first.seq
        (result, correlation), *_ = wait_until(hub.results, "the result on up/result")
        assert (result.cmd_id, result.ok, correlation) == ("r-311", True, None)
        assert agent.link.settings.protocol == "3.1.1"

    # The broker saw MQTT 3.1.1 from the agent (mosquitto logs it as p2, MQTT 5 as p5).
    log = logged_broker.log_path.read_text()
    assert f"as {DEVICE} (p2," in log and f"as {DEVICE} (p5," not in log


# --------------------------------------------------------------------------- a real process


def agent_process(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_killed_agent_process_leaves_its_will_and_the_next_one_takes_over(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    config = write_config(broker, tmp_path)
    with hub_client(broker) as hub:
        process = agent_process(config)
        try:
            birth = wait_until(hub.births, "birth from the agent process", timeout=30)[0]
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            assert process.stderr is not None
            process.stderr.close()
        will = wait_until(
            lambda: [s for s in hub.statuses() if s.state == "offline"], "the Will after kill -9"
        )[0]
        assert will.session == birth.session
        assert will.seq is None  # fixed at connect time
        with mqtt_tap(broker, f"{UP}/status") as fresh:
            retained = fresh.wait_for(lambda t: t.received, 5, "the retained status")[0]
            assert retained.retain and retained.message == will

        # The next process on the same state directory takes the next session; SIGTERM
        # says goodbye with the retained offline status of that session.
        process = agent_process(config)
        try:
            second = wait_until(lambda: hub.births()[1:], "the second birth", timeout=30)[0]
            assert second.session == birth.session + 1
            assert second.seq > birth.seq
        finally:
            process.send_signal(signal.SIGTERM)
            code = process.wait(30)
            assert process.stderr is not None
            process.stderr.close()
        assert code == 0
        offline = wait_until(
            lambda: [
                s for s in hub.statuses() if s.state == "offline" and s.session > will.session
            ],
            "the goodbye",
        )[0]
        assert offline.session == second.session
        with mqtt_tap(broker, f"{UP}/status") as fresh:
            retained = fresh.wait_for(lambda t: t.received, 5, "the retained status")[0]
            assert retained.message == offline
