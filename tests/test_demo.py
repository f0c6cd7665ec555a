"""``edgefleet-hub demo`` end to end, as a user runs it: a child process that starts a broker,
a hub and real agents, registers the OCR models, runs the two rollouts under load and stops
everything.

- ``--quick`` runs to completion, and its summary (``--summary-json``) is what the hub's
  store says afterwards: devices, profiles, the variants they run, generations, phases,
  the policy's final model set, the rollouts and how they ended;
- with the embedded amqtt broker (MQTT 3.1.1) the same demo works;
- Ctrl-C (SIGINT) in the middle stops everything and leaves no process behind;
- ``--keep`` keeps the fleet up and prints commands that work against it (the CLI,
  mosquitto_sub), until Ctrl-C.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from hub.store import Store
from support.agent_process import child_env

pytestmark = pytest.mark.slow

DEMO = [sys.executable, "-m", "hub.cli", "demo", "--no-live"]
QUICK_PROFILES = {
    # profile: the classifier variant it calls for
    "raspberry-pi-4-4gb": "int8",
    "intel-n100-gateway": "int8",
    "x86-64-nvidia-server": "fp32",
}
DEMO_TIMEOUT_S = 420


def processes_under(directory: Path) -> list[str]:
    """Processes whose command line names a path under ``directory`` (the demo's broker,
    hub and agents all do)."""
    marker = str(directory)
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        if any(marker in arg for arg in cmdline):
            found.append(f"{proc.info['pid']}: {' '.join(cmdline)}")
    return found


def run_demo(tmp: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    workdir, summary = tmp / "demo", tmp / "summary.json"
    done = subprocess.run(
        [*DEMO, "--workdir", str(workdir), "--summary-json", str(summary), *args],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    assert not processes_under(workdir)
    data: dict[str, Any] = json.loads(summary.read_text())
    assert data["ok"] and data["stopped_cleanly"], data
    return done, data


def store_models(state: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    keys = ("version", "variant", "precision", "provider", "ready")
    return {m["name"]: {k: m.get(k) for k in keys} for m in (state or {}).get("models", [])}


@pytest.mark.timeout(DEMO_TIMEOUT_S + 60)
def test_quick_demo_runs_to_completion_and_its_summary_is_the_stores(tmp_path: Path) -> None:
    done, data = run_demo(tmp_path, "--quick")
    assert data["broker"]["kind"] in ("mosquitto", "amqtt")

    with Store(tmp_path / "demo" / "hub" / "hub.db") as store:
        ids = sorted(b.device_id for b in store.device_briefs())
        assert ids == sorted(d["device_id"] for d in data["devices"])
        assert len(ids) == 3
        for device in data["devices"]:
            record = store.get_device(device["device_id"])
            assert record.profile_name == device["profile"]
            assert record.profile_source == device["profile_source"] == "override"
            assert record.applied_generation == device["applied_generation"]
            assert record.phase == device["phase"] == "committed"
            assert store_models(record.state) == device["models"]
            latest = store.latest_desired(device["device_id"])
            assert latest is not None and latest.generation == record.applied_generation
        policy = store.get_policy("ocr-fleet")
        assert policy.document["model_set"]["version"] == data["model_set"]["final"] == "2.0.0"
        rollouts = {r.document["name"]: r.state["phase"] for r in store.list_rollouts()}
    assert rollouts == {r["name"]: r["phase"] for r in data["rollouts"]}
    assert rollouts == {"ocr-2.0.0": "succeeded", "ocr-3.0.0": "failed"}

    # every device runs model set 2.0.0 in the variant its profile calls for
    chosen = {d["profile"]: d["models"]["cls"]["variant"] for d in data["devices"]}
    assert chosen == QUICK_PROFILES
    for device in data["devices"]:
        assert {n: m["version"] for n, m in device["models"].items()} == {
            "det": "1.0.0",
            "cls": "1.1.0",
            "rec": "1.0.0",
        }
        assert all(m["ready"] for m in device["models"].values())
        # the load was answered throughout both rollouts, by both classifier versions
        load = device["load"]
        assert load["requests"] > 0 and load["errors"] == 0, load
        assert load["p50_ms"] is not None and load["p95_ms"] >= load["p50_ms"]
        assert set(load["versions"]["cls"]) == {"1.0.0", "1.1.0"}, load["versions"]
        assert device["telemetry"], "the hub stored no latency for the device"

    # the broken rollout: the canary failed its smoke test and the rollout stopped there
    broken = next(r for r in data["rollouts"] if r["name"] == "ocr-3.0.0")
    kinds = [m["text"].split(" ", 1)[0].rstrip(":") for m in broken["timeline"]]
    assert "device.failed" in kinds and "cohort.failed" in kinds
    assert not any(
        k == "cohort.started" and "batch" in m["text"]
        for k, m in zip(kinds, broken["timeline"], strict=True)
    )
    failed = next(m for m in broken["timeline"] if m["text"].startswith("device.failed"))
    assert "smoke_test_error" in failed["text"] and "non-finite" in failed["text"]
    assert broken["timeline"][-1]["text"].startswith("rolled back:")
    # the canary is the one device whose reported state keeps the smoke test's error
    with Store(tmp_path / "demo" / "hub" / "hub.db") as store:
        refused = [
            d["device_id"]
            for d in data["devices"]
            if ((store.get_device(d["device_id"]).state or {}).get("last_error") or {}).get("code")
            == "smoke_test_error"
        ]
    assert refused == broken["failed_devices"] and len(refused) == 1

    # what the person sees: the summary table and both rollout timelines
    assert "rollout ocr-2.0.0 -> ocr 2.0.0: succeeded" in done.stdout
    assert "rollout ocr-3.0.0 -> ocr 3.0.0: failed" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.skipif(importlib.util.find_spec("amqtt") is None, reason="amqtt is not installed")
@pytest.mark.timeout(DEMO_TIMEOUT_S + 60)
def test_demo_on_the_embedded_amqtt_broker(tmp_path: Path) -> None:
    _, data = run_demo(tmp_path, "--quick", "--broker", "amqtt")
    assert data["broker"] == {**data["broker"], "kind": "amqtt", "protocol": "3.1.1"}
    hub_toml = (tmp_path / "demo" / "hub" / "hub.toml").read_text()
    assert 'protocol = "3.1.1"' in hub_toml and 'shared_group = ""' in hub_toml
    assert {r["name"]: r["phase"] for r in data["rollouts"]} == {
        "ocr-2.0.0": "succeeded",
        "ocr-3.0.0": "failed",
    }
    assert all(d["phase"] == "committed" for d in data["devices"])


@contextmanager
def demo_process(tmp: Path, *args: str) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """The demo in the background, its output in a file; killed (and its children found
    and killed) if the test leaves it running."""
    workdir, output = tmp / "demo", tmp / "demo.out"
    with output.open("w") as out:
        proc = subprocess.Popen(
            [*DEMO, "--workdir", str(workdir), "--summary-json", str(tmp / "summary.json"), *args],
            env=child_env({"COLUMNS": "200"}),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            yield proc, output
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)
            for line in processes_under(workdir):
                os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)


def wait_output(proc: subprocess.Popen[str], output: Path, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        seen = output.read_text()
        if text in seen:
            return seen
        assert proc.poll() is None, f"the demo exited ({proc.returncode}):\n{seen[-6000:]}"
        assert time.monotonic() < deadline, f"no {text!r} in {timeout} s:\n{seen[-6000:]}"
        time.sleep(0.2)


def test_ctrl_c_stops_everything(tmp_path: Path) -> None:
    with demo_process(tmp_path, "--quick") as (proc, output):
        wait_output(proc, output, "waiting for every device", 180)
        assert processes_under(tmp_path / "demo")  # broker, hub and agents are up
        proc.send_signal(signal.SIGINT)
        assert proc.wait(90) == 130, output.read_text()[-4000:]
    assert not processes_under(tmp_path / "demo")
    text = output.read_text()
    assert "interrupted: stopping everything" in text and "Traceback" not in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["ok"] is False


def test_keep_leaves_the_fleet_running_for_the_cli_and_mosquitto_sub(tmp_path: Path) -> None:
    with demo_process(tmp_path, "--quick", "--keep", "--no-rollouts", "--load", "1") as (
        proc,
        output,
    ):
        text = wait_output(proc, output, "Press Ctrl-C to stop everything.", 240)
        config = re.search(r"export EDGEFLEET_HUB_CONFIG=(\S+)", text)
        assert config is not None, text
        env = child_env({"EDGEFLEET_HUB_CONFIG": config.group(1)})
        listed = subprocess.run(
            [sys.executable, "-m", "hub.cli", "devices", "list", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert listed.returncode == 0, listed.stderr
        devices = json.loads(listed.stdout)
        assert sorted(d["profile"] for d in devices) == sorted(QUICK_PROFILES)
        assert all(d["online"] for d in devices)

        sub = re.search(r"^\s*(mosquitto_sub .*)$", text, re.MULTILINE)
        assert sub is not None, text
        if shutil.which("mosquitto_sub"):
            # the retained status of every device, through the printed command
            argv = [*shlex.split(sub.group(1)), "-C", "3", "-W", "20"]
            argv[argv.index("-t") + 1] = "edgefleet/v1/dev/+/up/status"
            got = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
            assert got.returncode == 0, got.stderr
            assert got.stdout.count('"online"') == 3, got.stdout

        proc.send_signal(signal.SIGINT)
        assert proc.wait(90) == 0, output.read_text()[-4000:]
    assert not processes_under(tmp_path / "demo")
