"""The agent's MQTT link: connect, Will, birth, subscriptions, reconnect, outbox draining.

One thread owns the paho client and drives its network loop. paho callbacks only record
what happened (a flag, a queue entry); everything that may block runs in this thread
between loop iterations or in the caller's threads, never inside a callback.

Every connection attempt gets a fresh paho client, so nothing paho still held for an old
connection (unacknowledged outbox rows, an old session's birth) is re-sent after a
reconnect: the outbox alone decides what is sent again, in order. An MQTT 5 broker may
answer a row with a failure: one a retry cannot change (not authorized, topic or payload
invalid, packet too large) drops the row, counted in ``publish_refused``; any other (quota
exceeded, unspecified) keeps it in the outbox, sent again after ``publish_retry_after``.
An incoming packet whose header announces more than ``max_packet_bytes`` ends the
connection before its body is read (paho alone would read it all into memory first),
counted in ``oversized``. Only the link thread
writes to the socket; ``publish`` from other threads queues the packet and wakes the loop
(a TLS socket must not be written from two threads at once).
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)

NOT_AUTHORIZED_CODES = frozenset({0x86, 0x87})
UNSUPPORTED_PROTOCOL_VERSION = 0x84
PUBLISH_REFUSED_FOR_GOOD = frozenset({0x87, 0x90, 0x95, 0x99})
"""PUBACK reasons a retry cannot change: not authorized, topic name invalid, packet too
large, payload format invalid."""
PUBLISH_RETRY_AFTER_S = 5.0
STABLE_AFTER_S = 10.0
"""A connection that lasted this long resets the backoff; a shorter one does not, so two
agents with the same client id (each connect drops the other) back off instead of looping."""


@dataclass(frozen=True)
class Publication:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    correlation_data: bytes | None = None
    """MQTT 5 correlation data (a command's reply); not sent over MQTT 3.1.1."""


@dataclass(frozen=True)
class Incoming:
    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation_data: bytes | None = None


@dataclass(frozen=True)
class BrokerSettings:
    host: str
    port: int
    client_id: str
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = None
    keepalive: int = 30
    protocol: str = "5"
    max_packet_bytes: int | None = None
    """MQTT 5: the largest packet the broker may send this client (Maximum Packet Size);
    an honest broker drops larger ones for it instead of sending them."""


class OutboxLike(Protocol):
    """What the link needs of the store-and-forward outbox."""

    @property
    def depth(self) -> int: ...

    def peek(self, limit: int) -> Sequence[Any]: ...

    def ack(self, ids: Sequence[int]) -> None: ...


class _BoundedClient(mqtt.Client):
    """A paho client that refuses to read an incoming packet larger than ``max_bytes``.

    paho reads a packet's whole body into memory before handing it over, whatever size its
    header announces, and MQTT 5's Maximum Packet Size only asks the broker to honour it.
    Once the header is in, a packet above the limit fails the next read instead, which
    paho treats as a lost connection.
    """

    def __init__(self, *args: Any, max_bytes: int, on_oversized: Callable[[int], None], **kw: Any):
        super().__init__(*args, **kw)
        self._max_bytes = max_bytes
        self._on_oversized = on_oversized

    def _sock_recv(self, bufsize: int) -> bytes:
        packet = self._in_packet
        if packet["have_remaining"]:
            size = 1 + len(packet["remaining_count"]) + packet["remaining_length"]
            if size > self._max_bytes:
                self._on_oversized(size)
                raise OSError(f"incoming packet of {size} bytes, above the {self._max_bytes}")
        return super()._sock_recv(bufsize)


def backoff_delay(attempt: int, *, base: float, cap: float, rand: Callable[[], float]) -> float:
    """Capped exponential backoff with jitter: a delay in [d/2, d], d = min(cap, base*2^n)."""
    ceiling: float = min(cap, base * 2.0 ** min(attempt, 30))
    return ceiling * (0.5 + 0.5 * rand())


@dataclass
class LinkCounters:
    connects: int = 0
    reconnects: int = 0
    connect_failures: int = 0
    not_authorized: int = 0
    callback_errors: int = 0
    published: int = 0
    publish_refused: int = 0
    """Outbox rows the broker refused for good (dropped)."""
    publish_retries: int = 0
    """Outbox rows the broker failed for now (kept and sent again)."""
    oversized: int = 0
    """Incoming packets above ``max_packet_bytes``: each ended its connection unread."""


@dataclass
class _Inflight:
    mids: dict[int, int] = field(default_factory=dict)
    """paho message id -> outbox row id, for rows sent and not yet answered."""
    acked: set[int] = field(default_factory=set)
    refused: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)


class MqttLink:
    """Keeps one MQTT connection up and moves messages both ways.

    ``session`` is the session number of the current (or, while reconnecting, the last)
    connection; every attempt takes a new number from ``next_session`` for its Will, and
    it becomes ``session`` once the broker accepts the connection.
    ``will`` builds the (topic, payload) of the Will for a session number;
    ``on_connected`` returns what to publish first on every connect (status, birth, state);
    ``on_message`` receives every message on the subscriptions (called in the link
    thread: it must only enqueue).
    """

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        subscriptions: Sequence[tuple[str, int]],
        next_session: Callable[[], int],
        will: Callable[[int], Publication],
        on_connected: Callable[[int], Sequence[Publication]],
        on_message: Callable[[Incoming], None],
        outbox: OutboxLike | None = None,
        backoff_base: float = 0.5,
        backoff_cap: float = 60.0,
        rand: Callable[[], float] = random.random,
        stable_after: float = STABLE_AFTER_S,
        publish_retry_after: float = PUBLISH_RETRY_AFTER_S,
    ) -> None:
        self.settings = settings
        self._subscriptions = list(subscriptions)
        self._next_session = next_session
        self._will = will
        self._on_connected = on_connected
        self._on_message = on_message
        self._outbox = outbox
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._rand = rand
        self._stable_after = stable_after
        self._publish_retry_after = publish_retry_after
        self.counters = LinkCounters()
        self.session = 0
        self.protocol = settings.protocol
        """The protocol spoken: the configured one, or 3.1.1 after a broker refused MQTT 5."""
        self._stop = threading.Event()
        self._final: list[Publication] = []
        self._connected = threading.Event()
        self._connack: ReasonCode | None = None
        self._lost = False
        self._rebirth = False
        self._inflight = _Inflight()
        self._retry_at = 0.0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._client = self._make_client()

    # ---- public surface -------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the link is already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="edgefleet-mqtt", daemon=True)
        self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def publish(self, publication: Publication) -> bool:
        """Hand a message to the broker now; False when not connected (caller decides)."""
        if not self.connected:
            return False
        info = self._send(self._client, publication)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return False
        self.counters.published += 1
        return True

    def _properties(self, publication: Publication) -> Properties | None:
        if publication.correlation_data is None or self.protocol != "5":
            return None
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.CorrelationData = publication.correlation_data
        return properties

    def _send(self, client: mqtt.Client, publication: Publication) -> mqtt.MQTTMessageInfo:
        return client.publish(
            publication.topic,
            publication.payload,
            publication.qos,
            publication.retain,
            properties=self._properties(publication),
        )

    def request_rebirth(self) -> None:
        self._rebirth = True

    def stop(self, final: Sequence[Publication] = (), timeout: float = 5.0) -> None:
        """Publish ``final`` (e.g. the offline status), disconnect cleanly and join."""
        self._final = list(final)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # ---- client set-up and callbacks -------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        s = self.settings
        v5 = self.protocol == "5"
        options: dict[str, Any] = {
            "callback_api_version": CallbackAPIVersion.VERSION2,
            "client_id": s.client_id,
            "protocol": MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            "clean_session": None if v5 else True,
        }
        client = (
            mqtt.Client(**options)
            if s.max_packet_bytes is None
            else _BoundedClient(
                **options, max_bytes=s.max_packet_bytes, on_oversized=self._count_oversized
            )
        )
        if s.tls:
            client.tls_set(
                ca_certs=s.ca_file,
                certfile=s.cert_file,
                keyfile=s.key_file,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        client.max_queued_messages_set(0)
        # Writes happen in the link thread only (in loop()); a publish from another thread
        # queues the packet and wakes the loop through paho's socket pair.
        client.on_socket_register_write = _defer_write
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        return client

    def _count_oversized(self, size: int) -> None:
        self.counters.oversized += 1
        log.warning(
            "broker sent a packet of %d bytes, above the %d announced: connection dropped",
            size,
            self.settings.max_packet_bytes,
        )

    def _handle_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connack = reason_code

    def _handle_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._lost = True
        self._connected.clear()

    def _handle_message(self, client: mqtt.Client, userdata: Any, message: Any) -> None:
        try:
            props = getattr(message, "properties", None)
            self._on_message(
                Incoming(
                    topic=message.topic,
                    payload=bytes(message.payload),
                    response_topic=getattr(props, "ResponseTopic", None),
                    correlation_data=getattr(props, "CorrelationData", None),
                )
            )
        except Exception:
            self.counters.callback_errors += 1
            log.exception("message handler failed; message dropped")

    def _handle_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._lock:
            if mid not in self._inflight.mids:
                return
            if not reason_code.is_failure:
                self._inflight.acked.add(mid)
            elif reason_code.value in PUBLISH_REFUSED_FOR_GOOD:
                self._inflight.refused.add(mid)
            else:
                self._inflight.failed.add(mid)

    # ---- the link thread ------------------------------------------------------------

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                outcome = self._connect_once()
                if outcome == "connected":
                    began = time.monotonic()
                    self._serve()
                    if time.monotonic() - began >= self._stable_after:
                        attempt = 0
                    outcome = "connection lost"
            except Exception:
                # Nothing here may end the thread: count it, drop the connection, try again.
                self.counters.callback_errors += 1
                self._connected.clear()
                log.exception("mqtt link failure")
                self._abandon()
                outcome = "link failure"
            if self._stop.is_set():
                break
            if outcome == "not_authorized":
                attempt = max(attempt, 30)
            delay = backoff_delay(
                attempt, base=self._backoff_base, cap=self._backoff_cap, rand=self._rand
            )
            attempt += 1
            log.info("mqtt: %s; retrying in %.1fs", outcome, delay)
            self._stop.wait(delay)
        self._connected.clear()

    def _connect_once(self) -> str:
        s = self.settings
        session = self._next_session()
        will = self._will(session)
        self._client = self._make_client()
        self._client.will_set(will.topic, will.payload, will.qos, will.retain)
        self._connack = None
        self._lost = False
        try:
            if self.protocol == "5":
                properties = None
                if s.max_packet_bytes is not None:
                    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                    properties.MaximumPacketSize = s.max_packet_bytes
                self._client.connect(
                    s.host, s.port, s.keepalive, clean_start=True, properties=properties
                )
            else:
                self._client.connect(s.host, s.port, s.keepalive)
        except (OSError, ssl.SSLError) as exc:
            self.counters.connect_failures += 1
            return f"connect to {s.host}:{s.port} failed ({exc})"
        deadline = time.monotonic() + max(5.0, float(s.keepalive))
        while (
            self._connack is None
            and not self._lost
            and not self._stop.is_set()
            and time.monotonic() < deadline
        ):
            if self._client.loop(0.1) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
        code = self._connack
        if code is None and self._stop.is_set():
            self._client.disconnect()
            self._client.loop(0.1)
            return "stopped"
        if code is None or code.is_failure:
            self.counters.connect_failures += 1
            self._client.disconnect()
            self._client.loop(0.1)
            if code is not None and code.value in NOT_AUTHORIZED_CODES:
                self.counters.not_authorized += 1
                return "not_authorized"
            refused_v5 = code is not None and code.value == UNSUPPORTED_PROTOCOL_VERSION
            if refused_v5 and self.protocol == "5":
                # An MQTT 3.1.1-only broker: the next attempt speaks 3.1.1.
                log.warning("mqtt: the broker does not speak MQTT 5; falling back to 3.1.1")
                self.protocol = "3.1.1"
            return f"broker refused or closed the connection ({code})"
        # Only an established connection's session names what the agent publishes: messages
        # queued during an outage keep the session (and seq run) of the last connection.
        self.session = session
        first = self.counters.connects == 0
        self.counters.connects += 1
        if not first:
            self.counters.reconnects += 1
        return "connected"

    def _serve(self) -> None:
        # Answers that came just before the last connection ended still count (a broker may
        # close the connection right after refusing a row); rows without one go again.
        self._settle_answers()
        with self._lock:
            self._inflight = _Inflight()
        for topic, qos in self._subscriptions:
            self._client.subscribe(topic, qos)
        self._connected.set()
        self._publish_greeting()
        while not self._stop.is_set() and not self._lost:
            rc = self._client.loop(0.2)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
            if self._rebirth:
                self._rebirth = False
                self._publish_greeting()
            try:
                self._drain_outbox()
            except Exception:
                self.counters.callback_errors += 1
                log.exception("draining the outbox failed; trying again")
        self._connected.clear()
        if self._stop.is_set():
            self._say_goodbye()
        else:
            log.warning("mqtt: connection lost")

    def _publish_greeting(self) -> None:
        try:
            greeting = self._on_connected(self.session)
        except Exception:
            self.counters.callback_errors += 1
            log.exception("building the birth messages failed")
            return
        for publication in greeting:
            self._send(self._client, publication)

    def _drain_outbox(self) -> None:
        if self._outbox is None:
            return
        pending = self._settle_answers()
        if pending or self._outbox.depth == 0 or time.monotonic() < self._retry_at:
            return
        rows = self._outbox.peek(100)
        for row in rows:
            info = self._client.publish(row.topic, row.payload, row.qos, row.retain)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
            with self._lock:
                self._inflight.mids[info.mid] = row.id

    def _settle_answers(self) -> bool:
        """Apply the broker's answers to sent rows to the outbox; True while rows sent on
        this connection still wait for one."""
        if self._outbox is None:
            return False
        inflight = self._inflight
        with self._lock:
            acked = [inflight.mids.pop(mid) for mid in inflight.acked]
            refused = [inflight.mids.pop(mid) for mid in inflight.refused]
            failed = [inflight.mids.pop(mid) for mid in inflight.failed]
            inflight.acked.clear()
            inflight.refused.clear()
            inflight.failed.clear()
            pending = bool(inflight.mids)
        if refused:
            self.counters.publish_refused += len(refused)
            log.warning("the broker refused %d outbox message(s) for good; dropped", len(refused))
            acked += refused
        if acked:
            self._outbox.ack(acked)
        if failed:
            self.counters.publish_retries += len(failed)
            self._retry_at = time.monotonic() + self._publish_retry_after
            log.warning(
                "the broker failed %d outbox message(s); sending again in %.1fs",
                len(failed),
                self._publish_retry_after,
            )
        return pending

    def _abandon(self) -> None:
        """Close the current connection without a DISCONNECT (the broker sends the Will)."""
        try:
            sock = self._client.socket()
            if sock is not None:
                sock.close()
        except Exception:
            log.debug("closing the socket failed", exc_info=True)

    def _say_goodbye(self) -> None:
        sent = [self._send(self._client, p) for p in self._final]
        # a connection that died as the stop came refuses them at once: nothing to wait for
        infos = [i for i in sent if i.rc == MQTTErrorCode.MQTT_ERR_SUCCESS]
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and not all(i.is_published() for i in infos):
            if self._client.loop(0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
        self._client.disconnect()
        self._client.loop(0.1)


def _defer_write(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """paho's hook for an external write loop: the link thread's loop() does the writing."""
