"""Desired-state fan-out: sign and publish a document for every device, against a bare
publish loop of the same payloads, in one run.

Setup (not timed): a private mosquitto, an ``init``-ed hub directory, N synthetic devices
(births of a Raspberry Pi 4 with its real profile and facts) in the SQLite store, a model
set of three models with two variants each (artifacts by URL), one policy for all devices.

Each round then times:

1. the controller: ``HubService.reconcile()`` with the hub's MQTT connection
   (``hub.ingest.Ingest``) as publisher: resolve the policies, decide, sign (Ed25519 over
   canonical JSON), record every generation in the store, publish retained at QoS 1, wait
   for every acknowledgement and mark the documents published;
2. the bare loop: one paho client (same protocol, same in-flight window) publishing the
   very payloads the controller published, QoS 1 retained, to the same topics, until
   every acknowledgement is in.

The fraction is bare seconds / controller seconds: the share of the bare loop's rate the
controller reaches. After that, a reconcile in which nothing changed is timed too (what
every device's birth or a policy apply that changes nothing costs). Each later round
changes the policy's runtime, so every device gets a new generation. The run fails unless
every document was published and acknowledged, and the unchanged reconcile published none.

    .venv/bin/python bench/bench_fanout.py [--devices 10000]
        [--rounds 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from contract.topics import Kind, down_topic  # noqa: E402
from hub.artifacts import ArtifactStore  # noqa: E402
from hub.broker import MosquittoBroker  # noqa: E402
from hub.config import HubConfig  # noqa: E402
from hub.ingest import Ingest  # noqa: E402
from hub.init import init_hub  # noqa: E402
from hub.keys import Keyring  # noqa: E402
from hub.metrics import HubMetrics  # noqa: E402
from hub.service import HubService  # noqa: E402
from hub.store import Store  # noqa: E402
from support.hub_fleet import birth, policy_yaml  # noqa: E402

ACK_TIMEOUT_S = 600.0


def model_set_yaml() -> str:
    """Three models, an fp32 and an int8 variant each, fetched by URL."""
    lines = ["schema: edgefleet.modelset/1", "name: ocr", 'version: "1.0.0"', "models:"]
    for index, (name, priority) in enumerate((("det", 30), ("rec", 20), ("cls", 10))):
        lines += [
            f"  - name: {name}",
            '    version: "1.0.0"',
            f"    priority: {priority}",
            "    inputs:",
            "      x: {shape: [1, 3, 48, 320]}",
            "    variants:",
        ]
        for offset, (precision, size, memory) in enumerate(
            (("fp32", 4_700_000, 60), ("int8", 1_300_000, 30))
        ):
            sha = f"{index * 2 + offset:x}" * 64
            lines += [
                f"      - name: {precision}",
                f"        precision: {precision}",
                "        artifact:",
                f'          sha256: "{sha}"',
                f"          size: {size}",
                f"          url: https://models.example.com/{name}-{precision}.onnx",
                "        requires:",
                f"          memory_mb: {memory}",
            ]
    return "\n".join(lines) + "\n"


@dataclass
class Round:
    devices: int
    controller_s: float
    bare_s: float
    published: int
    unacknowledged: int
    payload_bytes: int
    unchanged_s: float
    unchanged_published: int

    @property
    def fraction(self) -> float:
        return self.bare_s / self.controller_s

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["fraction"] = self.fraction
        data["controller_ms_per_device"] = self.controller_s / self.devices * 1000
        data["bare_ms_per_device"] = self.bare_s / self.devices * 1000
        return data


def add_devices(store: Store, count: int) -> None:
    template = birth("template", "raspberry-pi-4-4gb", labels={"fleet": "bench"})
    with store.transaction():
        for i in range(count):
            store.record_birth(template.model_copy(update={"device_id": f"bench-{i:05d}"}), 1.0)


def bare_publish(config: HubConfig, payloads: list[tuple[str, bytes]]) -> float:
    """Seconds for one paho client to publish ``payloads`` (QoS 1, retained) until every
    acknowledgement is in."""
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id="bench-bare-publisher",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    client.max_queued_messages_set(0)
    done = threading.Event()
    acked = [0]

    def on_publish(*args: Any) -> None:
        acked[0] += 1
        if acked[0] == len(payloads):
            done.set()

    client.on_publish = on_publish
    client.connect(config.broker.host, config.broker.port)
    client.loop_start()
    try:
        started = time.perf_counter()
        for topic, payload in payloads:
            client.publish(topic, payload, qos=1, retain=True)
        if not done.wait(ACK_TIMEOUT_S):
            raise RuntimeError(f"bare loop: {acked[0]} of {len(payloads)} acknowledged")
        return time.perf_counter() - started
    finally:
        client.disconnect()
        client.loop_stop()


def run(devices: int, rounds: int, workdir: Path) -> list[Round]:
    results = []
    with MosquittoBroker(workdir=workdir / "broker") as broker:
        config = init_hub(workdir / "hub", hub_id="bench-hub", broker_url=broker.url).config
        with Store(config.store_path) as store:
            add_devices(store, devices)
            ingest = Ingest(config, store, metrics=HubMetrics())
            ingest.start()
            try:
                service = HubService(
                    config,
                    store,
                    artifacts=ArtifactStore(config.artifacts_dir),
                    keys=Keyring(config.keys_dir, config.public_keys_path),
                    publisher=ingest,
                )
                service.apply_model_set(model_set_yaml(), "bench-modelset.yaml")
                for number in range(rounds):
                    text = policy_yaml(labels={"fleet": "bench"}, probation_s=60.0 + number)
                    service.registry.apply_policy(text, "bench-policy.yaml")
                    started = time.perf_counter()
                    report = service.reconcile()
                    controller_s = time.perf_counter() - started
                    payloads = [
                        (
                            down_topic(record.device_id, Kind.DESIRED),
                            json.dumps(record.document, separators=(",", ":")).encode(),
                        )
                        for record in store.latest_desired_all().values()
                    ]
                    bare_s = bare_publish(config, payloads)
                    started = time.perf_counter()
                    unchanged = service.reconcile()
                    unchanged_s = time.perf_counter() - started
                    results.append(
                        Round(
                            devices=devices,
                            controller_s=controller_s,
                            bare_s=bare_s,
                            published=report.published,
                            unacknowledged=report.unacknowledged,
                            payload_bytes=int(statistics.mean(len(p) for _, p in payloads)),
                            unchanged_s=unchanged_s,
                            unchanged_published=unchanged.published + unchanged.resigned,
                        )
                    )
            finally:
                ingest.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp:
        results = run(args.devices, args.rounds, Path(tmp))
    complete = all(
        r.published == args.devices and r.unacknowledged == 0 and r.unchanged_published == 0
        for r in results
    )
    summary = {
        "devices": args.devices,
        "rounds": [r.as_dict() for r in results],
        "fraction_median": statistics.median(r.fraction for r in results),
        "complete": complete,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"desired-state fan-out to {args.devices} devices, QoS 1 retained, MQTT 5")
        for i, r in enumerate(results, 1):
            print(
                f"round {i}: controller {r.controller_s:.2f} s "
                f"({r.controller_s / r.devices * 1000:.2f} ms/device: resolve, sign, record, "
                f"publish, ack) | bare publish loop {r.bare_s:.2f} s | fraction "
                f"{r.fraction:.2f} | {r.published} published, {r.unacknowledged} "
                f"unacknowledged, {r.payload_bytes} bytes per document | a reconcile with "
                f"nothing changed {r.unchanged_s:.2f} s ({r.unchanged_published} published)"
            )
        print(f"fraction (median) {summary['fraction_median']:.2f}; complete: {complete}")
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
