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
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from hub.api_models import RolloutDetail
from hub.broker import MosquittoBroker, free_port
from hub.client import HubClient
from hub.config import HubConfig, load_config
from hub.errors import ClientError
from support.agent_process import AgentProcess, Notifications, child_env
from support.inference import binary_request
from support.models import nan_model

pytestmark = pytest.mark.slow

HUB_CLI = [sys.executable, "-m", "hub.cli"]
DEVICES = [f"ro-{n}" for n in range(5)]
PROFILE = "generic"
POLICY = "ocr-rollout"
MODEL_SET = "ocr"
ARTIFACT_TOKEN = "artifact-token-for-rollouts"
CLS_SHAPE = [1, 3, 48, 192]
TERMINAL = ("succeeded", "failed", "aborted", "rolled_back")


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


# --- the hub process -------------------------------------------------------------------------


class HubProcess:
    """``edgefleet-hub serve`` in a child process, READY=1 on its own notify socket."""

    def __init__(self, config_path: Path, workdir: Path, name: str) -> None:
        self.notify = Notifications(workdir, f"{name}-notify")
        self.log_path = workdir / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*HUB_CLI, "serve", "--config", str(config_path)],
            env=child_env({"NOTIFY_SOCKET": str(self.notify.path)}),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def describe(self) -> str:
        tail = self.log_path.read_text(errors="replace").splitlines()[-40:]
        return f"hub pid {self.proc.pid} (exit {self.proc.poll()}); log:\n" + "\n".join(tail)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while "READY=1" not in "\n".join(self.notify.poll(0.2)).split("\n"):
            assert self.proc.poll() is None, f"the hub exited: {self.describe()}"
            assert time.monotonic() < deadline, f"the hub was not ready: {self.describe()}"

    def kill(self) -> None:
        """SIGKILL (no clean stop at all) and reap; release the log and the socket."""
        try:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)
        finally:
            self._log.close()
            self.notify.close()


def make_hub(tmp: Path, broker: MosquittoBroker) -> HubConfig:
    """``edgefleet-hub init`` for this broker, free ports, a token for the artifacts."""
    directory = tmp / "hub"
    done = subprocess.run(
        [
            *HUB_CLI,
            "init",
            str(directory),
            "--hub-id",
            "hub-rollouts",
            "--broker-url",
            broker.url,
            "--api-bind",
            f"127.0.0.1:{free_port()}",
        ],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    path = directory / "hub.toml"
    (directory / "artifacts-token").write_text(ARTIFACT_TOKEN + "\n")
    text = path.read_text().replace(
        'bind = "127.0.0.1:8601"',
        f'bind = "127.0.0.1:{free_port()}"\ntoken_file = "artifacts-token"',
    )
    path.write_text(text)
    return load_config(path)


def agent_config(
    tmp: Path, config: HubConfig, broker: MosquittoBroker, device_id: str, api_port: int
) -> Path:
    state_dir = tmp / device_id
    state_dir.mkdir()
    lines = [
        f'device_id = "{device_id}"',
        f'state_dir = "{state_dir}"',
        f'profile = "{PROFILE}"',
        'log_level = "info"',
        "",
        "[broker]",
        f'url = "{broker.url}"',
        "keepalive = 5",
        "",
        "[trust]",
        f'hub_public_keys_file = "{config.public_keys_path}"',
        "",
        "[labels]",
        'fleet = "rollouts"',
        "",
        "[api]",
        f'bind = "127.0.0.1:{api_port}"',
        "",
        "[artifacts]",
        f'token_file = "{config.data_path / "artifacts-token"}"',
    ]
    path = tmp / f"{device_id}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


# --- the fleet -------------------------------------------------------------------------------


def modelset_yaml(version: str, variants: list[Any], inputs: dict[str, list[int]]) -> str:
    lines = [
        "schema: edgefleet.modelset/1",
        f"name: {MODEL_SET}",
        f'version: "{version}"',
        "models:",
        "  - name: cls",
        f'    version: "{version}"',
        "    priority: 10",
    ]
    if inputs:
        lines.append("    inputs:")
        lines += [f"      {name}: {{shape: {shape}}}" for name, shape in inputs.items()]
    lines.append("    variants:")
    for v in variants:
        memory = max(1, int(v.load_memory_mb or 20) + 1)
        lines += [
            f"      - name: {v.variant}",
            f"        precision: {v.precision}",
            f"        artifact: {{sha256: {v.sha256}, size: {v.size}}}",
            f"        requires: {{memory_mb: {memory}}}",
        ]
    return "\n".join(lines) + "\n"


POLICY_YAML = f"""schema: edgefleet.policy/1
name: {POLICY}
selector: {{labels: {{fleet: rollouts}}}}
model_set: {{name: {MODEL_SET}, version: "1.0.0"}}
runtime: {{probation_s: 0, telemetry_interval_s: 1}}
"""


@dataclass
class Fleet:
    tmp: Path
    broker: MosquittoBroker
    config: HubConfig
    client: HubClient
    agents: dict[str, AgentProcess]
    cls_path: Path
    api_ports: dict[str, int] = field(default_factory=dict)
    """Each agent's inference API port."""
    hubs: list[HubProcess] = field(default_factory=list)

    @property
    def hub(self) -> HubProcess:
        return self.hubs[-1]

    def start_hub(self) -> HubProcess:
        assert self.config.source is not None
        hub = HubProcess(self.config.source, self.tmp, f"hub-{len(self.hubs)}")
        self.hubs.append(hub)
        hub.wait_ready()
        return hub

    def describe(self, *device_ids: str) -> str:
        parts = [self.hub.describe()]
        parts += [self.agents[d].describe() for d in device_ids or DEVICES]
        return "\n\n".join(parts)

    def publish(self, version: str, path: Path, inputs: dict[str, list[int]]) -> None:
        """Register ``path`` as cls ``version`` and publish model set ocr ``version``."""
        variants = self.client.add_model(
            path, name="cls", version=version, input_shapes=inputs or None
        )
        self.client.apply_model_set(modelset_yaml(version, variants, inputs), f"ocr-{version}")

    def policy_version(self) -> str:
        return self.client.policy(POLICY).document.model_set.version

    def cls_version(self, device_id: str) -> str | None:
        """The cls version the device reports running, committed and ready (else None).

        A device that failed a generation and then got its old content again under a new
        generation may report that generation applied with its phase still ``failed`` (an
        agent that adopts equal content without touching the phase): running too."""
        device = self.client.device(device_id)
        state = device.state
        if state is None:
            return None
        failed_before = (
            state.phase == "failed"
            and state.last_error is not None
            and state.last_error.generation < state.applied_generation
        )
        if state.phase != "committed" and not failed_before:
            return None
        versions = [m.version for m in state.models if m.name == "cls" and m.ready]
        return versions[0] if versions else None

    def wait_running(self, version: str, device_ids: list[str], timeout: float = 90.0) -> None:
        """Until every device reports ``version`` committed, on the hub's newest document."""
        deadline = time.monotonic() + timeout
        pending = set(device_ids)
        while pending:
            for device_id in sorted(pending):
                try:
                    device = self.client.device(device_id)
                except ClientError as exc:  # not born yet
                    assert exc.status == 404, exc
                    continue
                desired = device.desired
                if (
                    desired is not None
                    and device.applied_generation == desired.generation
                    and self.cls_version(device_id) == version
                ):
                    pending.discard(device_id)
            if pending:
                for agent in self.agents.values():
                    assert agent.returncode is None, agent.describe()
                assert self.hub.proc.poll() is None, self.hub.describe()
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"not on {version}: {sorted(pending)}\n{self.describe(*sorted(pending))}"
                    )
                time.sleep(0.3)

    def wait_rollout(
        self, name: str, until: tuple[str, ...] = TERMINAL, timeout: float = 120.0
    ) -> RolloutDetail:
        deadline = time.monotonic() + timeout
        while True:
            detail = self.client.rollout(name, events=200, devices=True)
            if detail.phase in until:
                return detail
            assert self.hub.proc.poll() is None, self.hub.describe()
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"rollout {name} is {detail.phase}: {detail.reason}\n"
                    + json.dumps(detail.model_dump(mode="json")["cohort_progress"], indent=1)
                    + "\n"
                    + self.describe()
                )
            time.sleep(0.3)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, ocr_models: dict[str, Path]) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("rollouts")
    with MosquittoBroker(workdir=tmp / "broker") as broker:
        config = make_hub(tmp, broker)
        client = HubClient(f"http://{config.api.bind}", config.api_token(), timeout=120)
        fleet = Fleet(tmp, broker, config, client, {}, ocr_models["cls"])
        try:
            fleet.start_hub()
            fleet.publish("1.0.0", ocr_models["cls"], {"x": CLS_SHAPE})
            client.apply_policy(POLICY_YAML, "policy.yaml")
            for device_id in DEVICES:
                fleet.api_ports[device_id] = free_port()
                path = agent_config(tmp, config, broker, device_id, fleet.api_ports[device_id])
                fleet.agents[device_id] = AgentProcess(path, tmp, name=device_id)
            for agent in fleet.agents.values():
                agent.wait_ready(90)
            fleet.wait_running("1.0.0", DEVICES, timeout=120)
            yield fleet
        finally:
            for agent in fleet.agents.values():
                agent.kill()
            for hub in fleet.hubs:
                hub.kill()
            client.close()


def rollout_yaml(name: str, version: str, **fields: Any) -> str:
    spec: dict[str, Any] = {
        "schema": "edgefleet.rollout/1",
        "name": name,
        "policy": POLICY,
        "target": version,
        "cohorts": {"canary": 1, "batches": [50, 100], "bake_s": 0},
        "device_timeout_s": 120,
    }
    spec.update(fields)
    return json.dumps(spec)


def cohort_devices(detail: RolloutDetail, index: int) -> list[str]:
    assert detail.device_progress is not None
    return [d.device_id for d in detail.device_progress if d.cohort == index]


def kinds(detail: RolloutDetail) -> list[str]:
    """Event kinds, oldest first."""
    return [e.kind for e in reversed(detail.events)]


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
