"""A rollout at fleet scale: N simulated devices on one private mosquitto with one hub
(``edgefleet-hub serve`` in a child process), a canary of 1 % and three batches
(33, 66, 100 %) with zero bake time.

Setup (not timed): mosquitto (``max_connections -1``, ``set_tcp_nodelay true``), an
``init``-ed hub directory, the cls OCR model of ``rapidocr_onnxruntime`` registered as
1.0.0 and 2.0.0 with a model set of each, one policy on 1.0.0 for the label
``fleet=bench``; the simulated fleet (``hub.simulate``, in worker processes so that it does
not share this process's GIL) connects and every device commits 1.0.0.

Timed: from ``start_rollout`` (target 2.0.0) until the rollout is ``succeeded`` (or ends
otherwise). Reported: the rollout's wall time; the controller's time per tick (the driver
does not export its tick timings, so this is an upper bound: the hub process's CPU time
over the rollout divided by the number of 1 s scheduler ticks the rollout lasted at least);
how many 1 s interval ticks APScheduler skipped because a tick (or one waiting for the
driver's lock behind an ingest wake-up tick) was still running; the ingest drop counts
(the hub's ``edgefleet_hub_ingest_dropped_total`` by reason and the broker's
``$SYS/broker/publish/messages/dropped``, read directly and through the hub's gauge);
and how many devices ended on 2.0.0 (the simulation's own view and the hub's).

    .venv/bin/python bench/bench_rollout.py [--devices 10000] [--processes 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from hub.broker import MosquittoBroker  # noqa: E402
from hub.client import HubClient  # noqa: E402
from hub.simulate import Simulation, SimulationConfig, read_public_keys  # noqa: E402
from support.hub_process import (  # type: ignore[import-not-found,unused-ignore]  # noqa: E402
    HubProcess,
    make_hub,
)
from support.rollout_fleet import (  # type: ignore[import-not-found,unused-ignore]  # noqa: E402
    modelset_yaml,
)

POLICY = "ocr-bench"
MODEL_SET = "ocr"
LABELS = {"fleet": "bench"}
CLS_SHAPE = [1, 3, 48, 192]
V1, V2 = "1.0.0", "2.0.0"
TERMINAL = ("succeeded", "failed", "aborted", "rolled_back")
TICK_S = 1.0

POLICY_YAML = f"""schema: edgefleet.policy/1
name: {POLICY}
selector: {{labels: {{fleet: bench}}}}
model_set: {{name: {MODEL_SET}, version: "{V1}"}}
runtime: {{probation_s: 0, telemetry_interval_s: 10}}
"""


def cls_model() -> Path:
    import rapidocr_onnxruntime

    models = Path(rapidocr_onnxruntime.__file__).parent / "models"
    return models / "ch_ppocr_mobile_v2.0_cls_infer.onnx"


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rollout_json(name: str) -> str:
    spec = {
        "schema": "edgefleet.rollout/1",
        "name": name,
        "policy": POLICY,
        "target": V2,
        "cohorts": {"canary": "1%", "batches": "33,66,100", "bake_s": 0},
        "device_timeout_s": 600,
    }
    return json.dumps(spec)


def metric_values(text: str, name: str) -> dict[str, float]:
    """Every sample of metric ``name`` in Prometheus text: labels -> value."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$", line)
        if match:
            found[match.group(1) or ""] = float(match.group(2))
    return found


def broker_dropped(broker: MosquittoBroker, tries: int = 3) -> int | None:
    """``$SYS/broker/publish/messages/dropped``, read with mosquitto_sub (None: not read)."""
    for _ in range(tries):
        value = _broker_dropped_once(broker)
        if value is not None:
            return value
    return None


def _broker_dropped_once(broker: MosquittoBroker) -> int | None:
    try:
        done = subprocess.run(
            [
                "mosquitto_sub",
                "-h",
                broker.host,
                "-p",
                str(broker.port),
                "-t",
                "$SYS/broker/publish/messages/dropped",
                "-C",
                "1",
                "-W",
                "15",
            ],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = done.stdout.strip()
    return int(out) if out.isdigit() else None


def hub_versions(client: HubClient) -> dict[str, int]:
    """Devices per cls version the hub has for them (its device listing's filter)."""
    return {
        version: sum(
            1 for _ in client.iter_devices(labels=LABELS, model="cls", model_version=version)
        )
        for version in (V1, V2)
    }


def run(devices: int, processes: int, workdir: Path) -> dict[str, Any]:
    nofile = raise_nofile()
    extra = ["max_connections -1", "set_tcp_nodelay true", "max_inflight_messages 0"]
    figures: dict[str, Any] = {"devices": devices, "processes": processes, "nofile": nofile}
    with MosquittoBroker(workdir=workdir / "broker", extra_config=extra) as broker:
        config = make_hub(workdir, broker, hub_id="hub-bench", artifact_token=None)
        assert config.source is not None
        client = HubClient(f"http://{config.api.bind}", config.api_token(), timeout=300)
        hub = HubProcess(config.source, workdir)
        try:
            hub.wait_ready()
            for version in (V1, V2):
                variants = client.add_model(
                    cls_model(), name="cls", version=version, input_shapes={"x": CLS_SHAPE}
                )
                client.apply_model_set(
                    modelset_yaml(version, {"cls": variants}, {"x": CLS_SHAPE}),
                    f"ocr-{version}.yaml",
                )
            client.apply_policy(POLICY_YAML, "policy.yaml")

            sim_config = SimulationConfig(
                broker_url=broker.url,
                devices=devices,
                trusted_keys=read_public_keys(config.public_keys_path),
                profiles={"generic": 1},
                labels=LABELS,
                apply_delay_s=1.0,
                connect_rate=1000,
                processes=processes,
                isolate=True,
            )
            with Simulation(sim_config) as sim:
                t0 = time.monotonic()
                if not sim.wait_connected(max(120, devices / 50)):
                    raise SystemExit(f"not every device connected: {sim.stats()}")
                figures["connect_s"] = round(time.monotonic() - t0, 1)
                if not sim.wait_for(lambda s: s.versions.get(V1, 0) == devices, 300):
                    raise SystemExit(f"not every device on {V1}: {sim.stats().versions}")
                figures["on_v1_s"] = round(time.monotonic() - t0, 1)
                print(f"setup: {devices} devices on {V1} after {figures['on_v1_s']} s", flush=True)

                name = "bench-rollout"
                before_dropped = broker_dropped(broker)
                cpu0 = hub.cpu_s()
                skipped0 = hub.skipped_ticks()
                started = time.monotonic()
                client.start_rollout(rollout_json(name), "rollout.json")
                last = ""
                while True:
                    detail = client.rollout(name, events=0)
                    if detail.phase in TERMINAL:
                        break
                    if hub.proc.poll() is not None:
                        raise SystemExit(f"the hub exited: {hub.describe()}")
                    stats = sim.stats()
                    line = f"{detail.phase} on {V2}: {stats.versions.get(V2, 0)}/{devices}"
                    if line != last:
                        print(f"[{time.monotonic() - started:6.1f}s] {line}", flush=True)
                        last = line
                    time.sleep(0.5)
                wall = time.monotonic() - started
                cpu = hub.cpu_s() - cpu0
                ticks_min = max(1, int(wall / TICK_S))
                skipped = hub.skipped_ticks() - skipped0
                figures.update(
                    phase=detail.phase,
                    reason=detail.reason,
                    rollout_wall_s=round(wall, 2),
                    hub_cpu_s=round(cpu, 2),
                    scheduler_ticks_at_least=ticks_min,
                    tick_s_upper_bound=round(cpu / ticks_min, 3),
                    interval_ticks_skipped=skipped,
                    cohorts=[
                        f"{c.name}: {c.total} devices, {c.healthy} healthy, {c.status}"
                        + (
                            f", {c.finished_at - c.started_at:.1f} s"
                            if c.started_at is not None and c.finished_at is not None
                            else ""
                        )
                        for c in detail.cohort_progress
                    ],
                )
                sim.wait_for(lambda s: s.versions.get(V2, 0) == devices, 30)
                final = sim.stats()
                figures["sim_versions"] = dict(final.versions)
                figures["sim_errors"] = final.errors
                figures["sim_outbox_dropped"] = final.outbox_dropped
                figures["hub_versions"] = hub_versions(client)
                metrics = client.metrics()
                figures["ingest_dropped"] = metric_values(
                    metrics, "edgefleet_hub_ingest_dropped_total"
                )
                figures["hub_broker_dropped_gauge"] = metric_values(
                    metrics, "edgefleet_hub_broker_messages_dropped"
                )
                figures["broker_dropped_before"] = before_dropped
                figures["broker_dropped"] = broker_dropped(broker)
        finally:
            hub.stop()
            client.close()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--devices", type=int, default=10000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        figures = run(args.devices, args.processes, workdir)
    if args.json:
        print(json.dumps(figures, indent=1, sort_keys=True))
    else:
        for key, value in figures.items():
            print(f"{key}: {value}")
    dropped = sum(figures["ingest_dropped"].values()) + (figures["broker_dropped"] or 0)
    on_v2 = figures["sim_versions"].get(V2, 0)
    ok = figures["phase"] == "succeeded" and on_v2 == args.devices and dropped == 0
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
