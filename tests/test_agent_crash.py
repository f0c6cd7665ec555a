"""Crash safety: kill -9 a real agent process at each step of an apply, then restart it.

For every fault point (``EDGEFLEET_FAULT``, see agent/faults.py) a real agent process
applies generation 1 cleanly; a second process, started with the fault, receives the
retained generation 2 and is killed by SIGKILL at that point. Then:

- on disk: every file in the cache's verified directory hashes to its name, unfinished
  downloads are only under ``partial/``, and ``edgefleet-agent status`` names exactly the
  generation the next start must serve (1 before the commit point, 2 after it);
- a third process, started without the fault, serves exactly that generation (its birth
  inventory lists every model with its variant and the sha256 of the bytes it loaded: all
  from one generation, never a mix), resumes or reuses what the dead one left (a ``Range``
  request for a half-downloaded file, no request at all for a complete one), applies the
  retained generation 2 and ends serving exactly it.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest

from agent.faults import FAULT_ENV, POINTS
from agent.state import AgentState
from contract.manifests import ModelSpec
from contract.messages import Birth, Cmd, Event, State, Telemetry, encode
from contract.signing import SigningKey
from contract.topics import Kind, down_topic
from hub.broker import MosquittoBroker
from support.agent_process import agent_process, cli
from support.fleet import (
    OCR_HINTS,
    OCR_MEMORY_MB,
    OCR_PRIORITY,
    Tap,
    agent_toml,
    desired_state,
    mqtt_tap,
    sha256_of,
    signed,
    spec_for,
)
from support.http_server import ArtifactServer

pytestmark = pytest.mark.slow

DEVICE = "crash-dev-1"
UP = f"edgefleet/v1/dev/{DEVICE}/up"


@dataclass(frozen=True)
class Gen:
    """A generation: model name -> (version, file)."""

    number: int
    models: dict[str, tuple[str, Path]]

    def specs(self) -> list[ModelSpec]:
        return [
            spec_for(
                name,
                path,
                version=version,
                hints=OCR_HINTS[name],
                memory_mb=OCR_MEMORY_MB[name],
                priority=OCR_PRIORITY[name],
            )
            for name, (version, path) in self.models.items()
        ]

    @property
    def hashes(self) -> set[str]:
        return {sha256_of(path) for _, path in self.models.values()}

    @property
    def inventory(self) -> dict[str, tuple[str, str, str]]:
        """What serving exactly this generation looks like: name -> (version, variant, sha)."""
        return {
            name: (version, "fp32", sha256_of(path))
            for name, (version, path) in self.models.items()
        }


@pytest.fixture(scope="module")
def generations(
    tmp_path_factory: pytest.TempPathFactory, ocr_models: dict[str, Path]
) -> tuple[Gen, Gen]:
    """Generation 1: cls. Generation 2: another cls (distinct bytes, still a valid model)
    and det, which is downloaded and loaded first (higher priority)."""
    model = onnx.load(str(ocr_models["cls"]))
    entry = model.metadata_props.add()
    entry.key, entry.value = "edgefleet-test", "cls 2.0.0"
    cls2 = tmp_path_factory.mktemp("models") / "cls-2.onnx"
    onnx.save(model, str(cls2))
    assert sha256_of(cls2) != sha256_of(ocr_models["cls"])
    one = Gen(1, {"cls": ("1.0.0", ocr_models["cls"])})
    two = Gen(2, {"det": ("1.0.0", ocr_models["det"]), "cls": ("2.0.0", cls2)})
    return one, two


@dataclass
class Rig:
    config: Path
    state_dir: Path
    workdir: Path
    key: SigningKey
    files: ArtifactServer
    tap: Tap

    @property
    def base_urls(self) -> list[str]:
        return [self.files.url("/artifacts")]

    def desire(self, gen: Gen) -> None:
        doc = desired_state(DEVICE, gen.number, gen.specs(), base_urls=self.base_urls)
        self.tap.publish_desired(DEVICE, signed(doc, self.key))

    def birth(self, after_session: int) -> Birth:
        found: list[Birth] = self.tap.wait_for(
            lambda t: [
                m for m in t.messages("birth") if isinstance(m, Birth) and m.session > after_session
            ],
            20,
            f"a birth after session {after_session}",
        )
        return found[-1]

    def states(self, session: int) -> list[State]:
        return [
            m for m in self.tap.messages("state") if isinstance(m, State) and m.session == session
        ]

    def events(self, session: int) -> list[Event]:
        return [
            m for m in self.tap.messages("events") if isinstance(m, Event) and m.session == session
        ]

    def wait_committed(self, generation: int, session: int) -> State:
        found: list[State] = self.tap.wait_for(
            lambda t: [
                s
                for s in self.states(session)
                if s.applied_generation == generation and s.phase == "committed"
            ],
            40,
            f"generation {generation} committed in session {session}",
        )
        return found[-1]

    def rebirth(self, session: int) -> Birth:
        """Ask for a birth (its inventory is what the host serves right now)."""
        before = len(self.tap.messages("birth"))
        cmd = Cmd(cmd_id=f"rebirth-{time.monotonic_ns()}", command="rebirth", ts=time.time())
        self.tap.publish(down_topic(DEVICE, Kind.CMD), encode(cmd))
        found: list[Birth] = self.tap.wait_for(
            lambda t: [
                m
                for m in t.messages("birth")[before:]
                if isinstance(m, Birth) and m.session == session
            ],
            20,
            "a birth on rebirth",
        )
        return found[-1]

    def status(self) -> dict[str, object]:
        result = cli("status", "--config", str(self.config), "--json")
        assert result.returncode == 0, result.stderr
        report: dict[str, object] = json.loads(result.stdout)
        return report


@pytest.fixture
def rig(broker: MosquittoBroker, tmp_path: Path, generations: tuple[Gen, Gen]) -> Iterator[Rig]:
    key = SigningKey.generate()
    state_dir = tmp_path / "state"
    config = tmp_path / "agent.toml"
    config.write_text(agent_toml(device_id=DEVICE, broker=broker, state_dir=state_dir, key=key))
    with ArtifactServer() as files, mqtt_tap(broker, f"{UP}/#") as tap:
        for gen in generations:
            for _, path in gen.models.values():
                files.add(f"/artifacts/{sha256_of(path)}", path)
        yield Rig(config, state_dir, tmp_path, key, files, tap)


def served(birth: Birth) -> dict[str, tuple[str, str, str]]:
    return {item.model: (item.version, item.variant, item.sha256) for item in birth.inventory}


def cache_contents(state_dir: Path) -> tuple[set[str], dict[str, int]]:
    """Verified hashes and partial downloads (hash -> bytes); fails on anything unsound.

    Every verified file must hash to its name; a ``.part`` file may exist only in
    ``partial/``; nothing else lives in the cache.
    """
    root = state_dir / "artifacts"
    assert sorted(p.name for p in root.iterdir()) == ["partial", "sha256"]
    verified: set[str] = set()
    for path in (root / "sha256").iterdir():
        assert path.is_file() and not path.is_symlink(), path
        assert sha256_of(path) == path.name, f"{path} does not match its hash"
        verified.add(path.name)
    partials: dict[str, int] = {}
    for path in (root / "partial").iterdir():
        assert path.is_file() and path.name.endswith(".part"), path
        partials[path.name.removesuffix(".part")] = path.stat().st_size
    strays = [p for p in state_dir.rglob("*.part") if p.parent != root / "partial"]
    assert not strays, strays
    return verified, partials


@pytest.mark.parametrize("point", POINTS)
def test_kill_9_during_an_apply_comes_back_on_one_whole_generation(
    rig: Rig, point: str, generations: tuple[Gen, Gen]
) -> None:
    one, two = generations

    # 1. A clean apply of generation 1.
    with agent_process(rig.config, rig.workdir, name="clean") as agent:
        agent.wait_ready()
        session = rig.birth(0).session
        rig.desire(one)
        rig.wait_committed(1, session)
        assert agent.terminate() == 0, agent.describe()
    assert rig.status()["applied_generation"] == 1
    downloads = len(rig.files.requests)
    assert downloads == 1

    # 2. Generation 2 is retained for the device; the agent dies at the fault point.
    rig.desire(two)
    with agent_process(rig.config, rig.workdir, env={FAULT_ENV: point}, name=point) as agent:
        returncode = agent.wait_exit(60)
        assert returncode == -signal.SIGKILL, agent.describe()
    with AgentState(rig.state_dir / "state.db") as state:
        fault_session = state.session  # the dead agent's (its birth may not have gone out)
    assert fault_session > session

    # On disk: the commit point decides; nothing unverified sits among the verified files.
    survivor = two if point == "persist" else one
    report = rig.status()
    assert report["applied_generation"] == survivor.number, report
    assert report["previous_generation"] == (1 if point == "persist" else None), report
    verified, partials = cache_contents(rig.state_dir)
    sizes = {sha256_of(path): path.stat().st_size for _, path in two.models.values()}
    assert one.hashes <= verified
    assert set(partials) <= two.hashes - verified
    # Artifacts are fetched and loaded in parallel, so the other one may be anywhere short
    # of verified; but no download ever passed the fault point into the verified files.
    assert all(size <= sizes[sha] for sha, size in partials.items())
    if point == "download":
        assert verified == one.hashes
        assert any(size == sizes[sha] // 2 for sha, size in partials.items()), partials
        # The other pipeline may have finished its body (still unverified, in partial/)
        # when the first one died: complete partials are allowed, verified ones are not.
    elif point == "verify":
        assert verified == one.hashes
        assert any(size == sizes[sha] for sha, size in partials.items()), partials
    elif point == "load":
        det = sha256_of(two.models["det"][1])  # loaded first (the higher priority)
        assert det in verified
    else:
        assert partials == {}
        assert verified == one.hashes | two.hashes
    # What the restart must do for each artifact of generation 2: nothing (verified, or a
    # complete partial it verifies from disk), resume it (Range), or fetch it from zero.
    expected_requests = {
        (f"/artifacts/{sha}", f"bytes={partials[sha]}-" if partials.get(sha) else None)
        for sha in two.hashes - verified
        if partials.get(sha) != sizes[sha]
    }
    fault_requests = len(rig.files.requests) - downloads
    assert fault_requests == 2 if point in ("switch", "persist") else 1 <= fault_requests <= 2

    # 3. Restarted without the fault: exactly the surviving generation, then generation 2.
    with agent_process(rig.config, rig.workdir, name="restart") as agent:
        agent.wait_ready()
        birth = rig.birth(fault_session)
        assert birth.applied_generation == survivor.number
        assert served(birth) == survivor.inventory, agent.describe()
        greeting: State = rig.tap.wait_for(
            lambda _: rig.states(birth.session), 10, "the state sent with the birth"
        )[0]
        assert greeting.applied_generation == survivor.number
        assert {m.name: (m.version, m.ready) for m in greeting.models} == {
            name: (version, True) for name, (version, _) in survivor.models.items()
        }

        final = rig.wait_committed(2, birth.session)
        assert final.last_error is None
        assert {m.name: m.version for m in final.models if m.ready} == {
            "det": "1.0.0",
            "cls": "2.0.0",
        }
        assert served(rig.rebirth(birth.session)) == two.inventory
        # Events go through the outbox, in order: once a telemetry message queued after
        # the rebirth is here, every event of this session before it is here too.
        asked = time.time()
        rig.tap.wait_for(
            lambda t: [
                m
                for m in t.messages("telemetry")
                if isinstance(m, Telemetry) and m.session == birth.session and m.ts > asked
            ],
            10,
            "telemetry after the rebirth",
        )
        kinds = [e.kind for e in rig.events(birth.session)]
        assert agent.terminate() == 0, agent.describe()
    applied = [s.applied_generation for s in rig.states(birth.session)]
    assert applied == sorted(applied) and set(applied) <= {survivor.number, 2}, applied
    if point == "persist":
        assert kinds == [], kinds  # nothing to apply: the retained document is the one served
    else:
        assert kinds == ["update.started", "update.activated", "update.committed"], kinds

    # What the dead agent left was resumed or reused, never fetched again from zero.
    restart_requests = rig.files.requests[downloads + fault_requests :]
    seen = [(r.path, r.headers.get("Range")) for r in restart_requests]
    assert sorted(seen, key=str) == sorted(expected_requests, key=str)
    if point == "download":  # the half-written file was resumed where it stopped
        assert any(range_ is not None for _, range_ in seen), seen

    verified, partials = cache_contents(rig.state_dir)
    assert verified == one.hashes | two.hashes  # generation 1 is kept for a rollback
    assert partials == {}
    report = rig.status()
    assert report["applied_generation"] == 2
    assert report["previous_generation"] == 1
