"""Store-and-forward outbox: what the agent could not publish yet, bounded, in order.

Messages go in with ``put`` while the broker is unreachable and leave, oldest first,
with ``peek`` + ``ack`` once it is back. The payload already carries the message's
original ``ts`` and ``seq``, so draining in id order keeps both. When a bound (message
count or bytes) is passed the oldest messages are deleted and counted in ``dropped``.

It is a SQLite file: a process crash loses nothing that ``put`` returned for. The own
connection uses ``synchronous=NORMAL`` (WAL): a power cut may lose the last few messages,
never corrupt the file, and flash storage is spared an fsync per telemetry message.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlite_utils import Database

from agent.state import lock_for, open_database, transaction

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS outbox (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        topic      TEXT NOT NULL,
        payload    BLOB NOT NULL,
        qos        INTEGER NOT NULL,
        retain     INTEGER NOT NULL,
        size       INTEGER NOT NULL,
        created_at REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS outbox_meta (
        key   TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    )""",
    "INSERT OR IGNORE INTO outbox_meta VALUES ('dropped', 0)",
)
_ACK_CHUNK = 500


@dataclass(frozen=True)
class OutboxMessage:
    """A stored message; ``id`` increases with every ``put`` and is never reused."""

    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    created_at: float


class Outbox:
    """A bounded FIFO of MQTT publications in SQLite. Thread-safe.

    ``size`` of a message is its payload plus its UTF-8 topic; ``max_bytes`` bounds the sum.
    One Outbox object per file writes to it (it keeps the totals in memory).
    """

    def __init__(self, db: Path | str | Database, max_messages: int, max_bytes: int) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise ValueError("max_messages and max_bytes must be positive")
        self._owned = not isinstance(db, Database)
        self.db = db if isinstance(db, Database) else open_database(db, synchronous="NORMAL")
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._lock = lock_for(self.db)
        with self._lock:
            if not {"outbox", "outbox_meta"} <= set(self.db.table_names()):
                with transaction(self.db):
                    for statement in _SCHEMA:
                        self.db.execute(statement)
            self._depth, self._bytes = self._totals()
            if self._depth > max_messages or self._bytes > max_bytes:
                # A smaller bound than the file was written with applies at once.
                with transaction(self.db):
                    self._depth, self._bytes = self._totals()
                    self._trim(incoming=0)

    def close(self) -> None:
        """Close the database if this object opened it."""
        if self._owned:
            self.db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def put(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int | None:
        """Append a message; return its id, or None when it alone is over ``max_bytes``.

        Oldest messages are deleted (and counted as dropped) to stay within the bounds.
        A message too large for the whole outbox is dropped itself and counted.
        """
        size = len(payload) + len(topic.encode())
        with self._lock:
            try:
                with transaction(self.db):
                    if size > self.max_bytes:
                        self._add_dropped(1)
                        return None
                    self._trim(incoming=size)
                    cursor = self.db.execute(
                        "INSERT INTO outbox (topic, payload, qos, retain, size, created_at) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        [topic, payload, qos, int(retain), size, time.time()],
                    )
            except BaseException:
                self._depth, self._bytes = self._totals()
                raise
            self._depth += 1
            self._bytes += size
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def peek(self, limit: int) -> list[OutboxMessage]:
        """The oldest ``limit`` messages, oldest first; they stay until acked."""
        with self._lock:
            rows = list(
                self.db.query(
                    "SELECT id, topic, payload, qos, retain, created_at FROM outbox "
                    "ORDER BY id LIMIT ?",
                    [limit],
                )
            )
        return [
            OutboxMessage(
                id=int(row["id"]),
                topic=row["topic"],
                payload=bytes(row["payload"]),
                qos=int(row["qos"]),
                retain=bool(row["retain"]),
                created_at=float(row["created_at"]),
            )
            for row in rows
        ]

    def ack(self, ids: Sequence[int]) -> None:
        """Delete delivered messages; unknown ids (already dropped or acked) are ignored."""
        with self._lock, transaction(self.db):
            for start in range(0, len(ids), _ACK_CHUNK):
                chunk = list(ids[start : start + _ACK_CHUNK])
                marks = ",".join("?" * len(chunk))
                self.db.execute(f"DELETE FROM outbox WHERE id IN ({marks})", chunk)
            self._depth, self._bytes = self._totals()

    @property
    def depth(self) -> int:
        """Messages waiting."""
        with self._lock:
            return self._depth

    @property
    def bytes(self) -> int:
        """Sum of the waiting messages' sizes."""
        with self._lock:
            return self._bytes

    @property
    def dropped(self) -> int:
        """Messages deleted unsent to stay within the bounds, ever (persisted)."""
        with self._lock:
            row = self.db.execute("SELECT value FROM outbox_meta WHERE key='dropped'").fetchone()
        return int(row[0])

    def _totals(self) -> tuple[int, int]:
        row = self.db.execute("SELECT count(*), coalesce(sum(size), 0) FROM outbox").fetchone()
        return int(row[0]), int(row[1])

    def _trim(self, incoming: int) -> None:
        """Delete the oldest messages until one more of ``incoming`` bytes fits."""
        extra = 1 if incoming else 0
        excess_count = self._depth + extra - self.max_messages
        excess_bytes = self._bytes + incoming - self.max_bytes
        if excess_count <= 0 and excess_bytes <= 0:
            return
        victims: list[int] = []
        freed = 0
        cursor = self.db.execute("SELECT id, size FROM outbox ORDER BY id")
        while len(victims) < excess_count or freed < excess_bytes:
            row = cursor.fetchone()
            if row is None:
                break
            victims.append(int(row[0]))
            freed += int(row[1])
        cursor.close()
        if victims:
            self.db.execute("DELETE FROM outbox WHERE id <= ?", [victims[-1]])
            self._depth -= len(victims)
            self._bytes -= freed
            self._add_dropped(len(victims))

    def _add_dropped(self, count: int) -> None:
        self.db.execute(
            "UPDATE outbox_meta SET value = value + ? WHERE key='dropped'",
            [count],
        )
