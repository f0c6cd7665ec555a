"""``edgefleet-agent install-service``: make this machine run the agent under systemd.

It writes, under ``--root`` (``/`` by default, a directory for packaging or tests):

- ``/etc/systemd/system/edgefleet-agent.service``: the packaged unit
  (``agent/edgefleet-agent.service``) with ``ExecStart=`` running this installation's
  ``edgefleet-agent`` with ``--config``; when the state directory is not the unit's
  ``StateDirectory=`` (``/var/lib/edgefleet``), a ``ReadWritePaths=`` line so that
  ``ProtectSystem=strict`` still lets the agent write it;
- the configuration (``/etc/edgefleet/agent.toml`` by default), **only when there is none**:
  a skeleton with this machine's device id, the broker URL and the state directory, for the
  operator to complete (an enrolled device already has its bundle's file: it is kept);
- the state directory, mode 0750, owned by the user the unit runs as (root, the unit has no
  ``User=``) when run as root.

``--print`` writes nothing and prints the unit and the configuration skeleton. Then, on a
machine that runs systemd, ``systemctl daemon-reload``; the operator enables the service
(``systemctl enable --now edgefleet-agent``) once the configuration is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from agent.config import DEFAULT_CONFIG_PATH, DEFAULT_STATE_DIR
from agent.errors import AgentError
from agent.sdnotify import UNIT_NAME, unit_text
from contract.topics import device_id_problem

UNIT_DIR = PurePosixPath("/etc/systemd/system")
UNIT_STATE_DIR = PurePosixPath("/var/lib/edgefleet")
"""What the unit's ``StateDirectory=edgefleet`` makes writable."""
DEFAULT_BROKER_URL = "mqtt://localhost:1883"
STATE_DIR_MODE = 0o750
HIDDEN_BY_PROTECT_HOME = ("/home", "/root", "/run/user")


class InstallError(AgentError):
    """The service cannot be installed as asked (names what and where)."""


@dataclass(frozen=True)
class InstallPlan:
    """What ``install-service`` writes; paths as they are on the target system."""

    executable: PurePosixPath
    config_path: PurePosixPath
    state_dir: PurePosixPath
    device_id: str
    broker_url: str
    unit: str
    config: str
    warnings: list[str] = field(default_factory=list)

    @property
    def unit_path(self) -> PurePosixPath:
        return UNIT_DIR / UNIT_NAME


@dataclass(frozen=True)
class InstallResult:
    """What was written (paths under the root) and what was kept."""

    unit_path: Path
    config_path: Path
    config_written: bool
    state_dir: Path
    reloaded: bool | None
    """True after ``systemctl daemon-reload``; None when not tried (another root, no systemd)."""


def default_device_id() -> str:
    """This machine's short host name, when it is a valid device id."""
    name = socket.gethostname().split(".")[0]
    if device_id_problem(name) is not None:
        raise InstallError(
            f"the host name {name!r} is not a valid device id; give --device-id "
            "(1 to 64 of A-Z a-z 0-9 . _ : -, starting with a letter or digit)"
        )
    return name


def find_executable() -> PurePosixPath:
    """This installation's ``edgefleet-agent``: beside the running Python (a venv or a pip
    install into /usr/local), else on PATH."""
    beside = Path(sys.executable).parent / "edgefleet-agent"
    if beside.is_file() and os.access(beside, os.X_OK):
        return PurePosixPath(os.path.abspath(beside))
    found = shutil.which("edgefleet-agent")
    if found is None:
        raise InstallError("cannot find the edgefleet-agent executable; give --executable PATH")
    return PurePosixPath(os.path.abspath(found))


def plan_install(
    *,
    config_path: str | Path | None = None,
    state_dir: str | Path | None = None,
    device_id: str | None = None,
    broker_url: str | None = None,
    executable: str | Path | None = None,
) -> InstallPlan:
    """The unit and configuration skeleton for this machine; InstallError on a bad value."""
    config = _absolute("--config", config_path or DEFAULT_CONFIG_PATH)
    state = _absolute("--state-dir", state_dir or DEFAULT_STATE_DIR)
    exe = _absolute("--executable", executable) if executable else find_executable()
    device = device_id or default_device_id()
    problem = device_id_problem(device)
    if problem is not None:
        raise InstallError(f"--device-id {device!r}: {problem}")
    url = broker_url or DEFAULT_BROKER_URL
    if not re.match(r"^mqtts?://[^/\s:]+(:\d+)?/?$", url):
        raise InstallError(f"--broker-url: expected mqtt://host[:port] or mqtts://..., got {url!r}")
    warnings = []
    if any(str(exe).startswith(p + "/") for p in HIDDEN_BY_PROTECT_HOME):
        warnings.append(
            f"{exe} is under a home directory, which the unit's ProtectHome=yes hides from "
            "the service: install edgefleet into /opt or /usr/local, or relax it in a drop-in"
        )
    return InstallPlan(
        executable=exe,
        config_path=config,
        state_dir=state,
        device_id=device,
        broker_url=url,
        unit=render_unit(exe, config, state),
        config=render_config(device_id=device, broker_url=url, state_dir=state),
        warnings=warnings,
    )


def _absolute(option: str, value: str | Path) -> PurePosixPath:
    path = PurePosixPath(str(value))
    if not path.is_absolute():
        raise InstallError(f"{option}: expected an absolute path, got {str(value)!r}")
    if any(c in str(path) for c in "\n\r\t"):
        raise InstallError(f"{option}: the path has a control character: {str(value)!r}")
    return path


def render_unit(executable: PurePosixPath, config: PurePosixPath, state: PurePosixPath) -> str:
    """The packaged unit for ``executable`` and ``config``; ``state`` made writable when it
    is not the unit's own state directory."""
    text = unit_text(str(executable), str(config))
    if state != UNIT_STATE_DIR and not _under(state, UNIT_STATE_DIR):
        line = f"ReadWritePaths={_unit_path(state)}"
        text = re.sub(
            r"^(StateDirectoryMode=.*)$",
            lambda m: f"{m.group(1)}\n# --state-dir {state}\n{line}",
            text,
            count=1,
            flags=re.MULTILINE,
        )
    return text


def _under(path: PurePosixPath, parent: PurePosixPath) -> bool:
    return parent in path.parents


def _unit_path(path: PurePosixPath) -> str:
    text = str(path).replace("%", "%%")
    return f'"{text}"' if re.search(r"\s", text) else text


def render_config(*, device_id: str, broker_url: str, state_dir: PurePosixPath) -> str:
    """The configuration skeleton: valid TOML, complete once the hub's keys are beside it."""

    def s(value: str) -> str:
        return json.dumps(value)

    return f"""# edgefleet agent configuration, written by `edgefleet-agent install-service`.
# Every key: docs/configuration.md. Relative paths are relative to this file's directory.
# Check it with: edgefleet-agent config check --config <this file>
device_id = {s(device_id)}                # also the MQTT client id (and TLS CN)
state_dir = {s(str(state_dir))}
# profile = "raspberry-pi-4-4gb"          # force a firmware profile (default: detected)
log_level = "info"

[broker]
url = {s(broker_url)}
# With the device's TLS certificate (docs/enrollment.md):
# url = "mqtts://mqtt.example.com:8883"
# ca_file = "ca.crt"
# cert_file = "device.crt"
# key_file = "device.key"

[trust]
# The hub's public signing keys: copy the hub's hub-keys.json here. Without them no
# desired state is accepted (and `config check` says the file does not exist).
hub_public_keys_file = "hub-keys.json"

[labels]
# site = "plant-3"

[api]
bind = "127.0.0.1:8501"                   # the local inference API
"""


def install(
    plan: InstallPlan, *, root: Path = Path("/"), reload: bool | None = None
) -> InstallResult:
    """Write the unit, the configuration (when there is none) and the state directory
    under ``root``; ``systemctl daemon-reload`` when ``root`` is ``/`` and systemd runs
    (``reload`` forces it on or off)."""
    unit_path = _at(root, plan.unit_path)
    config_path = _at(root, plan.config_path)
    state_dir = _at(root, plan.state_dir)
    try:
        unit_path.parent.mkdir(parents=True, exist_ok=True)
        _write(unit_path, plan.unit, 0o644)
        config_written = False
        if not config_path.exists():
            config_path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            _write(config_path, plan.config, 0o640)
            config_written = True
        state_dir.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
        os.chmod(state_dir, STATE_DIR_MODE)
        if os.geteuid() == 0:
            os.chown(state_dir, 0, 0)  # the unit runs as root (no User=)
    except OSError as exc:
        where = exc.filename or root
        raise InstallError(f"{where}: {exc.strerror or exc}") from exc
    reloaded: bool | None = None
    systemd_runs = Path("/run/systemd/system").is_dir() and shutil.which("systemctl")
    if reload or (reload is None and root == Path("/") and systemd_runs):
        done = subprocess.run(
            ["systemctl", "daemon-reload"], capture_output=True, text=True, check=False
        )
        reloaded = done.returncode == 0
    return InstallResult(unit_path, config_path, config_written, state_dir, reloaded)


def _at(root: Path, path: PurePosixPath) -> Path:
    return root / str(path).lstrip("/")


def _write(path: Path, text: str, mode: int) -> None:
    """Write atomically: a temporary file beside it, then rename."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "w") as file:
        file.write(text)
    os.chmod(temporary, mode)
    os.replace(temporary, path)


def printed(plan: InstallPlan) -> str:
    """What ``--print`` shows: each file under a comment naming where it would go."""
    return (
        f"# {plan.unit_path}\n{plan.unit.rstrip()}\n\n"
        f"# {plan.config_path} (written only when it does not exist)\n{plan.config.rstrip()}\n"
    )


def report(plan: InstallPlan, result: InstallResult, root: Path) -> str:
    """What was done and what the operator does next."""
    lines = [f"wrote {result.unit_path}"]
    if result.config_written:
        lines.append(f"wrote {result.config_path} (a skeleton: complete it)")
    else:
        lines.append(f"kept {result.config_path} (it exists)")
    lines.append(f"state directory {result.state_dir} (mode 0750)")
    if result.reloaded is True:
        lines.append("systemctl daemon-reload: done")
    elif result.reloaded is False:
        lines.append("systemctl daemon-reload failed: run it yourself")
    lines += [f"warning: {w}" for w in plan.warnings]
    lines += ["", "next:"]
    if root != Path("/"):
        lines.append(f"  (files are under {root}; copy them to the device)")
    if result.config_written:
        lines.append(
            f"  put the hub's hub-keys.json beside {plan.config_path}, set broker.url and labels"
        )
    lines += [
        f"  edgefleet-agent config check --config {plan.config_path}",
        "  systemctl enable --now edgefleet-agent",
        "  journalctl -u edgefleet-agent -f",
    ]
    return "\n".join(lines)
