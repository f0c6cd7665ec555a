"""The hub end to end: a hub process and three real agent processes on a private mosquitto.

``edgefleet-hub init`` makes the hub directory and ``edgefleet-hub serve`` runs the hub; the
registry steps go through its HTTP API (``hub.client.HubClient``): the OCR models (cls with
an int8 variant derived by the hub), the model set, the policy. Each agent overrides its
firmware profile, so one host plays a Raspberry Pi 4 (int8 first), an Intel N100 gateway
(int8 first) and an NVIDIA server (fp16, then fp32). Two agents are up before the policy is
applied (its reconcile reaches them), the third comes after (its birth does). Every agent
downloads from the hub's artifact server (bearer token), loads and commits. Then: each
agent runs the variant its profile calls for, which is what ``plan`` predicted from the
births, and the state the hub shows is the state the agent reports.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from contract.messages import Desired, HubState, decode, encode, topic_for
from contract.signing import TrustedKeys
from hub.broker import MosquittoBroker, free_port
from hub.client import HubClient
from hub.config import HubConfig, load_config
from hub.errors import ClientError
from hub.init import init_hub
from hub.keys import Keyring
from hub.store import Store
from support import hub_samples
from support.agent_process import AgentProcess, agent_process, child_env, cli
from support.fleet import mqtt_tap
from support.hub_fleet import OCR_HINTS, modelset_yaml, policy_yaml
from support.hub_process import HUB_CLI, HubProcess, hub_process, make_hub

pytestmark = pytest.mark.slow

AGENTS = {
    # device id: (profile override, the cls variant that profile calls for)
    "e2e-pi": ("raspberry-pi-4-4gb", "int8"),
    "e2e-gw": ("intel-n100-gateway", "int8"),
    "e2e-srv": ("x86-64-nvidia-server", "fp32"),
}
ARTIFACT_TOKEN = "artifact-token-for-e2e"


def api(config: HubConfig) -> HubClient:
    return HubClient(f"http://{config.api.bind}", config.api_token(), timeout=120)


def register(client: HubClient, ocr_models: dict[str, Path]) -> None:
    """Models (the hub derives cls int8) and the model set, through the HTTP API."""
    variants = []
    for name, path in ocr_models.items():
        variants += client.add_model(
            path,
            name=name,
            version="1.0.0",
            quantize="int8" if name == "cls" else None,
            input_shapes=OCR_HINTS[name],
        )
    assert sorted((v.name, v.variant) for v in variants) == [
        ("cls", "fp32"),
        ("cls", "int8"),
        ("det", "fp32"),
        ("rec", "fp32"),
    ]
    assert all(v.load_memory_mb for v in variants)
    client.apply_model_set(modelset_yaml(variants), "ocr.yaml")


def agent_config(tmp: Path, config: HubConfig, broker: MosquittoBroker, device_id: str) -> Path:
    profile, _ = AGENTS[device_id]
    state_dir = tmp / device_id
    state_dir.mkdir()
    lines = [
        f'device_id = "{device_id}"',
        f'state_dir = "{state_dir}"',
        f'profile = "{profile}"',
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
        'site = "e2e"',
        "",
        "[api]",
        f'bind = "127.0.0.1:{free_port()}"',
        "",
        "[artifacts]",
        f'token_file = "{config.data_path / "artifacts-token"}"',
    ]
    path = tmp / f"{device_id}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_converged(
    client: HubClient, agents: dict[str, AgentProcess], hub: HubProcess, timeout: float = 60.0
) -> None:
    """Until the hub shows every device committed, all models ready, on its newest document."""
    deadline = time.monotonic() + timeout
    pending = set(agents)
    while pending:
        for device_id in sorted(pending):
            try:
                device = client.device(device_id)
            except ClientError as exc:  # its birth may not be stored yet
                assert exc.status == 404, exc
                continue
            desired = device.desired
            if (
                desired is not None
                and desired.published_at is not None
                and device.applied_generation == desired.generation
                and device.phase == "committed"
                and device.state is not None
                and all(m.ready for m in device.state.models)
            ):
                pending.discard(device_id)
        if not pending:
            return
        if time.monotonic() > deadline:
            details = "\n\n".join(agents[d].describe() for d in sorted(pending))
            raise AssertionError(f"not converged: {sorted(pending)}\n{hub.describe()}\n\n{details}")
        for agent in agents.values():
            assert agent.returncode is None, agent.describe()
        assert hub.proc.poll() is None, hub.describe()
        time.sleep(0.25)


def agent_status(config_path: Path) -> dict[str, Any]:
    done = cli("status", "--config", str(config_path), "--json")
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def test_hub_and_agents_converge_on_what_plan_predicted(
    tmp_path: Path, broker: MosquittoBroker, ocr_models: dict[str, Path]
) -> None:
    config = make_hub(tmp_path, broker, hub_id="hub-e2e", artifact_token=ARTIFACT_TOKEN)
    assert config.source is not None
    configs = {d: agent_config(tmp_path, config, broker, d) for d in AGENTS}

    with ExitStack() as stack:
        tap = stack.enter_context(
            mqtt_tap(broker, "edgefleet/v1/hub/state", "edgefleet/v1/dev/+/down/desired")
        )
        hub = stack.enter_context(hub_process(config.source, tmp_path))
        hub.wait_ready()
        client = stack.enter_context(api(config))
        register(client, ocr_models)
        agents = {
            d: stack.enter_context(agent_process(configs[d], tmp_path, name=d))
            for d in ("e2e-pi", "e2e-gw")
        }
        for agent in agents.values():
            agent.wait_ready(60)
        wait_born(client, list(agents), hub)
        client.apply_policy(policy_yaml(labels={"site": "e2e"}), "policy.yaml")
        agents["e2e-srv"] = stack.enter_context(
            agent_process(configs["e2e-srv"], tmp_path, name="e2e-srv")
        )
        agents["e2e-srv"].wait_ready(60)
        wait_converged(client, agents, hub)

        plans = {p.device_id: p for p in client.plan().items}
        assert sorted(plans) == sorted(AGENTS)
        trusted = TrustedKeys(Keyring(config.keys_dir, config.public_keys_path).public_keys())
        for device_id, (profile, cls_variant) in AGENTS.items():
            device = client.device(device_id)
            assert device.profile == profile and device.labels == {"site": "e2e"}
            plan = plans[device_id].plan
            assert plan is not None, plans[device_id].message
            predicted = {c.model: c for c in plan.chosen}
            assert len(predicted) == 3 and not plan.skipped
            assert predicted["cls"].variant == cls_variant

            # the state the hub shows is the state the agent reports
            status = agent_status(configs[device_id])
            assert device.state is not None
            assert device.state.model_dump(mode="json", by_alias=True) == status["reported"]
            assert status["applied_generation"] == device.applied_generation
            assert {
                m.name: (m.variant, m.precision, m.provider, m.version) for m in device.state.models
            } == {
                c.model: (c.variant, c.precision, c.provider, c.version) for c in predicted.values()
            }

            # what the agent applied is the signed document the hub published (retained)
            assert device.desired is not None
            assert device.desired.generation == device.state.applied_generation
            sent = [
                decode(Desired, r.payload)
                for r in tap.received
                if r.topic == f"edgefleet/v1/dev/{device_id}/down/desired"
            ]
            assert sent and sent[-1].payload.generation == device.desired.generation
            sent[-1].verify(trusted)

        # the rollout job ran (no rollout is active: each tick only looks) and is timed
        ticks = [
            line
            for line in client.metrics().splitlines()
            if line.startswith("edgefleet_hub_rollout_tick_seconds_count ")
        ]
        assert ticks and float(ticks[0].split()[-1]) >= 1, ticks
        for agent in agents.values():
            assert agent.terminate() == 0, agent.describe()
            log = agent.log_path.read_text()
            assert "INFO agent." in log and "Running job" not in log, agent.describe()
        assert hub.terminate() == 0, hub.describe()
        states = [
            decode(HubState, r.payload) for r in tap.received if r.topic.endswith("/hub/state")
        ]
        assert [s.state for s in states][-2:] == ["online", "offline"]
        assert "Traceback" not in hub.log_path.read_text(), hub.describe()
    # every document the hub recorded was acknowledged by the broker
    with Store(config.store_path) as store:
        latest = store.latest_desired_all()
        assert sorted(latest) == sorted(AGENTS)
        assert all(d.published_at is not None for d in latest.values())


def wait_born(client: HubClient, device_ids: list[str], hub: HubProcess) -> None:
    deadline = time.monotonic() + 30
    while True:
        born = {d.device_id for d in client.iter_devices() if d.profile is not None}
        if set(device_ids) <= born:
            return
        assert time.monotonic() < deadline, f"no birth from {device_ids}: {hub.describe()}"
        time.sleep(0.1)


def test_serve_refuses_a_bad_configuration(tmp_path: Path) -> None:
    path = tmp_path / "hub.toml"
    path.write_text('hub_id = "x"\n[broker]\nurl = "http://nope"\n')
    done = run_hub("serve", "--config", str(path))
    assert done.returncode == 2
    assert "broker.url" in done.stderr and str(path) in done.stderr


def test_serve_fails_cleanly_without_a_broker(tmp_path: Path) -> None:
    result = init_hub(
        tmp_path / "hub",
        broker_url=f"mqtt://127.0.0.1:{free_port()}",
        api_bind=f"127.0.0.1:{free_port()}",
        artifacts_bind=f"127.0.0.1:{free_port()}",
    )
    done = run_hub("serve", "--config", str(result.config_path))
    assert done.returncode == 2, done.stderr
    assert "cannot connect" in done.stderr
    assert os.path.exists(result.config.store_path)


def test_serve_names_an_artifact_port_in_use(tmp_path: Path, broker: MosquittoBroker) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = init_hub(
            tmp_path / "hub",
            broker_url=broker.url,
            api_bind=f"127.0.0.1:{free_port()}",
            artifacts_bind=f"127.0.0.1:{port}",
        )
        done = run_hub("serve", "--config", str(result.config_path))
    assert done.returncode == 2, done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "artifacts.bind" in done.stderr
    assert "Traceback" not in done.stderr


# --- ingest workers beside the hub -----------------------------------------------------------


STORED_TELEMETRY = 'edgefleet_hub_ingest_messages_total{kind="telemetry"}'


def _metrics(config_path: Path) -> list[str]:
    with api(load_config(config_path)) as client:
        return client.metrics().splitlines()


def worker_hub(tmp: Path, broker: MosquittoBroker, *, detect_gaps: bool = False) -> Path:
    """A hub directory whose hub.toml lets ingest workers share the subscription."""
    path = make_hub(tmp, broker, hub_id="hub-e2e").source
    assert path is not None
    text = path.read_text()
    text = text.replace("detect_gaps = true", f"detect_gaps = {str(detect_gaps).lower()}")
    text = text.replace('shared_group = ""', 'shared_group = "hub"')
    path.write_text(text)
    return path


def run_hub(*args: str) -> subprocess.CompletedProcess[str]:
    """``edgefleet-hub ARGS`` to its end, output captured."""
    return subprocess.run(
        [*HUB_CLI, *args], env=child_env(), capture_output=True, text=True, timeout=60, check=False
    )


def test_an_ingest_worker_shares_the_devices_messages_with_the_hub(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    config_path = worker_hub(tmp_path, broker)
    devices = [f"wk-{i}" for i in range(10)]
    per_device = 60
    with (
        hub_process(config_path, tmp_path) as hub,
        hub_process(config_path, tmp_path, ("ingest-worker", "--index", "1")) as worker,
        mqtt_tap(broker, "edgefleet/v1/hub/state") as hub_state,
    ):
        hub.wait_ready()
        worker.wait_ready()
        with mqtt_tap(broker) as sender:
            for device_id in devices:
                sent = [hub_samples.status(device_id, 1, 0), hub_samples.birth(device_id, 1, 1)]
                sent += [hub_samples.telemetry(device_id, 1, 2 + n) for n in range(per_device)]
                for msg in sent:
                    sender.publish(topic_for(msg), encode(msg))
        with Store(load_config(config_path).store_path) as store:
            deadline = time.monotonic() + 60
            while store.count_telemetry() < len(devices) * per_device:
                assert time.monotonic() < deadline, f"{hub.describe()}\n{worker.describe()}"
                time.sleep(0.1)
            assert store.count_telemetry() == len(devices) * per_device
            assert store.count_devices() == len(devices)
        metrics = [line for line in _metrics(config_path) if line.startswith(STORED_TELEMETRY)]
        by_hub = float(metrics[0].split()[-1])
        assert 0 < by_hub < len(devices) * per_device, "the worker took none of the messages"
        assert "serving: ingest worker 1 of hub" in worker.log_path.read_text()
        worker.kill()  # no Will: the hub is still the one that says whether it is online
        time.sleep(0.5)
        states = [decode(HubState, bytes(m.payload)).state for m in hub_state.received]
        assert states and states[-1] == "online" and "offline" not in states
        assert hub.terminate() == 0


def test_an_ingest_worker_refuses_a_hub_that_detects_gaps(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    config_path = worker_hub(tmp_path, broker, detect_gaps=True)
    done = run_hub("ingest-worker", "--config", str(config_path))
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "ingest.detect_gaps: false when" in done.stderr
    assert str(config_path) in done.stderr
