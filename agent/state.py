"""The agent's persisted state: generations, the session counter and the message seq.

One SQLite file (sqlite-utils, WAL, ``synchronous=FULL``). ``activate`` is the commit
point of an apply: one transaction makes the new generation active and the old one
previous, so after a crash or power cut the agent serves exactly what ``active()`` says.

Statuses of a generation:

    staged       recorded, its artifacts verified or being verified; not serving
    active       serving (exactly one row at most)
    previous     the one before active, kept for a rollback without download (at most one)
    failed       an apply that did not reach the switch (or was interrupted by a restart)
    rolled_back  was active, rolled back; refused until a newer generation arrives
    retired      was previous, superseded; kept a while as history
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sqlite_utils import Database

Status = Literal["staged", "active", "previous", "failed", "rolled_back", "retired"]

SEQ_BLOCK = 1000
"""Seq values reserved per write: after a crash the next block starts, so none repeats."""

HISTORY_KEPT = 20
"""Rows other than staged, active and previous kept as history; older ones are deleted."""

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_LOCKS: weakref.WeakKeyDictionary[Database, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS generations (
    generation   INTEGER PRIMARY KEY,
    document     TEXT NOT NULL,
    plan         TEXT NOT NULL,
    artifacts    TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN
                 ('staged', 'active', 'previous', 'failed', 'rolled_back', 'retired')),
    staged_at    REAL NOT NULL,
    activated_at REAL,
    updated_at   REAL NOT NULL,
    error        TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS generations_one_live
    ON generations (status) WHERE status IN ('active', 'previous');
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


def open_database(path: Path | str, *, synchronous: str = "FULL") -> Database:
    """Open (creating it and its directory) a SQLite file in WAL mode, usable from threads.

    The connection is in autocommit mode; group writes with ``transaction``. Callers that
    share it between threads serialise on ``lock_for(db)``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=30.0, check_same_thread=False, isolation_level=None)
    db = Database(conn)
    db.enable_wal()
    db.execute(f"PRAGMA synchronous={synchronous}")
    return db


def lock_for(db: Database) -> threading.RLock:
    """The lock that every user of ``db`` in this process holds around its statements."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(db)
        if lock is None:
            lock = _LOCKS[db] = threading.RLock()
        return lock


@contextmanager
def transaction(db: Database) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any exception (nests as a savepoint)."""
    if db.conn.in_transaction:
        db.execute("SAVEPOINT edgefleet")
        try:
            yield
        except BaseException:
            db.execute("ROLLBACK TO SAVEPOINT edgefleet")
            db.execute("RELEASE SAVEPOINT edgefleet")
            raise
        db.execute("RELEASE SAVEPOINT edgefleet")
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if db.conn.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


@dataclass(frozen=True)
class Generation:
    """One recorded generation and what became of it."""

    generation: int
    document: dict[str, Any]
    plan: Any
    artifacts: frozenset[str]
    status: Status
    staged_at: float
    activated_at: float | None
    updated_at: float
    error: str | None


class AgentState:
    """The persisted state of one agent. Thread-safe; every change is one transaction."""

    def __init__(self, db: Path | str | Database) -> None:
        self._owned = not isinstance(db, Database)
        self.db = open_database(db) if not isinstance(db, Database) else db
        self._lock = lock_for(self.db)
        with self._lock:
            if not {"generations", "meta"} <= set(self.db.table_names()):
                # Only a new file is written to here: a reader (``status``) never waits.
                with transaction(self.db):
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            self.db.execute(statement)
                    self._set_meta("schema_version", 1)
            self._seq = self._seq_limit = int(self._meta("seq_reserved", 0))

    def close(self) -> None:
        """Close the database if this object opened it."""
        if self._owned:
            self.db.close()

    def __enter__(self) -> AgentState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ counters

    def next_session(self) -> int:
        """Increment and return the session counter (call it at every connect attempt)."""
        with self._lock, transaction(self.db):
            session = int(self._meta("session", 0)) + 1
            self._set_meta("session", session)
        return session

    @property
    def session(self) -> int:
        """The last session number handed out (0 before the first)."""
        with self._lock:
            return int(self._meta("session", 0))

    def next_seq(self) -> int:
        """The next message seq: strictly increasing, never repeated, even after a crash.

        Seqs are reserved ``SEQ_BLOCK`` at a time, so a restart skips the rest of a block.
        """
        with self._lock:
            if self._seq >= self._seq_limit:
                with transaction(self.db):
                    start = max(self._seq, int(self._meta("seq_reserved", 0)))
                    self._set_meta("seq_reserved", start + SEQ_BLOCK)
                self._seq, self._seq_limit = start, start + SEQ_BLOCK
            seq = self._seq
            self._seq += 1
            return seq

    # ------------------------------------------------------------------ generations

    def record_staged(
        self,
        generation: int,
        document: dict[str, Any],
        plan: Any,
        artifacts: Iterable[str] | None = None,
    ) -> None:
        """Record a verified desired document and its plan as ``staged``.

        ``artifacts`` are the sha256 of every file the plan loads; when omitted they are
        every ``sha256`` found in the plan (or, failing that, in the document). Raises
        ValueError for a generation that is not newer than the active one or is refused.
        A newer generation clears the refusal of older ones.
        """
        hashes = _hashes(artifacts, plan, document)
        now = time.time()
        with self._lock, transaction(self.db):
            active = self._scalar("SELECT max(generation) FROM generations WHERE status='active'")
            if active is not None and generation <= active:
                raise ValueError(f"generation {generation} is not newer than active {active}")
            refused = self._refused()
            if generation in refused:
                raise ValueError(f"generation {generation} is refused")
            self.db.execute(
                "INSERT OR REPLACE INTO generations (generation, document, plan, artifacts, "
                "status, staged_at, activated_at, updated_at, error) "
                "VALUES (?, ?, ?, ?, 'staged', ?, NULL, ?, NULL)",
                [generation, _dump(document), _dump(plan), _dump(sorted(hashes)), now, now],
            )
            self._set_meta("refused", sorted(g for g in refused if g > generation))

    def mark_failed(self, generation: int, error: str) -> None:
        """A staged generation that will not be activated, and why."""
        with self._lock, transaction(self.db):
            self._require(generation, "staged")
            self.db.execute(
                "UPDATE generations SET status='failed', error=?, updated_at=? WHERE generation=?",
                [error, time.time(), generation],
            )
            self._prune()

    def discard_staged(self, reason: str) -> list[int]:
        """Mark every staged generation failed (at start-up: an apply a crash interrupted)."""
        with self._lock, transaction(self.db):
            found = [
                int(row["generation"])
                for row in self.db.query(
                    "SELECT generation FROM generations WHERE status='staged' ORDER BY generation"
                )
            ]
            self.db.execute(
                "UPDATE generations SET status='failed', error=?, updated_at=? "
                "WHERE status='staged'",
                [reason, time.time()],
            )
            self._prune()
        return found

    def activate(self, generation: int) -> None:
        """Make a staged generation active and the active one previous, in one transaction.

        This is the commit point of an apply. The generation before the previous one is
        retired (its artifacts are no longer kept).
        """
        now = time.time()
        with self._lock, transaction(self.db):
            self._require(generation, "staged")
            active = self._scalar("SELECT generation FROM generations WHERE status='active'")
            if active is not None and generation <= active:
                raise ValueError(f"generation {generation} is not newer than active {active}")
            self.db.execute(
                "UPDATE generations SET status='retired', updated_at=? WHERE status='previous'",
                [now],
            )
            self.db.execute(
                "UPDATE generations SET status='previous', updated_at=? WHERE status='active'",
                [now],
            )
            self.db.execute(
                "UPDATE generations SET status='active', activated_at=?, updated_at=?, "
                "error=NULL WHERE generation=?",
                [now, now, generation],
            )
            self._prune()

    def rollback(self, reason: str) -> Generation:
        """Make the previous generation active again; refuse the rolled-back one.

        Returns the generation now active. Raises LookupError when there is no active or
        no previous generation.
        """
        now = time.time()
        with self._lock, transaction(self.db):
            active = self._scalar("SELECT generation FROM generations WHERE status='active'")
            previous = self._scalar("SELECT generation FROM generations WHERE status='previous'")
            if active is None or previous is None:
                raise LookupError("no previous generation to roll back to")
            self.db.execute(
                "UPDATE generations SET status='rolled_back', error=?, updated_at=? "
                "WHERE generation=?",
                [reason, now, active],
            )
            self.db.execute(
                "UPDATE generations SET status='active', activated_at=?, updated_at=? "
                "WHERE generation=?",
                [now, now, previous],
            )
            self._set_meta("refused", sorted(self._refused() | {active}))
            self._prune()
            restored = self._get(previous)
        assert restored is not None
        return restored

    def active(self) -> Generation | None:
        """The generation being served, or None before the first apply."""
        return self._one("SELECT * FROM generations WHERE status='active'")

    def previous(self) -> Generation | None:
        """The generation a rollback returns to, or None."""
        return self._one("SELECT * FROM generations WHERE status='previous'")

    def get(self, generation: int) -> Generation | None:
        """Any recorded generation, or None."""
        with self._lock:
            return self._get(generation)

    def history(self) -> list[Generation]:
        """Every recorded generation, newest first."""
        with self._lock:
            rows = list(self.db.query("SELECT * FROM generations ORDER BY generation DESC"))
        return [_generation(row) for row in rows]

    def last_applied(self) -> int | None:
        """The highest generation that was ever active (a rolled-back one included)."""
        with self._lock:
            return self._scalar(
                "SELECT max(generation) FROM generations WHERE activated_at IS NOT NULL"
            )

    def is_refused(self, generation: int) -> bool:
        """Whether ``generation`` was rolled back and no newer one has been staged since."""
        with self._lock:
            return generation in self._refused()

    def refused(self) -> frozenset[int]:
        """Generations rolled back here and not yet superseded by a newer staged one."""
        with self._lock:
            return frozenset(self._refused())

    def trusted_keys(self) -> list[dict[str, str]]:
        """The hub keys adopted from the last applied desired state (empty: use the config)."""
        with self._lock:
            return list(self._meta("trusted_keys", []))

    def set_trusted_keys(self, keys: list[dict[str, str]]) -> None:
        with self._lock, transaction(self.db):
            self._set_meta("trusted_keys", keys)

    def keep_hashes(self) -> frozenset[str]:
        """The artifact hashes of the active and previous generations (keep them in cache)."""
        with self._lock:
            rows = list(
                self.db.query(
                    "SELECT artifacts FROM generations WHERE status IN ('active', 'previous')"
                )
            )
        return frozenset(h for row in rows for h in json.loads(row["artifacts"]))

    # ------------------------------------------------------------------ internals

    def _meta(self, key: str, default: Any) -> Any:
        rows = list(self.db.query("SELECT value FROM meta WHERE key=?", [key]))
        return json.loads(rows[0]["value"]) if rows else default

    def _set_meta(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, json.dumps(value)])

    def _refused(self) -> set[int]:
        return {int(g) for g in self._meta("refused", [])}

    def _scalar(self, sql: str) -> int | None:
        row = self.db.execute(sql).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def _one(self, sql: str) -> Generation | None:
        with self._lock:
            rows = list(self.db.query(sql))
        return _generation(rows[0]) if rows else None

    def _get(self, generation: int) -> Generation | None:
        rows = list(self.db.query("SELECT * FROM generations WHERE generation=?", [generation]))
        return _generation(rows[0]) if rows else None

    def _require(self, generation: int, status: Status) -> None:
        found = self._get(generation)
        if found is None or found.status != status:
            now = "not recorded" if found is None else found.status
            raise ValueError(f"generation {generation} is {now}, not {status}")

    def _prune(self) -> None:
        self.db.execute(
            "DELETE FROM generations WHERE status IN ('failed', 'rolled_back', 'retired') "
            "AND generation NOT IN (SELECT generation FROM generations "
            "WHERE status IN ('failed', 'rolled_back', 'retired') "
            "ORDER BY generation DESC LIMIT ?)",
            [HISTORY_KEPT],
        )


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _generation(row: dict[str, Any]) -> Generation:
    return Generation(
        generation=int(row["generation"]),
        document=json.loads(row["document"]),
        plan=json.loads(row["plan"]),
        artifacts=frozenset(json.loads(row["artifacts"])),
        status=row["status"],
        staged_at=float(row["staged_at"]),
        activated_at=None if row["activated_at"] is None else float(row["activated_at"]),
        updated_at=float(row["updated_at"]),
        error=row["error"],
    )


def _hashes(explicit: Iterable[str] | None, plan: Any, document: Any) -> set[str]:
    if explicit is not None:
        hashes = set(explicit)
        bad = sorted(h for h in hashes if not _SHA256.match(h))
        if bad:
            raise ValueError(f"not a sha256: {bad[0]!r}")
        return hashes
    return _find_hashes(plan) or _find_hashes(document)


def _find_hashes(value: Any) -> set[str]:
    """Every string under a ``sha256`` key, at any depth."""
    found: set[str] = set()
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                if key == "sha256" and isinstance(child, str) and _SHA256.match(child):
                    found.add(child)
                else:
                    pending.append(child)
        elif isinstance(item, list | tuple):
            pending.extend(item)
    return found
