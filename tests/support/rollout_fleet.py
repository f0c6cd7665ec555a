"""A real fleet for rollout tests: ``edgefleet-hub serve`` in a child process, real agent
processes, a private mosquitto, all on loopback.

    fleet = Fleet.create(tmp, broker, cls_path)        # hub init + serve, READY=1
    fleet.publish("1.0.0", cls_path, {"x": CLS_SHAPE})  # model + model set ocr 1.0.0
    fleet.client.apply_policy(policy_yaml(), "policy.yaml")
    fleet.add_agent("ro-0")                             # agent config + process
    fleet.wait_running("1.0.0")
    ...
    fleet.close()                                       # kills and reaps everything

Used by tests/test_rollout_e2e.py and tests/test_rollout_faults.py; the hub process itself
is ``support.hub_process``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from hub.api_models import ModelVariant, RolloutDetail
from hub.broker import MosquittoBroker, free_port
from hub.client import HubClient
from hub.config import HubConfig
from hub.errors import ClientError
from support.agent_process import AgentProcess
from support.hub_process import HubProcess, make_hub
from support.inference import binary_request

PROFILE = "generic"
POLICY = "ocr-rollout"
MODEL_SET = "ocr"
ARTIFACT_TOKEN = "artifact-token-for-rollouts"
CLS_SHAPE = [1, 3, 48, 192]
TERMINAL = ("succeeded", "failed", "aborted", "rolled_back")


# --- agents ----------------------------------------------------------------------------------


def agent_config(
    tmp: Path,
    config: HubConfig,
    broker_url: str,
    device_id: str,
    api_port: int,
    *,
    state_dir: Path | None = None,
    labels: Mapping[str, str] | None = None,
    artifacts_timeout_s: float | None = None,
) -> Path:
    """An agent.toml for ``device_id``: this hub's keys and artifact token, the broker at
    ``broker_url``, the inference API on ``api_port``; state under ``tmp/<device_id>``
    unless ``state_dir`` says where."""
    state_dir = state_dir if state_dir is not None else tmp / device_id
    state_dir.mkdir(exist_ok=True)
    lines = [
        f'device_id = "{device_id}"',
        f'state_dir = "{state_dir}"',
        f'profile = "{PROFILE}"',
        'log_level = "info"',
        "",
        "[broker]",
        f'url = "{broker_url}"',
        "keepalive = 5",
        "",
        "[trust]",
        f'hub_public_keys_file = "{config.public_keys_path}"',
        "",
        "[labels]",
        *(f'{k} = "{v}"' for k, v in (labels or {"fleet": "rollouts"}).items()),
        "",
        "[api]",
        f'bind = "127.0.0.1:{api_port}"',
        "",
        "[artifacts]",
        f'token_file = "{config.data_path / "artifacts-token"}"',
    ]
    if artifacts_timeout_s is not None:
        lines.append(f"timeout_s = {artifacts_timeout_s}")
    path = tmp / f"{device_id}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def served_versions(api_port: int, models: Sequence[str]) -> dict[str, str]:
    """What the agent on ``api_port`` serves, asked of its inference API: model -> version.

    The repository index must list exactly ``models``, every one READY; then each model
    answers one inference, and the version is the one its answer names (the session that
    computed it). Raises AssertionError otherwise."""
    body, headers = binary_request(
        {"x": np.random.default_rng(3).random(CLS_SHAPE, dtype=np.float32)}, binary_output=False
    )
    conn = http.client.HTTPConnection("127.0.0.1", api_port, timeout=30)
    try:
        conn.request("POST", "/v2/repository/index", b"{}", {"Content-Type": "application/json"})
        response = conn.getresponse()
        index = json.loads(response.read())
        assert response.status == 200, index
        listed = {e["name"]: (e.get("version"), e.get("state")) for e in index}
        assert sorted(listed) == sorted(models), index
        assert all(state == "READY" for _, state in listed.values()), index
        versions: dict[str, str] = {}
        for name in models:
            conn.request("POST", f"/v2/models/{name}/infer", body, headers)
            response = conn.getresponse()
            answer = json.loads(response.read())
            assert response.status == 200, (name, answer)
            assert answer["model_version"] == listed[name][0], (answer, index)
            versions[name] = answer["model_version"]
        return versions
    finally:
        conn.close()


# --- model files and documents ---------------------------------------------------------------


def tagged_model(source: Path, path: Path, tag: str, *, pad_bytes: int = 0) -> Path:
    """``source`` with a metadata entry naming ``tag`` (and ``pad_bytes`` of padding): the
    same graph and outputs, other bytes, so every version is an artifact of its own that
    devices must download."""
    model = onnx.load(str(source))
    entry = model.metadata_props.add()
    entry.key, entry.value = "edgefleet.test.tag", tag
    if pad_bytes:
        padding = model.metadata_props.add()
        padding.key, padding.value = "edgefleet.test.padding", "p" * pad_bytes
    onnx.save(model, str(path))
    return path


def modelset_yaml(
    version: str,
    variants: Mapping[str, Sequence[ModelVariant]],
    inputs: Mapping[str, list[int]],
) -> str:
    """Model set ``ocr`` ``version``: each model of ``variants`` at ``version``, the first
    with the highest priority."""
    lines = [
        "schema: edgefleet.modelset/1",
        f"name: {MODEL_SET}",
        f'version: "{version}"',
        "models:",
    ]
    for index, (model, model_variants) in enumerate(variants.items()):
        lines += [
            f"  - name: {model}",
            f'    version: "{version}"',
            f"    priority: {10 - index}",
        ]
        if inputs:
            lines.append("    inputs:")
            lines += [f"      {name}: {{shape: {shape}}}" for name, shape in inputs.items()]
        lines.append("    variants:")
        for v in model_variants:
            memory = max(1, int(v.load_memory_mb or 20) + 1)
            lines += [
                f"      - name: {v.variant}",
                f"        precision: {v.precision}",
                f"        artifact: {{sha256: {v.sha256}, size: {v.size}}}",
                f"        requires: {{memory_mb: {memory}}}",
            ]
    return "\n".join(lines) + "\n"


def policy_yaml(version: str = "1.0.0", *, telemetry_interval_s: float = 1) -> str:
    """The policy every rollout test moves: the ``fleet: rollouts`` devices, no probation."""
    return f"""schema: edgefleet.policy/1
name: {POLICY}
selector: {{labels: {{fleet: rollouts}}}}
model_set: {{name: {MODEL_SET}, version: "{version}"}}
runtime: {{probation_s: 0, telemetry_interval_s: {telemetry_interval_s}}}
"""


POLICY_YAML = policy_yaml()


def rollout_yaml(name: str, version: str, **fields: Any) -> str:
    """A rollout of the policy to ``version``: canary 1, batches 50 and 100 %, no bake."""
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


# --- the fleet -------------------------------------------------------------------------------


@dataclass
class Fleet:
    """A hub process, its client, and agent processes; ``models`` is what the model set
    holds (every model takes the same input as cls)."""

    tmp: Path
    broker: MosquittoBroker
    config: HubConfig
    client: HubClient
    cls_path: Path
    models: tuple[str, ...] = ("cls",)
    agents: dict[str, AgentProcess] = field(default_factory=dict)
    agent_configs: dict[str, Path] = field(default_factory=dict)
    api_ports: dict[str, int] = field(default_factory=dict)
    """Each agent's inference API port."""
    hubs: list[HubProcess] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        tmp: Path,
        broker: MosquittoBroker,
        cls_path: Path,
        *,
        models: tuple[str, ...] = ("cls",),
        **hub_options: Any,
    ) -> Fleet:
        """``edgefleet-hub init`` (``hub_options`` as for ``make_hub``) and a started hub."""
        hub_options.setdefault("artifact_token", ARTIFACT_TOKEN)
        config = make_hub(tmp, broker, **hub_options)
        client = HubClient(f"http://{config.api.bind}", config.api_token(), timeout=120)
        fleet = cls(tmp, broker, config, client, cls_path, models)
        try:
            fleet.start_hub()
        except BaseException:
            fleet.close()
            raise
        return fleet

    def close(self) -> None:
        """Kill and reap every agent and hub process; close the client."""
        for agent in self.agents.values():
            agent.kill()
        for hub in self.hubs:
            hub.kill()
        self.client.close()

    @property
    def device_ids(self) -> list[str]:
        return list(self.agents)

    @property
    def hub(self) -> HubProcess:
        return self.hubs[-1]

    def start_hub(self) -> HubProcess:
        assert self.config.source is not None
        hub = HubProcess(self.config.source, self.tmp, f"hub-{len(self.hubs)}")
        self.hubs.append(hub)
        hub.wait_ready()
        return hub

    def add_agent(self, device_id: str, *, broker_url: str | None = None, **options: Any) -> None:
        """Write the agent's config (``options`` as for ``agent_config``) and start it."""
        self.api_ports[device_id] = free_port()
        self.agent_configs[device_id] = agent_config(
            self.tmp,
            self.config,
            broker_url or self.broker.url,
            device_id,
            self.api_ports[device_id],
            **options,
        )
        self.start_agent(device_id)

    def start_agent(self, device_id: str, env: Mapping[str, str] | None = None) -> AgentProcess:
        """Start (again) the agent of ``device_id``: a new process, the same config, state
        and log; the previous process, if any, is killed first."""
        old = self.agents.get(device_id)
        if old is not None:
            old.kill()
        agent = AgentProcess(self.agent_configs[device_id], self.tmp, env=env, name=device_id)
        self.agents[device_id] = agent
        return agent

    def drain_notifications(self) -> None:
        """Read what the agents told "systemd" so far, as systemd does all the time: each
        agent's notify socket holds only a few datagrams (net.unix.max_dgram_qlen), and an
        agent whose socket is full waits on every STATUS= it sends. Every wait here
        drains them."""
        for agent in self.agents.values():
            with contextlib.suppress(OSError):  # a killed agent's socket is closed
                agent.notify.poll()

    def describe(self, *device_ids: str) -> str:
        parts = [self.hub.describe()]
        parts += [self.agents[d].describe() for d in device_ids or self.device_ids]
        return "\n\n".join(parts)

    def publish(
        self, version: str, files: Path | Mapping[str, Path], inputs: dict[str, list[int]]
    ) -> dict[str, list[ModelVariant]]:
        """Register each file as its model at ``version`` (one path: cls) and publish model
        set ocr ``version`` of them; returns the variants the hub stored, per model."""
        paths = {"cls": files} if isinstance(files, Path) else dict(files)
        assert tuple(paths) == self.models, (tuple(paths), self.models)
        variants = {
            name: self.client.add_model(
                path, name=name, version=version, input_shapes=inputs or None
            )
            for name, path in paths.items()
        }
        self.client.apply_model_set(modelset_yaml(version, variants, inputs), f"ocr-{version}")
        return variants

    def policy_version(self) -> str:
        return self.client.policy(POLICY).document.model_set.version

    def running_version(self, device_id: str) -> str | None:
        """The version of the whole model set the device reports running, committed and
        ready: every model of the set at that one version (None otherwise).

        A device that failed a generation and then got its old content again under a new
        generation may report that generation applied with its phase still ``failed`` (an
        agent that adopts equal content without touching the phase): running too."""
        state = self.client.device(device_id).state
        if state is None:
            return None
        failed_before = (
            state.phase == "failed"
            and state.last_error is not None
            and state.last_error.generation < state.applied_generation
        )
        if state.phase != "committed" and not failed_before:
            return None
        versions = {m.version for m in state.models if m.ready}
        if sorted(m.name for m in state.models if m.ready) != sorted(self.models):
            return None
        return versions.pop() if len(versions) == 1 else None

    def wait_running(
        self, version: str, device_ids: Sequence[str] | None = None, timeout: float = 90.0
    ) -> None:
        """Until every device reports ``version`` committed, on the hub's newest document."""
        deadline = time.monotonic() + timeout
        pending = set(device_ids if device_ids is not None else self.device_ids)
        while pending:
            self.drain_notifications()
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
                    and self.running_version(device_id) == version
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

    def wait_online(self, device_ids: Sequence[str], timeout: float = 60.0) -> None:
        """Until the hub holds every device online (its newest status)."""
        deadline = time.monotonic() + timeout
        for device_id in device_ids:
            while not self.client.device(device_id).online:
                self.drain_notifications()
                assert self.agents[device_id].returncode is None, self.describe(device_id)
                assert time.monotonic() < deadline, f"{device_id} not online\n{self.describe()}"
                time.sleep(0.2)

    def wait_rollout(
        self, name: str, until: tuple[str, ...] = TERMINAL, timeout: float = 120.0
    ) -> RolloutDetail:
        deadline = time.monotonic() + timeout
        while True:
            self.drain_notifications()
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

    def assert_whole_set(self, version: str, device_ids: Sequence[str] | None = None) -> None:
        """Every device runs the whole model set at ``version``: as it reports to the hub
        (its state) and as its inference API serves it."""
        self.wait_running(version, device_ids)
        for device_id in device_ids if device_ids is not None else self.device_ids:
            served = served_versions(self.api_ports[device_id], self.models)
            assert served == dict.fromkeys(self.models, version), (device_id, served)
