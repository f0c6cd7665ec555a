"""The wheel, installed as a user installs it: into fresh virtualenvs, from the package index
(the machine's pip configuration and cache), away from this checkout.

- ``edgefleet[agent]`` (a device) pulls none of the hub's dependencies, and its agent runs:
  ``profile detect`` with the packaged firmware profiles, ``install-service --print`` with
  the packaged unit;
- ``edgefleet[demo]`` runs ``edgefleet-hub demo --quick`` to the end: both daemons from the
  wheel, the OCR models from the index, rollouts included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
HUB_ONLY = {"fastapi", "uvicorn", "httpx", "rich", "onnx", "starlette"}
INSTALL_TIMEOUT_S = 900


def clean_env() -> dict[str, str]:
    """No PYTHONPATH, no virtualenv of the caller, nothing steering edgefleet."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
        and not k.startswith(("EDGEFLEET_", "NOTIFY_SOCKET", "WATCHDOG_"))
    }
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def run(argv: list[str | Path], cwd: Path, timeout: float = 300) -> str:
    done = subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"{argv}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip wheel .`` of this checkout (the build backend from the running environment
    when it has it, so nothing is fetched for the build)."""
    out = tmp_path_factory.mktemp("dist")
    isolation = []
    try:
        import hatchling  # noqa: F401

        isolation = ["--no-build-isolation"]
    except ImportError:
        pass
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", out, ROOT],
        cwd=out,
        timeout=600,
    )
    wheels = list(out.glob("edgefleet-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def new_venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    return path / "bin"


def installed(bin_dir: Path, cwd: Path) -> set[str]:
    listed = json.loads(run([bin_dir / "python", "-m", "pip", "list", "--format=json"], cwd))
    return {p["name"].lower().replace("_", "-") for p in listed}


@pytest.mark.timeout(900)
def test_the_wheel_carries_the_unit_and_the_profiles(wheel: Path) -> None:
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    assert "agent/edgefleet-agent.service" in names
    assert "agent/firmware_profiles/raspberry-pi-4-4gb.yaml" in names
    assert {"hub/demo.py", "hub/demo_load.py", "agent/install.py"} <= names
    assert not any(n.startswith("tests/") for n in names)


@pytest.mark.timeout(1200)
def test_agent_only_install_pulls_no_hub_dependency(wheel: Path, tmp_path: Path) -> None:
    bin_dir = new_venv(tmp_path / "venv")
    run([bin_dir / "pip", "install", f"{wheel}[agent]"], tmp_path, timeout=INSTALL_TIMEOUT_S)
    packages = installed(bin_dir, tmp_path)
    assert {"edgefleet", "onnxruntime", "paho-mqtt"} <= packages
    assert not packages & HUB_ONLY, sorted(packages & HUB_ONLY)

    where = run([bin_dir / "python", "-c", "import agent; print(agent.__file__)"], tmp_path)
    assert where.startswith(str(tmp_path / "venv")), where
    detected = run([bin_dir / "edgefleet-agent", "profile", "detect", "--json"], tmp_path)
    assert json.loads(detected)["profiles_dir"].startswith(str(tmp_path / "venv"))
    printed = run(
        [bin_dir / "edgefleet-agent", "install-service", "--print", "--device-id", "pi-1"],
        tmp_path,
    )
    assert f"ExecStart={bin_dir / 'edgefleet-agent'} run --config" in printed


@pytest.mark.timeout(1500)
def test_demo_runs_from_the_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    bin_dir = new_venv(tmp_path / "venv")
    run([bin_dir / "pip", "install", f"{wheel}[demo]"], tmp_path, timeout=INSTALL_TIMEOUT_S)
    where = run([bin_dir / "python", "-c", "import hub; print(hub.__file__)"], tmp_path)
    assert where.startswith(str(tmp_path / "venv")), where
    summary = tmp_path / "summary.json"
    output = run(
        [
            bin_dir / "edgefleet-hub",
            "demo",
            "--quick",
            "--no-live",
            "--workdir",
            tmp_path / "demo",
            "--summary-json",
            summary,
        ],
        tmp_path,
        timeout=420,
    )
    data = json.loads(summary.read_text())
    assert data["ok"] and data["stopped_cleanly"], output[-4000:]
    assert [r["phase"] for r in data["rollouts"]] == ["succeeded", "failed"]
    assert all(d["phase"] == "committed" for d in data["devices"])
    # the daemons were this venv's, not the checkout's
    hub_log = (tmp_path / "demo" / "logs" / "hub.log").read_text()
    assert "Traceback" not in hub_log
