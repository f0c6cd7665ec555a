"""The MQTT link on its own against a real mosquitto: session, Will, birth, backoff, outbox."""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties

from agent.link import BrokerSettings, Incoming, MqttLink, Publication, backoff_delay
from agent.outbox import Outbox
from agent.state import AgentState
from agent.telemetry import link_stats
from hub.broker import MosquittoBroker, free_port
from support.fake_broker import FakeBroker, publish_v5

PROTOCOLS = ["5", "3.1.1"]


# --------------------------------------------------------------------------- helpers


@dataclass
class Seen:
    topic: str
    payload: bytes
    retain: bool
    correlation_data: bytes | None

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Listener:
    """A plain MQTT 5 subscriber that records what arrives, properties included."""

    client: mqtt.Client
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on(self, topic: str) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.topic == topic]

    def wait(self, predicate: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
        return wait_until(predicate, what, timeout)

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, properties: Properties | None = None
    ) -> None:
        self.client.publish(topic, payload, qos=qos, properties=properties).wait_for_publish(5)


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@contextmanager
def listening(broker: MosquittoBroker, *topics: str) -> Iterator[Listener]:
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"listener-{time.monotonic_ns()}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    listener = Listener(client)
    subscribed = threading.Event()

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        seen = Seen(
            msg.topic, bytes(msg.payload), bool(msg.retain), getattr(props, "CorrelationData", None)
        )
        with listener.lock:
            listener.seen.append(seen)

    def on_subscribe(*args: Any) -> None:
        subscribed.set()

    client.on_message = on_message
    client.on_subscribe = on_subscribe
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.subscribe([(t, 1) for t in topics])
        assert subscribed.wait(5), "subscription not acknowledged"
        yield listener
    finally:
        client.disconnect()
        client.loop_stop()


class Device:
    """An MqttLink wired the way the agent wires it, with simple JSON messages on ``t/{id}/``."""

    def __init__(
        self,
        host: str,
        port: int,
        state: AgentState,
        *,
        client_id: str = "dev-1",
        protocol: str = "5",
        username: str | None = None,
        password: str | None = None,
        outbox: Outbox | None = None,
        on_message: Callable[[Incoming], None] | None = None,
        greeting_fails: int = 0,
        will_fails: int = 0,
        max_packet_bytes: int | None = None,
        **link_kwargs: Any,
    ) -> None:
        self.state = state
        self.client_id = client_id
        self.base = f"t/{client_id}"
        self.attempts: list[tuple[float, int]] = []
        self.greetings: list[int] = []
        self.messages: list[Incoming] = []
        self._greeting_fails = greeting_fails
        self._will_fails = will_fails
        self.link = MqttLink(
            BrokerSettings(
                host=host,
                port=port,
                client_id=client_id,
                keepalive=5,
                protocol=protocol,
                username=username,
                password=password,
                max_packet_bytes=max_packet_bytes,
            ),
            subscriptions=[(f"{self.base}/in", 1)],
            next_session=self._next_session,
            will=self._will,
            on_connected=self._greet,
            on_message=on_message or self.messages.append,
            outbox=outbox,
            **link_kwargs,
        )

    @property
    def status_topic(self) -> str:
        return f"{self.base}/status"

    @property
    def birth_topic(self) -> str:
        return f"{self.base}/birth"

    def _next_session(self) -> int:
        session = self.state.next_session()
        self.attempts.append((time.monotonic(), session))
        return session

    def _will(self, session: int) -> Publication:
        if self._will_fails:
            self._will_fails -= 1
            raise RuntimeError("the will factory failed")
        return self.status("offline", session, will=True)

    def status(self, state: str, session: int, *, will: bool = False) -> Publication:
        body: dict[str, Any] = {"state": state, "session": session}
        if will:
            body["will"] = True  # tells the broker's Will from the goodbye of a clean stop
        payload = json.dumps(body).encode()
        return Publication(self.status_topic, payload, 1, True)

    def _greet(self, session: int) -> Sequence[Publication]:
        if self._greeting_fails:
            self._greeting_fails -= 1
            raise RuntimeError("building the greeting failed")
        self.greetings.append(session)
        birth = {"session": session, "seq": self.state.next_seq()}
        return [
            self.status("online", session),
            Publication(self.birth_topic, json.dumps(birth).encode(), 1, False),
        ]

    def stop(self) -> None:
        self.link.stop(final=[self.status("offline", self.link.session)])


@pytest.fixture
def state(tmp_path: Path) -> Iterator[AgentState]:
    with AgentState(tmp_path / "state.db") as opened:
        yield opened


@contextmanager
def running(device: Device) -> Iterator[Device]:
    device.link.start()
    try:
        yield device
    finally:
        device.stop()


def births(listener: Listener, device: Device) -> list[dict[str, Any]]:
    return [s.json() for s in listener.on(device.birth_topic)]


def statuses(listener: Listener, device: Device) -> list[dict[str, Any]]:
    return [s.json() for s in listener.on(device.status_topic)]


def retained_status(
    broker: MosquittoBroker, device: Device, *, settled: bool = True
) -> dict[str, Any]:
    """What a new subscriber is told about the device: the retained status.

    ``settled=False``: the status may still be on its way, and reach the new subscriber as
    a live message rather than as the retained one.
    """
    with listening(broker, device.status_topic) as fresh:
        seen = fresh.wait(lambda: fresh.on(device.status_topic), "a retained status")
        assert seen[0].retain or not settled
        result: dict[str, Any] = seen[0].json()
        return result


def gaps(attempts: Sequence[tuple[float, int]]) -> list[float]:
    return [b[0] - a[0] for a, b in itertools.pairwise(attempts)]


def chosen_delays(caplog: pytest.LogCaptureFixture) -> list[float]:
    """The retry delays the link chose, from its "retrying in" log lines, in order.

    Wall-clock gaps between attempts also hold each attempt's own time, which a loaded
    machine stretches; these are what the link decided to wait.
    """
    return [
        float(cast(tuple[Any, ...], record.args)[1])
        for record in caplog.records
        if record.name == "agent.link" and "retrying in" in record.msg
    ]


def cycle(*values: float) -> Callable[[], float]:
    """A ``rand`` that returns ``values`` in turn, forever."""
    turns = itertools.cycle(values)
    return lambda: next(turns)


def constant(value: float) -> Callable[[], float]:
    return lambda: value


# --------------------------------------------------------------------------- backoff (pure)


def test_backoff_delay_is_capped_exponential_with_jitter() -> None:
    top = [backoff_delay(n, base=0.5, cap=60.0, rand=lambda: 1.0) for n in range(10)]
    assert top == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    low = [backoff_delay(n, base=0.5, cap=60.0, rand=lambda: 0.0) for n in range(10)]
    assert low == [d / 2 for d in top]
    # A huge attempt number neither overflows nor passes the cap.
    assert backoff_delay(10_000, base=0.5, cap=60.0, rand=lambda: 1.0) == 60.0
    # Jitter spreads the delays over [d/2, d].
    import random

    rng = random.Random(3)
    spread = {round(backoff_delay(4, base=0.5, cap=60.0, rand=rng.random), 3) for _ in range(50)}
    assert len(spread) > 40 and min(spread) >= 4.0 and max(spread) <= 8.0


# --------------------------------------------------------------------------- session and Will


def test_session_grows_on_every_connect_and_survives_a_new_state_object(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    path = tmp_path / "state.db"
    with listening(broker, "t/#") as listener:
        with AgentState(path) as state:
            first = Device(broker.host, broker.port, state)
            with running(first):
                assert first.link.wait_connected(10)
                listener.wait(lambda: births(listener, first), "the first birth")
                assert first.link.session == state.session
            session_1 = first.link.session
            assert session_1 >= 1
        # A clean stop publishes the retained offline status itself, with its session, and
        # the broker does not send the Will.
        assert retained_status(broker, first) == {"state": "offline", "session": session_1}
        assert not [s for s in statuses(listener, first) if s.get("will")]

        with AgentState(path) as state:
            assert state.session == session_1
            second = Device(broker.host, broker.port, state)
            with running(second):
                listener.wait(lambda: len(births(listener, second)) == 2, "the second birth")
                assert second.link.session == session_1 + 1
                assert retained_status(broker, second) == {
                    "state": "online",
                    "session": session_1 + 1,
                }

    birth_sessions = [b["session"] for b in births(listener, first)]
    assert birth_sessions == [session_1, session_1 + 1]
    assert [g for g in first.greetings + second.greetings] == birth_sessions


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unclean_loss_sends_the_will_with_its_session_then_reconnects(
    broker: MosquittoBroker, state: AgentState, protocol: str
) -> None:
    # A slow first retry leaves time to see the retained Will before the link is back.
    device = Device(
        broker.host, broker.port, state, protocol=protocol, backoff_base=2.0, rand=lambda: 1.0
    )
    with listening(broker, "t/#") as listener, running(device):
        listener.wait(lambda: births(listener, device), "birth")
        session = device.link.session
        assert statuses(listener, device)[-1] == {"state": "online", "session": session}

        # Drop the TCP connection under paho, as a crash or a cut cable would: no DISCONNECT.
        sock = cast(socket.socket, device.link._client.socket())
        sock.shutdown(socket.SHUT_RDWR)

        offline = {"state": "offline", "session": session, "will": True}
        listener.wait(lambda: offline in statuses(listener, device), "the Will")
        assert retained_status(broker, device) == offline

        # The link comes back on its own with the next session: online and birth again.
        listener.wait(lambda: len(births(listener, device)) == 2, "the birth after reconnect")
        assert device.link.session == session + 1
        assert births(listener, device)[-1]["session"] == session + 1
        assert retained_status(broker, device) == {"state": "online", "session": session + 1}
        assert device.link.counters.reconnects == 1
        # Its subscription was renewed on the new connection.
        listener.publish(f"{device.base}/in", b"after reconnect")
        wait_until(lambda: device.messages, "the message on the renewed subscription")
        assert device.messages[-1].payload == b"after reconnect"


def test_birth_and_subscriptions_again_after_the_broker_restarts(
    broker: MosquittoBroker, state: AgentState
) -> None:
    device = Device(broker.host, broker.port, state, backoff_base=0.05, backoff_cap=0.3)
    with running(device):
        assert device.link.wait_connected(10)
        first_session = device.link.session
        online = {"state": "online", "session": first_session}
        assert retained_status(broker, device, settled=False) == online
        broker.stop()
        wait_until(lambda: not device.link.connected, "the link to notice")
        broker.start()
        with listening(broker, "t/#") as listener:
            assert device.link.wait_connected(10)
            # Retained, so seen whenever the listener subscribed: the new session's online.
            listener.wait(
                lambda: any(
                    s["state"] == "online" and s["session"] > first_session
                    for s in statuses(listener, device)
                ),
                "online status of the new session",
            )
            assert len(device.greetings) >= 2 and device.greetings[-1] > first_session
            assert device.link.counters.reconnects >= 1
            listener.publish(f"{device.base}/in", b"hello again")
            wait_until(lambda: device.messages, "a message on the renewed subscription")
            assert device.messages[0].payload == b"hello again"


def test_rebirth_republishes_the_greeting_in_the_same_session(
    broker: MosquittoBroker, state: AgentState
) -> None:
    device = Device(broker.host, broker.port, state)
    with listening(broker, "t/#") as listener, running(device):
        listener.wait(lambda: births(listener, device), "birth")
        device.link.request_rebirth()
        listener.wait(lambda: len(births(listener, device)) == 2, "the rebirth")
        first, second = births(listener, device)
        assert first["session"] == second["session"] == device.link.session
        assert second["seq"] > first["seq"]
        assert device.link.counters.reconnects == 0


# --------------------------------------------------------------------------- backoff (live)


def test_attempts_back_off_exponentially_while_the_broker_is_down(
    state: AgentState, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.link")
    jitter = cycle(1.0, 0.0)
    device = Device(
        "127.0.0.1", free_port(), state, backoff_base=0.05, backoff_cap=0.4, rand=jitter
    )
    with running(device):
        wait_until(lambda: len(device.attempts) >= 8, "eight connection attempts", timeout=10)
    expected = [
        backoff_delay(n, base=0.05, cap=0.4, rand=constant(1.0 if n % 2 == 0 else 0.0))
        for n in range(7)
    ]
    assert expected == [0.05, 0.05, 0.2, 0.2, 0.4, 0.2, 0.4]
    assert chosen_delays(caplog)[:7] == expected
    # ... and it really waited them.
    for gap, delay in zip(gaps(device.attempts[:8]), expected, strict=True):
        assert gap >= delay * 0.95, (gaps(device.attempts), expected)
    # Every attempt took a new session number, and none connected.
    sessions = [s for _, s in device.attempts]
    assert sessions == list(range(sessions[0], sessions[0] + len(sessions)))
    assert device.link.counters.connects == 0
    assert device.link.counters.connect_failures >= 8
    assert not device.link.connected
    assert device.link.session == 0  # the session of a connection, and there was none


def test_stop_is_prompt_while_waiting_to_retry(state: AgentState) -> None:
    device = Device("127.0.0.1", free_port(), state, backoff_base=30.0, backoff_cap=60.0)
    device.link.start()
    wait_until(lambda: device.attempts, "the first attempt")
    began = time.monotonic()
    device.stop()
    assert time.monotonic() - began < 2.0
    assert device.link.publish(Publication("t/x", b"x")) is False


@pytest.fixture
def locked_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A broker that admits only user ``agent`` with password ``right``."""
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not Path(tool).exists():
        pytest.skip("mosquitto_passwd is not installed")
    workdir = tmp_path / "locked"
    workdir.mkdir()
    passwords = workdir / "passwords"
    subprocess.run([tool, "-b", "-c", str(passwords), "agent", "right"], check=True)
    passwords.chmod(0o600)
    # Run as root, mosquitto drops to its own user unless told otherwise, and could not read
    # a file under pytest's private temporary directory.
    as_root = ["user root"] if os.geteuid() == 0 else []
    broker = MosquittoBroker(
        workdir=workdir,
        extra_config=[*as_root, "allow_anonymous false", f"password_file {passwords}"],
    )
    with broker:
        yield broker


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("password", [None, "wrong"], ids=["anonymous", "bad-password"])
def test_not_authorized_backs_off_to_the_cap_at_once(
    locked_broker: MosquittoBroker,
    state: AgentState,
    protocol: str,
    password: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="agent.link")
    device = Device(
        locked_broker.host,
        locked_broker.port,
        state,
        protocol=protocol,
        username=None if password is None else "agent",
        password=password,
        backoff_base=0.01,
        backoff_cap=0.5,
        rand=lambda: 1.0,
    )
    with running(device):
        wait_until(lambda: len(device.attempts) >= 3, "three attempts", timeout=10)
        counters = device.link.counters
        assert counters.not_authorized >= 2
        assert counters.connects == 0 and not device.link.connected
    # No exponential ramp from 10 ms: every retry after a refusal waits the cap.
    assert chosen_delays(caplog)[:2] == [0.5, 0.5]
    for gap in gaps(device.attempts[:3]):
        assert gap >= 0.5 * 0.95, gaps(device.attempts)


def test_right_credentials_connect_to_the_locked_broker(
    locked_broker: MosquittoBroker, state: AgentState
) -> None:
    device = Device(
        locked_broker.host, locked_broker.port, state, username="agent", password="right"
    )
    with running(device):
        assert device.link.wait_connected(10)
        assert device.link.counters.not_authorized == 0


def test_a_connection_that_drops_at_once_does_not_reset_the_backoff(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    """Two links with one client id take the session from each other on every connect."""
    with AgentState(tmp_path / "a.db") as state_a, AgentState(tmp_path / "b.db") as state_b:
        options: dict[str, Any] = {"backoff_base": 0.05, "backoff_cap": 0.4, "rand": lambda: 1.0}
        a = Device(broker.host, broker.port, state_a, client_id="twin", **options)
        b = Device(broker.host, broker.port, state_b, client_id="twin", **options)
        with running(a), running(b):
            wait_until(lambda: len(a.attempts) >= 5 and len(b.attempts) >= 5, "five attempts each")
        for device in (a, b):
            expected = [backoff_delay(n, base=0.05, cap=0.4, rand=lambda: 1.0) for n in range(4)]
            for gap, delay in zip(gaps(device.attempts[:5]), expected, strict=True):
                assert gap >= delay * 0.95, (gaps(device.attempts), expected)


# --------------------------------------------------------------------------- callbacks


def test_a_raising_message_handler_is_counted_and_the_link_lives_on(
    broker: MosquittoBroker, state: AgentState
) -> None:
    handled: list[bytes] = []

    def handler(incoming: Incoming) -> None:
        if incoming.payload == b"boom":
            raise ValueError("handler bug")
        handled.append(incoming.payload)

    device = Device(broker.host, broker.port, state, on_message=handler)
    with listening(broker, "t/#") as listener, running(device):
        listener.wait(lambda: births(listener, device), "birth")
        listener.publish(f"{device.base}/in", b"boom")
        listener.publish(f"{device.base}/in", b"fine")
        wait_until(lambda: handled == [b"fine"], "the next message")
        assert device.link.counters.callback_errors == 1
        assert device.link.connected
        assert device.link.counters.reconnects == 0
        assert device.link.publish(Publication(f"{device.base}/out", b"still here"))
        listener.wait(lambda: listener.on(f"{device.base}/out"), "a publish after the error")


def test_failing_will_and_greeting_builders_do_not_end_the_link(
    broker: MosquittoBroker, state: AgentState
) -> None:
    device = Device(
        broker.host,
        broker.port,
        state,
        will_fails=1,
        greeting_fails=1,
        backoff_base=0.05,
        rand=lambda: 1.0,
    )
    with listening(broker, "t/#") as listener, running(device):
        # The first attempt fails before connecting; the second connects, its greeting fails.
        assert device.link.wait_connected(10)
        assert device.link.counters.callback_errors == 2
        assert device.greetings == []
        device.link.request_rebirth()
        listener.wait(lambda: births(listener, device), "a birth on request")
        assert device.link.counters.connects == 1


# --------------------------------------------------------------------------- publishing


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_publish_carries_correlation_data_over_mqtt5_only(
    broker: MosquittoBroker, state: AgentState, protocol: str
) -> None:
    device = Device(broker.host, broker.port, state, protocol=protocol)
    assert device.link.publish(Publication("t/early", b"x")) is False
    with listening(broker, "t/#") as listener, running(device):
        listener.wait(lambda: births(listener, device), "birth")
        reply = Publication(f"{device.base}/reply", b"ok", 1, False, correlation_data=b"\x00id-7")
        assert device.link.publish(reply)
        seen = listener.wait(lambda: listener.on(f"{device.base}/reply"), "the reply")
        assert seen[0].correlation_data == (b"\x00id-7" if protocol == "5" else None)


def test_publish_from_other_threads_while_the_loop_runs(
    broker: MosquittoBroker, state: AgentState
) -> None:
    device = Device(broker.host, broker.port, state)
    with listening(broker, "t/#") as listener, running(device):
        assert device.link.wait_connected(10)

        def burst(worker: int) -> None:
            for n in range(100):
                payload = json.dumps({"worker": worker, "n": n}).encode()
                assert device.link.publish(Publication(f"{device.base}/burst", payload))

        workers = [threading.Thread(target=burst, args=(w,)) for w in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        got = listener.wait(
            lambda: len(listener.on(f"{device.base}/burst")) >= 400 or None, "400 messages"
        )
        del got
        per_worker: dict[int, list[int]] = {}
        for seen in listener.on(f"{device.base}/burst"):
            body = seen.json()
            per_worker.setdefault(body["worker"], []).append(body["n"])
        # Every message arrived once, and each thread's messages in its own order.
        assert per_worker == {w: list(range(100)) for w in range(4)}


# --------------------------------------------------------------------------- outbox


def test_outbox_drains_in_order_in_batches_and_is_acked(
    broker: MosquittoBroker, state: AgentState, tmp_path: Path
) -> None:
    with Outbox(tmp_path / "outbox.db", max_messages=1000, max_bytes=1 << 20) as outbox:
        for n in range(250):
            outbox.put("t/dev-1/telemetry", json.dumps({"n": n}).encode(), qos=1)
        device = Device(broker.host, broker.port, state, outbox=outbox)
        with listening(broker, "t/#") as listener, running(device):
            listener.wait(
                lambda: len(listener.on("t/dev-1/telemetry")) >= 250, "the outbox drained"
            )
            wait_until(lambda: outbox.depth == 0, "every message acked")
            outbox.put("t/dev-1/telemetry", b'{"n": 250}', qos=1)
            listener.wait(lambda: len(listener.on("t/dev-1/telemetry")) == 251, "a new message")
            wait_until(lambda: outbox.depth == 0, "the new message acked")
        got = [s.json()["n"] for s in listener.on("t/dev-1/telemetry")]
        assert got == list(range(251))
        assert outbox.dropped == 0


def test_rows_cut_off_in_flight_are_sent_again_once_and_in_order(
    broker: MosquittoBroker, state: AgentState, tmp_path: Path
) -> None:
    """Rows published but never acknowledged go out again from the outbox, not from paho too."""
    assert broker._process is not None
    pid = broker._process.pid
    with Outbox(tmp_path / "outbox.db", max_messages=1000, max_bytes=1 << 20) as outbox:
        device = Device(broker.host, broker.port, state, outbox=outbox, backoff_base=0.05)
        with listening(broker, "t/#") as listener, running(device):
            listener.wait(lambda: births(listener, device), "birth")
            os.kill(pid, signal.SIGSTOP)  # the broker reads nothing and acknowledges nothing
            try:
                for n in range(20):
                    outbox.put("t/dev-1/telemetry", json.dumps({"n": n}).encode(), qos=1)
                wait_until(lambda: len(device.link._inflight.mids) == 20, "20 rows in flight")
                sock = cast(socket.socket, device.link._client.socket())
                sock.shutdown(socket.SHUT_RDWR)
                wait_until(lambda: not device.link.connected, "the link to notice")
            finally:
                os.kill(pid, signal.SIGCONT)
            listener.wait(lambda: len(births(listener, device)) == 2, "the birth after reconnect")
            wait_until(lambda: outbox.depth == 0, "the outbox drained")
            listener.wait(lambda: len(listener.on("t/dev-1/telemetry")) >= 20, "the rows")
        with listener.lock:
            stream = [
                s for s in listener.seen if s.topic in ("t/dev-1/telemetry", device.birth_topic)
            ]
        second_birth = max(i for i, s in enumerate(stream) if s.topic == device.birth_topic)
        after = [s.json()["n"] for s in stream[second_birth + 1 :]]
        assert after == list(range(20))
        rows = [s.json()["n"] for s in stream if s.topic == "t/dev-1/telemetry"]
        assert all(rows.count(n) <= 2 for n in range(20)), rows


def test_a_packet_above_the_announced_maximum_ends_the_connection_unread(
    state: AgentState,
) -> None:
    """A hostile broker ignores the Maximum Packet Size: the link reads the header, drops
    the connection instead of reading 64 MiB, counts it and connects again."""
    hostile = publish_v5("t/dev-1/in", b"x" * 100, announced=64 << 20)
    broker = FakeBroker(levels=frozenset({5}), pushes=[hostile, publish_v5("t/dev-1/in", b"after")])
    try:
        device = Device(
            "127.0.0.1",
            broker.port,
            state,
            max_packet_bytes=1000,
            backoff_base=0.05,
            rand=lambda: 1.0,
        )
        with running(device):
            wait_until(lambda: device.messages, "the message on the next connection")
            assert [m.payload for m in device.messages] == [b"after"]
            assert device.link.counters.oversized == 1
            assert device.link.counters.connects == 2
        # the telemetry's link figures report it among the incoming drops
        reported = link_stats(0, 0, 0, 0, {"cmd_decode": 2}, oversized=1)
        assert reported.incoming_dropped == {"cmd_decode": 2, "too_large": 1}
    finally:
        broker.close()


def test_an_mqtt5_link_falls_back_to_311_on_a_broker_that_refuses_5(state: AgentState) -> None:
    old = FakeBroker()
    try:
        device = Device("127.0.0.1", old.port, state, backoff_base=0.05, rand=lambda: 1.0)
        with running(device):
            assert device.link.wait_connected(10)
            assert device.link.protocol == "3.1.1"
            assert device.link.counters.connect_failures == 1
            assert device.greetings == [device.link.session]
            assert device.link.publish(Publication("t/x", b"x", correlation_data=b"dropped"))
        assert old.levels == [5, 4]
    finally:
        old.close()


# --------------------------------------------------------------------------- PUBACK failures


def test_rows_the_broker_refuses_for_good_are_dropped_and_counted(
    tmp_path: Path, state: AgentState
) -> None:
    """mosquitto's ACL answers an MQTT 5 PUBLISH it denies with PUBACK *Not authorized*
    (and mosquitto 2.0 then closes the connection): the row must not come back forever."""
    acl = tmp_path / "acl"
    acl.write_text(
        "topic readwrite t/dev-1/status\ntopic write t/dev-1/birth\n"
        "topic read t/dev-1/in\ntopic write t/dev-1/telemetry\ntopic read t/#\n"
    )
    as_root = ["user root"] if os.geteuid() == 0 else []
    broker = MosquittoBroker(
        workdir=tmp_path / "acl-broker", extra_config=[*as_root, f"acl_file {acl}"]
    )
    with broker, Outbox(tmp_path / "outbox.db", max_messages=100, max_bytes=1 << 20) as outbox:
        outbox.put("t/dev-1/telemetry", b'{"n": 0}', qos=1)
        outbox.put("t/dev-1/forbidden", b'{"n": 1}', qos=1)
        outbox.put("t/dev-1/telemetry", b'{"n": 2}', qos=1)
        device = Device(broker.host, broker.port, state, outbox=outbox)
        with listening(broker, "t/#") as listener, running(device):

            def allowed_rows() -> list[int]:
                arrived = [m.json()["n"] for m in listener.on("t/dev-1/telemetry")]
                return list(dict.fromkeys(arrived))

            wait_until(lambda: outbox.depth == 0, "the outbox drained")
            listener.wait(lambda: allowed_rows() == [0, 2], "both allowed rows")
        # QoS 1 is at least once: when mosquitto closes the connection after the refusal,
        # the reset can swallow the PUBACK of a row it took, and that row goes again.
        assert allowed_rows() == [0, 2]
        assert listener.on("t/dev-1/forbidden") == []
        assert device.link.counters.publish_refused == 1
        assert device.link.counters.publish_retries == 0


def test_rows_the_broker_fails_for_now_stay_in_the_outbox_and_go_again(
    tmp_path: Path, state: AgentState
) -> None:
    failures = iter([0x97, 0x80])  # quota exceeded, then unspecified error; then success

    def puback(topic: str, payload: bytes) -> int:
        return next(failures, 0) if payload == b'{"n": 1}' else 0

    broker = FakeBroker(levels=frozenset({5}), puback=puback)
    try:
        with Outbox(tmp_path / "outbox.db", max_messages=100, max_bytes=1 << 20) as outbox:
            for n in range(3):
                outbox.put("t/dev-1/telemetry", json.dumps({"n": n}).encode(), qos=1)
            device = Device("127.0.0.1", broker.port, state, outbox=outbox, publish_retry_after=0.2)
            with running(device):
                wait_until(lambda: outbox.depth == 0, "the outbox drained")
            sent = [json.loads(p)["n"] for t, p in broker.published if t == "t/dev-1/telemetry"]
            assert sorted(sent) == [0, 1, 1, 1, 2]
            assert device.link.counters.publish_retries == 2
            assert device.link.counters.publish_refused == 0
            assert outbox.dropped == 0
    finally:
        broker.close()


def test_the_goodbye_on_a_connection_that_just_died_does_not_raise(state: AgentState) -> None:
    """The stop may come as the connection dies: paho then refuses the goodbye at once."""
    device = Device("127.0.0.1", free_port(), state)
    device.link._final = [device.status("offline", 1)]
    device.link._say_goodbye()  # never connected: publish answers "no connection"
    assert not device.link.connected


def test_the_broker_sends_no_packet_above_the_maximum_the_link_announces(
    broker: MosquittoBroker, state: AgentState
) -> None:
    device = Device(broker.host, broker.port, state, max_packet_bytes=1000)
    with listening(broker, "t/#") as sender, running(device):
        # the link subscribes before it greets, on the same connection: once the birth is
        # out, the subscription is in place
        sender.wait(lambda: births(sender, device), "birth")
        sender.publish("t/dev-1/in", b"x" * 2000)
        sender.publish("t/dev-1/in", b"small")
        wait_until(lambda: device.messages, "the small message")
        assert [m.payload for m in device.messages] == [b"small"]
        assert device.link.connected and device.link.counters.connects == 1
