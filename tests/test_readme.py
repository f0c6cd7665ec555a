"""Every command in README.md runs: the fenced blocks whose info string is ``sh runnable``
are executed in order, as one bash script (``set -euo pipefail``), in an empty directory,
with this virtualenv's ``bin`` first on PATH — as a reader with the virtualenv activated
would type them. The other shell blocks are listed here with the test that covers them,
so a new command cannot slip into the README untested."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from support.agent_process import child_env

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
NOT_RUN_HERE = {
    # the install one-liner: tests/test_packaging.py builds the wheel, installs it with
    # [demo] into a new virtualenv and runs `edgefleet-hub demo --quick` from there
    "python3 -m venv .venv && .venv/bin/pip install '.[demo]' && .venv/bin/edgefleet-hub demo",
    # the test suite itself
    "bash tests/run.sh",
}
TOUR_PORTS = (8883, 8884, 8600, 8601, 8501)
TIMEOUT_S = 600


def blocks() -> list[tuple[str, str]]:
    """(info string, body) of every fenced block of the README."""
    return [(m.group(1).strip(), m.group(2)) for m in FENCE.finditer(README.read_text())]


def runnable() -> list[str]:
    return [body for info, body in blocks() if info.split() == ["sh", "runnable"]]


def test_every_shell_block_is_run_or_accounted_for() -> None:
    shell = [(info, body.strip()) for info, body in blocks() if info.split()[:1] == ["sh"]]
    assert len(runnable()) >= 8
    others = {body for info, body in shell if info.split() != ["sh", "runnable"]}
    assert others == NOT_RUN_HERE


def port_taken(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def processes_in(directory: Path) -> list[str]:
    """Processes started from ``directory`` or naming it on their command line."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd", "status"]):
        info = proc.info
        if info["status"] == psutil.STATUS_ZOMBIE:
            continue
        inside = (info["cwd"] or "").startswith(str(directory)) or any(
            str(directory) in arg for arg in info["cmdline"] or []
        )
        if inside:
            found.append(f"{info['pid']}: {' '.join(info['cmdline'] or [])}")
    return found


def interesting(log: Path) -> list[str]:
    noise = ("apscheduler", "Quantization parameters")
    lines = log.read_text(errors="replace").splitlines()
    return [line for line in lines if not any(n in line for n in noise)]


@pytest.mark.timeout(TIMEOUT_S + 60)
def test_readme_commands_run(tmp_path: Path) -> None:
    missing = [b for b in ("mosquitto", "mosquitto_sub") if shutil.which(b) is None]
    if missing and not Path("/usr/sbin/mosquitto").exists():
        pytest.skip(f"the tour needs {missing} (apt-get install mosquitto mosquitto-clients)")
    taken = [p for p in TOUR_PORTS if port_taken(p)]
    if taken:
        pytest.skip(f"the tour uses fixed ports and {taken} are taken on this machine")
    work = tmp_path / "reader"
    work.mkdir()
    script = tmp_path / "readme.sh"
    script.write_text(
        "set -euo pipefail\n"
        # whatever happens, nothing started in the background outlives the script
        "trap 'rc=$?; set +e; pids=$(jobs -p); [ -z \"$pids\" ] || kill $pids; wait; exit $rc'"
        " EXIT\n" + "\n".join(runnable())
    )
    env = child_env()
    env.pop("PYTHONPATH", None)
    env["PATH"] = os.pathsep.join(
        [str(Path(sys.executable).parent), "/usr/sbin", env.get("PATH", "")]
    )
    try:
        done = subprocess.run(
            ["bash", str(script)],
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )
    finally:
        left = processes_in(work)
        for line in left:
            os.kill(int(line.split(":", 1)[0]), 9)
    logs = "\n".join(
        f"--- {p.name}:\n" + "\n".join(interesting(p)[-30:])
        for p in sorted((work / "tour").glob("*.log"))
    )
    assert done.returncode == 0, f"{done.stdout[-6000:]}\n{done.stderr[-4000:]}\n{logs}"
    assert not left, left

    out = done.stdout
    assert "rollout ocr-2.0.0 -> ocr 2.0.0: succeeded" in out  # the demo
    assert "edgefleet/v1/dev/pi-0042/up/telemetry" in out  # mosquitto_sub saw telemetry
    assert "ExecStart=" in out  # install-service --print
    assert "Traceback" not in done.stderr
