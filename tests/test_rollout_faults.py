"""Fault injection across a whole rollout, with real processes only: a hub process
(``edgefleet-hub serve``), three agent processes, a private mosquitto with persistence, and
an HTTP artifact server (tests/support/http_server.py) behind a TCP proxy that can drop
the link (tests/support/flaky_proxy.py), all on 127.0.0.1.

One fleet serves the module. The model set holds two models (``cls`` and ``orient``, both
the cls OCR graph with bytes of their own per version), so "the whole set" means
something; every test publishes a new version, starts a rollout to it (canary 1, batches
50 and 100 %), injects one fault, and checks:

- every device ends on the old or the new version of the whole set, as it reports it to
  the hub and as its inference API serves it (index and one inference per model);
- the rollout ends as docs/rollouts.md says: ``succeeded`` when the fault heals, ``failed``
  (its devices unpinned back to the baseline) when a device cannot apply;
- for the broker and the link faults, no telemetry was lost (see ``assert_no_telemetry_lost``).

The hub killed mid-rollout is tests/test_rollout_e2e.py::test_the_hub_killed_mid_rollout_resumes_it.
"""

from __future__ import annotations

import functools
import itertools
import json
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest

from agent.faults import FAULT_ENV, POINTS
from hub.api_models import TelemetryItem
from hub.broker import MosquittoBroker
from support.agent_process import cli
from support.flaky_proxy import FlakyProxy
from support.fleet import mqtt_tap
from support.http_server import ArtifactServer, Fault
from support.rollout_fleet import (
    ARTIFACT_TOKEN,
    CLS_SHAPE,
    Fleet,
    kinds,
    policy_yaml,
    rollout_yaml,
    served_versions,
    tagged_model,
)

pytestmark = pytest.mark.slow

DEVICES = ["fx-0", "fx-1", "fx-2"]
MODELS = ("cls", "orient")
DISK_DEVICE = "fx-1"
"""Its state directory is a tmpfs (when mounting one is permitted)."""
LINK_DEVICE = "fx-2"
"""It reaches the broker through a FlakyProxy."""
TMPFS_SIZE = 64 * 1024 * 1024
ARTIFACTS_TIMEOUT_S = 3.0
"""The agents' connect/read timeout for artifacts: a stalled body is given up on soon."""


def persistent_broker(workdir: Path) -> MosquittoBroker:
    """mosquitto with persistence on, saved after every change (retained messages and
    the hub's queued messages survive a SIGKILL)."""
    workdir.mkdir(parents=True, exist_ok=True)
    return MosquittoBroker(
        workdir=workdir,
        extra_config=[
            "persistence true",
            f"persistence_location {workdir}/",
            "autosave_interval 1",
            "autosave_on_changes true",
        ],
    )


def kill_broker(broker: MosquittoBroker) -> None:
    """SIGKILL mosquitto (MosquittoBroker.stop is a SIGTERM) and reap it; ``start`` brings
    it back on the same port."""
    process = broker._process
    assert process is not None and process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    broker.stop()  # already dead: only releases the pipe


def mount_tmpfs(path: Path, size: int) -> str | None:
    """Mount a tmpfs of ``size`` bytes on ``path``; None, or why it could not."""
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return "no mount binary"
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        return f"mount -t tmpfs -o size={size} failed: {done.stderr.strip() or done.returncode}"
    return None


def resize_tmpfs(path: Path, size: int) -> None:
    done = subprocess.run(
        ["mount", "-o", f"remount,size={size}", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr


@dataclass
class Faulty:
    fleet: Fleet
    broker: MosquittoBroker
    artifacts: ArtifactServer
    artifact_proxy: FlakyProxy
    mqtt_proxy: FlakyProxy
    state_dirs: dict[str, Path]
    tmpfs: Path | None
    tmpfs_problem: str | None
    counter: Iterator[int]

    def new_version(self, *, pad_bytes: int = 0) -> tuple[str, list[str]]:
        """Register and publish the next version (files of its own), serve its artifacts;
        returns the version and the artifacts' paths on the artifact server."""
        version = f"{next(self.counter)}.0.0"
        fleet = self.fleet
        files = {
            model: tagged_model(
                fleet.cls_path,
                fleet.tmp / f"{model}-{version}.onnx",
                f"{model} {version}",
                pad_bytes=pad_bytes,
            )
            for model in MODELS
        }
        paths = []
        for variants in fleet.publish(version, files, {"x": CLS_SHAPE}).values():
            for variant in variants:
                path = f"/artifacts/{variant.sha256}"
                stored = fleet.config.artifacts_dir / "sha256" / variant.sha256
                self.artifacts.add(path, stored, token=ARTIFACT_TOKEN)
                paths.append(path)
        return version, paths

    def outbox_telemetry(self, device_id: str, since: float) -> int:
        """Telemetry messages put into the agent's outbox after ``since`` and still waiting
        there (read-only, beside the running agent)."""
        uri = f"file:{self.state_dirs[device_id] / 'outbox.db'}?mode=ro"
        db = sqlite3.connect(uri, uri=True, timeout=5)
        try:
            row = db.execute(
                "SELECT count(*) FROM outbox WHERE topic LIKE '%/up/telemetry' AND created_at > ?",
                [since],
            ).fetchone()
        finally:
            db.close()
        return int(row[0])


@pytest.fixture(scope="module")
def faulty(
    tmp_path_factory: pytest.TempPathFactory, ocr_models: dict[str, Path]
) -> Iterator[Faulty]:
    tmp = tmp_path_factory.mktemp("faults")
    tmpfs = tmp / f"{DISK_DEVICE}-tmpfs"
    problem = mount_tmpfs(tmpfs, TMPFS_SIZE)
    try:
        with (
            persistent_broker(tmp / "broker") as broker,
            ArtifactServer() as artifacts,
            FlakyProxy(_address(artifacts.base_url), name="artifact-proxy") as artifact_proxy,
            FlakyProxy((broker.host, broker.port), name="mqtt-proxy") as mqtt_proxy,
        ):
            fleet = Fleet.create(
                tmp,
                broker,
                ocr_models["cls"],
                models=MODELS,
                artifact_base_urls=[f"http://127.0.0.1:{artifact_proxy.port}/artifacts"],
                serve_artifacts=False,
            )
            state_dirs = {d: tmp / d for d in DEVICES}
            if problem is None:
                state_dirs[DISK_DEVICE] = tmpfs
            faulty = Faulty(
                fleet,
                broker,
                artifacts,
                artifact_proxy,
                mqtt_proxy,
                state_dirs,
                tmpfs if problem is None else None,
                problem,
                itertools.count(1),
            )
            try:
                version, _ = faulty.new_version()
                fleet.client.apply_policy(policy_yaml(version), "policy.yaml")
                for device_id in DEVICES:
                    fleet.add_agent(
                        device_id,
                        broker_url=(
                            f"mqtt://127.0.0.1:{mqtt_proxy.port}"
                            if device_id == LINK_DEVICE
                            else None
                        ),
                        state_dir=state_dirs[device_id],
                        artifacts_timeout_s=ARTIFACTS_TIMEOUT_S,
                    )
                for agent in fleet.agents.values():
                    agent.wait_ready(90)
                fleet.wait_running(version, timeout=120)
                yield faulty
            finally:
                fleet.close()
    finally:
        if problem is None:
            subprocess.run(["umount", str(tmpfs)], timeout=30, check=False)


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def wait_for(
    predicate: Callable[[], object], what: str, fleet: Fleet, timeout: float = 60.0
) -> None:
    """Until ``predicate()`` holds; the agents' notifications are read meanwhile."""
    deadline = time.monotonic() + timeout
    while not predicate():
        fleet.drain_notifications()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{fleet.describe()}")
        time.sleep(0.2)


def telemetry(fleet: Fleet, device_id: str) -> list[TelemetryItem]:
    """What the hub stored of the device's telemetry (the newest 1,000), in seq order."""
    return sorted(fleet.client.telemetry(device_id, limit=1000).items, key=lambda i: i.seq)


def assert_no_telemetry_lost(fleet: Fleet, device_id: str, since: float) -> list[TelemetryItem]:
    """The telemetry the device generated from ``since`` on is all in the hub's store.

    Seqs number every message kind of a device together (state messages too, which the
    hub keeps only the newest of), so telemetry seqs alone have holes by design. Each
    telemetry message names its predecessor instead: ``ts - interval_s`` is the ``ts`` of
    the telemetry before it (the same agent process). So, in seq order, within each
    session and across sessions: seqs increase, sessions never go back, and every message
    links to the one before it; a lost message breaks the chain."""
    items = [i for i in telemetry(fleet, device_id) if i.ts >= since]
    assert len(items) >= 2, (device_id, items)
    for before, after in pairwise(items):
        assert after.seq > before.seq and after.session >= before.session, (before, after)
        link = after.ts - after.message.interval_s
        assert abs(link - before.ts) < 1e-3, (
            f"{device_id}: telemetry lost between seq {before.seq} (session {before.session},"
            f" ts {before.ts}) and seq {after.seq} (session {after.session}, ts {after.ts}:"
            f" follows ts {link})"
        )
    assert items[-1].message.link.dropped == items[0].message.link.dropped, "outbox dropped"
    return items


def wait_stored_after(fleet: Fleet, device_ids: list[str], ts: float) -> None:
    """Until the hub stored telemetry generated after ``ts`` from every device (the outbox
    drains in order, so everything before it arrived too)."""
    for device_id in device_ids:
        wait_for(
            functools.partial(lambda d: telemetry(fleet, d)[-1].ts > ts, device_id),
            f"telemetry of {device_id} after {ts}",
            fleet=fleet,
        )


# --- 1. the broker killed and restarted --------------------------------------------------------


def test_the_broker_killed_mid_rollout_and_restarted_loses_nothing(faulty: Faulty) -> None:
    fleet, broker = faulty.fleet, faulty.broker
    baseline = fleet.policy_version()
    fleet.wait_running(baseline)
    version, _ = faulty.new_version()
    name = f"broker-{version}"
    fleet.client.start_rollout(
        rollout_yaml(
            name,
            version,
            cohorts={"canary": {"count": 1, "bake_s": 4}, "batches": [50, 100], "bake_s": 0},
        ),
        f"{name}.yaml",
    )
    fleet.wait_rollout(name, until=("running",))
    wait_for(
        lambda: fleet.client.rollout(name).cohort_progress[0].status == "baking",
        "the canary baking",
        fleet=fleet,
    )
    desired = {d: fleet.client.device(d).desired for d in DEVICES}
    gaps = seq_gaps(fleet)
    killed_at = time.time()
    kill_broker(broker)
    # Telemetry goes on into each agent's outbox while the broker is away.
    for device_id in DEVICES:
        filled = functools.partial(lambda d: faulty.outbox_telemetry(d, killed_at) >= 2, device_id)
        wait_for(filled, f"{device_id}'s outbox", fleet)
    broker.start()
    restarted_at = time.time()
    # The retained desired documents survived the SIGKILL (persistence).
    with mqtt_tap(broker, "edgefleet/v1/dev/+/down/desired") as tap:
        tap.wait_for(
            lambda t: {r.topic.split("/")[3] for r in t.received if r.retain} >= set(DEVICES),
            timeout=30,
            what="the retained desired documents",
        )
        retained = {
            r.topic.split("/")[3]: json.loads(r.payload)["payload"]["generation"]
            for r in tap.received
            if r.retain
        }
    for device_id, document in desired.items():
        assert document is not None and retained[device_id] >= document.generation, retained
    detail = fleet.wait_rollout(name)
    assert detail.phase == "succeeded", detail.reason
    assert [c.status for c in detail.cohort_progress] == ["passed"] * 3
    fleet.assert_whole_set(version)
    assert fleet.policy_version() == version
    # The sessions begun after the restart: the hub's own seq tracking (every message
    # kind) found no seq missing for longer than its grace. The session cut by the kill,
    # replayed from the outboxes: the telemetry chain.
    wait_stored_after(fleet, DEVICES, restarted_at + GAP_GRACE_S + 2)
    assert seq_gaps(fleet) == gaps
    for device_id in DEVICES:
        items = assert_no_telemetry_lost(fleet, device_id, killed_at - 5)
        during = [i for i in items if killed_at < i.ts < restarted_at]
        assert during, f"{device_id}: nothing generated while the broker was down"
        assert {i.session for i in items} != {items[0].session}, "no new session after restart"


GAP_GRACE_S = 5.0
"""The hub's ``ingest.gap_grace_s`` (hub.toml as ``init`` writes it)."""


def seq_gaps(fleet: Fleet) -> float:
    """``edgefleet_hub_ingest_seq_gaps_total``: seqs the hub found missing so far."""
    for line in fleet.client.metrics().splitlines():
        if line.startswith("edgefleet_hub_ingest_seq_gaps_total "):
            return float(line.split()[1])
    raise AssertionError("the hub exports no edgefleet_hub_ingest_seq_gaps_total")


# --- 2. the hub killed: tests/test_rollout_e2e.py::test_the_hub_killed_mid_rollout_resumes_it --


# --- 3. an agent killed at each stage of its apply ---------------------------------------------


@pytest.mark.parametrize("stage", POINTS)
def test_an_agent_killed_at_an_apply_stage_comes_back_whole(faulty: Faulty, stage: str) -> None:
    fleet = faulty.fleet
    victim = DEVICES[POINTS.index(stage) % len(DEVICES)]
    baseline = fleet.policy_version()
    fleet.wait_running(baseline)
    old_generation = fleet.client.device(victim).applied_generation
    version, paths = faulty.new_version()
    requests_before = len(faulty.artifacts.requests)
    agent = fleet.start_agent(victim, env={FAULT_ENV: stage})
    agent.wait_ready(60)
    fleet.wait_online([victim])
    fleet.wait_running(baseline, [victim])
    name = f"{stage}-{version}"
    fleet.client.start_rollout(rollout_yaml(name, version), f"{name}.yaml")
    assert agent.wait_exit(120) == -signal.SIGKILL, agent.describe()
    # On disk: exactly the old generation, or (killed after the commit point) the new one.
    config = fleet.agent_configs[victim]
    status = cli("status", "--config", str(config), "--json")
    assert status.returncode == 0, status.stderr
    on_disk = json.loads(status.stdout)["applied_generation"]
    new_generation = fleet.client.device(victim).desired
    assert new_generation is not None
    expected = new_generation.generation if stage == "persist" else old_generation
    assert on_disk == expected, (stage, on_disk, old_generation, new_generation.generation)
    # Restarted without the fault, as systemd would: it serves one whole set, then the new.
    agent = fleet.start_agent(victim)
    agent.wait_ready(60)
    served = serving_one_version(fleet, victim)
    assert served in (baseline, version), served
    detail = fleet.wait_rollout(name)
    assert detail.phase == "succeeded", detail.reason
    fleet.assert_whole_set(version)
    new_requests = [r for r in faulty.artifacts.requests[requests_before:] if r.path in paths]
    resumed = [r for r in new_requests if "Range" in r.headers]
    if stage == "download":
        assert resumed, "the half-downloaded artifact was not resumed"
    if stage in ("switch", "persist"):
        assert not resumed, "a complete download was fetched again"
        assert len(new_requests) == len(paths) * len(DEVICES), new_requests


def serving_one_version(fleet: Fleet, device_id: str) -> str:
    """The one version every model of the device serves (asked twice when a switch fell
    between the questions)."""
    for _ in range(5):
        try:
            served = set(served_versions(fleet.api_ports[device_id], fleet.models).values())
        except AssertionError:  # answered by a session swapped in after the index
            time.sleep(0.2)
            continue
        assert len(served) == 1, f"{device_id} serves a mix: {served}"
        return served.pop()
    raise AssertionError(f"{device_id}: no consistent answer\n{fleet.describe(device_id)}")


# --- 5. the artifact server answering errors, or slowly ----------------------------------------

STALL_AFTER = 64 * 1024


@pytest.mark.parametrize("fault", ["http_errors", "slow_bodies"])
def test_artifact_server_faults_are_retried_and_the_rollout_completes(
    faulty: Faulty, fault: str
) -> None:
    fleet, artifacts = faulty.fleet, faulty.artifacts
    baseline = fleet.policy_version()
    fleet.wait_running(baseline)
    version, paths = faulty.new_version()
    for path in paths:
        if fault == "http_errors":
            # The next three requests of each artifact fail (the agents try four times).
            artifacts.push_faults(path, Fault(status=500), Fault(status=503), Fault(status=500))
        else:
            # Every body trickles; the first one stops for longer than the agents wait.
            stored = fleet.config.artifacts_dir / "sha256" / path.rsplit("/", 1)[1]
            slow = Fault(chunk_delay_s=0.02, chunk_size=16 * 1024)
            artifacts.add(path, stored, token=ARTIFACT_TOKEN, fault=slow)
            stall = Fault(stall_after=STALL_AFTER, stall_s=ARTIFACTS_TIMEOUT_S + 2)
            artifacts.push_faults(path, stall)
    name = f"{fault.replace('_', '-')}-{version}"
    fleet.client.start_rollout(rollout_yaml(name, version), f"{name}.yaml")
    detail = fleet.wait_rollout(name)
    assert detail.phase == "succeeded", detail.reason
    fleet.assert_whole_set(version)
    for path in paths:
        answered = artifacts.requests_for(path)
        served = [r for r in answered if r.status in (200, 206)]
        assert len(served) >= len(DEVICES), answered
        if fault == "http_errors":
            assert [r.status for r in answered[:3]] == [500, 503, 500], answered
        else:
            assert answered[0].bytes_sent >= STALL_AFTER, answered
            resumed = [r for r in answered if r.headers.get("Range") == f"bytes={STALL_AFTER}-"]
            assert resumed, answered


# --- 6. a link that drops every N bytes ----------------------------------------------------------

ARTIFACT_CUT = 128 * 1024
"""Bytes per connection to the artifact server: each artifact (~570 kB) takes five."""
MQTT_CUT = 16 * 1024
"""Bytes per MQTT connection of LINK_DEVICE: a few seconds of its traffic."""


def test_a_link_dropping_every_n_bytes_is_resumed_and_the_rollout_completes(
    faulty: Faulty,
) -> None:
    fleet = faulty.fleet
    artifact_proxy, mqtt_proxy = faulty.artifact_proxy, faulty.mqtt_proxy
    baseline = fleet.policy_version()
    fleet.wait_running(baseline)
    version, paths = faulty.new_version()
    cuts = artifact_proxy.cuts, mqtt_proxy.cuts
    requests_before = len(faulty.artifacts.requests)
    started_at = time.time()
    artifact_proxy.cut_after = ARTIFACT_CUT
    mqtt_proxy.cut_after = MQTT_CUT  # also cuts LINK_DEVICE's open connection at once
    try:
        name = f"link-{version}"
        fleet.client.start_rollout(rollout_yaml(name, version), f"{name}.yaml")
        detail = fleet.wait_rollout(name)
        assert detail.phase == "succeeded", detail.reason
        fleet.assert_whole_set(version)
    finally:
        artifact_proxy.cut_after = mqtt_proxy.cut_after = None
    requests = [r for r in faulty.artifacts.requests[requests_before:] if r.path in paths]
    # A connection carries less than ARTIFACT_CUT bytes of body: each device resumed each
    # artifact at least size // ARTIFACT_CUT times.
    least = {p: paths_size(faulty, [p]) // ARTIFACT_CUT for p in paths}
    assert artifact_proxy.cuts - cuts[0] >= len(DEVICES) * sum(least.values())
    for path in paths:
        resumed = [r for r in requests if r.path == path and r.headers.get("Range")]
        assert len(resumed) >= len(DEVICES) * least[path], requests
    assert mqtt_proxy.cuts - cuts[1] >= 1
    assert not artifact_proxy.errors and not mqtt_proxy.errors, "a bug of the proxy"
    wait_stored_after(fleet, [LINK_DEVICE], time.time())
    items = assert_no_telemetry_lost(fleet, LINK_DEVICE, started_at)
    assert len({i.session for i in items}) >= 2, "the MQTT link was never cut"


def paths_size(faulty: Faulty, paths: list[str]) -> int:
    """The bytes of every artifact at ``paths``, together."""
    store = faulty.fleet.config.artifacts_dir / "sha256"
    return sum((store / p.rsplit("/", 1)[1]).stat().st_size for p in paths)


# --- 4. a full disk during the download ----------------------------------------------------------

PAD_BYTES = 6 * 1024 * 1024
"""Padding of each model of the version too big for DISK_DEVICE."""


def test_a_full_disk_during_the_download_keeps_the_old_set_and_fails_the_rollout(
    faulty: Faulty,
) -> None:
    if faulty.tmpfs is None:
        pytest.skip(f"no tmpfs for {DISK_DEVICE}'s state directory: {faulty.tmpfs_problem}")
    fleet, tmpfs = faulty.fleet, faulty.tmpfs
    baseline = fleet.policy_version()
    fleet.wait_running(baseline)
    version, paths = faulty.new_version(pad_bytes=PAD_BYTES)
    largest = max(paths_size(faulty, [p]) for p in paths)
    # Room for any one new artifact, not for all of them: the disk fills during a download.
    resize_tmpfs(tmpfs, shutil.disk_usage(tmpfs).used + largest * 3 // 2)
    try:
        requests_before = len(faulty.artifacts.requests)
        name = f"disk-{version}"
        fleet.client.start_rollout(rollout_yaml(name, version), f"{name}.yaml")
        wait_for(
            lambda: storage_full(fleet, DISK_DEVICE), f"{DISK_DEVICE} reporting storage_full", fleet
        )
        # It never stopped serving the old set.
        assert serving_one_version(fleet, DISK_DEVICE) == baseline
        detail = fleet.wait_rollout(name)
    finally:
        resize_tmpfs(tmpfs, TMPFS_SIZE)
    assert detail.phase == "failed", detail.reason
    assert "success gate failed" in detail.reason, detail.reason
    assert detail.device_progress is not None
    rows = {d.device_id: d for d in detail.device_progress}
    assert rows[DISK_DEVICE].status == "failed", rows[DISK_DEVICE]
    assert "storage_full" in rows[DISK_DEVICE].reason, rows[DISK_DEVICE]
    assert not any(d.pinned for d in detail.device_progress), "on_failure: rollback unpins"
    assert kinds(detail)[-1] == "rollout.failed"
    assert any(r.path in paths for r in faulty.artifacts.requests[requests_before:])
    assert fleet.policy_version() == baseline
    fleet.assert_whole_set(baseline)


def storage_full(fleet: Fleet, device_id: str) -> bool:
    state = fleet.client.device(device_id).state
    return (
        state is not None
        and state.last_error is not None
        and (state.last_error.code == "storage_full")
    )
