"""The hub's MQTT ingest: everything devices send, validated, ordered by session and stored.

Threads. paho's network thread runs the callbacks, which only put what arrived on a bounded
queue (blocking when it is full, so that the broker holds the backlog). One worker thread
takes whatever is queued (at most ``ingest.max_batch``; a lone message goes alone, so batches
grow with the load and never wait), decodes each message with the contract, and writes the
batch in one store transaction. Only then are the QoS 1 messages acknowledged (paho manual
acks): a message the broker saw acknowledged is in the store. Hooks run after the commit.

Rules, per message:

- A bad topic, an oversized, malformed or unknown-major payload, or a payload whose device id
  is not the topic's, is counted by reason (``WireError.reason``, ``device_mismatch``) and
  dropped. Nothing a device sends stops the ingest.
- Sessions order everything: a birth or status from a session older than the device's
  current one is ignored and counted (``stale_will`` for an offline Will, else
  ``stale_session``); telemetry and events of older sessions (outbox replays) are stored.
- Telemetry, events and command results are stored once per (device, session, seq): QoS 1
  redeliveries and outbox replays are counted as duplicates. A reported state older (by
  session, then seq) than the stored one does not replace it.
- Within the current session, a seq that is still missing ``ingest.gap_grace_s`` after a
  later one arrived is a gap, and a device online in a session whose birth never came is
  missing its birth; either way the hub publishes ``Cmd(command="rebirth")`` on the device's
  ``down/cmd``, at most once per ``ingest.rebirth_interval_s`` per device. With several hub
  workers on one shared subscription each sees only part of a device's messages: set
  ``ingest.detect_gaps = false`` there.

Connection. MQTT 5 (or 3.1.1) with a persistent session (``broker.session_expiry_s``), so
messages that arrive while the hub restarts wait in the broker; Will ``HubState(offline)``
retained on ``edgefleet/v1/hub/state``, ``online`` published on every connect. With
``broker.shared_group`` the ingest subscribes to ``$share/<group>/edgefleet/v1/dev/+/up/#``
so that several hub workers share the load; because shared subscriptions receive no
retained messages, it also reads the retained status and state topics once after each
connect. It reads ``$SYS/broker/publish/messages/dropped`` into the metrics.

The broker must not drop messages queued for the hub: configure the hub's account with
``max_queued_messages 0`` (or a limit above any backlog) — mosquitto's default of 1000
silently drops QoS 1 messages to a subscriber that falls behind (docs/hub-ingest.md).
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import secrets
import ssl
import threading
import time
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
SUB_ID_SHARED = 1
SUB_ID_SNAPSHOT = 2
SNAPSHOT_WINDOW_S = 5.0
"""How long after a connect the retained status/state snapshot subscription stays."""
MAX_TRACKED_MISSING = 1000
"""A larger jump in seq is a gap at once instead of a set of missing numbers."""
GAP_CHECK_INTERVAL_S = 0.25
PRUNE_INTERVAL_S = 3600.0
FIRST_PRUNE_AFTER_S = 60.0
RECEIVE_MAXIMUM = 65535
DAY_S = 86400.0

M = TypeVar("M", bound=Message)
Hook = Callable[[str, M], None]


class _Item(NamedTuple):
    topic: str
    payload: bytes
    mid: int
    qos: int
    received_at: float
    connection: int


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

    Pure bookkeeping on a monotonic clock; ``due`` says which devices need a rebirth.
    """

    def __init__(self, grace_s: float, rebirth_interval_s: float) -> None:
        self.grace_s = grace_s
        self.rebirth_interval_s = rebirth_interval_s
        self._tracks: dict[str, _Track] = {}
        self._suspects: set[str] = set()

    def load(self, cursors: dict[str, DeviceCursor], now: float) -> None:
        for device_id, c in cursors.items():
            self._tracks[device_id] = _Track(c.session, c.birth_session, c.last_seq, c.online, now)
            if c.online and c.birth_session != c.session:
                self._suspects.add(device_id)

    @property
    def online_count(self) -> int:
        return sum(1 for t in self._tracks.values() if t.online)

    def observe(
        self,
        device_id: str,
        session: int,
        seq: int | None,
        now: float,
        *,
        birth: bool = False,
        online: bool | None = None,
    ) -> int:
        """Note a stored message; returns how many seqs it revealed missing (0 usually)."""
        track = self._tracks.get(device_id)
        if track is None:
            track = self._tracks[device_id] = _Track(session, None, None, False, now)
        if session < track.session:
            return 0
        if session > track.session:
            track.session, track.last_seq, track.since = session, None, now
            track.missing.clear()
            track.online = True
        if online is not None:
            track.online = online
        if birth:
            track.birth_session = session
            track.online = True
            if seq is not None:
                track.missing = {s: t for s, t in track.missing.items() if s > seq}
        revealed = 0
        if seq is not None:
            if track.last_seq is None or seq > track.last_seq:
                if track.last_seq is not None and seq > track.last_seq + 1:
                    revealed = seq - track.last_seq - 1
                    if revealed > MAX_TRACKED_MISSING:
                        track.missing[-1] = -math.inf
                    else:
                        for s in range(track.last_seq + 1, seq):
                            track.missing[s] = now
                track.last_seq = seq
            else:
                track.missing.pop(seq, None)
        if track.missing or (track.online and track.birth_session != track.session):
            self._suspects.add(device_id)
        return revealed

    def due(self, now: float) -> list[tuple[str, str, int]]:
        """Devices to ask for a rebirth now: (device_id, cause, seqs lost) with cause
        ``seq_gap`` or ``no_birth``; gaps reported here are forgotten."""
        found: list[tuple[str, str, int]] = []
        for device_id in list(self._suspects):
            track = self._tracks[device_id]
            cutoff = now - self.grace_s
            expired = [s for s, t in track.missing.items() if t <= cutoff]
            lost = 0
            for s in expired:
                del track.missing[s]
                lost += 1
            awaiting = track.online and track.birth_session != track.session
            cause = (
                "seq_gap" if expired else "no_birth" if awaiting and track.since <= cutoff else None
            )
            if not track.missing and not awaiting:
                self._suspects.discard(device_id)
            if cause is None:
                continue
            if now - track.last_rebirth < self.rebirth_interval_s:
                if cause == "seq_gap":
                    found.append((device_id, "", lost))
                continue
            track.last_rebirth = now
            found.append((device_id, cause, lost))
        return found


class _PublishTimer:
    """Publish-to-acknowledgement latency, whichever of the two a thread sees first."""

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


class _Decoded(NamedTuple):
    item: _Item
    kind: str
    message: Message


class Ingest:
    """Connects to the broker, subscribes to every device's up topics and stores what comes.

    ``start()`` connects (IngestError if the broker cannot be reached or refuses) and starts
    the worker; ``stop()`` writes what is queued, publishes the hub offline and disconnects.
    ``publish()`` is the hub's way to send anything else (desired documents, commands).
    """

    def __init__(
        self,
        config: HubConfig,
        store: Store,
        *,
        metrics: HubMetrics | None = None,
        hooks: IngestHooks | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics if metrics is not None else HubMetrics()
        self.hooks = hooks if hooks is not None else IngestHooks()
        settings = config.ingest
        self.tracker = SeqTracker(settings.gap_grace_s, settings.rebirth_interval_s)
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=settings.queue_size)
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._connack: ReasonCode | None = None
        self._connection = 0
        self._snapshot_until: float | None = None
        self._worker: threading.Thread | None = None
        self._enqueued = 0
        self._processed = 0
        self._progress = threading.Condition()
        self._timer = _PublishTimer(self.metrics)
        self._v5 = config.broker.protocol == "5"
        self._client = self._make_client()

    # --- lifecycle -----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self, timeout: float = 10.0) -> None:
        """Connect, subscribe and start writing; IngestError when that fails in ``timeout``."""
        self.tracker.load(self.store.device_cursors(), time.monotonic())
        self.metrics.devices_online.set(self.tracker.online_count)
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
            self._client.loop_stop()
            self._client.disconnect()
            why = f"refused: {reason}" if reason is not None else f"no answer in {timeout}s"
            raise IngestError(f"cannot connect to {broker.url}: {why}")
        self._worker = threading.Thread(target=self._run, name="hub-ingest", daemon=True)
        self._worker.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, publish the hub offline, disconnect, join the threads."""
        self._stop.set()
        if self._worker is not None:
            self._worker.join(timeout)
            self._worker = None
        if self._connected.is_set():
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
        deadline = time.monotonic() + timeout
        with self._progress:
            target = self._enqueued
            while self._processed < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._progress.wait(left)
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
        """Publish from any thread; the latency to the broker's ack is measured under
        ``kind``. paho queues it while disconnected; ``wait_for_publish()`` on the result
        waits for the acknowledgement."""
        started = time.monotonic()
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS and qos > 0:
            self._timer.published(info.mid, kind, started)
        return info

    def request_rebirth(self, device_id: str) -> mqtt.MQTTMessageInfo:
        """Ask a device to send its birth (and status and state) again."""
        cmd = Cmd(cmd_id=f"rebirth-{secrets.token_hex(6)}", command="rebirth", ts=time.time())
        return self.publish(down_topic(device_id, Kind.CMD), encode(cmd), kind="cmd")

    def _publish_hub_state(self, state: OnlineState) -> mqtt.MQTTMessageInfo:
        msg = HubState(state=state, hub_id=self.config.hub_id, ts=time.time())
        return self.publish(HUB_STATE_TOPIC, encode(msg), retain=True, kind="hub_state")

    # --- paho ----------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        broker = self.config.broker
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.config.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if self._v5 else False,
            manual_ack=True,
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
        will = HubState(state="offline", hub_id=self.config.hub_id, ts=time.time())
        client.will_set(HUB_STATE_TOPIC, encode(will), qos=1, retain=True)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    def _subscriptions(self) -> None:
        group = self.config.broker.shared_group
        client = self._client
        if self._v5:
            options = SubscribeOptions(qos=1)
            if group:
                props = Properties(PacketTypes.SUBSCRIBE)  # type: ignore[no-untyped-call]
                props.SubscriptionIdentifier = SUB_ID_SHARED
                client.subscribe(
                    shared_subscription(group, DEVICE_UP_ALL), options=options, properties=props
                )
                snap = Properties(PacketTypes.SUBSCRIBE)  # type: ignore[no-untyped-call]
                snap.SubscriptionIdentifier = SUB_ID_SNAPSHOT
                client.subscribe(
                    [(up_filter(Kind.STATUS), options), (up_filter(Kind.STATE), options)],
                    properties=snap,
                )
                self._snapshot_until = time.monotonic() + SNAPSHOT_WINDOW_S
            else:
                client.subscribe(DEVICE_UP_ALL, options=options)
            client.subscribe(SYS_DROPPED_TOPIC, options=SubscribeOptions(qos=0))
        else:
            client.subscribe([(DEVICE_UP_ALL, 1), (SYS_DROPPED_TOPIC, 0)])

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
        self._subscriptions()
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
        if topic.startswith("$SYS/"):
            if topic == SYS_DROPPED_TOPIC:
                with contextlib.suppress(UnicodeDecodeError, ValueError):
                    self.metrics.broker_dropped.set(float(message.payload.decode().strip()))
            client.ack(message.mid, message.qos)
            return
        if self._v5 and not message.retain:
            ids = getattr(message.properties, "SubscriptionIdentifier", None) or []
            if SUB_ID_SNAPSHOT in ids and SUB_ID_SHARED not in ids:
                client.ack(message.mid, message.qos)  # a live copy: the shared one is processed
                return
        item = _Item(
            topic,
            bytes(message.payload),
            message.mid,
            message.qos,
            time.time(),
            self._connection,
        )
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                break
            except queue.Full:
                if self._stop.is_set():
                    return  # not acknowledged: the broker delivers it again
        with self._progress:
            self._enqueued += 1

    # --- worker --------------------------------------------------------------------------

    def _run(self) -> None:
        next_check = time.monotonic()
        next_prune = time.monotonic() + FIRST_PRUNE_AFTER_S
        max_batch = self.config.ingest.max_batch
        while True:
            try:
                first = self._queue.get(timeout=GAP_CHECK_INTERVAL_S)
            except queue.Empty:
                first = None
            batch = [] if first is None else [first]
            while 0 < len(batch) < max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if batch:
                self.metrics.queue_depth.set(self._queue.qsize())
                try:
                    self._process(batch)
                except Exception:  # the worker must survive anything
                    log.exception("ingest batch failed")
                with self._progress:
                    self._processed += len(batch)
                    self._progress.notify_all()
            now = time.monotonic()
            if now >= next_check:
                next_check = now + GAP_CHECK_INTERVAL_S
                self._housekeeping(now)
            if now >= next_prune:
                next_prune = now + PRUNE_INTERVAL_S
                self._prune()
            if self._stop.is_set() and self._queue.empty():
                return

    def _housekeeping(self, now: float) -> None:
        if self._snapshot_until is not None and now >= self._snapshot_until:
            self._snapshot_until = None
            self._client.unsubscribe([up_filter(Kind.STATUS), up_filter(Kind.STATE)])
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
            parsed = parse_topic(item.topic)
            if parsed.direction is not Direction.UP:
                raise WireError(f"not a device-to-hub topic: {item.topic[:80]!r}")
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
        decoded = [d for d in (self._decode(item) for item in batch) if d is not None]
        applied: list[_Decoded] = []
        if decoded:
            applied = self._write(decoded)
        now = time.monotonic()
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_seconds.observe(now - started)
        for d in applied:
            self._track(d, now)
        self.metrics.devices_online.set(self.tracker.online_count)
        self._ack(batch)
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
        messages that changed something, in order."""
        store = self.store
        metrics = self.metrics
        applied: list[_Decoded] = []
        telemetry: list[tuple[_Decoded, Telemetry]] = []
        for d in decoded:
            msg, at = d.message, d.item.received_at
            new = True
            if isinstance(msg, Telemetry):
                telemetry.append((d, msg))
                continue
            if isinstance(msg, Birth):
                new = store.record_birth(msg, at)
                if not new:
                    metrics.ingest_dropped.labels("stale_session").inc()
            elif isinstance(msg, Status):
                new = store.record_status(msg, at)
                if not new:
                    reason = "stale_will" if msg.state == "offline" else "stale_session"
                    metrics.ingest_dropped.labels(reason).inc()
            elif isinstance(msg, State):
                new = store.record_state(msg, at)
                if not new:
                    metrics.ingest_duplicates.labels(d.kind).inc()
            elif isinstance(msg, Event):
                new = store.record_event(msg, at)
                if not new:
                    metrics.ingest_duplicates.labels(d.kind).inc()
            elif isinstance(msg, CmdResult):
                new = store.record_result(msg, at)
                if not new:
                    metrics.ingest_duplicates.labels(d.kind).inc()
            if new:
                metrics.ingest_messages.labels(d.kind).inc()
                applied.append(d)
        if telemetry:
            items = [
                TelemetryIn(msg, d.item.payload.decode("utf-8"), d.item.received_at)
                for d, msg in telemetry
            ]
            fresh = store.record_telemetry(items)
            count = sum(fresh)
            metrics.ingest_messages.labels("telemetry").inc(count)
            metrics.ingest_duplicates.labels("telemetry").inc(len(fresh) - count)
            applied += [d for (d, _), new in zip(telemetry, fresh, strict=True) if new]
        return applied

    def _track(self, d: _Decoded, now: float) -> None:
        msg = d.message
        device_id = msg.subject_device_id() or ""
        if isinstance(msg, Status):
            self.tracker.observe(device_id, msg.session, msg.seq, now, online=msg.state == "online")
        elif isinstance(msg, Birth | Telemetry | State | Event | CmdResult):
            self.tracker.observe(device_id, msg.session, msg.seq, now, birth=isinstance(msg, Birth))

    def _ack(self, batch: list[_Item]) -> None:
        connection = self._connection
        for item in batch:
            if item.qos and item.connection == connection:
                self._client.ack(item.mid, item.qos)

    def _call_hooks(self, d: _Decoded) -> None:
        msg = d.message
        if isinstance(msg, Birth):
            self._run_hooks("on_birth", self.hooks.on_birth, msg.device_id, msg)
        elif isinstance(msg, Status):
            self._run_hooks("on_status", self.hooks.on_status, msg.device_id, msg)
        elif isinstance(msg, State):
            self._run_hooks("on_state", self.hooks.on_state, msg.device_id, msg)
        elif isinstance(msg, Event):
            self._run_hooks("on_event", self.hooks.on_event, msg.device_id, msg)
        elif isinstance(msg, CmdResult):
            self._run_hooks("on_result", self.hooks.on_result, msg.device_id, msg)
        elif isinstance(msg, Telemetry):
            self._run_hooks("on_telemetry", self.hooks.on_telemetry, msg.device_id, msg)

    def _run_hooks(self, name: str, hooks: list[Hook[M]], device_id: str, msg: M) -> None:
        for hook in hooks:
            try:
                hook(device_id, msg)
            except Exception:
                self.metrics.hook_errors.labels(name).inc()
                log.exception("ingest hook %s failed for %s", name, device_id)
