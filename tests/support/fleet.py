"""Helpers for agent tests: model specs for real files, signed desired states, an MQTT tap."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from contract.manifests import (
    Artifact,
    InputHint,
    ModelSetRef,
    ModelSpec,
    Requirements,
    RuntimePolicy,
    Variant,
)
from contract.messages import Desired, DesiredState, Message, decode_for_topic, encode
from contract.signing import SigningKey
from contract.topics import Kind, down_topic, parse_topic
from hub.broker import MosquittoBroker, free_port

OCR_HINTS = {
    "det": {"x": [1, 3, 320, 320]},
    "cls": {"x": [1, 3, 48, 192]},
    "rec": {"x": [1, 3, 48, 320]},
}
OCR_MEMORY_MB = {"det": 60, "cls": 20, "rec": 100}
OCR_PRIORITY = {"det": 30, "cls": 10, "rec": 20}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def spec_for(
    name: str,
    path: Path,
    *,
    version: str = "1.0.0",
    hints: dict[str, list[int]] | None = None,
    memory_mb: int = 50,
    priority: int = 10,
    url: str | None = None,
    precision: str = "fp32",
) -> ModelSpec:
    return ModelSpec(
        name=name,
        version=version,
        priority=priority,
        inputs={k: InputHint(shape=v) for k, v in (hints or {}).items()},
        variants=[
            Variant(
                name=precision,
                precision=precision,
                artifact=Artifact(sha256=sha256_of(path), size=path.stat().st_size, url=url),
                requires=Requirements(memory_mb=memory_mb),
            )
        ],
    )


def ocr_specs(models: dict[str, Path], *, version: str = "1.0.0") -> list[ModelSpec]:
    return [
        spec_for(
            name,
            path,
            version=version,
            hints=OCR_HINTS[name],
            memory_mb=OCR_MEMORY_MB[name],
            priority=OCR_PRIORITY[name],
        )
        for name, path in models.items()
    ]


def desired_state(
    device_id: str,
    generation: int,
    models: Sequence[ModelSpec],
    *,
    base_urls: Sequence[str] = (),
    runtime: RuntimePolicy | None = None,
    now: float | None = None,
    validity_s: float = 3600.0,
    model_set_version: str = "1.0.0",
) -> DesiredState:
    issued = time.time() if now is None else now
    return DesiredState(
        device_id=device_id,
        generation=generation,
        issued_at=issued,
        expires_at=issued + validity_s,
        model_set=ModelSetRef(name="ocr", version=model_set_version),
        models=list(models),
        runtime=runtime or RuntimePolicy(probation_s=0, telemetry_interval_s=1.0),
        artifact_base_urls=list(base_urls),
    )


def signed(state: DesiredState, *keys: SigningKey) -> bytes:
    return encode(Desired.sign(state, *keys))


class BrokerAddress(Protocol):
    """Where a broker listens: a MosquittoBroker, or a test's raw-socket one."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


def agent_toml(
    *,
    device_id: str,
    broker: BrokerAddress,
    state_dir: Path,
    key: SigningKey,
    profile: str = "generic",
    api_bind: str | None = None,
    labels: dict[str, str] | None = None,
) -> str:
    lines = [
        f'device_id = "{device_id}"',
        f'state_dir = "{state_dir}"',
        f'profile = "{profile}"',
        'log_level = "debug"',
        "",
        "[broker]",
        f'url = "mqtt://{broker.host}:{broker.port}"',
        "keepalive = 5",
        "",
        "[trust]",
        f'hub_public_keys = [{{ keyid = "{key.keyid}", public_key = "{key.public.public_key}" }}]',
        "",
        "[labels]",
        *[f'{k} = "{v}"' for k, v in (labels or {}).items()],
    ]
    lines += ["", "[api]", f'bind = "{api_bind or f"127.0.0.1:{free_port()}"}"']
    return "\n".join(lines) + "\n"


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    message: Message | None


@dataclass
class Tap:
    """A paho subscriber that records every message on the topics it was given."""

    client: mqtt.Client
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def messages(self, kind: Kind | str) -> list[Message]:
        with self.lock:
            items = list(self.received)
        out = []
        for item in items:
            if item.message is not None and item.topic.endswith(f"/{kind}"):
                out.append(item.message)
        return out

    def wait_for(
        self, predicate: Callable[[Tap], Any], timeout: float = 30.0, what: str = "condition"
    ) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = predicate(self)
            if result:
                return result
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(5)

    def publish_desired(self, device_id: str, payload: bytes) -> None:
        self.publish(down_topic(device_id, Kind.DESIRED), payload, retain=True)


@contextmanager
def mqtt_tap(broker: MosquittoBroker, *topics: str) -> Iterator[Tap]:
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"tap-{time.monotonic_ns()}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    tap = Tap(client)
    subscribed = threading.Event()

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            message: Message | None = decode_for_topic(parse_topic(msg.topic), bytes(msg.payload))
        except Exception:
            message = None
        with tap.lock:
            tap.received.append(Received(msg.topic, bytes(msg.payload), msg.retain, message))

    def on_subscribe(*args: Any) -> None:
        subscribed.set()

    client.on_message = on_message
    client.on_subscribe = on_subscribe
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        if topics:
            client.subscribe([(t, 1) for t in topics])
            assert subscribed.wait(5), "subscription not acknowledged"
        yield tap
    finally:
        client.disconnect()
        client.loop_stop()


def json_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
