"""The hub as operators run it: ``edgefleet-hub init`` a directory, then ``edgefleet-hub
serve`` (or ``ingest-worker``) in a child process that says READY=1 on its own notify
socket. Used by the hub and rollout end-to-end tests and bench/bench_rollout.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from hub.broker import MosquittoBroker, free_port
from hub.config import HubConfig, load_config
from support.agent_process import Notifications, child_env

HUB_CLI = [sys.executable, "-m", "hub.cli"]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def make_hub(
    tmp: Path,
    broker: MosquittoBroker,
    *,
    hub_id: str = "hub-test",
    artifact_token: str | None = None,
    artifact_base_urls: Sequence[str] = (),
    serve_artifacts: bool = True,
) -> HubConfig:
    """``edgefleet-hub init tmp/hub`` for this broker on free ports; optionally a token for
    the artifacts, external artifact base URLs, and no artifact server of the hub's own."""
    directory = tmp / "hub"
    done = subprocess.run(
        [
            *HUB_CLI,
            "init",
            str(directory),
            "--hub-id",
            hub_id,
            "--broker-url",
            broker.url,
            "--api-bind",
            f"127.0.0.1:{free_port()}",
            "--artifacts-bind",
            f"127.0.0.1:{free_port()}",
        ],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    path = directory / "hub.toml"
    text = path.read_text()
    if artifact_token is not None:
        (directory / "artifacts-token").write_text(artifact_token + "\n")
        text = text.replace('# token_file = "artifacts-token"', 'token_file = "artifacts-token"')
    if artifact_base_urls:
        urls = ", ".join(json.dumps(u) for u in artifact_base_urls)
        text = text.replace("base_urls = []", f"base_urls = [{urls}]")
    if not serve_artifacts:
        text = text.replace("serve = true", "serve = false")
    path.write_text(text)
    return load_config(path)


class HubProcess:
    """``edgefleet-hub serve`` (or another ``command``) in a child process, READY=1 on its
    own notify socket; its output in ``workdir/<name>.log``."""

    def __init__(
        self,
        config_path: Path,
        workdir: Path,
        name: str = "hub",
        command: Sequence[str] = ("serve",),
    ) -> None:
        self.notify = Notifications(workdir, f"{name}-notify")
        self.log_path = workdir / f"{name}.log"
        self._log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                [*HUB_CLI, *command, "--config", str(config_path)],
                env=child_env({"NOTIFY_SOCKET": str(self.notify.path)}),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
            )
        except BaseException:
            self._log.close()
            self.notify.close()
            raise

    def describe(self, lines: int = 40) -> str:
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"hub pid {self.proc.pid} (exit {self.proc.poll()}); log:\n" + "\n".join(tail)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while "READY=1" not in "\n".join(self.notify.poll(0.2)).split("\n"):
            assert self.proc.poll() is None, f"the hub exited: {self.describe()}"
            assert time.monotonic() < deadline, f"the hub was not ready: {self.describe()}"

    def skipped_ticks(self) -> int:
        """Rollout ticks APScheduler skipped so far because the previous one still ran."""
        text = self.log_path.read_text(errors="replace")
        return sum(
            1
            for line in text.splitlines()
            if "_tick_rollouts" in line and "maximum number of running instances" in line
        )

    def cpu_s(self) -> float:
        """User + system CPU seconds of the hub process so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def kill(self) -> None:
        """SIGKILL (no clean stop at all) and reap; release the log and the socket."""
        try:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)
        finally:
            self._close()

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait for the exit status (the log and socket stay open)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """SIGTERM and wait (SIGKILL after 20 s); release the log and the socket."""
        try:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(20)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        finally:
            self._close()

    def _close(self) -> None:
        if not self._log.closed:
            self._log.close()
            self.notify.close()


@contextmanager
def hub_process(
    config_path: Path, workdir: Path, command: Sequence[str] = ("serve",)
) -> Iterator[HubProcess]:
    process = HubProcess(config_path, workdir, "-".join(["hub", *command[:1]]), command)
    try:
        yield process
    finally:
        process.kill()
