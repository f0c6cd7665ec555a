"""A real mosquitto started with a full configuration file (hub/broker_config.py renders it),
and small paho probes that record what a client saw: CONNACK, PUBACKs, SUBACKs, messages."""

from __future__ import annotations

import signal
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from hub.broker import BrokerError, MosquittoBroker


@dataclass
class ConfiguredMosquitto(MosquittoBroker):
    """``MosquittoBroker`` that runs ``config_path`` as written; ``port`` is the listener
    it waits for. The configuration should log to ``workdir/mosquitto.log``."""

    config_path: Path = field(default_factory=Path)
    other_ports: tuple[int, ...] = ()
    """Further listeners to wait for: mosquitto opens them one after the other."""

    def write_config(self) -> Path:
        return self.config_path

    def start(self, timeout: float = 10.0) -> ConfiguredMosquitto:
        super().start(timeout)
        deadline = time.monotonic() + timeout
        for port in self.other_ports:
            while True:
                try:
                    with socket.create_connection((self.host, port), timeout=0.2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise BrokerError(f"mosquitto did not listen on {port}") from None
                    time.sleep(0.02)
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def reload(self, timeout: float = 5.0) -> None:
        """SIGHUP (re-reads the CRL, the ACL, the certificates) and wait until logged."""
        process = self._process
        assert process is not None, "broker not running"
        before = self.log().count("Reloading config")
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self.log().count("Reloading config") <= before:
            assert time.monotonic() < deadline, "mosquitto did not log the reload"
            time.sleep(0.02)
        time.sleep(0.05)


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path | None
    key: Path | None


class Probe:
    """One paho client on a loop thread; never reconnects; ``close`` stops everything."""

    def __init__(
        self,
        client_id: str,
        port: int,
        *,
        tls: TlsFiles | None = None,
        username: str | None = None,
        password: str | None = None,
        protocol: str = "5",
        host: str = "127.0.0.1",
    ) -> None:
        self.v5 = protocol == "5"
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self.v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if self.v5 else True,
            reconnect_on_failure=False,
        )
        if tls is not None:
            self.client.tls_set(
                ca_certs=str(tls.ca),
                certfile=str(tls.cert) if tls.cert else None,
                keyfile=str(tls.key) if tls.key else None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.host, self.port = host, port
        self.lock = threading.Lock()
        self.connack: Any = None
        self.connect_error: BaseException | None = None
        self.disconnects: list[Any] = []
        self.messages: list[mqtt.MQTTMessage] = []
        self.pubacks: dict[int, Any] = {}
        self.subacks: dict[int, list[Any]] = {}
        self.changed = threading.Condition(self.lock)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self._started = False

    # --- callbacks -----------------------------------------------------------------------

    def _on_connect(self, c: mqtt.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
        with self.changed:
            self.connack = rc
            self.changed.notify_all()

    def _on_disconnect(self, c: mqtt.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
        with self.changed:
            self.disconnects.append(rc)
            self.changed.notify_all()

    def _on_message(self, c: mqtt.Client, u: Any, message: mqtt.MQTTMessage) -> None:
        with self.changed:
            self.messages.append(message)
            self.changed.notify_all()

    def _on_publish(self, c: mqtt.Client, u: Any, mid: int, rc: Any, p: Any) -> None:
        with self.changed:
            self.pubacks[mid] = rc
            self.changed.notify_all()

    def _on_subscribe(self, c: mqtt.Client, u: Any, mid: int, rcs: list[Any], p: Any) -> None:
        with self.changed:
            self.subacks[mid] = rcs
            self.changed.notify_all()

    # --- use -----------------------------------------------------------------------------

    def start(self, timeout: float = 5.0) -> Probe:
        """Connect; afterwards ``connected`` says whether the broker accepted."""
        try:
            self.client.connect(self.host, self.port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:
            self.connect_error = exc
            return self
        self.client.loop_start()
        self._started = True
        self.wait_for(lambda: self.connack is not None or bool(self.disconnects), timeout)
        return self

    @property
    def connected(self) -> bool:
        with self.lock:
            rc = self.connack
            return rc is not None and not rc.is_failure and not self.disconnects

    def wait_for(self, predicate: Any, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(left)
            return True

    def publish(
        self, topic: str, payload: bytes = b"x", *, qos: int = 1, retain: bool = False
    ) -> Any:
        """Publish and wait for the PUBACK (QoS 1); its reason code (None for QoS 0)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos == 0:
            return None
        assert self.wait_for(lambda: info.mid in self.pubacks), f"no PUBACK for {topic}"
        return self.pubacks[info.mid]

    def subscribe(self, *filters: str, qos: int = 1) -> list[Any]:
        """Subscribe and wait for the SUBACK; its reason codes."""
        _, mid = self.client.subscribe([(f, qos) for f in filters])
        assert mid is not None, f"subscribe {filters} was not sent"
        assert self.wait_for(lambda: mid in self.subacks), f"no SUBACK for {filters}"
        return self.subacks[mid]

    def topics(self) -> list[str]:
        with self.lock:
            return [m.topic for m in self.messages]

    def received(self, topic: str, timeout: float = 5.0) -> bool:
        return self.wait_for(lambda: any(m.topic == topic for m in self.messages), timeout)

    def close(self) -> None:
        if self._started:
            self.client.disconnect()
            self.client.loop_stop()
            self._started = False

    def __enter__(self) -> Probe:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
