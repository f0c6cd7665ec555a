"""Persisted agent state: generations, session and seq, and what a SIGKILL leaves behind."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from agent.state import SEQ_BLOCK, AgentState

REPO_ROOT = Path(__file__).resolve().parent.parent


def sha(n: int) -> str:
    return f"{n:064x}"


def doc(generation: int, *hashes: str) -> dict[str, Any]:
    return {
        "generation": generation,
        "models": [{"name": f"m{i}", "artifact": {"sha256": h}} for i, h in enumerate(hashes)],
    }


def plan(*hashes: str) -> dict[str, Any]:
    return {"models": [{"variant": "int8", "sha256": h} for h in hashes]}


@pytest.fixture
def state(tmp_path: Path) -> Any:
    with AgentState(tmp_path / "state.db") as opened:
        yield opened


def test_fresh_state(state: AgentState) -> None:
    assert state.active() is None
    assert state.previous() is None
    assert state.last_applied() is None
    assert state.keep_hashes() == frozenset()
    assert state.session == 0
    assert state.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert state.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_activate_moves_active_to_previous_and_retires_the_one_before(
    state: AgentState,
) -> None:
    state.record_staged(1, doc(1, sha(1)), plan(sha(1)))
    staged = state.get(1)
    assert staged is not None and staged.status == "staged" and state.active() is None
    state.activate(1)
    active = state.active()
    assert active is not None and active.generation == 1 and active.activated_at is not None
    assert active.document == doc(1, sha(1))
    assert active.plan == plan(sha(1))

    state.record_staged(2, doc(2, sha(2), sha(3)), plan(sha(2)))
    assert state.keep_hashes() == {sha(1)}
    state.activate(2)
    assert [state.active().generation, state.previous().generation] == [2, 1]  # type: ignore[union-attr]
    # Only the planned artifacts of active + previous are kept, not every variant.
    assert state.keep_hashes() == {sha(1), sha(2)}

    state.record_staged(3, doc(3, sha(4)), plan(sha(4)))
    state.activate(3)
    assert state.get(1).status == "retired"  # type: ignore[union-attr]
    assert state.keep_hashes() == {sha(2), sha(4)}
    assert state.last_applied() == 3
    assert [g.generation for g in state.history()] == [3, 2, 1]


def test_explicit_artifacts_and_fallback_to_document(state: AgentState) -> None:
    state.record_staged(1, doc(1, sha(7)), {"models": ["m0"]})
    state.activate(1)
    assert state.keep_hashes() == {sha(7)}
    state.record_staged(2, doc(2, sha(8)), plan(sha(8)), artifacts=[sha(9)])
    state.activate(2)
    assert state.keep_hashes() == {sha(7), sha(9)}
    with pytest.raises(ValueError, match="not a sha256"):
        state.record_staged(3, doc(3), plan(), artifacts=["nope"])


def test_activate_refuses_what_is_not_staged_or_not_newer(state: AgentState) -> None:
    with pytest.raises(ValueError, match="generation 1 is not recorded, not staged"):
        state.activate(1)
    state.record_staged(5, doc(5), plan())
    state.activate(5)
    with pytest.raises(ValueError, match="generation 5 is active, not staged"):
        state.activate(5)
    with pytest.raises(ValueError, match="not newer than active 5"):
        state.record_staged(4, doc(4), plan())
    with pytest.raises(ValueError, match="not newer than active 5"):
        state.record_staged(5, doc(5), plan())


def test_the_schema_itself_refuses_two_active_generations(state: AgentState) -> None:
    state.record_staged(1, doc(1), plan())
    state.activate(1)
    state.record_staged(2, doc(2), plan())
    with pytest.raises(sqlite3.IntegrityError):
        state.db.execute("UPDATE generations SET status='active' WHERE generation=2")


def test_rollback_restores_previous_and_refuses_until_newer(state: AgentState) -> None:
    with pytest.raises(LookupError):
        state.rollback("nothing active")
    for gen in (1, 2):
        state.record_staged(gen, doc(gen, sha(gen)), plan(sha(gen)))
        state.activate(gen)
    restored = state.rollback("latency p95 over the limit")
    assert restored.generation == 1 and restored.status == "active"
    assert state.active() == restored
    assert state.previous() is None
    rolled = state.get(2)
    assert rolled is not None and rolled.status == "rolled_back"
    assert rolled.error == "latency p95 over the limit"
    assert state.is_refused(2) and not state.is_refused(3)
    assert state.last_applied() == 2
    assert state.keep_hashes() == {sha(1)}
    with pytest.raises(ValueError, match="generation 2 is refused"):
        state.record_staged(2, doc(2), plan())
    with pytest.raises(LookupError):
        state.rollback("again")

    state.record_staged(3, doc(3, sha(3)), plan(sha(3)))
    assert not state.is_refused(2)
    state.activate(3)
    assert state.previous().generation == 1  # type: ignore[union-attr]


def test_failed_and_interrupted_applies(state: AgentState) -> None:
    state.record_staged(1, doc(1), plan())
    state.mark_failed(1, "hash mismatch")
    failed = state.get(1)
    assert failed is not None and (failed.status, failed.error) == ("failed", "hash mismatch")
    # A retry of the same generation replaces the failed row.
    state.record_staged(1, doc(1), plan())
    state.record_staged(2, doc(2), plan())
    assert state.discard_staged("interrupted by a restart") == [1, 2]
    assert {g.status for g in state.history()} == {"failed"}
    assert state.active() is None


def test_history_is_bounded(state: AgentState) -> None:
    for gen in range(1, 40):
        state.record_staged(gen, doc(gen), plan())
        state.activate(gen)
    kept = state.history()
    assert len(kept) == 2 + 20
    assert [kept[0].status, kept[1].status] == ["active", "previous"]


def test_session_and_seq_are_monotonic_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with AgentState(path) as first:
        assert [first.next_session(), first.next_session()] == [1, 2]
        seqs = [first.next_seq() for _ in range(SEQ_BLOCK + 5)]
    assert seqs == list(range(SEQ_BLOCK + 5))
    with AgentState(path) as second:
        assert second.session == 2
        assert second.next_session() == 3
        after = [second.next_seq() for _ in range(3)]
    assert after == [2 * SEQ_BLOCK, 2 * SEQ_BLOCK + 1, 2 * SEQ_BLOCK + 2]


def test_two_objects_on_one_file_never_share_a_seq(tmp_path: Path) -> None:
    with AgentState(tmp_path / "s.db") as one, AgentState(tmp_path / "s.db") as two:
        seen = [one.next_seq(), two.next_seq(), one.next_seq(), two.next_seq()]
    assert len(set(seen)) == 4


# --------------------------------------------------------------------------- real crashes

CHILD_PRELUDE = """
import json, sys, time
from agent.state import AgentState

def doc(g):
    return {"generation": g, "blob": "x" * 200_000}

state = AgentState(sys.argv[1])
"""


def spawn(tmp_path: Path, body: str, *args: str) -> subprocess.Popen[str]:
    script = tmp_path / "child.py"
    script.write_text(CHILD_PRELUDE + textwrap.dedent(body))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "state.db"), *args],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for(child: subprocess.Popen[str], word: str) -> None:
    assert child.stdout is not None
    line = child.stdout.readline().strip()
    assert line == word, f"child said {line!r}, expected {word!r}"


def kill(child: subprocess.Popen[str]) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    if child.stdout is not None:
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL


def test_sigkill_inside_activate_leaves_the_old_generation(tmp_path: Path) -> None:
    """The child stops just before COMMIT of activate(2) and is killed there."""
    child = spawn(
        tmp_path,
        """
        for g in (1, 2):
            state.record_staged(g, doc(g), {"g": g})
        state.activate(1)

        def pause_at_commit(sql):
            if sql.strip().upper() == "COMMIT":
                print("in-transaction", flush=True)
                time.sleep(60)

        state.db.conn.set_trace_callback(pause_at_commit)
        state.activate(2)
        print("committed", flush=True)
        """,
    )
    try:
        wait_for(child, "in-transaction")
        # Another connection sees the committed state while the write is open.
        with AgentState(tmp_path / "state.db") as observer:
            assert observer.active().generation == 1  # type: ignore[union-attr]
    finally:
        kill(child)
    with AgentState(tmp_path / "state.db") as after:
        active, previous, staged = after.active(), after.previous(), after.get(2)
        assert active is not None and active.generation == 1
        assert previous is None
        assert staged is not None and staged.status == "staged"
        assert active.document == {"generation": 1, "blob": "x" * 200_000}


def test_sigkill_after_activate_keeps_the_new_generation(tmp_path: Path) -> None:
    child = spawn(
        tmp_path,
        """
        for g in (1, 2):
            state.record_staged(g, doc(g), {"g": g})
            state.activate(g)
        print("committed", flush=True)
        time.sleep(60)
        """,
    )
    try:
        wait_for(child, "committed")
    finally:
        kill(child)
    with AgentState(tmp_path / "state.db") as after:
        assert after.active().generation == 2  # type: ignore[union-attr]
        assert after.previous().generation == 1  # type: ignore[union-attr]


def test_sigkill_at_random_moments_leaves_old_or_new_never_a_mix(tmp_path: Path) -> None:
    """Apply generation after generation and kill the writer at random; check invariants."""
    rng = random.Random(7)
    for _ in range(6):
        child = spawn(
            tmp_path,
            """
            g = (state.active().generation if state.active() else 0) + 1
            state.discard_staged("interrupted")
            print("started", flush=True)
            while True:
                state.record_staged(g, doc(g), {"g": g})
                state.activate(g)
                g += 1
            """,
        )
        try:
            wait_for(child, "started")
            time.sleep(rng.uniform(0.05, 0.4))
        finally:
            kill(child)
        with AgentState(tmp_path / "state.db") as after:
            rows = after.history()
            active = [r for r in rows if r.status == "active"]
            previous = [r for r in rows if r.status == "previous"]
            staged = [r for r in rows if r.status == "staged"]
            assert len(active) == 1
            current = active[0].generation
            if current > 1:
                assert [r.generation for r in previous] == [current - 1]
            assert [r.generation for r in staged] in ([], [current + 1])
            for row in rows:
                assert row.document == {"generation": row.generation, "blob": "x" * 200_000}
                assert row.plan == {"g": row.generation}


def test_sigkill_never_repeats_a_seq_or_session(tmp_path: Path) -> None:
    child = spawn(
        tmp_path,
        """
        print(state.next_session(), flush=True)
        while True:
            print(state.next_seq(), flush=True)
        """,
    )
    assert child.stdout is not None
    try:
        session = int(child.stdout.readline())
        handed_out = [int(child.stdout.readline()) for _ in range(1500)]
    finally:
        kill(child)
    with AgentState(tmp_path / "state.db") as after:
        assert after.next_session() == session + 1
        assert after.next_seq() > max(handed_out)
