"""The store-and-forward outbox: bounds, drop counter, order, and surviving a crash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from agent.outbox import Outbox
from agent.state import AgentState, open_database

REPO_ROOT = Path(__file__).resolve().parent.parent
TOPIC = "edgefleet/v1/dev/pi-1/up/telemetry"


def message(seq: int, size: int = 10) -> bytes:
    """A payload that carries its own ts and seq, padded to about ``size`` bytes."""
    body = {"seq": seq, "ts": 1_700_000_000 + seq, "pad": ""}
    raw = json.dumps(body).encode()
    body["pad"] = "x" * max(0, size - len(raw))
    return json.dumps(body).encode()


def seqs(box: Outbox) -> list[int]:
    return [json.loads(m.payload)["seq"] for m in box.peek(1_000_000)]


def test_put_peek_ack_in_order(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db", max_messages=100, max_bytes=1 << 20) as box:
        ids = [box.put(TOPIC, message(seq), qos=seq % 2, retain=seq == 3) for seq in range(5)]
        numbered = [i for i in ids if i is not None]
        assert numbered == sorted(numbered) and len(numbered) == 5
        assert box.depth == 5
        assert box.bytes == sum(len(message(s)) + len(TOPIC) for s in range(5))
        first = box.peek(2)
        assert [m.id for m in first] == ids[:2]
        assert (first[1].topic, first[1].qos, first[1].retain) == (TOPIC, 1, False)
        assert box.peek(10)[3].retain is True
        box.ack([m.id for m in first] + [999_999])
        assert seqs(box) == [2, 3, 4]
        assert box.depth == 3
        assert box.dropped == 0


def test_count_bound_drops_oldest_and_counts(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db", max_messages=5, max_bytes=1 << 20) as box:
        for seq in range(8):
            box.put(TOPIC, message(seq))
        assert seqs(box) == [3, 4, 5, 6, 7]
        assert (box.depth, box.dropped) == (5, 3)


def test_byte_bound_drops_oldest_and_counts(tmp_path: Path) -> None:
    size = 300 + len(TOPIC)
    with Outbox(tmp_path / "outbox.db", max_messages=1000, max_bytes=3 * size + 10) as box:
        for seq in range(5):
            box.put(TOPIC, message(seq, 300))
        assert seqs(box) == [2, 3, 4]
        assert box.bytes == 3 * size
        assert box.dropped == 2
        # One large message pushes out as many old ones as it needs.
        box.put(TOPIC, message(5, 2 * 300 + len(TOPIC)))
        assert seqs(box) == [4, 5]
        assert box.dropped == 4
        # A message larger than the whole outbox is dropped itself; the others stay.
        assert box.put(TOPIC, message(6, 4 * size)) is None
        assert seqs(box) == [4, 5]
        assert box.dropped == 5


def test_survives_reopen_with_order_ids_and_counter(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path, max_messages=3, max_bytes=1 << 20) as box:
        for seq in range(5):
            box.put(TOPIC, message(seq))
        last_id = box.peek(10)[-1].id
        box.ack([m.id for m in box.peek(10)])
    with Outbox(path, max_messages=3, max_bytes=1 << 20) as box:
        assert (box.depth, box.dropped) == (0, 2)
        new_id = box.put(TOPIC, message(5))
        # Ids are never reused, so a late ack of an old id cannot delete a new message.
        assert new_id is not None and new_id > last_id
        for seq in range(6, 9):
            box.put(TOPIC, message(seq))
    # Reopening with a tighter bound applies it at once.
    with Outbox(path, max_messages=2, max_bytes=1 << 20) as box:
        assert seqs(box) == [7, 8]
        assert box.dropped == 4


def test_shares_a_database_with_the_state(tmp_path: Path) -> None:
    db = open_database(tmp_path / "agent.db")
    try:
        state = AgentState(db)
        box = Outbox(db, max_messages=10, max_bytes=1 << 20)
        box.put(TOPIC, message(state.next_seq()))
        box.put(TOPIC, message(state.next_seq()))
        assert seqs(box) == [0, 1]
        assert {"generations", "meta", "outbox", "outbox_meta"} <= set(db.table_names())
    finally:
        db.close()


def test_concurrent_producers_keep_each_ones_order(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db", max_messages=10_000, max_bytes=1 << 24) as box:

        def produce(worker: int) -> None:
            for n in range(50):
                box.put(f"{TOPIC}/{worker}", message(worker * 1000 + n))

        workers = [threading.Thread(target=produce, args=(w,)) for w in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        got = seqs(box)
        assert len(got) == 200
        for w in range(4):
            mine = [s for s in got if s // 1000 == w]
            assert mine == sorted(mine) and len(mine) == 50


def test_bounds_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Outbox(tmp_path / "outbox.db", max_messages=0, max_bytes=10)


def test_sigkill_loses_nothing_that_put_returned(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            from agent.outbox import Outbox
            box = Outbox(sys.argv[1], max_messages=1_000_000, max_bytes=1 << 30)
            seq = 0
            while True:
                box.put("t", b"%d" % seq)
                print(seq, flush=True)
                seq += 1
            """
        )
    )
    child = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "outbox.db")],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert child.stdout is not None
    try:
        confirmed = [int(child.stdout.readline()) for _ in range(300)]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    with Outbox(tmp_path / "outbox.db", max_messages=1_000_000, max_bytes=1 << 30) as box:
        stored = [int(m.payload) for m in box.peek(1_000_000)]
    assert stored[: len(confirmed)] == confirmed
    assert stored == list(range(len(stored)))
