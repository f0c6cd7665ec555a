"""Ingest benchmark: the hub's ingest against a bare paho subscriber, in one run.

N simulated devices publish a status, a birth and then telemetry at QoS 1 from P publisher
processes into a private mosquitto (``max_queued_messages 0``, ``sys_interval 1``). The same
messages (new session numbers each phase) are received twice:

1. by a bare paho subscriber that only counts them (the baseline), then
2. by the hub ingest (``hub.ingest.Ingest``), which decodes, validates and writes them to a
   real SQLite store; ``--workers N`` runs N ingest processes on one MQTT 5 shared
   subscription and one store (the scale path; sequence-gap detection is off then).

Each phase's rate is messages / seconds from the publishers' start to the last message
counted (baseline) or committed to the store (ingest). The report gives both rates, their
ratio (target: at least 0.7), the receiving side's CPU time per message, and the loss
checks: telemetry rows and devices in the store against what was sent, and the broker's
``$SYS/broker/publish/messages/dropped`` (expected 0).

    .venv/bin/python bench/bench_ingest.py [--devices 200] [--messages 20000]
        [--publishers 3] [--workers 1] [--rounds 1] [--protocol 5|3.1.1] [--json]

Exit status 1 when anything was lost.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from contract.messages import encode, topic_for  # noqa: E402
from hub.broker import MosquittoBroker  # noqa: E402
from hub.config import HubConfig  # noqa: E402
from hub.ingest import SYS_DROPPED_TOPIC, Ingest  # noqa: E402
from hub.metrics import HubMetrics  # noqa: E402
from hub.server import tune_gc_for_serving  # noqa: E402
from hub.store import Store  # noqa: E402
from support import hub_samples  # noqa: E402

TARGET_RATIO = 0.7
UP_ALL = "edgefleet/v1/dev/+/up/#"


def _client(client_id: str, protocol: str) -> mqtt.Client:
    return mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5 if protocol == "5" else MQTTProtocolVersion.MQTTv311,
    )


@dataclass(frozen=True)
class Setup:
    """The broker, the protocol and the session number of one phase."""

    host: str
    port: int
    protocol: str
    session: int

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


Share = tuple[list[str], list[int]]
"""A publisher's devices and how many telemetry messages each sends."""


def _publisher(index: int, setup: Setup, share: Share, start: MpEvent, done: Any) -> None:
    """One publisher process: greet each device, then send its telemetry round robin."""
    devices, telemetry_per_device = share
    session = setup.session
    payloads: list[tuple[str, bytes]] = []
    for device_id in devices:
        status = hub_samples.status(device_id, session, 0)
        birth = hub_samples.birth(device_id, session, 1)
        payloads += [(topic_for(status), encode(status)), (topic_for(birth), encode(birth))]
    counts = dict(zip(devices, telemetry_per_device, strict=True))
    seq = dict.fromkeys(devices, 2)
    remaining = sum(counts.values())
    while remaining:
        for device_id in devices:
            if counts[device_id] == 0:
                continue
            msg = hub_samples.telemetry(device_id, session, seq[device_id])
            payloads.append((topic_for(msg), encode(msg)))
            seq[device_id] += 1
            counts[device_id] -= 1
            remaining -= 1
    client = _client(f"bench-pub-{index}-{session}", setup.protocol)
    client.max_queued_messages_set(0)
    client.connect(setup.host, setup.port)
    client.loop_start()
    start.wait()
    began = time.monotonic()
    last = None
    for topic, payload in payloads:
        last = client.publish(topic, payload, qos=1)
    if last is not None:
        last.wait_for_publish(300)
    done.put((index, len(payloads), time.monotonic() - began))
    client.disconnect()
    client.loop_stop()


@dataclass
class Phase:
    name: str
    messages: int
    seconds: float
    rate: float
    publish_seconds: float
    broker_dropped: float
    cpu_us_per_message: float
    """CPU time of this (the receiving) process per message, over the measured interval."""


def _split(devices: list[str], messages: int, publishers: int) -> list[Share]:
    per_device = [messages // len(devices)] * len(devices)
    for i in range(messages - sum(per_device)):
        per_device[i] += 1
    shares: list[Share] = []
    for p in range(publishers):
        shares.append((devices[p::publishers], per_device[p::publishers]))
    return shares


def _run_publishers(
    setup: Setup, shares: list[Share], counted: Callable[[], int], total: int, timeout: float
) -> tuple[float, float, float]:
    """Start the publishers together; return (seconds until ``counted() >= total``,
    slowest publisher's own seconds, this process's CPU seconds meanwhile)."""
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    done: Any = ctx.Queue()
    procs = [
        ctx.Process(
            target=_publisher,
            args=(i, setup, share, start, done),
            daemon=True,
        )
        for i, share in enumerate(shares)
    ]
    for proc in procs:
        proc.start()
    time.sleep(3.0)  # let every publisher build its payloads and connect
    began = time.monotonic()
    cpu = time.process_time()
    start.set()
    deadline = began + timeout
    while counted() < total and time.monotonic() < deadline:
        time.sleep(0.005)
    elapsed = time.monotonic() - began
    cpu = time.process_time() - cpu
    publish_seconds = 0.0
    for _ in procs:
        _, _, seconds = done.get(timeout=timeout)
        publish_seconds = max(publish_seconds, seconds)
    for proc in procs:
        proc.join(10)
    return elapsed, publish_seconds, cpu


class _SysDropped:
    """Reads the broker's dropped-messages counter."""

    def __init__(self, setup: Setup) -> None:
        self.value = -1.0
        self.client = _client(f"bench-sys-{setup.session}", "5")
        self.client.on_message = self._on_message
        self.client.connect(setup.host, setup.port)
        self.client.subscribe(SYS_DROPPED_TOPIC, 0)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.value = float(message.payload.decode())

    def read(self, wait: float = 2.5) -> float:
        time.sleep(wait)  # sys_interval is 1 s
        return self.value

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def baseline_phase(setup: Setup, shares: list[Share], total: int) -> Phase:
    """A bare paho subscriber that counts what it receives."""
    lock = threading.Lock()
    count = [0]

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with lock:
            count[0] += 1

    sub = _client(f"bench-sub-{setup.session}", setup.protocol)
    sub.on_message = on_message
    sub.connect(setup.host, setup.port)
    sub.subscribe(UP_ALL, 1)
    sub.loop_start()
    time.sleep(0.5)
    sys_dropped = _SysDropped(setup)
    try:
        seconds, publish_seconds, cpu = _run_publishers(setup, shares, lambda: count[0], total, 300)
        dropped = sys_dropped.read()
    finally:
        sys_dropped.close()
        sub.disconnect()
        sub.loop_stop()
    n = count[0]
    return Phase(
        "bare subscriber", n, seconds, n / seconds, publish_seconds, dropped, cpu / n * 1e6
    )


def _ingest_config(setup: Setup, hub_id: str, workers: int) -> HubConfig:
    return HubConfig.model_validate(
        {
            "hub_id": hub_id,
            "broker": {
                "url": setup.url,
                "protocol": setup.protocol,
                "shared_group": "hub" if setup.protocol == "5" else "",
                "session_expiry_s": 0,
            },
            "api": {"token": "x" * 32, "token_file": None},
            # several workers on one shared subscription each see part of a device's seqs
            "ingest": {"detect_gaps": workers == 1},
        }
    )


def _counters(metrics: HubMetrics) -> dict[str, float]:
    def total(name: str) -> float:
        return sum(s.value for m in metrics.registry.collect() for s in m.samples if s.name == name)

    return {
        "duplicates": total("edgefleet_hub_ingest_duplicates_total"),
        "dropped_by_hub": total("edgefleet_hub_ingest_dropped_total"),
        "seq_gaps": total("edgefleet_hub_ingest_seq_gaps_total"),
        "batches": total("edgefleet_hub_ingest_batch_size_count"),
        "broker_dropped": metrics.value("edgefleet_hub_broker_messages_dropped"),
    }


def _ingest_worker(index: int, setup: Setup, db: str, ready: Any, stop: MpEvent) -> None:
    """One more hub ingest process on the same shared subscription and the same store, as
    `edgefleet-hub ingest-worker` runs it."""
    config = _ingest_config(setup, f"bench-{setup.session}-w{index}", 2)
    with Store(db) as store:
        ingest = Ingest(config, store, worker_index=index)
        ingest.start()
        tune_gc_for_serving()  # as `edgefleet-hub ingest-worker` does once started
        cpu = time.process_time()
        ready.put(("ready", index, {}))
        stop.wait()
        ingest.flush(30)
        counters = _counters(ingest.metrics)
        counters["cpu"] = time.process_time() - cpu
        ingest.stop()
    ready.put(("done", index, counters))


def ingest_phase(
    setup: Setup, shares: list[Share], total: int, workdir: Path, workers: int = 1
) -> tuple[Phase, dict[str, float]]:
    """The hub ingest writing to a SQLite store: one worker in this process, or several
    worker processes sharing the subscription (the scale path)."""
    db = workdir / f"hub-{setup.session}.db"
    store = Store(db)
    telemetry_sent = total - 2 * sum(len(devices) for devices, _ in shares)
    ctx = mp.get_context("spawn")
    ready: Any = ctx.Queue()
    stop = ctx.Event()
    procs = [
        ctx.Process(target=_ingest_worker, args=(i, setup, str(db), ready, stop), daemon=True)
        for i in range(1, workers)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get(timeout=60)
    ingest = Ingest(_ingest_config(setup, f"bench-{setup.session}", workers), store)
    ingest.start()
    tune_gc_for_serving()  # as `edgefleet-hub serve` does once started

    def committed() -> int:
        if workers == 1:
            return int(sum(ingest.metrics.stored(k) for k in ("telemetry", "birth", "status")))
        time.sleep(0.02)
        rows = store.count_telemetry()
        return rows + 2 * store.count_devices() if rows == telemetry_sent else rows

    try:
        time.sleep(0.5)
        seconds, publish_seconds, cpu = _run_publishers(setup, shares, committed, total, 300)
        time.sleep(2.5)  # one more $SYS update
        ingest.flush(30)
        count = committed()
        counters = _counters(ingest.metrics)
        stop.set()
        for _ in procs:
            _, _, other = ready.get(timeout=60)
            cpu += other.pop("cpu")
            for key in ("duplicates", "dropped_by_hub", "seq_gaps", "batches"):
                counters[key] += other[key]
        checks = {
            "telemetry_rows": float(store.count_telemetry()),
            "devices": float(store.count_devices()),
            **counters,
        }
    finally:
        stop.set()
        ingest.stop()
        for proc in procs:
            proc.join(30)
        store.close()
    dropped = checks.pop("broker_dropped")
    phase = Phase(
        f"hub ingest ({workers} worker{'s' if workers > 1 else ''})",
        count,
        seconds,
        count / seconds,
        publish_seconds,
        dropped,
        cpu / count * 1e6,
    )
    return phase, checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--messages", type=int, default=20_000, help="telemetry messages")
    parser.add_argument("--publishers", type=int, default=3, choices=range(1, 9))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--protocol", choices=("5", "3.1.1"), default="5")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="hub ingest processes sharing the subscription (MQTT 5 only; gap detection off)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.workers > 1 and args.protocol != "5":
        parser.error("--workers above 1 needs --protocol 5 (shared subscriptions)")

    tune_gc_for_serving()  # the baseline runs under the same collector settings
    devices = [f"bench-{i:05d}" for i in range(args.devices)]
    shares = _split(devices, args.messages, args.publishers)
    total = args.messages + 2 * args.devices  # telemetry + status + birth per device
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        workdir = Path(tmp)
        with MosquittoBroker(workdir=workdir / "broker") as broker:
            for round_no in range(args.rounds):
                base = baseline_phase(
                    Setup(broker.host, broker.port, args.protocol, 2 * round_no + 1), shares, total
                )
                hub, checks = ingest_phase(
                    Setup(broker.host, broker.port, args.protocol, 2 * round_no + 2),
                    shares,
                    total,
                    workdir,
                    args.workers,
                )
                results.append(
                    {
                        "baseline": asdict(base),
                        "ingest": asdict(hub),
                        "ratio": hub.rate / base.rate,
                        "checks": checks,
                        "lossless": (
                            checks["telemetry_rows"] == args.messages
                            and checks["devices"] == args.devices
                            and base.messages == total
                            and hub.messages == total
                            and hub.broker_dropped == 0
                            and base.broker_dropped == 0
                        ),
                    }
                )
    ratios = [r["ratio"] for r in results]
    summary = {
        "devices": args.devices,
        "telemetry_messages": args.messages,
        "messages_per_phase": total,
        "publishers": args.publishers,
        "protocol": args.protocol,
        "ingest_workers": args.workers,
        "rounds": results,
        "ratio_median": statistics.median(ratios),
        "target_ratio": TARGET_RATIO,
        "lossless": all(r["lossless"] for r in results),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"{args.devices} devices, {total} messages per phase "
            f"({args.messages} telemetry), {args.publishers} publishers, QoS 1, "
            f"MQTT {args.protocol}"
        )
        for i, r in enumerate(results, 1):
            b, h, c = r["baseline"], r["ingest"], r["checks"]
            print(
                f"round {i}: bare subscriber {b['rate']:8.0f} msg/s ({b['messages']} in "
                f"{b['seconds']:.2f}s) | {h['name']} {h['rate']:8.0f} msg/s ({h['messages']} in "
                f"{h['seconds']:.2f}s) | ratio {r['ratio']:.2f}"
            )
            print(
                f"         receiving CPU per message: bare subscriber "
                f"{b['cpu_us_per_message']:.0f} us, hub ingest {h['cpu_us_per_message']:.0f} us"
            )
            print(
                f"         store: {c['telemetry_rows']:.0f}/{args.messages} telemetry rows, "
                f"{c['devices']:.0f}/{args.devices} devices, {c['batches']:.0f} batches, "
                f"duplicates {c['duplicates']:.0f}, hub drops {c['dropped_by_hub']:.0f}, "
                f"seq gaps {c['seq_gaps']:.0f}; broker dropped: baseline "
                f"{b['broker_dropped']:.0f}, ingest {h['broker_dropped']:.0f}"
            )
        verdict = "meets" if summary["ratio_median"] >= TARGET_RATIO else "misses"
        print(
            f"ratio (median) {summary['ratio_median']:.2f}: {verdict} the target "
            f"{TARGET_RATIO}; lossless: {summary['lossless']}"
        )
    return 0 if summary["lossless"] else 1


if __name__ == "__main__":
    sys.exit(main())
