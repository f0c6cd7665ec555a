"""systemd integration: sd_notify without a dependency, and the unit file.

sd_notify is one datagram to ``$NOTIFY_SOCKET``. The agent runs as ``Type=notify`` with
``WatchdogSec=``: it says ``READY=1`` once it serves, ``WATCHDOG=1`` at half the watchdog
period, ``STATUS=...`` when its state changes and ``STOPPING=1`` when it begins to drain.
Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op. A failed send is logged,
never raised: the daemon goes on. So is a send that found no room in the receiver's queue
for ``NOTIFY_TIMEOUT_S`` (a supervisor that does not read).
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)

UNIT_NAME = "edgefleet-agent.service"
NOTIFY_TIMEOUT_S = 2.0
"""How long one send may wait for room in the receiver's queue (a supervisor that does not
read): then it fails, logged, instead of stopping the caller for good."""


def _address(environ: Mapping[str, str]) -> str | None:
    """The socket address: a path, or an abstract name (``@name`` -> ``\\0name``)."""
    value = environ.get("NOTIFY_SOCKET", "")
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    if value:
        log.warning("NOTIFY_SOCKET=%r is neither an absolute path nor @abstract; ignored", value)
    return None


def notify(*assignments: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``assignments`` (``"READY=1"``, ``"STATUS=..."``) as one datagram.

    Returns True when sent, False when there is no socket to send to or sending failed.
    """
    address = _address(os.environ if environ is None else environ)
    if address is None or not assignments:
        return False
    message = "\n".join(assignments).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(NOTIFY_TIMEOUT_S)
            sock.connect(address)
            sock.sendall(message)
    except OSError as exc:
        log.warning("sd_notify to %r failed: %s", address.replace("\0", "@"), exc)
        return False
    return True


def _status(text: str) -> str:
    return "STATUS=" + " ".join(text.splitlines())


def ready(status: str | None = None, *, environ: Mapping[str, str] | None = None) -> bool:
    """Tell systemd that start-up is complete (``READY=1``), with an optional status."""
    parts = ["READY=1"] + ([_status(status)] if status else [])
    return notify(*parts, environ=environ)


def status(text: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Set the one-line status ``systemctl status`` shows."""
    return notify(_status(text), environ=environ)


def watchdog(*, environ: Mapping[str, str] | None = None) -> bool:
    """Keep the watchdog from firing (``WATCHDOG=1``)."""
    return notify("WATCHDOG=1", environ=environ)


def stopping(status: str | None = None, *, environ: Mapping[str, str] | None = None) -> bool:
    """Tell systemd that shutdown has begun (``STOPPING=1``)."""
    parts = ["STOPPING=1"] + ([_status(status)] if status else [])
    return notify(*parts, environ=environ)


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or None.

    None when no watchdog is set, or ``$WATCHDOG_PID`` names another process.
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid is not None and pid != "" and pid != str(os.getpid()):
        return None
    return usec / 2_000_000


def unit_text(executable: str | Path, config_path: str | Path) -> str:
    """The packaged unit file, its ExecStart= running ``executable`` with ``config_path``.

    What ``edgefleet-agent install-service`` writes to /etc/systemd/system/.
    """
    template = (resources.files("agent") / UNIT_NAME).read_text(encoding="utf-8")
    line = f"ExecStart={_quote(executable)} run --config {_quote(config_path)}"
    return re.sub(r"^ExecStart=.*$", lambda _: line, template, count=1, flags=re.MULTILINE)


def _quote(word: str | Path) -> str:
    """One word of a systemd command line (``%`` escaped, quoted when it needs it)."""
    text = str(word).replace("%", "%%")
    if re.search(r"[\s\"'\\;]", text) or not text:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text
