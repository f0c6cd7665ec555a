"""``edgefleet-agent install-service``: the unit, the configuration skeleton, the state
directory; ``--print``; an existing configuration is kept; the unit passes
``systemd-analyze verify``; the skeleton is a valid configuration once the hub's keys are
beside it."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from agent.install import UNIT_DIR, plan_install, render_unit
from agent.sdnotify import UNIT_NAME
from hub.keys import Keyring
from support.agent_process import cli

UNIT = str(UNIT_DIR / UNIT_NAME).lstrip("/")


def install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done: subprocess.CompletedProcess[str] = cli(
        "install-service", "--root", str(root), "--executable", sys.executable, *args
    )
    return done


def verify(unit: Path) -> None:
    """``systemd-analyze verify`` says nothing about our unit (skipped without the tool)."""
    binary = shutil.which("systemd-analyze")
    if binary is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    result = subprocess.run(
        [binary, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    ours = [line for line in (result.stdout + result.stderr).splitlines() if UNIT_NAME in line]
    assert result.returncode == 0, result.stderr
    assert ours == [], "\n".join(ours)


def test_print_shows_the_unit_and_the_skeleton_and_writes_nothing(tmp_path: Path) -> None:
    done = cli(
        "install-service",
        "--print",
        "--root",
        str(tmp_path),
        "--device-id",
        "pi-0042",
        "--broker-url",
        "mqtts://mqtt.example.com:8883",
    )
    assert done.returncode == 0, done.stderr
    assert list(tmp_path.iterdir()) == []
    unit, config = done.stdout.split("\n# /etc/edgefleet/agent.toml", 1)
    assert unit.startswith(f"# /{UNIT}\n")
    exe = Path(sys.executable).parent / "edgefleet-agent"
    assert f"ExecStart={exe} run --config /etc/edgefleet/agent.toml" in unit
    assert "ReadWritePaths" not in unit  # the default state dir is the unit's own
    document = tomllib.loads(config.split("\n", 1)[1])
    assert document["device_id"] == "pi-0042"
    assert document["broker"]["url"] == "mqtts://mqtt.example.com:8883"
    assert document["state_dir"] == "/var/lib/edgefleet"
    assert document["trust"]["hub_public_keys_file"] == "hub-keys.json"


def test_writes_unit_config_and_state_dir_and_keeps_an_existing_config(tmp_path: Path) -> None:
    root = tmp_path / "root"
    done = install(root, "--device-id", "gw-7")
    assert done.returncode == 0, done.stderr
    unit = root / UNIT
    config = root / "etc/edgefleet/agent.toml"
    state = root / "var/lib/edgefleet"
    assert f"ExecStart={sys.executable} run --config /etc/edgefleet/agent.toml" in (
        unit.read_text()
    )
    assert tomllib.loads(config.read_text())["device_id"] == "gw-7"
    assert stat.S_IMODE(state.stat().st_mode) == 0o750
    assert state.stat().st_uid == os.geteuid()  # root (the unit's user) when run as root
    assert stat.S_IMODE(config.stat().st_mode) == 0o640
    assert "wrote" in done.stdout and "systemctl enable --now edgefleet-agent" in done.stdout
    verify(unit)

    # an enrolled device's configuration is never replaced; the unit is rewritten
    config.write_text("# from the enrollment bundle\n")
    again = install(root, "--device-id", "other", "--config", "/etc/edgefleet/agent.toml")
    assert again.returncode == 0, again.stderr
    assert config.read_text() == "# from the enrollment bundle\n"
    assert "kept" in again.stdout


def test_a_state_dir_elsewhere_is_made_writable_for_the_service(tmp_path: Path) -> None:
    root = tmp_path / "root"
    done = install(
        root, "--device-id", "pi-1", "--state-dir", "/srv/edge fleet", "--config", "/opt/ef/a.toml"
    )
    assert done.returncode == 0, done.stderr
    unit = (root / UNIT).read_text()
    assert 'ReadWritePaths="/srv/edge fleet"' in unit
    assert "--config /opt/ef/a.toml" in unit
    assert (root / "srv/edge fleet").is_dir()
    assert tomllib.loads((root / "opt/ef/a.toml").read_text())["state_dir"] == "/srv/edge fleet"
    verify(root / UNIT)


def test_the_skeleton_is_a_valid_configuration_once_the_hub_keys_are_there(
    tmp_path: Path,
) -> None:
    plan = plan_install(
        config_path=tmp_path / "agent.toml",
        state_dir=tmp_path / "state",
        device_id="pi-0042",
        executable=sys.executable,
    )
    (tmp_path / "agent.toml").write_text(plan.config)
    missing = cli("config", "check", "--config", str(tmp_path / "agent.toml"))
    assert missing.returncode == 1 and "hub_public_keys_file" in missing.stderr
    Keyring.create(tmp_path / "keys", tmp_path / "hub-keys.json")
    checked = cli("config", "check", "--config", str(tmp_path / "agent.toml"))
    assert checked.returncode == 0, checked.stderr
    assert 'device_id = "pi-0042"' in checked.stdout


def test_refuses_bad_values(tmp_path: Path) -> None:
    bad_id = install(tmp_path, "--device-id=-nope")
    assert bad_id.returncode == 1 and "--device-id" in bad_id.stderr
    bad_url = install(tmp_path, "--device-id", "ok", "--broker-url", "http://broker")
    assert bad_url.returncode == 1 and "--broker-url" in bad_url.stderr
    relative = install(tmp_path, "--device-id", "ok", "--config", "agent.toml")
    assert relative.returncode == 1 and "absolute" in relative.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_home_directory_executable_is_warned_about() -> None:
    plan = plan_install(device_id="pi", executable="/home/pi/.venv/bin/edgefleet-agent")
    assert any("ProtectHome" in w for w in plan.warnings)
    assert "ReadWritePaths" in render_unit(
        plan.executable, plan.config_path, plan.state_dir.parent / "elsewhere"
    )
