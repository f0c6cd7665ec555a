"""Rollouts end to end: a real hub process (``edgefleet-hub serve``) and five real agent
processes on a private mosquitto, the cls OCR model only (to stay fast).

One fleet serves the whole module; each test registers the model-set version it rolls out
and starts from whatever version the policy names then:

1. a good version goes through the canary and two batches (``rollout start ... --watch``
   from the CLI) to 100 %, and the policy is promoted;
2. a version whose model fails the agents' smoke test (its output is NaN) stops at the
   canary, and the canary gets the old version again;
3. a version three times slower (the cls graph three times over) fails the health gate:
   a load generator calls every agent's inference API, and the canary's p95 is compared
   with the baseline devices' over the same window;
4. the hub is killed (SIGKILL) while the canary bakes and started again: the rollout
   resumes where it was and completes.
"""

from __future__ import annotations

import http.client
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from hub.broker import MosquittoBroker
from hub.demo import nan_model
from support.agent_process import child_env
from support.hub_process import HUB_CLI
from support.inference import binary_request
from support.rollout_fleet import (
    CLS_SHAPE,
    POLICY,
    POLICY_YAML,
    Fleet,
    cohort_devices,
    kinds,
    rollout_yaml,
)

pytestmark = pytest.mark.slow

DEVICES = [f"ro-{n}" for n in range(5)]


# --- model files -----------------------------------------------------------------------------


def slower_model(source: Path, path: Path, copies: int = 3) -> Path:
    """The same model computed ``copies`` times over and averaged: the same input and output,
    ``copies`` times the work. Each copy sees the input shifted by a different tiny
    constant, so ONNX Runtime cannot merge the copies into one (common subexpression
    elimination)."""
    model = onnx.load(str(source))
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    (feed,) = [i for i in graph.input if i.name not in initializers]
    (out,) = graph.output
    nodes: list[onnx.NodeProto] = []
    tensors: list[onnx.TensorProto] = []
    outputs = []
    for k in range(copies):
        prefix = f"copy{k}_"
        shifted = feed.name
        if k > 0:
            shifted = prefix + feed.name
            tensors.append(helper.make_tensor(prefix + "shift", TensorProto.FLOAT, [], [1e-3 * k]))
            nodes.append(
                helper.make_node(
                    "Add", [feed.name, prefix + "shift"], [shifted], name=prefix + "in"
                )
            )
        for tensor in graph.initializer:
            copy = onnx.TensorProto()
            copy.CopyFrom(tensor)
            copy.name = prefix + tensor.name
            tensors.append(copy)
        for node in graph.node:
            copy_node = onnx.NodeProto()
            copy_node.CopyFrom(node)
            copy_node.name = prefix + (node.name or node.op_type)
            copy_node.input[:] = [
                "" if i == "" else shifted if i == feed.name else prefix + i for i in node.input
            ]
            copy_node.output[:] = [prefix + o for o in node.output]
            nodes.append(copy_node)
        outputs.append(prefix + out.name)
    tensors.append(helper.make_tensor("mean_factor", TensorProto.FLOAT, [], [1.0 / copies]))
    nodes.append(helper.make_node("Sum", outputs, ["copies_sum"], name="sum"))
    nodes.append(helper.make_node("Mul", ["copies_sum", "mean_factor"], [out.name], name="mean"))
    slow = helper.make_model(
        helper.make_graph(nodes, "slower", [feed], [out], initializer=tensors),
        opset_imports=model.opset_import,
    )
    slow.ir_version = model.ir_version
    onnx.checker.check_model(slow)
    onnx.save(slow, str(path))
    return path


# --- the fleet -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, ocr_models: dict[str, Path]) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("rollouts")
    with MosquittoBroker(workdir=tmp / "broker") as broker:
        fleet = Fleet.create(tmp, broker, ocr_models["cls"])
        try:
            fleet.publish("1.0.0", ocr_models["cls"], {"x": CLS_SHAPE})
            fleet.client.apply_policy(POLICY_YAML, "policy.yaml")
            for device_id in DEVICES:
                fleet.add_agent(device_id)
            for agent in fleet.agents.values():
                agent.wait_ready(90)
            fleet.wait_running("1.0.0", DEVICES, timeout=120)
            yield fleet
        finally:
            fleet.close()


# --- 1. a good version ---------------------------------------------------------------------


def test_a_good_version_goes_through_canary_and_batches_to_100_percent(fleet: Fleet) -> None:
    baseline = fleet.policy_version()
    fleet.publish("2.0.0", fleet.cls_path, {"x": CLS_SHAPE})
    assert fleet.config.source is not None
    started = time.monotonic()
    done = subprocess.run(
        [
            *HUB_CLI,
            "rollout",
            "start",
            "--config",
            str(fleet.config.source),
            "--name",
            "good",
            "--policy",
            POLICY,
            "--to",
            "2.0.0",
            "--canary",
            "1",
            "--batches",
            "50,100",
            "--bake",
            "0",
            "--device-timeout",
            "2m",
            "--watch",
            "--interval",
            "0.5",
        ],
        env=child_env({"COLUMNS": "200"}),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, (done.stdout, done.stderr, fleet.describe())
    assert "succeeded" in done.stdout and "canary" in done.stdout and "batch 2" in done.stdout
    detail = fleet.client.rollout("good", events=200, devices=True)
    assert detail.phase == "succeeded" and detail.promoted, detail.reason
    assert detail.baseline is not None and detail.baseline.version == baseline
    assert [c.total for c in detail.cohort_progress] == [1, 2, 2]
    assert all(c.status == "passed" and c.healthy == c.total for c in detail.cohort_progress)
    assert detail.counts == {"healthy": len(DEVICES)}
    order = kinds(detail)
    assert order[0] == "rollout.created" and order[-1] == "rollout.succeeded"
    assert order.count("cohort.started") == 3 and order.count("cohort.passed") == 3
    # the canary passed before any batch started
    started_at = {e.cohort: e.ts for e in detail.events if e.kind == "cohort.started"}
    passed_at = {e.cohort: e.ts for e in detail.events if e.kind == "cohort.passed"}
    assert passed_at[0] <= started_at[1] and passed_at[1] <= started_at[2]
    # the policy names 2.0.0 now, and every device runs it
    assert fleet.policy_version() == "2.0.0"
    fleet.wait_running("2.0.0", DEVICES, timeout=60)
    listing = subprocess.run(
        [*HUB_CLI, "rollout", "list", "--config", str(fleet.config.source)],
        env=child_env({"COLUMNS": "200"}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert listing.returncode == 0, listing.stderr
    assert "good" in listing.stdout and "succeeded" in listing.stdout
    print(f"good rollout: {time.monotonic() - started:.1f} s")


# --- 2. a model that fails its smoke test ------------------------------------------------------


def test_a_version_failing_its_smoke_test_stops_at_the_canary(fleet: Fleet) -> None:
    baseline = fleet.policy_version()
    fleet.wait_running(baseline, DEVICES)
    before = {d: fleet.client.device(d).applied_generation for d in DEVICES}
    fleet.publish("3.0.0", nan_model(fleet.tmp / "nan.onnx"), {})
    fleet.client.start_rollout(rollout_yaml("broken", "3.0.0"), "broken.yaml")
    detail = fleet.wait_rollout("broken", timeout=90)
    assert detail.phase == "failed", detail.reason
    assert detail.reason.startswith("canary: success gate failed"), detail.reason
    (canary,) = cohort_devices(detail, 0)
    assert detail.device_progress is not None
    status = {d.device_id: d for d in detail.device_progress}
    assert status[canary].status == "failed" and not status[canary].pinned
    assert "smoke" in status[canary].reason, status[canary].reason
    others = [d for d in DEVICES if d != canary]
    assert all(status[d].status == "waiting" for d in others)
    assert [c.status for c in detail.cohort_progress] == ["failed", "pending", "pending"]
    assert "device.failed" in kinds(detail) and kinds(detail)[-1] == "rollout.failed"
    # the canary got the old version again (a new generation of it), the policy did not move
    assert fleet.policy_version() == baseline
    fleet.wait_running(baseline, DEVICES, timeout=60)
    canary_device = fleet.client.device(canary)
    assert canary_device.desired is not None and canary_device.desired.model_set is not None
    assert canary_device.desired.model_set.version == baseline
    assert canary_device.applied_generation > before[canary]
    # no other device was touched
    assert all(fleet.client.device(d).applied_generation == before[d] for d in others)


# --- 3. a version three times slower -----------------------------------------------------------


class Load:
    """Calls cls on every agent's inference API, one request at a time, round robin."""

    def __init__(self, fleet: Fleet) -> None:
        self.ports = dict(fleet.api_ports)
        rng = np.random.default_rng(7)
        self.body, self.headers = binary_request(
            {"x": rng.random(CLS_SHAPE, dtype=np.float32)}, binary_output=False
        )
        self.stop = threading.Event()
        self.counts = dict.fromkeys(self.ports, 0)
        self.errors: dict[str, str] = {}
        self.thread = threading.Thread(target=self._run, name="rollout-load", daemon=True)

    def _run(self) -> None:
        connections = {d: http.client.HTTPConnection("127.0.0.1", p) for d, p in self.ports.items()}
        try:
            while not self.stop.is_set():
                for device_id, conn in connections.items():
                    try:
                        conn.request("POST", "/v2/models/cls/infer", self.body, self.headers)
                        response = conn.getresponse()
                        response.read()
                        if response.status == 200:
                            self.counts[device_id] += 1
                        else:
                            self.errors[device_id] = f"HTTP {response.status}"
                    except (OSError, http.client.HTTPException) as exc:
                        self.errors[device_id] = repr(exc)
                        conn.close()
                    self.stop.wait(0.002)
        finally:
            for conn in connections.values():
                conn.close()

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def test_a_three_times_slower_version_fails_the_health_gate(fleet: Fleet) -> None:
    baseline = fleet.policy_version()
    fleet.wait_running(baseline, DEVICES)
    fleet.publish("4.0.0", slower_model(fleet.cls_path, fleet.tmp / "slow.onnx"), {"x": CLS_SHAPE})
    health = {
        "window_s": 60,
        "interval_s": 10,
        "latency_tolerance": 1.5,
        "min_requests": 20,
        "max_missing_data": 12,
        "max_failed": 0,
    }
    with Load(fleet) as load:
        fleet.client.start_rollout(
            rollout_yaml(
                "slow",
                "4.0.0",
                cohorts={"canary": 1, "batches": [50, 100], "bake_s": 600},
                health=health,
            ),
            "slow.yaml",
        )
        detail = fleet.wait_rollout("slow", timeout=200)
    assert detail.phase == "failed", detail.reason
    assert "canary: health analysis failed" in detail.reason, detail.reason
    assert "cls: p95" in detail.reason
    (canary,) = cohort_devices(detail, 0)
    gate = next(g for g in detail.cohort_progress[0].gates if g.name == "health")
    assert gate.status == "failed" and gate.value is not None and gate.value > 1.5
    assert all(load.counts[d] > 0 for d in DEVICES), (load.counts, load.errors)
    assert fleet.policy_version() == baseline
    fleet.wait_running(baseline, DEVICES, timeout=60)
    assert fleet.client.device(canary).desired is not None
    print(f"slow rollout: health {gate.value:.2f}x; requests {load.counts}")


# --- 4. the hub killed mid-rollout -------------------------------------------------------------


def test_the_hub_killed_mid_rollout_resumes_it(fleet: Fleet) -> None:
    baseline = fleet.policy_version()
    fleet.wait_running(baseline, DEVICES)
    fleet.publish("5.0.0", fleet.cls_path, {"x": CLS_SHAPE})
    fleet.client.start_rollout(
        rollout_yaml(
            "restart",
            "5.0.0",
            cohorts={"canary": {"count": 1, "bake_s": 8}, "batches": [50, 100], "bake_s": 0},
        ),
        "restart.yaml",
    )
    deadline = time.monotonic() + 90
    while True:
        detail = fleet.client.rollout("restart", devices=True)
        if detail.cohort_progress[0].status == "baking":
            break
        assert detail.phase == "running", detail.reason
        assert time.monotonic() < deadline, fleet.describe()
        time.sleep(0.2)
    (canary,) = cohort_devices(detail, 0)
    before = fleet.hub
    before.kill()
    assert before.proc.returncode == -9
    time.sleep(1.0)
    fleet.start_hub()
    detail = fleet.wait_rollout("restart", timeout=120)
    assert detail.phase == "succeeded", detail.reason
    order = kinds(detail)
    assert order.count("rollout.created") == 1 and order.count("rollout.running") == 1
    assert order.count("cohort.started") == 3
    assert [t.to_phase for t in detail.transitions] == ["running", "succeeded"]
    assert detail.device_progress is not None
    assert {d.status for d in detail.device_progress} == {"healthy"}
    canary_row = next(d for d in detail.device_progress if d.device_id == canary)
    assert canary_row.cohort == 0
    assert fleet.policy_version() == "5.0.0"
    fleet.wait_running("5.0.0", DEVICES, timeout=60)
    assert "Traceback" not in fleet.hub.log_path.read_text(), fleet.hub.describe()
