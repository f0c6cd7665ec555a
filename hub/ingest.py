"""The hub's MQTT ingest: everything devices send, validated, ordered by session and stored.

Threads. paho's network thread runs the callbacks, which only append what arrived to an
in-memory inbox (when ``ingest.queue_size`` messages wait, the callback waits too, so the
broker holds the backlog). One worker thread takes whatever is waiting (at most
``ingest.max_batch``; a lone message goes alone, so batches grow with the load and nothing
waits for a timer), decodes each message with the contract and writes the batch in one store
transaction. Only then are the QoS 1 messages acknowledged (paho manual acks): a message the
broker saw acknowledged is in the store. Hooks run after the commit.

Rules, per message:

- A bad topic, an oversized, malformed or unknown-major payload, or a payload whose device id
  is not the topic's, is counted by reason (``WireError.reason``, ``device_mismatch``) and
  dropped. Nothing a device sends stops the ingest.
- Sessions order everything: a birth or status from a session older than the device's
  current one is ignored and counted (``stale_will`` for an offline Will, else
  ``stale_session``), as is an ``online`` after the Will of the same session; telemetry and
  events of older sessions (outbox replays) are stored.
- Telemetry, events and command results are stored once per (device, session, seq): QoS 1
  redeliveries and outbox replays count as duplicates. A reported state older (by session,
  then seq) than the stored one does not replace it.
- Within the current session, a seq still missing ``ingest.gap_grace_s`` after a later one
  arrived is a gap, and a device online in a session whose birth never came is missing its
  birth; either way the hub publishes ``Cmd(command="rebirth")`` on the device's
  ``down/cmd``, at most once per ``ingest.rebirth_interval_s`` per device. With several hub
  workers on one shared subscription each sees only part of a device's messages: set
  ``ingest.detect_gaps = false`` there.

Connection. MQTT 5 (or 3.1.1) with a persistent session (``broker.session_expiry_s``), so
messages sent while the hub restarts wait in the broker; Will ``HubState(offline)``
retained on ``edgefleet/v1/hub/state``, ``online`` published on every connect. With
``broker.shared_group`` the ingest subscribes to ``$share/<group>/edgefleet/v1/dev/+/up/#``
so that several hub workers share the load; shared subscriptions receive no retained
messages, so after each connect a short-lived second connection reads the retained status
and state topics once. The ingest reads ``$SYS/broker/publish/messages/dropped`` into the
metrics.

The broker must not drop messages queued for the hub: mosquitto's per-client queue limit
(``max_queued_messages``, one setting for every client) must be 0 or above any backlog of
the hub — its default of 1000 silently drops QoS 1 messages to a subscriber that falls
behind (docs/hub-ingest.md).
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from contract.errors import WireError
from contract.messages import (
    Birth,
    Cmd,
    CmdResult,
    Event,
    HubState,
    Message,
    OnlineState,
    State,
    Status,
    Telemetry,
    decode,
    encode,
    message_for_topic,
)
from contract.topics import (
    DEVICE_UP_ALL,
    HUB_STATE_TOPIC,
    Direction,
    Kind,
    ParsedTopic,
    down_topic,
    parse_topic,
    shared_subscription,
    up_filter,
)
from hub.config import HubConfig
from hub.errors import IngestError
from hub.metrics import HubMetrics
from hub.store import TRANSIENT_ERRORS, DeviceCursor, Store, TelemetryIn

log = logging.getLogger(__name__)

SYS_DROPPED_TOPIC = "$SYS/broker/publish/messages/dropped"
SNAPSHOT_MAX_S = 5.0
SNAPSHOT_QUIET_S = 0.5
"""The retained snapshot ends after this long without a message (or after the maximum)."""
MAX_TRACKED_MISSING = 1000
"""A larger jump in seq is a gap at once instead of a set of missing numbers."""
HOUSEKEEPING_INTERVAL_S = 0.25
ONLINE_GAUGE_INTERVAL_S = 1.0
PRUNE_INTERVAL_S = 3600.0
FIRST_PRUNE_AFTER_S = 60.0
RECEIVE_MAXIMUM = 65535
DAY_S = 86400.0
TOPIC_CACHE_SIZE = 100_000
"""Parsed topics kept (a few per device); the cache is emptied when it is full."""
SNAPSHOT_CONNECTION = -1

M = TypeVar("M", bound=Message)
Hook = Callable[[str, M], None]


class _Item(NamedTuple):
    topic: str
    payload: bytes
    mid: int
    qos: int
    received_at: float
    connection: int


class _Decoded(NamedTuple):
    item: _Item
    kind: str
    message: Message


@dataclass
class IngestHooks:
    """Callbacks other hub parts register; each gets ``(device_id, message)``.

    They run in the ingest worker thread after the message's batch is committed, only for
    messages that changed something (not for duplicates or stale ones), in arrival order.
    Keep them short (hand work to another thread); an exception is logged and counted.
    """

    on_birth: list[Hook[Birth]] = field(default_factory=list)
    on_status: list[Hook[Status]] = field(default_factory=list)
    on_state: list[Hook[State]] = field(default_factory=list)
    on_event: list[Hook[Event]] = field(default_factory=list)
    on_result: list[Hook[CmdResult]] = field(default_factory=list)
    on_telemetry: list[Hook[Telemetry]] = field(default_factory=list)


class _Inbox:
    """What the paho threads hand to the worker: a deque, a wake-up event and a bound."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: deque[_Item] = deque()
        self._wake = threading.Event()
        self._count_lock = threading.Lock()
        self.put_count = 0
        """Items ever put (the ingest's and the snapshot reader's paho threads put)."""

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: _Item, stop: threading.Event) -> bool:
        """Append, waiting while the inbox is full; False when stopping instead."""
        while len(self._items) >= self.limit:
            if stop.is_set():
                return False
            time.sleep(0.001)
        with self._count_lock:
            self._items.append(item)
            self.put_count += 1
        if not self._wake.is_set():
            self._wake.set()
        return True

    def take(self, limit: int, timeout: float) -> list[_Item]:
        """Up to ``limit`` items, waiting up to ``timeout`` for the first."""
        if not self._items:
            self._wake.clear()
            if not self._items:
                self._wake.wait(timeout)
        batch: list[_Item] = []
        popleft = self._items.popleft
        with contextlib.suppress(IndexError):
            while len(batch) < limit:
                batch.append(popleft())
        return batch


@dataclass
class _Track:
    """Sequence tracking of one device's current session."""

    session: int
    birth_session: int | None
    last_seq: int | None
    online: bool
    since: float
    missing: dict[int, float] = field(default_factory=dict)
    last_rebirth: float = -math.inf


class SeqTracker:
    """Current session, highest seq, missing seqs and awaited births of every device.

    Bookkeeping on a monotonic clock; ``due`` says which devices need a rebirth.
    """

    def __init__(self, grace_s: float, rebirth_interval_s: float) -> None:
        self.grace_s = grace_s
        self.rebirth_interval_s = rebirth_interval_s
        self._tracks: dict[str, _Track] = {}
        self._suspects: set[str] = set()

    def load(self, cursors: dict[str, DeviceCursor], now: float) -> None:
        """Start from what the store knows."""
        for device_id, c in cursors.items():
            self._tracks[device_id] = _Track(c.session, c.birth_session, c.last_seq, c.online, now)
            if c.online and c.birth_session != c.session:
                self._suspects.add(device_id)

    def observe(
        self,
        device_id: str,
        session: int,
        seq: int | None,
        now: float,
        *,
        birth: bool = False,
        online: bool | None = None,
    ) -> None:
        """Note a stored message of ``session`` (``online``: a status message)."""
        track = self._tracks.get(device_id)
        if (
            track is not None
            and session == track.session
            and track.last_seq is not None
            and seq == track.last_seq + 1
            and not birth
            and online is None
        ):
            track.last_seq = seq  # the common case: the next message in order
            return
        if track is None:
            track = self._tracks[device_id] = _Track(session, None, None, True, now)
        if session < track.session:
            return  # an older session: outbox replay, or stale
        if session > track.session:
            track.session, track.last_seq, track.since, track.online = session, None, now, True
            track.missing.clear()
        if online is not None:
            track.online = online
        if birth:
            track.birth_session = session
            if seq is not None:
                track.missing = {s: t for s, t in track.missing.items() if s > seq}
        if seq is not None:
            last = track.last_seq
            if last is None or seq > last:
                if last is not None and seq > last + 1:
                    if seq - last - 1 > MAX_TRACKED_MISSING:
                        track.missing[-1] = -math.inf
                    else:
                        for s in range(last + 1, seq):
                            track.missing[s] = now
                track.last_seq = seq
            else:
                track.missing.pop(seq, None)
        if track.missing or (track.online and track.birth_session != track.session):
            self._suspects.add(device_id)

    def due(self, now: float) -> list[tuple[str, str | None, int]]:
        """Devices whose gap or awaited birth outlived the grace period:
        ``(device_id, cause, seqs lost)``; cause is ``seq_gap``, ``no_birth``, or None when
        a rebirth was asked for too recently. Gaps reported here are forgotten."""
        found: list[tuple[str, str | None, int]] = []
        cutoff = now - self.grace_s
        for device_id in list(self._suspects):
            track = self._tracks[device_id]
            expired = [s for s, t in track.missing.items() if t <= cutoff]
            for s in expired:
                del track.missing[s]
            lost = sum(1 for s in expired if s >= 0) or (1 if expired else 0)
            awaiting = track.online and track.birth_session != track.session
            if not track.missing and not awaiting:
                self._suspects.discard(device_id)
            cause = None
            if expired:
                cause = "seq_gap"
            elif awaiting and track.since <= cutoff:
                cause = "no_birth"
            if cause is None:
                continue
            if now - track.last_rebirth < self.rebirth_interval_s:
                if lost:
                    found.append((device_id, None, lost))
                continue
            track.last_rebirth = now
            found.append((device_id, cause, lost))
        return found


class _PublishTimer:
    """Publish-to-acknowledgement latency, whichever of the two a thread sees first.

    Never holds its lock while calling paho, so it cannot deadlock with paho's own locks.
    """

    def __init__(self, metrics: HubMetrics) -> None:
        self._metrics = metrics
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[str, float]] = {}
        self._early: dict[int, float] = {}

    def published(self, mid: int, kind: str, started: float) -> None:
        with self._lock:
            acked = self._early.pop(mid, None)
            if acked is None:
                self._pending[mid] = (kind, started)
        if acked is not None:
            self._metrics.publish_latency.labels(kind).observe(max(0.0, acked - started))

    def acked(self, mid: int) -> None:
        now = time.monotonic()
        with self._lock:
            entry = self._pending.pop(mid, None)
            if entry is None:
                if len(self._early) > 10_000:
                    self._early.clear()
                self._early[mid] = now
        if entry is not None:
            kind, started = entry
            self._metrics.publish_latency.labels(kind).observe(max(0.0, now - started))

    def reset(self) -> None:
        with self._lock:
            self._pending.clear()
            self._early.clear()


class Ingest:
    """Connects to the broker, subscribes to every device's up topics and stores what comes.

    ``start()`` connects (IngestError if the broker cannot be reached or refuses) and starts
    the worker; ``stop()`` writes what is waiting, publishes the hub offline and
    disconnects; an ``Ingest`` runs once. ``publish()`` is how the rest of the hub sends
    (desired documents, commands) over the same connection.

    With ``worker_index`` it is an extra ingest process beside the hub (``edgefleet-hub
    ingest-worker``): its own client id on the same shared subscription, and it neither
    speaks for the hub (no hub state, no Will) nor reads the retained snapshot.
    """

    def __init__(
        self,
        config: HubConfig,
        store: Store,
        *,
        metrics: HubMetrics | None = None,
        hooks: IngestHooks | None = None,
        worker_index: int | None = None,
    ) -> None:
        self.config = config
        self.worker_index = worker_index
        self.store = store
        self.metrics = metrics if metrics is not None else HubMetrics()
        self.hooks = hooks if hooks is not None else IngestHooks()
        settings = config.ingest
        self.tracker = SeqTracker(settings.gap_grace_s, settings.rebirth_interval_s)
        self._inbox = _Inbox(settings.queue_size)
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._connack: ReasonCode | None = None
        self._connection = 0
        self._worker: threading.Thread | None = None
        self._snapshot: threading.Thread | None = None
        self._processed = 0
        self._timer = _PublishTimer(self.metrics)
        self._v5 = config.broker.protocol == "5"
        self._stored = {k: self.metrics.ingest_messages.labels(k) for k in _KINDS}
        self._duplicates = {k: self.metrics.ingest_duplicates.labels(k) for k in _KINDS}
        self._topics: dict[str, ParsedTopic] = {}
        client_id = config.client_id
        if worker_index is not None:
            client_id = f"{client_id}-ingest-{worker_index}"
        self._client = self._make_client(client_id, persistent=True)

    # --- lifecycle -----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self, timeout: float = 10.0) -> None:
        """Connect, subscribe and start writing; IngestError when that fails in ``timeout``."""
        self.tracker.load(self.store.device_cursors(), time.monotonic())
        self.metrics.devices_online.set(self.store.count_devices(online=True))
        broker = self.config.broker
        properties = None
        if self._v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = broker.session_expiry_s
            properties.ReceiveMaximum = RECEIVE_MAXIMUM
        try:
            self._client.connect(
                broker.host,
                broker.port,
                keepalive=broker.keepalive,
                clean_start=False if self._v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                properties=properties,
            )
        except (OSError, ssl.SSLError) as exc:
            raise IngestError(f"cannot connect to {broker.url}: {exc}") from exc
        self._client.loop_start()
        if not self._connected.wait(timeout):
            reason = self._connack
            self._client.disconnect()
            self._client.loop_stop()
            why = f"refused: {reason}" if reason is not None else f"no answer in {timeout}s"
            raise IngestError(f"cannot connect to {broker.url}: {why}")
        self._worker = threading.Thread(target=self._run, name="hub-ingest", daemon=True)
        self._worker.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is waiting, publish the hub offline, disconnect, join the threads."""
        self._stop.set()
        if self._snapshot is not None:
            self._snapshot.join(timeout)
        if self._worker is not None:
            self._worker.join(timeout)
            self._worker = None
        if self._connected.is_set() and self.worker_index is None:
            info = self._publish_hub_state("offline")
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(min(timeout, 2.0))
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()
        self.metrics.mqtt_connected.set(0)

    def __enter__(self) -> Ingest:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every message received so far is processed; False on timeout."""
        target = self._inbox.put_count
        deadline = time.monotonic() + timeout
        while self._processed < target:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    # --- publishing ----------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        kind: str = "desired",
    ) -> mqtt.MQTTMessageInfo:
        """Publish from any thread; the time to the broker's acknowledgement is measured
        under ``kind``. paho queues it while disconnected; ``wait_for_publish()`` on the
        result waits for the acknowledgement."""
        started = time.monotonic()
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS and qos > 0:
            self._timer.published(info.mid, kind, started)
        return info

    def request_rebirth(self, device_id: str) -> mqtt.MQTTMessageInfo:
        """Ask a device to send its status, birth and state again."""
        cmd = Cmd(cmd_id=f"rebirth-{secrets.token_hex(6)}", command="rebirth", ts=time.time())
        return self.publish(down_topic(device_id, Kind.CMD), encode(cmd), kind="cmd")

    def _publish_hub_state(self, state: OnlineState) -> mqtt.MQTTMessageInfo:
        msg = HubState(state=state, hub_id=self.config.hub_id, ts=time.time())
        return self.publish(HUB_STATE_TOPIC, encode(msg), retain=True, kind="hub_state")

    # --- paho ----------------------------------------------------------------------------

    def _make_client(self, client_id: str, *, persistent: bool) -> mqtt.Client:
        broker = self.config.broker
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if self._v5 else not persistent,
            manual_ack=persistent,
        )
        client.suppress_exceptions = True
        if broker.tls:
            client.tls_set(
                ca_certs=str(self.config.path(broker.ca_file)) if broker.ca_file else None,
                certfile=str(self.config.path(broker.cert_file)) if broker.cert_file else None,
                keyfile=str(self.config.path(broker.key_file)) if broker.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        if broker.username is not None:
            client.username_pw_set(broker.username, self.config.broker_password())
        if persistent:
            if self.worker_index is None:
                will = HubState(state="offline", hub_id=self.config.hub_id, ts=time.time())
                client.will_set(HUB_STATE_TOPIC, encode(will), qos=1, retain=True)
            client.max_queued_messages_set(0)
            client.reconnect_delay_set(1, 30)
            client.on_connect = self._on_connect
            client.on_disconnect = self._on_disconnect
            client.on_message = self._on_message
            client.on_publish = self._on_publish
        return client

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connack = reason_code
        if reason_code.is_failure:
            log.warning("broker refused the connection: %s", reason_code)
            return
        self._connection += 1
        self._timer.reset()
        group = self.config.broker.shared_group
        if self._v5:
            options = SubscribeOptions(qos=1)
            topic = shared_subscription(group, DEVICE_UP_ALL) if group else DEVICE_UP_ALL
            client.subscribe(topic, options=options)
            client.subscribe(SYS_DROPPED_TOPIC, options=SubscribeOptions(qos=0))
        else:
            client.subscribe([(DEVICE_UP_ALL, 1), (SYS_DROPPED_TOPIC, 0)])
        if self.worker_index is None:  # only the hub itself reads the snapshot and speaks
            snapshot_running = self._snapshot is not None and self._snapshot.is_alive()
            if self._v5 and group and not snapshot_running:
                self._snapshot = threading.Thread(
                    target=self._read_retained, name="hub-ingest-snapshot", daemon=True
                )
                self._snapshot.start()
            self._publish_hub_state("online")
        self.metrics.mqtt_connected.set(1)
        self._connected.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connected.clear()
        self.metrics.mqtt_connected.set(0)
        if not self._stop.is_set():
            log.warning("disconnected from the broker (%s); reconnecting", reason_code)

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._timer.acked(mid)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            self.metrics.ingest_dropped.labels("topic").inc()
            client.ack(message.mid, message.qos)
            return
        if topic[0] == "$":
            if topic == SYS_DROPPED_TOPIC:
                with contextlib.suppress(UnicodeDecodeError, ValueError):
                    self.metrics.broker_dropped.set(float(message.payload.decode().strip()))
            client.ack(message.mid, message.qos)
            return
        if self._stop.is_set():
            return  # stopping: not acknowledged, so the broker keeps it for the next start
        item = _Item(
            topic, bytes(message.payload), message.mid, message.qos, time.time(), self._connection
        )
        self._inbox.put(item, self._stop)

    def _read_retained(self) -> None:
        """Read the retained status and state of every device once, on a second connection
        (a shared subscription receives no retained messages)."""
        client = self._make_client(f"{self.config.client_id}-snapshot", persistent=False)
        last = [time.monotonic()]

        def on_connect(c: mqtt.Client, u: Any, f: Any, rc: ReasonCode, p: Any) -> None:
            if not rc.is_failure:
                c.subscribe([(up_filter(Kind.STATUS), 1), (up_filter(Kind.STATE), 1)])

        def on_message(c: mqtt.Client, u: Any, message: mqtt.MQTTMessage) -> None:
            last[0] = time.monotonic()
            if message.retain:
                item = _Item(
                    message.topic, bytes(message.payload), 0, 0, time.time(), SNAPSHOT_CONNECTION
                )
                self._inbox.put(item, self._stop)

        client.on_connect = on_connect
        client.on_message = on_message
        broker = self.config.broker
        try:
            client.connect(broker.host, broker.port, keepalive=broker.keepalive)
        except (OSError, ssl.SSLError) as exc:
            log.warning("cannot read the retained device status: %s", exc)
            return
        client.loop_start()
        started = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now - started > SNAPSHOT_MAX_S or now - last[0] > SNAPSHOT_QUIET_S:
                break
            time.sleep(0.05)
        client.disconnect()
        client.loop_stop()

    # --- worker --------------------------------------------------------------------------

    def _run(self) -> None:
        now = time.monotonic()
        next_housekeeping = now
        next_gauge = now
        next_prune = now + FIRST_PRUNE_AFTER_S
        max_batch = self.config.ingest.max_batch
        while True:
            batch = self._inbox.take(max_batch, HOUSEKEEPING_INTERVAL_S)
            if batch:
                self.metrics.queue_depth.set(len(self._inbox))
                try:
                    self._process(batch)
                except Exception:  # the worker must survive anything
                    log.exception("ingest batch failed")
                self._processed += len(batch)
            now = time.monotonic()
            if now >= next_housekeeping:
                next_housekeeping = now + HOUSEKEEPING_INTERVAL_S
                self._request_rebirths(now)
            if now >= next_gauge:
                next_gauge = now + ONLINE_GAUGE_INTERVAL_S
                with contextlib.suppress(Exception):
                    self.metrics.devices_online.set(self.store.count_devices(online=True))
            if now >= next_prune:
                next_prune = now + PRUNE_INTERVAL_S
                self._prune()
            if self._stop.is_set() and not len(self._inbox):
                return

    def _request_rebirths(self, now: float) -> None:
        if not self.config.ingest.detect_gaps:
            return
        for device_id, cause, lost in self.tracker.due(now):
            if lost:
                self.metrics.seq_gaps.inc(lost)
            if cause:
                log.info("device %s: %s; requesting a rebirth", device_id, cause)
                self.metrics.rebirth_requests.labels(cause).inc()
                self.request_rebirth(device_id)

    def _prune(self) -> None:
        settings = self.config.ingest
        now = time.time()
        try:
            self.store.prune_telemetry(
                now - settings.telemetry_retention_days * DAY_S,
                now - settings.rollup_retention_days * DAY_S,
            )
        except Exception:
            log.exception("pruning old telemetry failed")

    def _decode(self, item: _Item) -> _Decoded | None:
        try:
            parsed = self._topics.get(item.topic)
            if parsed is None:
                parsed = parse_topic(item.topic)
                if parsed.direction is not Direction.UP:
                    raise WireError(f"not a device-to-hub topic: {item.topic[:80]!r}")
                if len(self._topics) >= TOPIC_CACHE_SIZE:
                    self._topics.clear()
                self._topics[item.topic] = parsed
            msg = decode(
                message_for_topic(parsed),
                item.payload,
                max_bytes=self.config.ingest.max_message_bytes,
            )
        except WireError as exc:
            self._drop(exc.reason if exc.reason != "wire" else "topic", item, exc)
            return None
        claimed = msg.subject_device_id()
        if claimed != parsed.device_id:
            self._drop(
                "device_mismatch",
                item,
                f"payload device_id {claimed!r} is not the topic's {parsed.device_id!r}",
            )
            return None
        return _Decoded(item, parsed.kind.value, msg)

    def _drop(self, reason: str, item: _Item, why: object) -> None:
        self.metrics.ingest_dropped.labels(reason).inc()
        log.debug("dropped a message on %.80s (%s): %s", item.topic, reason, why)

    def _process(self, batch: list[_Item]) -> None:
        started = time.monotonic()
        decoded = [d for d in map(self._decode, batch) if d is not None]
        applied = self._write(decoded) if decoded else []
        now = time.monotonic()
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_seconds.observe(now - started)
        observe = self.tracker.observe
        for d in applied:
            msg = d.message
            if isinstance(msg, Status):
                observe(msg.device_id, msg.session, msg.seq, now, online=msg.state == "online")
            elif isinstance(msg, Birth | Telemetry | State | Event | CmdResult):
                observe(msg.device_id, msg.session, msg.seq, now, birth=isinstance(msg, Birth))
        connection = self._connection
        ack = self._client.ack
        for item in batch:
            if item.qos and item.connection == connection:
                ack(item.mid, item.qos)
        for d in applied:
            self._call_hooks(d)

    def _write(self, decoded: list[_Decoded]) -> list[_Decoded]:
        """Write a batch in one transaction, retrying transient store errors; when a batch
        fails for another reason, write its messages one by one and drop those that fail."""
        delay = 0.05
        while True:
            try:
                with self.store.transaction():
                    return self._apply(decoded)
            except TRANSIENT_ERRORS as exc:
                if self._stop.is_set() and delay > 1.0:
                    raise
                self.metrics.store_retries.inc()
                log.warning("store busy or failing (%s); retrying the batch in %.2fs", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
            except Exception:
                log.exception("a batch failed; writing its messages one by one")
                break
        applied: list[_Decoded] = []
        for d in decoded:
            try:
                with self.store.transaction():
                    applied += self._apply([d])
            except Exception as exc:
                self._drop("store_error", d.item, exc)
        return applied

    def _apply(self, decoded: list[_Decoded]) -> list[_Decoded]:
        """The store writes of a batch (inside the caller's transaction); returns the
        messages that changed something, in arrival order. Telemetry is written last, in
        one statement: it never depends on the other kinds."""
        store = self.store
        dropped = self.metrics.ingest_dropped
        applied: list[tuple[int, _Decoded]] = []
        telemetry: list[tuple[int, _Decoded]] = []
        items: list[TelemetryIn] = []
        for position, d in enumerate(decoded):
            msg, at = d.message, d.item.received_at
            if isinstance(msg, Telemetry):
                telemetry.append((position, d))
                items.append(TelemetryIn(msg, d.item.payload.decode("utf-8"), at))
                continue
            if isinstance(msg, Birth):
                new = store.record_birth(msg, at)
                if not new:
                    dropped.labels("stale_session").inc()
            elif isinstance(msg, Status):
                new = store.record_status(msg, at)
                if not new:
                    dropped.labels(
                        "stale_will" if msg.state == "offline" else "stale_session"
                    ).inc()
            elif isinstance(msg, State):
                new = store.record_state(msg, at)
            elif isinstance(msg, Event):
                new = store.record_event(msg, at)
            elif isinstance(msg, CmdResult):
                new = store.record_result(msg, at)
            else:
                continue
            if new:
                self._stored[d.kind].inc()
                applied.append((position, d))
            elif not isinstance(msg, Birth | Status):
                self._duplicates[d.kind].inc()
        if items:
            fresh = store.record_telemetry(items)
            count = sum(fresh)
            self._stored["telemetry"].inc(count)
            if count < len(fresh):
                self._duplicates["telemetry"].inc(len(fresh) - count)
            applied += [pd for pd, new in zip(telemetry, fresh, strict=True) if new]
            applied.sort(key=lambda pd: pd[0])
        return [d for _, d in applied]

    def _call_hooks(self, d: _Decoded) -> None:
        msg = d.message
        if isinstance(msg, Telemetry):
            self._run_hooks("on_telemetry", self.hooks.on_telemetry, msg.device_id, msg)
        elif isinstance(msg, Birth):
            self._run_hooks("on_birth", self.hooks.on_birth, msg.device_id, msg)
        elif isinstance(msg, Status):
            self._run_hooks("on_status", self.hooks.on_status, msg.device_id, msg)
        elif isinstance(msg, State):
            self._run_hooks("on_state", self.hooks.on_state, msg.device_id, msg)
        elif isinstance(msg, Event):
            self._run_hooks("on_event", self.hooks.on_event, msg.device_id, msg)
        elif isinstance(msg, CmdResult):
            self._run_hooks("on_result", self.hooks.on_result, msg.device_id, msg)

    def _run_hooks(self, name: str, hooks: list[Hook[M]], device_id: str, msg: M) -> None:
        for hook in hooks:
            try:
                hook(device_id, msg)
            except Exception:
                self.metrics.hook_errors.labels(name).inc()
                log.exception("ingest hook %s failed for %s", name, device_id)


_KINDS = ("birth", "status", "telemetry", "state", "events", "result")
