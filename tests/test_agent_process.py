"""The agent as systemd runs it: a real process, a real $NOTIFY_SOCKET, SIGTERM, the CLI.

Each test starts ``python -m agent.cli run --config FILE`` against a private mosquitto and
watches it from outside: sd_notify datagrams, MQTT messages, its exit status, and what
``edgefleet-agent status`` / ``config check`` print.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from contract.messages import Birth, State, Status
from contract.signing import SigningKey
from hub.broker import MosquittoBroker
from support.agent_process import agent_process, cli
from support.fleet import Tap, agent_toml, desired_state, mqtt_tap, ocr_specs, sha256_of, signed
from support.http_server import ArtifactServer, Fault

pytestmark = pytest.mark.slow

DEVICE = "proc-dev-1"
UP = f"edgefleet/v1/dev/{DEVICE}/up"


@dataclass
class Device:
    config: Path
    state_dir: Path
    key: SigningKey
    workdir: Path


@pytest.fixture
def device(broker: MosquittoBroker, tmp_path: Path) -> Device:
    key = SigningKey.generate()
    state_dir = tmp_path / "state"
    config = tmp_path / "agent.toml"
    config.write_text(agent_toml(device_id=DEVICE, broker=broker, state_dir=state_dir, key=key))
    return Device(config, state_dir, key, tmp_path)


@pytest.fixture
def files() -> Iterator[ArtifactServer]:
    with ArtifactServer() as server:
        yield server


def births(tap: Tap) -> list[Birth]:
    return [m for m in tap.messages("birth") if isinstance(m, Birth)]


def statuses(tap: Tap) -> list[Status]:
    return [m for m in tap.messages("status") if isinstance(m, Status)]


def states(tap: Tap) -> list[State]:
    return [m for m in tap.messages("state") if isinstance(m, State)]


def wait_birth(tap: Tap, after_session: int = 0) -> Birth:
    found: list[Birth] = tap.wait_for(
        lambda t: [b for b in births(t) if b.session > after_session], 20, "birth"
    )
    return found[-1]


def datagrams_with(received: list[str], line: str) -> list[str]:
    return [d for d in received if line in d.split("\n")]


# --- sd_notify -----------------------------------------------------------------------------


def test_sd_notify_ready_watchdog_status_and_stopping(
    device: Device, files: ArtifactServer, ocr_models: dict[str, Path], broker: MosquittoBroker
) -> None:
    cls = ocr_models["cls"]
    files.add(f"/artifacts/{sha256_of(cls)}", cls)
    with (
        mqtt_tap(broker, f"{UP}/#") as tap,
        agent_process(
            device.config, device.workdir, watchdog_usec=2_000_000, watchdog_pid_self=True
        ) as agent,
    ):
        agent.wait_ready()
        ready = datagrams_with(agent.notify.received, "READY=1")
        assert ready == ["READY=1\nSTATUS=waiting: no generation applied yet"], agent.describe()
        # STATUS before READY=1: the start-up step, as `systemctl status` shows it.
        first = agent.notify.received[0]
        assert first.startswith("STATUS=") and "READY=1" not in first

        # WATCHDOG=1 every WATCHDOG_USEC/2 = 1 s, from the process WATCHDOG_PID names.
        started = time.monotonic()
        agent.wait_notified(lambda lines: lines.count("WATCHDOG=1") >= 2, 10, "WATCHDOG=1 twice")
        assert time.monotonic() - started < 4.0

        # The status line follows the state: after an apply it names the generation served.
        wait_birth(tap)
        doc = desired_state(DEVICE, 1, ocr_specs({"cls": cls}), base_urls=[files.url("/artifacts")])
        tap.publish_desired(DEVICE, signed(doc, device.key))
        agent.wait_notified(
            lambda lines: "STATUS=generation 1 ready" in lines, 20, "STATUS=generation 1 ready"
        )

        assert agent.terminate() == 0, agent.describe()
        received = agent.notify.poll()
        stopping = datagrams_with(received, "STOPPING=1")
        assert len(stopping) == 1, received
        assert stopping[0].startswith("STOPPING=1\nSTATUS="), stopping
        assert received.index(stopping[0]) > received.index(ready[0])
        assert not datagrams_with(received[received.index(stopping[0]) :], "READY=1")


def test_no_watchdog_pings_for_another_process(device: Device) -> None:
    """``WATCHDOG_PID`` naming another process: the watchdog is not ours to feed."""
    with agent_process(
        device.config, device.workdir, env={"WATCHDOG_PID": "1"}, watchdog_usec=400_000
    ) as agent:
        agent.wait_ready()
        # Five would-be intervals (0.2 s each) pass before the goodbye; none may ping.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            agent.notify.poll(deadline - time.monotonic())
        assert agent.terminate() == 0, agent.describe()
        assert "WATCHDOG=1" not in agent.notify.assignments()
        assert "STOPPING=1" in agent.notify.assignments()


# --- SIGTERM -------------------------------------------------------------------------------


def test_sigterm_drains_the_apply_in_flight_then_publishes_offline(
    device: Device, files: ArtifactServer, ocr_models: dict[str, Path], broker: MosquittoBroker
) -> None:
    cls = ocr_models["cls"]
    path = f"/artifacts/{sha256_of(cls)}"
    # About 2 s of body: the SIGTERM lands while the download is under way.
    files.add(path, cls, fault=Fault(chunk_delay_s=0.05, chunk_size=16 * 1024))
    with mqtt_tap(broker, f"{UP}/#") as tap:
        with agent_process(device.config, device.workdir) as agent:
            agent.wait_ready()
            session = wait_birth(tap).session
            doc = desired_state(
                DEVICE, 1, ocr_specs({"cls": cls}), base_urls=[files.url("/artifacts")]
            )
            tap.publish_desired(DEVICE, signed(doc, device.key))
            tap.wait_for(lambda _: files.requests_for(path), 20, "the download to start")
            sigterm_at = time.time()
            assert agent.terminate() == 0, agent.describe()
            assert "STOPPING=1" in agent.notify.assignments()

        # The apply that was under way finished before the goodbye ...
        assert files.requests_for(path)[0].headers.get("Range") is None
        received = tap.wait_for(
            lambda t: [s for s in statuses(t) if s.state == "offline" and s.session == session],
            5,
            "offline status",
        )
        offline: Status = received[-1]
        applied = [s for s in states(tap) if s.applied_generation == 1 and s.phase == "committed"]
        assert applied, [(s.applied_generation, s.phase) for s in states(tap)]
        assert applied[0].ts > sigterm_at  # it was in flight when the SIGTERM came
        order = [r.message for r in tap.received]
        assert order.index(applied[0]) < order.index(offline)
        # ... and the offline status is the agent's own goodbye, sent after the SIGTERM (the
        # Will carries the time of the connect), not the Will (not sent on a clean disconnect).
        assert offline.ts > applied[0].ts > sigterm_at, (offline.ts, sigterm_at)
        sentinel = f"{UP}/sentinel"
        tap.publish(sentinel, b"after the exit")
        tap.wait_for(lambda t: any(r.topic == sentinel for r in t.received), 5, "the sentinel")
        offline_msgs = [s for s in statuses(tap) if s.state == "offline" and s.session == session]
        assert offline_msgs == [offline]

    # The retained status is that offline, for a subscriber that comes later.
    with mqtt_tap(broker, f"{UP}/status") as later:
        retained = later.wait_for(statuses, 5, "retained status")
        assert retained[-1] == offline
        assert [r.retain for r in later.received] == [True]

    report = json.loads(cli("status", "--config", str(device.config), "--json").stdout)
    assert report["applied_generation"] == 1
    assert report["reported"]["phase"] == "committed"


# --- CLI -----------------------------------------------------------------------------------


def test_status_command_prints_the_applied_generation_and_models(
    device: Device, files: ArtifactServer, ocr_models: dict[str, Path], broker: MosquittoBroker
) -> None:
    before = cli("status", "--config", str(device.config))
    assert before.returncode == 0, before.stderr
    assert "generation  0" in before.stdout
    assert "never reported" in before.stdout

    models = {"cls": ocr_models["cls"], "det": ocr_models["det"]}
    for model in models.values():
        files.add(f"/artifacts/{sha256_of(model)}", model)
    with (
        mqtt_tap(broker, f"{UP}/#") as tap,
        agent_process(device.config, device.workdir) as agent,
    ):
        agent.wait_ready()
        wait_birth(tap)
        doc = desired_state(DEVICE, 1, ocr_specs(models), base_urls=[files.url("/artifacts")])
        tap.publish_desired(DEVICE, signed(doc, device.key))
        tap.wait_for(
            lambda t: [
                s for s in states(t) if s.applied_generation == 1 and s.phase == "committed"
            ],
            30,
            "generation 1 committed",
        )

        # Read while the daemon runs: the state database is shared, never locked for long.
        shown = cli("status", "--config", str(device.config))
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.splitlines()
        assert f"device      {DEVICE}" in lines
        assert "generation  1" in lines
        assert "phase       committed" in lines
        for name in ("cls", "det"):
            row = next(line for line in lines if line.startswith(f"{name} "))
            assert row.split()[1:4] == ["1.0.0", "fp32", "CPUExecutionProvider"], row
            assert row.endswith("ready"), row

        assert agent.terminate() == 0, agent.describe()

    report = json.loads(cli("status", "--config", str(device.config), "--json").stdout)
    assert report["device_id"] == DEVICE
    assert report["applied_generation"] == 1
    assert report["previous_generation"] is None
    reported = report["reported"]
    assert reported["applied_generation"] == 1
    assert {m["name"]: (m["version"], m["ready"]) for m in reported["models"]} == {
        "cls": ("1.0.0", True),
        "det": ("1.0.0", True),
    }


def test_config_check_prints_effective_settings(device: Device) -> None:
    result = cli(
        "config",
        "check",
        "--config",
        str(device.config),
        env={"EDGEFLEET_AGENT__LOG_LEVEL": "warning"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == f"# edgefleet-agent effective settings ({device.config})"
    assert f'device_id = "{DEVICE}"' in lines
    assert 'log_level = "warning"  # from $EDGEFLEET_AGENT__LOG_LEVEL' in lines
    assert f'state_dir = "{device.state_dir}"' in lines
    assert "[broker]" in lines


@pytest.mark.parametrize(
    ("edit", "env", "key"),
    [
        (("keepalive = 5", 'keepalive = "soon"'), {}, "broker.keepalive"),
        (('url = "mqtt://', 'url = "http://'), {}, "broker.url"),
        (None, {"EDGEFLEET_AGENT__BROKER__KEEPALIVE": "-3"}, "broker.keepalive"),
        (('device_id = "', 'device_id = "+/'), {}, "device_id"),
    ],
    ids=["wrong-type", "bad-url", "bad-env-override", "bad-device-id"],
)
def test_a_broken_config_is_one_line_on_stderr(
    device: Device, edit: tuple[str, str] | None, env: dict[str, str], key: str
) -> None:
    if edit is not None:
        text = device.config.read_text()
        assert edit[0] in text
        device.config.write_text(text.replace(edit[0], edit[1], 1))
    for command in (["config", "check"], ["run"], ["status"]):
        result = cli(*command, "--config", str(device.config), env=env)
        assert result.returncode == 1, (command, result)
        assert result.stdout == "", (command, result.stdout)
        assert result.stderr.count("\n") == 1, (command, result.stderr)
        assert result.stderr.startswith("edgefleet-agent: "), (command, result.stderr)
        assert key in result.stderr, (command, result.stderr)


def test_a_missing_config_file_is_one_line_on_stderr(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "agent.toml"
    result = cli("config", "check", "--config", str(missing))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert str(missing) in result.stderr
