"""sd_notify against real unix datagram sockets, and the systemd unit file."""

from __future__ import annotations

import configparser
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import sdnotify

UNIT = Path(__file__).resolve().parent.parent / "agent" / sdnotify.UNIT_NAME


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    """A datagram socket bound to a path, and the environment that points at it."""
    path = tmp_path / "notify.sock"
    if len(str(path)) > 100:  # sun_path holds 108 bytes
        path = Path(tempfile.mkdtemp(prefix="sdn")) / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        yield sock, {"NOTIFY_SOCKET": str(path)}


def received(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_messages_arrive_on_a_path_socket(
    listener: tuple[socket.socket, dict[str, str]],
) -> None:
    sock, env = listener
    assert sdnotify.ready("serving 3 models", environ=env)
    assert received(sock) == "READY=1\nSTATUS=serving 3 models"
    assert sdnotify.watchdog(environ=env)
    assert received(sock) == "WATCHDOG=1"
    assert sdnotify.status("applying generation 7\nstep 2", environ=env)
    assert received(sock) == "STATUS=applying generation 7 step 2"
    assert sdnotify.stopping("draining", environ=env)
    assert received(sock) == "STOPPING=1\nSTATUS=draining"
    assert sdnotify.ready(environ=env)
    assert received(sock) == "READY=1"


def test_messages_arrive_on_an_abstract_socket() -> None:
    name = f"edgefleet-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert sdnotify.notify("READY=1", "STATUS=up", environ={"NOTIFY_SOCKET": "@" + name})
        assert received(sock) == "READY=1\nSTATUS=up"


def test_reads_the_process_environment(
    listener: tuple[socket.socket, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, env = listener
    monkeypatch.setenv("NOTIFY_SOCKET", env["NOTIFY_SOCKET"])
    assert sdnotify.watchdog()
    assert received(sock) == "WATCHDOG=1"


def test_no_socket_is_a_quiet_no_op(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert sdnotify.ready(environ={}) is False
    assert sdnotify.notify(environ={"NOTIFY_SOCKET": "/x"}) is False  # nothing to say
    assert not caplog.records
    # A socket that is gone is logged, never raised.
    assert sdnotify.watchdog(environ={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}) is False
    assert "sd_notify" in caplog.text
    assert sdnotify.ready(environ={"NOTIFY_SOCKET": "relative.sock"}) is False


def test_a_socket_nobody_reads_fails_the_send_instead_of_blocking(
    listener: tuple[socket.socket, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    """A full receive queue (nobody reads: a stuck or absent supervisor) must not stop the
    caller for good: the agent's worker thread sends STATUS= while it holds the applier's
    lock. The send gives up after NOTIFY_TIMEOUT_S, logged, like any failed send."""
    _, env = listener  # bound, never read
    results: list[bool] = []

    def fill() -> None:
        # max_dgram_qlen (10 by default) datagrams fit; more would wait for a reader.
        for n in range(64):
            results.append(sdnotify.status(f"status {n}", environ=env))
            if not results[-1]:
                return

    sender = threading.Thread(target=fill, name="sdnotify-fill")
    sender.start()
    sender.join(60)  # a bound for a hang, not a timing assertion
    assert not sender.is_alive(), "sd_notify blocked on a socket nobody reads"
    assert results[0] is True and results[-1] is False, results
    assert "sd_notify" in caplog.text


def test_watchdog_interval() -> None:
    pid = str(os.getpid())
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}) == 15.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert sdnotify.watchdog_interval({}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


# --------------------------------------------------------------------------- the unit


def parse_unit(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return parser


def test_unit_has_the_required_settings() -> None:
    unit = parse_unit(UNIT.read_text())
    service = unit["Service"]
    expected = {
        "Type": "notify",
        "ExecStart": "/usr/local/bin/edgefleet-agent run --config /etc/edgefleet/agent.toml",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "RestartSec": "5",
        "StateDirectory": "edgefleet",
        "ConfigurationDirectory": "edgefleet",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
    }
    assert {key: service.get(key) for key in expected} == expected
    assert int(service["TimeoutStopSec"]) >= 30
    # What would hide the facts the agent reports, its accelerators or its network.
    for forbidden in ("PrivateDevices", "ProcSubset", "PrivateNetwork", "IPAddressDeny"):
        assert forbidden not in service
    assert "AF_INET" in service["RestrictAddressFamilies"].split()
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_unit_text_rewrites_exec_start() -> None:
    text = sdnotify.unit_text("/opt/edge fleet/bin/edgefleet-agent", "/etc/edgefleet/a%b.toml")
    service = parse_unit(text)["Service"]
    assert service["ExecStart"] == (
        '"/opt/edge fleet/bin/edgefleet-agent" run --config /etc/edgefleet/a%%b.toml'
    )
    assert service["Type"] == "notify"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    binary = shutil.which("systemd-analyze")
    if binary is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    config = tmp_path / "agent.toml"
    config.write_text("")
    unit = tmp_path / sdnotify.UNIT_NAME
    # As install-service does: point ExecStart= at an executable that exists here.
    unit.write_text(sdnotify.unit_text(sys.executable, config))
    result = subprocess.run(
        [binary, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    ours = [
        line for line in (result.stdout + result.stderr).splitlines() if sdnotify.UNIT_NAME in line
    ]
    assert result.returncode == 0, result.stderr
    assert ours == [], "\n".join(ours)
