"""The event loop: one thread drives thousands of paho clients over one selector.

Every simulated device has its own MQTT connection (its client id, its Will, its
subscription, as per-device broker ACLs require), but no thread of its own. paho's
external-loop interface does the protocol work: ``loop_read`` when the selector says a
socket is readable, ``loop_write`` for clients that queued packets, ``loop_misc`` for
keepalive. The socket callbacks (``on_socket_open/close/register_write/unregister_write``)
keep the selector in step, so paho never creates its per-client wake-up socket pair and a
device costs one file descriptor.

Writes are batched: a publish only marks its client dirty; after each round of events and
timers every dirty client writes once, and only a client whose socket buffer is full is
registered for write readiness. Connection attempts are rate-limited (a token bucket) so a
fleet that starts at once does not stampede the broker, and they do not block: the TCP
connect is non-blocking (plain TCP; TLS connects block for their handshake).

Everything a device does happens in its loop's thread; other threads talk to a loop only
through ``call`` (a queued function and a wake-up byte).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import heapq
import itertools
import logging
import os
import random
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from contract.messages import State
from contract.profile import FirmwareProfile, HardwareFacts
from contract.signing import PublicKey, TrustedKeys
from contract.topics import Kind, down_filter
from hub.simulate.device import SimDevice
from hub.simulate.model import (
    DeviceSpec,
    DeviceView,
    SimStats,
    SimulationConfig,
    SimulationError,
    connects_at_all,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

STABLE_AFTER_S = 10.0
"""A connection that lasted this long resets the reconnect backoff."""
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 30.0
MAX_WAIT_S = 0.5
SWEEP_S = 2.0
"""How often every connection's keepalive is checked."""
STOP_FLUSH_S = 10.0
FD_FLOOR = 1024
"""Device sockets get descriptors from here up when the open-file limit allows, so code in
the same process that uses select() (paho's loop_start, FD_SETSIZE 1024) keeps working."""


def lift_descriptor(sock: socket.socket) -> socket.socket:
    """``sock`` moved to a descriptor >= FD_FLOOR (the original is closed), or ``sock``
    itself when the limit leaves no room there."""
    try:
        fd = fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, FD_FLOOR)
    except OSError:
        return sock
    try:
        lifted = socket.socket(sock.family, sock.type, sock.proto, fileno=fd)
    except OSError:
        os.close(fd)
        return sock
    sock.close()
    return lifted


@dataclass(frozen=True)
class BrokerTarget:
    """Where the devices connect, resolved once."""

    host: str
    port: int
    family: int
    address: tuple[Any, ...]
    tls: bool

    @classmethod
    def from_url(cls, url: str) -> BrokerTarget:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise SimulationError(
                f"expected mqtt://host[:port] or mqtts://host[:port], got {url!r}"
            )
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError:
            raise SimulationError(f"bad port in {url!r}") from None
        try:
            infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise SimulationError(f"cannot resolve {parts.hostname}: {exc}") from None
        family, _, _, _, address = infos[0]
        return cls(parts.hostname, port, int(family), tuple(address), tls)


class SimClient(mqtt.Client):
    """A paho client whose TCP connect does not block the event loop (plain TCP only)."""

    sim_target: BrokerTarget | None = None

    def _create_socket_connection(self) -> socket.socket:
        target = self.sim_target
        if target is None:
            return super()._create_socket_connection()
        sock = lift_descriptor(socket.socket(target.family, socket.SOCK_STREAM))
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            err = sock.connect_ex(target.address)
            if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
                raise OSError(err, os.strerror(err))
        except BaseException:
            sock.close()
            raise
        return sock


class Conn:
    """One connection attempt of one device."""

    __slots__ = (
        "client",
        "closed",
        "connected",
        "device",
        "dirty",
        "goodbye",
        "opened_at",
        "session",
        "sock",
        "want_write",
        "write_registered",
    )

    def __init__(self, device: SimDevice, session: int) -> None:
        self.device = device
        self.session = session
        self.client: SimClient | None = None
        self.sock: Any = None
        self.connected = False
        self.closed = False
        self.want_write = False
        self.write_registered = False
        self.dirty = False
        self.goodbye = False
        self.opened_at = 0.0


class _Linger:
    """A socket closed after DISCONNECT, kept until the broker closes its side.

    paho closes its socket right after writing DISCONNECT; closing a socket with unread
    data (a late PUBACK) sends a TCP reset, which can make the broker discard the
    DISCONNECT it had not read yet and publish the Will. A duplicate of the socket keeps
    the connection open: its write side is shut (FIN after DISCONNECT) and it is read to
    the end before it is closed.
    """

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock


class Shard:
    """One event-loop thread and the devices it drives."""

    def __init__(
        self,
        name: str,
        specs: Sequence[DeviceSpec],
        *,
        profiles: dict[str, FirmwareProfile],
        facts: dict[str, HardwareFacts],
        config: SimulationConfig,
        target: BrokerTarget,
        connect_rate: float,
        seed: int,
    ) -> None:
        self.name = name
        self.config = config
        self.target = target
        self.rate = connect_rate
        self.burst = max(1.0, connect_rate / 20.0)
        self.tokens = 1.0
        self.refilled = time.monotonic()
        self._keys_cache: dict[tuple[tuple[str, str], ...], TrustedKeys] = {}
        initial = self.trusted_keys(
            tuple(sorted((k.keyid, k.public_key) for k in config.trusted_keys))
        )
        self.rng = random.Random(seed)
        self.devices = [
            SimDevice(
                spec,
                profile=profiles[spec.profile],
                facts=facts[spec.profile],
                config=config,
                port=self,
                trusted=initial,
                rng=self.rng,
            )
            for spec in specs
        ]
        self.by_id = {d.device_id: d for d in self.devices}
        self.expected_online = sum(1 for s in specs if connects_at_all(s, config.failures))
        self.conns: dict[str, Conn] = {}
        self.open_socks = 0
        self.lingering = 0
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._calls: deque[Callable[[], None]] = deque()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._ready: deque[SimDevice] = deque()
        self._dirty: list[Conn] = []
        self._held: dict[str, float | None] = {}
        """Devices kept offline: until when (monotonic), or None for good."""
        self._attempts: dict[str, int] = {}
        self._ever = 0
        self.stats = SimStats(devices=len(self.devices), expected_online=self.expected_online)
        if not self.expected_online:
            self.stats.ramp_s = 0.0
        self.started = 0.0
        self.stopping = False
        self._stop_deadline = 0.0
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"edgefleet-sim-{name}", daemon=True)

    # ---- life cycle (any thread) --------------------------------------------------------

    def start(self) -> None:
        self.started = time.monotonic()
        now = time.time()
        for device in self.devices:
            device.started_at = now
            if connects_at_all(device.spec, self.config.failures):
                self._ready.append(device)
            else:
                self._held[device.device_id] = None
        self._thread.start()

    def call(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        """Run ``fn`` in the loop thread and return its result."""
        future: Future[T] = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        if self._finished.is_set():
            return fn()  # the loop is gone: nothing else touches the devices
        self._calls.append(run)
        self._wake()
        if self._finished.is_set():
            # The loop ended while this was queued: run what it left (each call runs once,
            # whoever pops it).
            while self._calls:
                try:
                    self._calls.popleft()()
                except IndexError:
                    break
        return future.result(timeout)

    def request_stop(self, timeout: float = STOP_FLUSH_S) -> None:
        self._calls.append(lambda: self._begin_stop(timeout))
        self._wake()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    # ---- Port (loop thread) -------------------------------------------------------------

    def now(self) -> float:
        return time.time()

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._order), callback))

    def trusted_keys(self, keys: tuple[tuple[str, str], ...]) -> TrustedKeys:
        cached = self._keys_cache.get(keys)
        if cached is None:
            cached = TrustedKeys(PublicKey(keyid=k, public_key=v) for k, v in keys)
            self._keys_cache[keys] = cached
        return cached

    def publish(
        self,
        device: SimDevice,
        topic: str,
        payload: bytes,
        *,
        qos: int,
        retain: bool,
        correlation_data: bytes | None = None,
    ) -> bool:
        conn = self.conns.get(device.device_id)
        if conn is None or not conn.connected or conn.client is None:
            return False
        properties = None
        if correlation_data is not None:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.CorrelationData = correlation_data
        info = conn.client.publish(topic, payload, qos, retain, properties=properties)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return False
        self.stats.published += 1
        self.stats.published_bytes += len(payload)
        return True

    def go_offline(self, device: SimDevice, offline_for: float | None) -> None:
        self.stats.dropped_on_purpose += 1
        self._hold(device, offline_for)
        conn = self.conns.get(device.device_id)
        if conn is not None:
            self._abandon(conn, planned=True)

    def _hold(self, device: SimDevice, offline_for: float | None) -> None:
        if offline_for is None:
            self._held[device.device_id] = None
            return
        until = time.monotonic() + offline_for
        self._held[device.device_id] = until
        self.call_later(offline_for, lambda: self._release(device, until))

    def _release(self, device: SimDevice, until: float | None) -> None:
        if self._held.get(device.device_id, 0.0) != until or self.stopping:
            return
        del self._held[device.device_id]
        if device.device_id not in self.conns:
            self._ready.append(device)

    # ---- control (loop thread, through call) -----------------------------------------

    def set_offline(self, ids: Sequence[str], offline: bool, offline_for: float | None) -> int:
        changed = 0
        for device_id in ids:
            device = self.by_id.get(device_id)
            if device is None:
                continue
            changed += 1
            if offline:
                self.go_offline(device, offline_for)
            elif device_id in self._held:
                del self._held[device_id]
                if device_id not in self.conns:
                    self._ready.append(device)
        return changed

    def snapshot(self) -> SimStats:
        stats = SimStats(**{k: v for k, v in vars(self.stats).items() if k not in _AGGREGATES})
        stats.connected = sum(1 for d in self.devices if d.connected)
        stats.ever_connected = sum(1 for d in self.devices if d.ever_connected)
        for device in self.devices:
            for name, value in device.counters.items():
                setattr(stats, name, getattr(stats, name) + value)
            stats.outbox_dropped += device.outbox_dropped
            generation = device.applied_generation
            stats.generations[generation] = stats.generations.get(generation, 0) + 1
            version = device.serving.state.model_set.version if device.serving else ""
            stats.versions[version] = stats.versions.get(version, 0) + 1
            stats.phases[device.phase] = stats.phases.get(device.phase, 0) + 1
        return stats

    def views(self) -> list[DeviceView]:
        return [
            DeviceView(
                device_id=d.device_id,
                profile=d.spec.profile,
                modes=d.spec.modes,
                connected=d.connected,
                session=d.session,
                seq=d.seq,
                applied_generation=d.applied_generation,
                desired_generation=max(d.desired_generation, d.applied_generation),
                phase=d.phase,
                model_set_version=d.serving.state.model_set.version if d.serving else None,
                last_error_code=d.last_error.code if d.last_error else None,
            )
            for d in self.devices
        ]

    def state_of(self, device_id: str) -> State:
        return self.by_id[device_id].state_message()

    # ---- the loop -------------------------------------------------------------------

    def _run(self) -> None:
        self.call_later(SWEEP_S, self._sweep)
        try:
            while True:
                try:
                    self._round()
                except Exception:
                    self.stats.errors += 1
                    log.exception("simulator loop %s: unexpected error", self.name)
                if self.stopping and (
                    (self.open_socks == 0 and self.lingering == 0)
                    or time.monotonic() >= self._stop_deadline
                ):
                    break
        finally:
            self._close_all()
            self._finished.set()
            while self._calls:  # answer callers that raced with the end
                try:
                    self._calls.popleft()()
                except IndexError:
                    break

    def _round(self) -> None:
        now = time.monotonic()
        self._run_timers(now)
        self._run_calls()
        self._start_connects(now)
        self._flush()
        timeout = self._timeout(time.monotonic())
        for key, mask in self.selector.select(timeout):
            conn = key.data
            if conn is None:
                self._drain_wake()
                continue
            if isinstance(conn, _Linger):
                self._read_linger(conn)
                continue
            client = conn.client
            if client is None or conn.closed:
                continue
            try:
                if mask & selectors.EVENT_READ:
                    client.loop_read()
                if mask & selectors.EVENT_WRITE and not conn.closed:
                    client.loop_write()
            except Exception:
                self.stats.errors += 1
                log.exception("%s: network handling failed", conn.device.device_id)
                self._abandon(conn)
        self._run_calls()
        self._flush()

    def _timeout(self, now: float) -> float:
        if self._dirty or self._calls:
            return 0.0
        timeout = MAX_WAIT_S
        if self._timers:
            timeout = min(timeout, max(0.0, self._timers[0][0] - now))
        if self._ready and not self.stopping:
            timeout = min(timeout, max(0.0, (1.0 - self.tokens) / self.rate))
        if self.stopping:
            timeout = min(timeout, 0.05)
        return timeout

    def _run_timers(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, callback = heapq.heappop(timers)
            try:
                callback()
            except Exception:
                self.stats.errors += 1
                log.exception("simulator timer failed")

    def _run_calls(self) -> None:
        while self._calls:
            self._calls.popleft()()

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _flush(self) -> None:
        while self._dirty:
            dirty, self._dirty = self._dirty, []
            for conn in dirty:
                conn.dirty = False
                client = conn.client
                if conn.closed or client is None or not conn.want_write:
                    continue
                try:
                    client.loop_write()
                except Exception:
                    self.stats.errors += 1
                    log.exception("%s: write failed", conn.device.device_id)
                    self._abandon(conn)
                    continue
                if conn.want_write and not conn.closed and not conn.write_registered:
                    # The socket buffer is full (or the TCP connect is under way).
                    conn.write_registered = True
                    self._modify(conn, selectors.EVENT_READ | selectors.EVENT_WRITE)

    def _modify(self, conn: Conn, events: int) -> None:
        if conn.sock is None:
            return
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.selector.modify(conn.sock, events, conn)

    def _sweep(self) -> None:
        """Keepalive pings and connect timeouts for every connection."""
        now = time.monotonic()
        for conn in list(self.conns.values()):
            client = conn.client
            if client is None or conn.closed:
                continue
            if not conn.connected and now - conn.opened_at > self.config.connect_timeout_s:
                self._abandon(conn)
                continue
            try:
                client.loop_misc()
            except Exception:
                self.stats.errors += 1
                log.exception("%s: keepalive failed", conn.device.device_id)
        if not self.stopping:
            self.call_later(SWEEP_S, self._sweep)

    # ---- connecting -----------------------------------------------------------------

    def _start_connects(self, now: float) -> None:
        if self.stopping:
            self._ready.clear()
            return
        self.tokens = min(self.burst, self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now
        while self._ready and self.tokens >= 1.0:
            device = self._ready.popleft()
            if device.device_id in self.conns or device.device_id in self._held:
                continue
            self.tokens -= 1.0
            self._connect(device)

    def _connect(self, device: SimDevice) -> None:
        conn = Conn(device, device.next_session())
        client = SimClient(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=device.device_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            userdata=conn,
        )
        conn.client = client
        if not self.target.tls:
            client.sim_target = self.target
        else:
            client.tls_set(
                ca_certs=self.config.ca_file,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        if self.config.username is not None:
            client.username_pw_set(self.config.username, self.config.password)
        client.max_queued_messages_set(0)
        topic, payload = device.will(conn.session)
        client.will_set(topic, payload, 1, True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        self.conns[device.device_id] = conn
        conn.opened_at = time.monotonic()
        try:
            client.connect(
                self.target.host, self.target.port, self.config.keepalive, clean_start=True
            )
        except (OSError, ssl.SSLError) as exc:
            log.debug("%s: connect failed: %s", device.device_id, exc)
            self.stats.connect_failures += 1
            self._lost(conn)

    def _lost(self, conn: Conn) -> None:
        """The connection is over: forget it and, unless held or stopping, retry later."""
        if conn.closed:
            return
        conn.closed = True
        conn.connected = False
        device = conn.device
        if self.conns.get(device.device_id) is conn:
            del self.conns[device.device_id]
            device.connected = False
        if self.stopping or device.device_id in self._held:
            return
        stable = conn.opened_at and time.monotonic() - conn.opened_at >= STABLE_AFTER_S
        attempt = 0 if stable else self._attempts.get(device.device_id, 0)
        self._attempts[device.device_id] = attempt + 1
        ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2.0 ** min(attempt, 10))
        delay = ceiling * (0.5 + 0.5 * self.rng.random())
        self.call_later(delay, lambda: self._retry(device))

    def _retry(self, device: SimDevice) -> None:
        if device.device_id not in self.conns and device.device_id not in self._held:
            self._ready.append(device)

    def _abandon(self, conn: Conn, *, planned: bool = False) -> None:
        """Close a connection without a DISCONNECT: the broker publishes the Will."""
        sock = conn.sock
        if sock is not None:
            try:
                self.selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            else:
                self.open_socks -= 1
            conn.sock = None
            with contextlib.suppress(OSError):
                sock.close()
        if not conn.closed and not planned and not self.stopping:
            self.stats.disconnects += 1
        self._lost(conn)

    # ---- paho callbacks (loop thread, inside loop_read / loop_write / connect) --------

    def _on_socket_open(self, client: mqtt.Client, conn: Conn, sock: Any) -> None:
        conn.sock = sock
        self.selector.register(sock, selectors.EVENT_READ, conn)
        self.open_socks += 1

    def _on_socket_close(self, client: mqtt.Client, conn: Conn, sock: Any) -> None:
        if conn.sock is sock:
            conn.sock = None
            try:
                self.selector.unregister(sock)
            except (KeyError, ValueError):
                return
            self.open_socks -= 1
            if conn.goodbye:
                self._linger(sock)

    def _linger(self, sock: socket.socket) -> None:
        try:
            held = lift_descriptor(sock.dup())
        except OSError:
            return
        try:
            held.setblocking(False)
            held.shutdown(socket.SHUT_WR)
            self.selector.register(held, selectors.EVENT_READ, _Linger(held))
        except (OSError, ValueError, KeyError):
            held.close()
            return
        self.lingering += 1

    def _read_linger(self, linger: _Linger) -> None:
        try:
            while linger.sock.recv(65536):
                pass
        except BlockingIOError:
            return
        except OSError:
            pass
        self._end_linger(linger)

    def _end_linger(self, linger: _Linger) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(linger.sock)
        linger.sock.close()
        self.lingering -= 1

    def _on_register_write(self, client: mqtt.Client, conn: Conn, sock: Any) -> None:
        conn.want_write = True
        if not conn.dirty:
            conn.dirty = True
            self._dirty.append(conn)

    def _on_unregister_write(self, client: mqtt.Client, conn: Conn, sock: Any) -> None:
        conn.want_write = False
        if conn.write_registered:
            conn.write_registered = False
            self._modify(conn, selectors.EVENT_READ)

    def _on_connect(
        self,
        client: mqtt.Client,
        conn: Conn,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        device = conn.device
        if reason_code.is_failure:
            log.debug("%s: broker refused: %s", device.device_id, reason_code)
            self.stats.connect_failures += 1
            return  # paho closes the socket; _on_disconnect schedules the retry
        if self.conns.get(device.device_id) is not conn or self.stopping:
            return
        conn.connected = True
        device.connected = True
        device.session = conn.session
        self.stats.connects += 1
        if device.ever_connected:
            self.stats.reconnects += 1
            device.reconnects += 1
        else:
            device.ever_connected = True
            self._ever += 1
            if self._ever == self.expected_online:
                self.stats.ramp_s = time.monotonic() - self.started
        client.subscribe(down_filter(device.device_id), 1)
        try:
            device.greeting()
            device.flush_outbox()
            device.start_telemetry()
        except Exception:
            self.stats.errors += 1
            log.exception("%s: greeting failed", device.device_id)
        failures = self.config.failures
        if device.spec.offline and failures.offline_mode == "after" and not device.went_offline:
            device.went_offline = True
            self.call_later(
                failures.offline_after_s,
                lambda: self._scheduled_drop(conn, failures.offline_for_s),
            )

    def _scheduled_drop(self, conn: Conn, offline_for: float | None) -> None:
        if not conn.closed and not self.stopping:
            self.go_offline(conn.device, offline_for)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        conn: Conn,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if not conn.closed and not self.stopping:
            self.stats.disconnects += 1
        self._lost(conn)

    def _on_message(self, client: mqtt.Client, conn: Conn, message: mqtt.MQTTMessage) -> None:
        if conn.closed:
            return
        self.stats.received += 1
        device = conn.device
        topic = message.topic
        try:
            if topic.endswith("/desired"):
                device.on_desired(bytes(message.payload))
            elif topic.endswith("/cmd"):
                props = getattr(message, "properties", None)
                device.on_cmd(
                    bytes(message.payload),
                    getattr(props, "ResponseTopic", None),
                    getattr(props, "CorrelationData", None),
                )
        except Exception:
            self.stats.errors += 1
            log.exception("%s: handling %s failed", device.device_id, topic)

    # ---- stopping -------------------------------------------------------------------

    def _begin_stop(self, timeout: float) -> None:
        """Publish offline for every connected device, then DISCONNECT (no Will)."""
        if self.stopping:
            return
        self.stopping = True
        self._stop_deadline = time.monotonic() + timeout
        self._ready.clear()
        for device in self.devices:
            device.stop()
        for conn in list(self.conns.values()):
            client = conn.client
            if client is None or conn.closed:
                continue
            if conn.connected:
                device = conn.device
                try:
                    client.publish(device.topic(Kind.STATUS), device.offline_status(), 1, True)
                    conn.goodbye = True
                    client.disconnect()
                except Exception:
                    log.exception("%s: goodbye failed", device.device_id)
                    self._abandon(conn)
            else:
                self._abandon(conn)

    def _close_all(self) -> None:
        for conn in list(self.conns.values()):
            self._abandon(conn)
        for device in self.devices:
            device.connected = False
        for key in list(self.selector.get_map().values()):
            if isinstance(key.data, _Linger):
                self._end_linger(key.data)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(self._wake_r)
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()


_AGGREGATES = frozenset({"generations", "versions", "phases"})
