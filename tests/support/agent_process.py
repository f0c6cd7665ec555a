"""A real agent daemon in a child process: ``python -m agent.cli run --config FILE``.

    with agent_process(config_path, tmp_path, env={"EDGEFLEET_FAULT": "load"}) as agent:
        agent.wait_ready()                 # READY=1 on the agent's own $NOTIFY_SOCKET
        ...
        assert agent.terminate() == 0      # SIGTERM, wait for the exit
        # or: assert agent.wait_exit() == -signal.SIGKILL

Every child gets a private sd_notify socket (a real unix datagram socket) so that a test
can wait for READY=1 instead of sleeping, and read what the agent told "systemd". Output
goes to a log file, quoted in every assertion about the process. The context manager kills
and reaps the child whatever happens in the test.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CLI = [sys.executable, "-m", "agent.cli"]
_SUN_PATH_MAX = 100  # sun_path holds 108 bytes; keep a margin


def cli(*args: str, env: Mapping[str, str] | None = None, timeout: float = 30.0) -> Any:
    """Run ``edgefleet-agent ARGS`` to completion; the CompletedProcess (text output)."""
    return subprocess.run(
        [*CLI, *args],
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without anything that would steer the agent, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("EDGEFLEET_", "NOTIFY_SOCKET", "WATCHDOG_"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class Notifications:
    """A bound unix datagram socket standing in for systemd's ``$NOTIFY_SOCKET``."""

    def __init__(self, directory: Path, name: str = "notify") -> None:
        path = directory / f"{name}.sock"
        self._tmpdir: str | None = None
        if len(str(path)) > _SUN_PATH_MAX:
            self._tmpdir = tempfile.mkdtemp(prefix="efn")
            path = Path(self._tmpdir) / f"{name}.sock"
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self.received: list[str] = []
        """Every datagram so far, decoded, in arrival order."""

    def close(self) -> None:
        self._sock.close()
        self.path.unlink(missing_ok=True)
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def poll(self, timeout: float = 0.0) -> list[str]:
        """Read what arrived (waiting up to ``timeout`` for the first one); all so far."""
        self._sock.settimeout(timeout if timeout > 0 else 0.0)  # 0.0: non-blocking
        while True:
            try:
                data = self._sock.recv(65536)
            except (BlockingIOError, TimeoutError):
                break
            self.received.append(data.decode("utf-8"))
            self._sock.settimeout(0.0)
        return list(self.received)

    def assignments(self) -> list[str]:
        """Every ``KEY=value`` line of every datagram so far, in order."""
        self.poll()
        return [line for datagram in self.received for line in datagram.split("\n") if line]


class AgentProcess:
    """One ``agent.cli run`` child. Use ``agent_process`` to start one."""

    def __init__(
        self,
        config: Path,
        workdir: Path,
        *,
        env: Mapping[str, str] | None = None,
        watchdog_usec: int | None = None,
        watchdog_pid_self: bool = False,
        name: str = "agent",
    ) -> None:
        self.config = config
        self.notify = Notifications(workdir, name)
        self.log_path = workdir / f"{name}.log"
        extra = {"NOTIFY_SOCKET": str(self.notify.path), **(env or {})}
        if watchdog_usec is not None:
            extra["WATCHDOG_USEC"] = str(watchdog_usec)
        argv = [*CLI, "run", "--config", str(config)]
        if watchdog_pid_self:
            # As systemd does: WATCHDOG_PID is the main process's own pid ($$ survives exec).
            argv = ["/bin/sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh", *argv]
        self._log = self.log_path.open("ab")
        try:
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                argv,
                env=child_env(extra),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
            )
        except BaseException:
            self._log.close()
            self.notify.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        kept = [line for line in text.splitlines() if " apscheduler." not in line]
        return "\n".join(kept[-lines:])

    def describe(self) -> str:
        return f"agent pid {self.pid} (exit {self.returncode}); log tail:\n{self.log_tail()}"

    def wait_notified(
        self, predicate: Callable[[list[str]], bool], timeout: float, what: str
    ) -> None:
        """Wait until ``predicate(assignments so far)`` holds; fail if the agent exits first."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate(self.notify.assignments()):
                return
            if self.returncode is not None:
                self.notify.poll()
                if predicate(self.notify.assignments()):
                    return
                raise AssertionError(f"the agent exited before {what}: {self.describe()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}: {self.describe()}")
            self.notify.poll(min(left, 0.2))

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait for ``READY=1`` (sent once ``Agent.start`` returned)."""
        self.wait_notified(lambda lines: "READY=1" in lines, timeout, "READY=1")

    def wait_exit(self, timeout: float = 30.0) -> int:
        """The exit status once the process ended by itself (negative: killed by a signal)."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the agent did not exit within {timeout}s: {self.describe()}"
            ) from None

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (as systemd stops it) and wait for the exit."""
        if self.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        """SIGKILL and reap, if still running; release the log and the socket."""
        try:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)
        finally:
            self._log.close()
            self.notify.close()


@contextmanager
def agent_process(
    config: Path,
    workdir: Path,
    *,
    env: Mapping[str, str] | None = None,
    watchdog_usec: int | None = None,
    watchdog_pid_self: bool = False,
    name: str = "agent",
) -> Iterator[AgentProcess]:
    """Start the agent daemon; on leaving, kill it if it still runs and reap it."""
    process = AgentProcess(
        config,
        workdir,
        env=env,
        watchdog_usec=watchdog_usec,
        watchdog_pid_self=watchdog_pid_self,
        name=name,
    )
    try:
        yield process
    finally:
        process.kill()
