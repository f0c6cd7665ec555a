"""The hub's SQLite store (sqlite-utils, WAL): every table and every statement the hub runs.

No SQL lives outside this module: the registry, the controller, the rollout engine, the API
and the ingest call the typed accessors of ``Store``. One ``Store`` is one connection; its
lock serialises the threads of a process (one writer), and ``BEGIN IMMEDIATE`` plus the
busy timeout serialise processes (the hub and an operator's CLI).

The schema is built by numbered migrations (``MIGRATIONS``, kept in ``PRAGMA user_version``);
opening a store applies the missing ones in order, each in one transaction. A database
written by a newer hub is refused (``SchemaTooNew``). Never edit a released migration:
append a new one.

Conventions: times are Unix seconds (float); JSON columns hold compact, key-sorted JSON;
``get_*`` raises ``NotFound``, ``find_*`` returns None.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlite_utils import Database

from contract.messages import Birth, CmdResult, Event, State, Status, Telemetry
from hub.errors import Conflict, Immutable, NotFound, SchemaTooNew, StoreError

Row = dict[str, Any]
SYSTEM_MODEL = ""
"""The ``model`` of the per-minute rollup rows that describe the whole device."""
ROLLOUT_EVENT_DEVICE = ""
"""``device_id`` of the events rollouts record (their ``session`` is the rollout id and
``seq`` counts per rollout); no device has an empty id."""
CMD_RESULT_KIND = "cmd.result"
"""Event kind under which command results (``up/result``) are stored."""
PRUNE_CHUNK = 5000
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (sqlite3.OperationalError,)
"""Store errors worth retrying: the database is busy or locked, the disk full or failing."""


# --- migrations ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    """One numbered schema step; ``statements`` run in one transaction."""

    version: int
    name: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "hub metadata and devices",
        (
            """CREATE TABLE hub_meta (
                key   TEXT PRIMARY KEY,
                value TEXT NOT NULL
            )""",
            """CREATE TABLE devices (
                device_id          TEXT PRIMARY KEY,
                labels             TEXT NOT NULL DEFAULT '{}',
                facts              TEXT,
                profile            TEXT,
                profile_name       TEXT,
                profile_source     TEXT,
                agent_version      TEXT,
                capabilities       TEXT NOT NULL DEFAULT '[]',
                inventory          TEXT NOT NULL DEFAULT '[]',
                session            INTEGER NOT NULL DEFAULT 0,
                birth_session      INTEGER,
                last_seq           INTEGER,
                online             INTEGER NOT NULL DEFAULT 0,
                first_seen         REAL NOT NULL,
                last_seen          REAL NOT NULL,
                born_at            REAL,
                applied_generation INTEGER NOT NULL DEFAULT 0,
                desired_generation INTEGER NOT NULL DEFAULT 0,
                phase              TEXT,
                state              TEXT,
                state_session      INTEGER,
                state_seq          INTEGER,
                state_at           REAL
            )""",
            "CREATE INDEX devices_online ON devices (online)",
            "CREATE INDEX devices_profile_name ON devices (profile_name)",
        ),
    ),
    Migration(
        2,
        "registry: artifacts, models, model sets, policies",
        (
            """CREATE TABLE artifacts (
                sha256     TEXT PRIMARY KEY CHECK (length(sha256) = 64),
                size       INTEGER NOT NULL CHECK (size >= 0),
                path       TEXT NOT NULL,
                created_at REAL NOT NULL
            )""",
            """CREATE TABLE models (
                id             INTEGER PRIMARY KEY,
                name           TEXT NOT NULL,
                version        TEXT NOT NULL,
                variant        TEXT NOT NULL,
                precision      TEXT NOT NULL,
                sha256         TEXT NOT NULL REFERENCES artifacts (sha256),
                size           INTEGER NOT NULL,
                inputs         TEXT NOT NULL DEFAULT '[]',
                outputs        TEXT NOT NULL DEFAULT '[]',
                opset          INTEGER,
                load_memory_mb REAL,
                latency_ms     REAL,
                drift          TEXT,
                metadata       TEXT NOT NULL DEFAULT '{}',
                created_at     REAL NOT NULL,
                UNIQUE (name, version, variant)
            )""",
            "CREATE INDEX models_sha256 ON models (sha256)",
            """CREATE TABLE model_sets (
                name         TEXT NOT NULL,
                version      TEXT NOT NULL,
                document     TEXT NOT NULL,
                published    INTEGER NOT NULL DEFAULT 0,
                created_at   REAL NOT NULL,
                published_at REAL,
                PRIMARY KEY (name, version)
            )""",
            """CREATE TRIGGER model_sets_immutable_update BEFORE UPDATE ON model_sets
            WHEN OLD.published = 1
            BEGIN SELECT RAISE(ABORT, 'model set is published and immutable'); END""",
            """CREATE TRIGGER model_sets_immutable_delete BEFORE DELETE ON model_sets
            WHEN OLD.published = 1
            BEGIN SELECT RAISE(ABORT, 'model set is published and immutable'); END""",
            """CREATE TABLE policies (
                name       TEXT NOT NULL,
                version    INTEGER NOT NULL CHECK (version > 0),
                document   TEXT NOT NULL,
                active     INTEGER NOT NULL DEFAULT 0,
                created_at REAL NOT NULL,
                PRIMARY KEY (name, version)
            )""",
            "CREATE UNIQUE INDEX policies_one_active ON policies (name) WHERE active = 1",
            """CREATE TRIGGER policies_immutable_update BEFORE UPDATE OF name, version, document
            ON policies
            BEGIN SELECT RAISE(ABORT, 'policy versions are immutable'); END""",
        ),
    ),
    Migration(
        3,
        "desired state per device",
        (
            """CREATE TABLE desired (
                device_id    TEXT NOT NULL,
                generation   INTEGER NOT NULL CHECK (generation > 0),
                content_hash TEXT NOT NULL,
                document     TEXT NOT NULL,
                issued_at    REAL NOT NULL,
                expires_at   REAL NOT NULL,
                published_at REAL,
                PRIMARY KEY (device_id, generation)
            )""",
            "CREATE INDEX desired_expires_at ON desired (expires_at)",
        ),
    ),
    Migration(
        4,
        "events and telemetry",
        (
            """CREATE TABLE events (
                id          INTEGER PRIMARY KEY,
                device_id   TEXT NOT NULL,
                session     INTEGER NOT NULL,
                seq         INTEGER NOT NULL,
                ts          REAL NOT NULL,
                kind        TEXT NOT NULL,
                generation  INTEGER,
                message     TEXT NOT NULL DEFAULT '',
                data        TEXT NOT NULL DEFAULT '{}',
                received_at REAL NOT NULL,
                UNIQUE (device_id, session, seq)
            )""",
            "CREATE INDEX events_ts ON events (ts)",
            "CREATE INDEX events_kind ON events (kind, ts)",
            """CREATE TABLE telemetry_raw (
                device_id   TEXT NOT NULL,
                session     INTEGER NOT NULL,
                seq         INTEGER NOT NULL,
                ts          REAL NOT NULL,
                payload     TEXT NOT NULL,
                received_at REAL NOT NULL,
                UNIQUE (device_id, session, seq)
            )""",
            "CREATE INDEX telemetry_raw_ts ON telemetry_raw (ts)",
            """CREATE TABLE telemetry_minute (
                device_id               TEXT NOT NULL,
                model                   TEXT NOT NULL,
                minute                  INTEGER NOT NULL,
                samples                 INTEGER NOT NULL DEFAULT 0,
                requests                INTEGER NOT NULL DEFAULT 0,
                errors                  INTEGER NOT NULL DEFAULT 0,
                latency_p95_max         REAL,
                latency_p95_wsum        REAL NOT NULL DEFAULT 0,
                latency_weight          INTEGER NOT NULL DEFAULT 0,
                latency_p99_max         REAL,
                cpu_percent_sum         REAL NOT NULL DEFAULT 0,
                cpu_percent_max         REAL,
                memory_used_mb_max      INTEGER,
                memory_available_mb_min INTEGER,
                temperature_c_max       REAL,
                throttled_samples       INTEGER NOT NULL DEFAULT 0,
                PRIMARY KEY (device_id, model, minute)
            ) WITHOUT ROWID""",
            "CREATE INDEX telemetry_minute_minute ON telemetry_minute (minute)",
        ),
    ),
    Migration(
        5,
        "rollouts",
        (
            """CREATE TABLE rollouts (
                id         INTEGER PRIMARY KEY,
                document   TEXT NOT NULL,
                state      TEXT NOT NULL DEFAULT '{}',
                created_at REAL NOT NULL,
                updated_at REAL NOT NULL
            )""",
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1].version
"""The schema version this code writes."""


def open_database(path: Path | str) -> Database:
    """Open (creating it and its directory) a SQLite file: WAL, synchronous NORMAL, foreign
    keys on, a 30 s busy timeout, usable from any thread, no implicit transactions."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            str(path), timeout=30.0, check_same_thread=False, isolation_level=None
        )
        db = Database(conn)
        db.enable_wal()
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(f"{path}: cannot open the store: {exc}") from exc
    return db


def schema_version(db: Database) -> int:
    """The schema version recorded in ``db`` (0 for an empty database)."""
    return int(db.execute("PRAGMA user_version").fetchone()[0])


@contextmanager
def transaction(db: Database) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any exception; nests as a savepoint."""
    if db.conn.in_transaction:
        db.execute("SAVEPOINT hub_store")
        try:
            yield
        except BaseException:
            if db.conn.in_transaction:
                db.execute("ROLLBACK TO SAVEPOINT hub_store")
                db.execute("RELEASE SAVEPOINT hub_store")
            raise
        db.execute("RELEASE SAVEPOINT hub_store")
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if db.conn.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def migrate(db: Database, target: int | None = None, *, source: str = "store") -> int:
    """Apply the migrations above the database's version up to ``target`` (default: all).

    Each migration runs in its own transaction together with the version bump, so a crash
    leaves the database at a whole version. Returns the version reached.
    """
    goal = SCHEMA_VERSION if target is None else target
    if not 0 <= goal <= SCHEMA_VERSION:
        raise ValueError(f"no schema version {goal} (0 to {SCHEMA_VERSION})")
    current = schema_version(db)
    if current > SCHEMA_VERSION:
        raise SchemaTooNew(source, current, SCHEMA_VERSION)
    for migration in MIGRATIONS:
        if migration.version > goal:
            break
        if migration.version <= current:
            continue
        with transaction(db):
            if schema_version(db) >= migration.version:  # another process got here first
                continue
            for statement in migration.statements:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {migration.version:d}")
    return schema_version(db)


# --- records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceRecord:
    """A device as the hub knows it: identity from its birth, liveness, reported state."""

    device_id: str
    labels: dict[str, str]
    facts: dict[str, Any] | None
    """The birth's hardware facts (``contract.profile.HardwareFacts`` as JSON)."""
    profile: dict[str, Any] | None
    """The firmware profile document the device reported in its birth."""
    profile_name: str | None
    profile_source: str | None
    agent_version: str | None
    capabilities: list[str]
    inventory: list[dict[str, Any]]
    session: int
    birth_session: int | None
    """Session of the last birth received; differs from ``session`` while one is awaited."""
    last_seq: int | None
    online: bool
    first_seen: float
    last_seen: float
    born_at: float | None
    applied_generation: int
    desired_generation: int
    phase: str | None
    state: dict[str, Any] | None
    """The last reported state message (``contract.messages.State`` as JSON)."""
    state_at: float | None


@dataclass(frozen=True)
class DeviceCursor:
    """What the ingest tracks per device: the current session and the highest seq in it."""

    session: int
    birth_session: int | None
    last_seq: int | None
    online: bool


@dataclass(frozen=True)
class ArtifactRecord:
    sha256: str
    size: int
    path: str
    created_at: float


@dataclass(frozen=True)
class ModelRecord:
    """One variant of one model version, its artifact and what the hub measured."""

    name: str
    version: str
    variant: str
    precision: str
    sha256: str
    size: int
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    opset: int | None
    load_memory_mb: float | None
    latency_ms: float | None
    drift: dict[str, Any] | None
    """How far a derived variant's outputs drift from its reference, on sample input."""
    metadata: dict[str, Any]
    created_at: float


@dataclass(frozen=True)
class ModelSetRecord:
    name: str
    version: str
    document: dict[str, Any]
    published: bool
    created_at: float
    published_at: float | None


@dataclass(frozen=True)
class PolicyRecord:
    name: str
    version: int
    document: dict[str, Any]
    active: bool
    created_at: float


@dataclass(frozen=True)
class DeviceBrief:
    """What the controller resolves a device by, without the birth's documents."""

    device_id: str
    labels: dict[str, str]
    profile_name: str | None
    applied_generation: int
    desired_generation: int


@dataclass(frozen=True)
class DesiredHead:
    """A device's newest desired document without the document itself."""

    device_id: str
    generation: int
    content_hash: str
    issued_at: float
    expires_at: float
    published_at: float | None


@dataclass(frozen=True)
class DesiredRecord:
    """One generation of one device's signed desired document (the whole envelope)."""

    device_id: str
    generation: int
    content_hash: str
    document: dict[str, Any]
    issued_at: float
    expires_at: float
    published_at: float | None


@dataclass(frozen=True)
class EventRecord:
    id: int
    device_id: str
    session: int
    seq: int
    ts: float
    kind: str
    generation: int | None
    message: str
    data: dict[str, Any]
    received_at: float


@dataclass(frozen=True)
class TelemetryRecord:
    device_id: str
    session: int
    seq: int
    ts: float
    payload: dict[str, Any]
    """The telemetry message as received (unknown fields included)."""
    received_at: float


@dataclass(frozen=True)
class TelemetryMinute:
    """One minute of one device (``model == ""``: the whole device) or one of its models."""

    device_id: str
    model: str
    minute: int
    """Start of the minute, Unix seconds (from the device's ``ts``)."""
    samples: int
    requests: int
    errors: int
    latency_p95_max: float | None
    latency_p95_avg: float | None
    """p95 of the intervals, weighted by their request counts."""
    latency_p99_max: float | None
    cpu_percent_avg: float | None
    cpu_percent_max: float | None
    memory_used_mb_max: int | None
    memory_available_mb_min: int | None
    temperature_c_max: float | None
    throttled_samples: int


@dataclass(frozen=True)
class HealthSummary:
    """Requests, errors and latency of one model over a set of devices and a time window."""

    samples: int
    requests: int
    errors: int
    latency_p95_avg: float | None
    latency_p95_max: float | None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None


@dataclass(frozen=True)
class RolloutRecord:
    id: int
    document: dict[str, Any]
    state: dict[str, Any]
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class RolloutHead:
    """A rollout without its documents: what a list or a tick needs first."""

    id: int
    name: str
    phase: str
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class RolloutEventIn:
    """An event of a rollout to store (``record_rollout_events``)."""

    ts: float
    kind: str
    message: str
    data: Mapping[str, Any]


@dataclass(frozen=True)
class DeviceSnapshot:
    """What a rollout observes of one device: liveness, profile, generations, the reported
    state, and the newest generation the hub stored for it (0: none)."""

    device_id: str
    online: bool
    last_seen: float
    profile_name: str | None
    applied_generation: int
    phase: str | None
    state: dict[str, Any] | None
    issued_generation: int


@dataclass(frozen=True)
class DesiredContent:
    """What one stored generation carries, without the rest of its document: the reported
    model set (the top policy's), every model by name and version, and the rollout."""

    model_set: dict[str, Any] | None
    models: dict[str, str]
    rollout: str | None


@dataclass(frozen=True)
class TelemetryIn:
    """A decoded telemetry message and its payload exactly as received."""

    message: Telemetry
    payload: str
    received_at: float


# --- helpers -------------------------------------------------------------------------------


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def _load(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _device(row: Row) -> DeviceRecord:
    return DeviceRecord(
        device_id=row["device_id"],
        labels=_load(row["labels"]),
        facts=_load(row["facts"]),
        profile=_load(row["profile"]),
        profile_name=row["profile_name"],
        profile_source=row["profile_source"],
        agent_version=row["agent_version"],
        capabilities=_load(row["capabilities"]),
        inventory=_load(row["inventory"]),
        session=row["session"],
        birth_session=row["birth_session"],
        last_seq=row["last_seq"],
        online=bool(row["online"]),
        first_seen=row["first_seen"],
        last_seen=row["last_seen"],
        born_at=row["born_at"],
        applied_generation=row["applied_generation"],
        desired_generation=row["desired_generation"],
        phase=row["phase"],
        state=_load(row["state"]),
        state_at=row["state_at"],
    )


def _model(row: Row) -> ModelRecord:
    return ModelRecord(
        name=row["name"],
        version=row["version"],
        variant=row["variant"],
        precision=row["precision"],
        sha256=row["sha256"],
        size=row["size"],
        inputs=_load(row["inputs"]),
        outputs=_load(row["outputs"]),
        opset=row["opset"],
        load_memory_mb=row["load_memory_mb"],
        latency_ms=row["latency_ms"],
        drift=_load(row["drift"]),
        metadata=_load(row["metadata"]),
        created_at=row["created_at"],
    )


def _model_set(row: Row) -> ModelSetRecord:
    return ModelSetRecord(
        name=row["name"],
        version=row["version"],
        document=_load(row["document"]),
        published=bool(row["published"]),
        created_at=row["created_at"],
        published_at=row["published_at"],
    )


def _policy(row: Row) -> PolicyRecord:
    return PolicyRecord(
        name=row["name"],
        version=row["version"],
        document=_load(row["document"]),
        active=bool(row["active"]),
        created_at=row["created_at"],
    )


def _desired(row: Row) -> DesiredRecord:
    return DesiredRecord(
        device_id=row["device_id"],
        generation=row["generation"],
        content_hash=row["content_hash"],
        document=_load(row["document"]),
        issued_at=row["issued_at"],
        expires_at=row["expires_at"],
        published_at=row["published_at"],
    )


def _event(row: Row) -> EventRecord:
    return EventRecord(
        id=row["id"],
        device_id=row["device_id"],
        session=row["session"],
        seq=row["seq"],
        ts=row["ts"],
        kind=row["kind"],
        generation=row["generation"],
        message=row["message"],
        data=_load(row["data"]),
        received_at=row["received_at"],
    )


def _telemetry(row: Row) -> TelemetryRecord:
    return TelemetryRecord(
        device_id=row["device_id"],
        session=row["session"],
        seq=row["seq"],
        ts=row["ts"],
        payload=_load(row["payload"]),
        received_at=row["received_at"],
    )


def _minute_record(row: Row) -> TelemetryMinute:
    samples = row["samples"]
    weight = row["latency_weight"]
    return TelemetryMinute(
        device_id=row["device_id"],
        model=row["model"],
        minute=row["minute"],
        samples=samples,
        requests=row["requests"],
        errors=row["errors"],
        latency_p95_max=row["latency_p95_max"],
        latency_p95_avg=row["latency_p95_wsum"] / weight if weight else None,
        latency_p99_max=row["latency_p99_max"],
        cpu_percent_avg=(
            row["cpu_percent_sum"] / samples
            if samples and row["cpu_percent_max"] is not None
            else None
        ),
        cpu_percent_max=row["cpu_percent_max"],
        memory_used_mb_max=row["memory_used_mb_max"],
        memory_available_mb_min=row["memory_available_mb_min"],
        temperature_c_max=row["temperature_c_max"],
        throttled_samples=row["throttled_samples"],
    )


def _rollout(row: Row) -> RolloutRecord:
    return RolloutRecord(
        id=row["id"],
        document=_load(row["document"]),
        state=_load(row["state"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


class _Rollups:
    """Per-minute rollup contributions of a batch of telemetry, merged by (device, model,
    minute) into the column order of ``_ROLLUP_UPSERT``."""

    def __init__(self) -> None:
        self._acc: dict[tuple[str, str, int], list[Any]] = {}

    def _row(self, key: tuple[str, str, int]) -> list[Any]:
        row = self._acc.get(key)
        if row is None:
            row = self._acc[key] = [
                *key,
                0,
                0,
                0,
                None,
                0.0,
                0,
                None,
                0.0,
                None,
                None,
                None,
                None,
                0,
            ]
        return row

    def add(self, t: Telemetry) -> None:
        minute = int(t.ts // 60) * 60
        requests = errors = 0
        for name, m in t.models.items():
            requests += m.requests
            errors += m.errors
            row = self._row((t.device_id, name, minute))
            row[3] += 1
            row[4] += m.requests
            row[5] += m.errors
            lat = m.latency_ms
            if lat is not None:
                weight = max(m.requests, 1)
                row[6] = _nmax(row[6], lat.p95)
                row[7] += lat.p95 * weight
                row[8] += weight
                row[9] = _nmax(row[9], lat.p99)
        s = t.system
        row = self._row((t.device_id, SYSTEM_MODEL, minute))
        row[3] += 1
        row[4] += requests
        row[5] += errors
        row[10] += s.cpu_percent
        row[11] = _nmax(row[11], s.cpu_percent)
        row[12] = _nmax(row[12], s.memory_used_mb)
        row[13] = _nmin(row[13], s.memory_available_mb)
        row[14] = _nmax(row[14], s.temperature_c)
        row[15] += 1 if s.throttled else 0

    def rows(self) -> list[list[Any]]:
        return list(self._acc.values())


def _nmax(a: Any, b: Any) -> Any:
    return b if a is None else a if b is None else max(a, b)


def _nmin(a: Any, b: Any) -> Any:
    return b if a is None else a if b is None else min(a, b)


_ROLLUP_UPSERT = """
INSERT INTO telemetry_minute (
    device_id, model, minute, samples, requests, errors, latency_p95_max, latency_p95_wsum,
    latency_weight, latency_p99_max, cpu_percent_sum, cpu_percent_max, memory_used_mb_max,
    memory_available_mb_min, temperature_c_max, throttled_samples
) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (device_id, model, minute) DO UPDATE SET
    samples = samples + excluded.samples,
    requests = requests + excluded.requests,
    errors = errors + excluded.errors,
    latency_p95_max = coalesce(max(latency_p95_max, excluded.latency_p95_max),
                               latency_p95_max, excluded.latency_p95_max),
    latency_p95_wsum = latency_p95_wsum + excluded.latency_p95_wsum,
    latency_weight = latency_weight + excluded.latency_weight,
    latency_p99_max = coalesce(max(latency_p99_max, excluded.latency_p99_max),
                               latency_p99_max, excluded.latency_p99_max),
    cpu_percent_sum = cpu_percent_sum + excluded.cpu_percent_sum,
    cpu_percent_max = coalesce(max(cpu_percent_max, excluded.cpu_percent_max),
                               cpu_percent_max, excluded.cpu_percent_max),
    memory_used_mb_max = coalesce(max(memory_used_mb_max, excluded.memory_used_mb_max),
                                  memory_used_mb_max, excluded.memory_used_mb_max),
    memory_available_mb_min = coalesce(
        min(memory_available_mb_min, excluded.memory_available_mb_min),
        memory_available_mb_min, excluded.memory_available_mb_min),
    temperature_c_max = coalesce(max(temperature_c_max, excluded.temperature_c_max),
                                 temperature_c_max, excluded.temperature_c_max),
    throttled_samples = throttled_samples + excluded.throttled_samples
"""


_TOUCH = """
INSERT INTO devices (device_id, session, last_seq, online, first_seen, last_seen)
VALUES (?, ?, ?, 1, ?, ?)
ON CONFLICT (device_id) DO UPDATE SET
    last_seen = max(devices.last_seen, excluded.last_seen),
    last_seq = CASE
        WHEN excluded.session > devices.session THEN excluded.last_seq
        WHEN excluded.session = devices.session
        THEN max(coalesce(devices.last_seq, -1), excluded.last_seq)
        ELSE devices.last_seq END,
    online = CASE WHEN excluded.session > devices.session
        THEN 1 ELSE devices.online END,
    session = max(devices.session, excluded.session)
"""
"""Record that a device was heard from (creating it): last seen, session and seq."""


class Store:
    """The hub's store: one SQLite connection, migrated on open, shared by a process's threads.

    Every accessor is one transaction unless it runs inside ``transaction()``, which groups
    several (the ingest writes a whole batch that way).
    """

    def __init__(self, path: Path | str, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.clock = clock
        self._lock = threading.RLock()
        self.db = open_database(self.path)
        try:
            migrate(self.db, source=str(self.path))
        except BaseException:
            self.db.close()
            raise

    # --- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        with self._lock:
            return schema_version(self.db)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Hold the store's lock and one SQLite transaction (a savepoint when nested)."""
        with self._lock, transaction(self.db):
            yield

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._lock:
            return list(self.db.query(sql, params))

    def _row(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    # --- hub_meta ------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        """A value of ``hub_meta``, or None."""
        row = self._row("SELECT value FROM hub_meta WHERE key = ?", (key,))
        return None if row is None else str(row["value"])

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction():
            self.db.execute(
                "INSERT INTO hub_meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def list_meta(self, prefix: str) -> dict[str, str]:
        """Every ``hub_meta`` entry whose key starts with ``prefix``, by key."""
        rows = self._rows(
            "SELECT key, value FROM hub_meta WHERE substr(key, 1, ?) = ? ORDER BY key",
            (len(prefix), prefix),
        )
        return {str(r["key"]): str(r["value"]) for r in rows}

    def delete_meta(self, key: str) -> bool:
        """Remove a ``hub_meta`` entry; False when there was none."""
        with self.transaction():
            return self.db.execute("DELETE FROM hub_meta WHERE key = ?", (key,)).rowcount > 0

    # --- devices: ingest writes ----------------------------------------------------------

    def device_cursors(self) -> dict[str, DeviceCursor]:
        """Session, birth session, last seq and online flag of every device (ingest start)."""
        rows = self._rows("SELECT device_id, session, birth_session, last_seq, online FROM devices")
        return {
            r["device_id"]: DeviceCursor(
                r["session"], r["birth_session"], r["last_seq"], bool(r["online"])
            )
            for r in rows
        }

    def record_birth(self, birth: Birth, received_at: float) -> bool:
        """Create or update the device from its birth; False (ignored) for an older session.

        A birth of the current or a newer session replaces identity, facts, profile, labels,
        capabilities and inventory, makes ``birth.session`` the current session and marks the
        device online (unless the Will of that same session came first).
        """
        profile = birth.profile.model_dump(mode="json", by_alias=True)
        with self.transaction():
            cur = self.db.execute(
                """
                INSERT INTO devices (
                    device_id, labels, facts, profile, profile_name, profile_source,
                    agent_version, capabilities, inventory, session, birth_session, last_seq,
                    online, first_seen, last_seen, born_at, applied_generation
                ) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?)
                ON CONFLICT (device_id) DO UPDATE SET
                    labels = excluded.labels,
                    facts = excluded.facts,
                    profile = excluded.profile,
                    profile_name = excluded.profile_name,
                    profile_source = excluded.profile_source,
                    agent_version = excluded.agent_version,
                    capabilities = excluded.capabilities,
                    inventory = excluded.inventory,
                    last_seq = CASE
                        WHEN devices.session = excluded.session
                        THEN max(coalesce(devices.last_seq, -1), excluded.last_seq)
                        ELSE excluded.last_seq END,
                    session = excluded.session,
                    birth_session = excluded.session,
                    online = CASE WHEN excluded.session > devices.session OR devices.online = 1
                        THEN 1 ELSE 0 END,
                    last_seen = max(devices.last_seen, excluded.last_seen),
                    born_at = excluded.born_at,
                    applied_generation = CASE
                        WHEN devices.state_session IS NULL
                          OR (excluded.session, excluded.last_seq)
                             > (devices.state_session, devices.state_seq)
                        THEN excluded.applied_generation
                        ELSE devices.applied_generation END
                WHERE excluded.session >= devices.session
                """,
                (
                    birth.device_id,
                    _dump(birth.labels),
                    _dump(birth.facts.model_dump(mode="json", by_alias=True)),
                    _dump(profile),
                    profile.get("name"),
                    birth.profile_source,
                    birth.agent_version,
                    _dump(birth.capabilities),
                    _dump([i.model_dump(mode="json", by_alias=True) for i in birth.inventory]),
                    birth.session,
                    birth.session,
                    birth.seq,
                    received_at,
                    received_at,
                    birth.ts,
                    birth.applied_generation,
                ),
            )
            return cur.rowcount > 0

    def record_status(self, status: Status, received_at: float) -> bool:
        """Apply an online/offline status; False (ignored) for a session older than the
        device's current one (a late Will, a stale retained status), and for ``online``
        after the Will of the same session (offline ends a session)."""
        online = 1 if status.state == "online" else 0
        with self.transaction():
            cur = self.db.execute(
                """
                INSERT INTO devices (device_id, session, last_seq, online, first_seen, last_seen)
                VALUES (?, ?, ?, ?, ?, ?)
                ON CONFLICT (device_id) DO UPDATE SET
                    online = excluded.online,
                    last_seq = CASE
                        WHEN excluded.last_seq IS NULL THEN devices.last_seq
                        WHEN devices.session = excluded.session
                        THEN max(coalesce(devices.last_seq, -1), excluded.last_seq)
                        ELSE excluded.last_seq END,
                    session = excluded.session,
                    last_seen = CASE WHEN excluded.online = 1
                        THEN max(devices.last_seen, excluded.last_seen)
                        ELSE devices.last_seen END
                WHERE excluded.session > devices.session
                   OR (excluded.session = devices.session
                       AND (devices.online = 1 OR excluded.online = 0))
                """,
                (status.device_id, status.session, status.seq, online, received_at, received_at),
            )
            return cur.rowcount > 0

    def touch_device(self, device_id: str, session: int, seq: int, received_at: float) -> None:
        """Note a message of ``session`` / ``seq``: last seen, highest seq of the current
        session; a newer session becomes current (and the device online). Creates the row
        for a device not seen before."""
        with self.transaction():
            self._touch(device_id, session, seq, received_at)

    def _touch(self, device_id: str, session: int, seq: int, received_at: float) -> None:
        with self._lock:
            self.db.execute(_TOUCH, (device_id, session, seq, received_at, received_at))

    def record_state(self, state: State, received_at: float) -> bool:
        """Store a reported state unless a newer one (by session, then seq) is stored."""
        with self.transaction():
            self._touch(state.device_id, state.session, state.seq, received_at)
            cur = self.db.execute(
                """
                UPDATE devices SET
                    applied_generation = ?, desired_generation = ?, phase = ?, state = ?,
                    state_session = ?, state_seq = ?, state_at = ?
                WHERE device_id = ?
                  AND (state_session IS NULL OR (state_session, state_seq) < (?, ?))
                """,
                (
                    state.applied_generation,
                    state.desired_generation,
                    state.phase,
                    _dump(state.model_dump(mode="json", by_alias=True)),
                    state.session,
                    state.seq,
                    state.ts,
                    state.device_id,
                    state.session,
                    state.seq,
                ),
            )
            return cur.rowcount > 0

    def record_event(self, event: Event, received_at: float) -> bool:
        """Store an event once per (device, session, seq); False for a duplicate."""
        return self._insert_event(
            event.device_id,
            session=event.session,
            seq=event.seq,
            ts=event.ts,
            kind=event.kind,
            generation=event.generation,
            message=event.message,
            data=event.data,
            received_at=received_at,
        )

    def record_result(self, result: CmdResult, received_at: float) -> bool:
        """Store a command result as a ``cmd.result`` event; False for a duplicate."""
        data = {"cmd_id": result.cmd_id, "ok": result.ok, "result": result.result}
        if result.error is not None:
            data["error"] = result.error
        message = result.error or ("ok" if result.ok else "failed")
        return self._insert_event(
            result.device_id,
            session=result.session,
            seq=result.seq,
            ts=result.ts,
            kind=CMD_RESULT_KIND,
            generation=None,
            message=message,
            data=data,
            received_at=received_at,
        )

    def _insert_event(
        self,
        device_id: str,
        *,
        session: int,
        seq: int,
        ts: float,
        kind: str,
        generation: int | None,
        message: str,
        data: Mapping[str, Any],
        received_at: float,
    ) -> bool:
        with self.transaction():
            self._touch(device_id, session, seq, received_at)
            cur = self.db.execute(
                """
                INSERT OR IGNORE INTO events (
                    device_id, session, seq, ts, kind, generation, message, data, received_at
                ) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                """,
                (device_id, session, seq, ts, kind, generation, message, _dump(data), received_at),
            )
            return cur.rowcount > 0

    def record_telemetry(self, items: Sequence[TelemetryIn]) -> list[bool]:
        """Store telemetry once per (device, session, seq) and add the new ones to the
        per-minute rollups. Returns, per item, whether it was new (False: a duplicate)."""
        if not items:
            return []
        touched: dict[tuple[str, int], tuple[int, float]] = {}
        rows = []
        for item in items:
            t = item.message
            key = (t.device_id, t.session)
            seen = touched.get(key)
            if seen is None or seen[0] < t.seq or seen[1] < item.received_at:
                touched[key] = (
                    t.seq if seen is None else max(seen[0], t.seq),
                    item.received_at if seen is None else max(seen[1], item.received_at),
                )
            rows.append((t.device_id, t.session, t.seq, t.ts, item.payload, item.received_at))
        conn = self.db.conn
        with self.transaction():
            conn.executemany(
                _TOUCH,
                [
                    (device_id, session, seq, seen_at, seen_at)
                    for (device_id, session), (seq, seen_at) in sorted(touched.items())
                ],
            )
            before = conn.execute("SELECT coalesce(max(rowid), 0) FROM telemetry_raw").fetchone()[0]
            changes = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO telemetry_raw "
                "(device_id, session, seq, ts, payload, received_at) VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            if conn.total_changes - changes == len(rows):
                new = [True] * len(rows)
            else:
                inserted = set(
                    conn.execute(
                        "SELECT device_id, session, seq FROM telemetry_raw WHERE rowid > ?",
                        (before,),
                    ).fetchall()
                )
                new = []
                for row in rows:
                    key3 = (row[0], row[1], row[2])
                    new.append(key3 in inserted)
                    inserted.discard(key3)
            rollups = _Rollups()
            for item, fresh in zip(items, new, strict=True):
                if fresh:
                    rollups.add(item.message)
            conn.executemany(_ROLLUP_UPSERT, rollups.rows())
        return new

    # --- devices: reads ------------------------------------------------------------------

    def find_device(self, device_id: str) -> DeviceRecord | None:
        row = self._row("SELECT * FROM devices WHERE device_id = ?", (device_id,))
        return None if row is None else _device(row)

    def get_device(self, device_id: str) -> DeviceRecord:
        device = self.find_device(device_id)
        if device is None:
            raise NotFound(f"no device {device_id!r}")
        return device

    @staticmethod
    def _device_where(
        online: bool | None,
        profile: str | None,
        labels: Mapping[str, str] | None,
        model: str | None,
        model_version: str | None,
    ) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if online is not None:
            clauses.append("online = ?")
            params.append(1 if online else 0)
        if profile is not None:
            clauses.append("profile_name = ?")
            params.append(profile)
        for key, value in (labels or {}).items():
            clauses.append("json_extract(labels, ?) = ?")
            params += ["$." + json.dumps(key), value]
        if model is not None or model_version is not None:
            clauses.append(
                "EXISTS (SELECT 1 FROM json_each(devices.state, '$.models') AS m WHERE "
                "(? IS NULL OR json_extract(m.value, '$.name') = ?) AND "
                "(? IS NULL OR json_extract(m.value, '$.version') = ?))"
            )
            params += [model, model, model_version, model_version]
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    def device_briefs(self) -> list[DeviceBrief]:
        """Every device's id, labels, profile name and generations, ordered by id."""
        rows = self._rows(
            "SELECT device_id, labels, profile_name, applied_generation, desired_generation "
            "FROM devices ORDER BY device_id"
        )
        return [
            DeviceBrief(
                device_id=r["device_id"],
                labels=_load(r["labels"]),
                profile_name=r["profile_name"],
                applied_generation=r["applied_generation"],
                desired_generation=r["desired_generation"],
            )
            for r in rows
        ]

    def list_devices(
        self,
        *,
        online: bool | None = None,
        profile: str | None = None,
        labels: Mapping[str, str] | None = None,
        model: str | None = None,
        model_version: str | None = None,
        after: str | None = None,
        limit: int | None = 100,
    ) -> list[DeviceRecord]:
        """Devices ordered by id, filtered by ``online``, ``profile`` (profile name),
        ``labels`` (every key equal), ``model`` / ``model_version`` (in the reported state);
        ``after`` is the last id of the previous page, ``limit`` None for all."""
        where, params = self._device_where(online, profile, labels, model, model_version)
        if after is not None:
            where += (" AND " if where else " WHERE ") + "device_id > ?"
            params.append(after)
        sql = f"SELECT * FROM devices{where} ORDER BY device_id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [_device(r) for r in self._rows(sql, params)]

    def count_devices(
        self,
        *,
        online: bool | None = None,
        profile: str | None = None,
        labels: Mapping[str, str] | None = None,
        model: str | None = None,
        model_version: str | None = None,
    ) -> int:
        """How many devices match the filters of ``list_devices``."""
        where, params = self._device_where(online, profile, labels, model, model_version)
        row = self._row(f"SELECT count(*) AS n FROM devices{where}", params)
        return int(row["n"]) if row else 0

    def delete_device(self, device_id: str) -> None:
        """Forget a decommissioned device (its events, telemetry and desired history stay)."""
        with self.transaction():
            cur = self.db.execute("DELETE FROM devices WHERE device_id = ?", (device_id,))
            if cur.rowcount == 0:
                raise NotFound(f"no device {device_id!r}")

    # --- artifacts -----------------------------------------------------------------------

    def add_artifact(self, sha256: str, size: int, path: str) -> ArtifactRecord:
        """Record a content-addressed file; the same hash again returns the stored record.
        Conflict when the hash is stored with another size."""
        with self.transaction():
            existing = self.find_artifact(sha256)
            if existing is not None:
                if existing.size != size:
                    raise Conflict(
                        f"artifact {sha256} is stored with size {existing.size}, not {size}"
                    )
                return existing
            now = self.clock()
            try:
                self.db.execute(
                    "INSERT INTO artifacts (sha256, size, path, created_at) VALUES (?, ?, ?, ?)",
                    (sha256, size, path, now),
                )
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"artifact {sha256!r}: {exc}") from exc
            return ArtifactRecord(sha256, size, path, now)

    def find_artifact(self, sha256: str) -> ArtifactRecord | None:
        row = self._row("SELECT * FROM artifacts WHERE sha256 = ?", (sha256,))
        return None if row is None else ArtifactRecord(**row)

    def get_artifact(self, sha256: str) -> ArtifactRecord:
        artifact = self.find_artifact(sha256)
        if artifact is None:
            raise NotFound(f"no artifact with sha256 {sha256}")
        return artifact

    def list_artifacts(self) -> list[ArtifactRecord]:
        return [ArtifactRecord(**r) for r in self._rows("SELECT * FROM artifacts ORDER BY sha256")]

    def delete_artifact(self, sha256: str) -> None:
        """Forget an artifact; Conflict while a model variant uses it."""
        with self.transaction():
            try:
                cur = self.db.execute("DELETE FROM artifacts WHERE sha256 = ?", (sha256,))
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"artifact {sha256} is used by a model variant") from exc
            if cur.rowcount == 0:
                raise NotFound(f"no artifact with sha256 {sha256}")

    # --- models --------------------------------------------------------------------------

    def add_model(
        self,
        *,
        name: str,
        version: str,
        variant: str,
        precision: str,
        sha256: str,
        size: int,
        inputs: Sequence[Mapping[str, Any]] = (),
        outputs: Sequence[Mapping[str, Any]] = (),
        opset: int | None = None,
        load_memory_mb: float | None = None,
        latency_ms: float | None = None,
        drift: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> ModelRecord:
        """Register one variant of a model version; its artifact must be stored first.

        Adding the same (name, version, variant) with the same sha256 again returns the
        stored record; with another sha256 it is a Conflict (versions are immutable).
        """
        with self.transaction():
            existing = self.find_model(name, version, variant)
            if existing is not None:
                if existing.sha256 != sha256:
                    raise Conflict(
                        f"model {name} {version} variant {variant} exists with another "
                        f"artifact ({existing.sha256[:12]}); give it a new version"
                    )
                return existing
            if self.find_artifact(sha256) is None:
                raise NotFound(f"no artifact with sha256 {sha256}; store the file first")
            now = self.clock()
            self.db.execute(
                """
                INSERT INTO models (
                    name, version, variant, precision, sha256, size, inputs, outputs, opset,
                    load_memory_mb, latency_ms, drift, metadata, created_at
                ) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                """,
                (
                    name,
                    version,
                    variant,
                    precision,
                    sha256,
                    size,
                    _dump(list(inputs)),
                    _dump(list(outputs)),
                    opset,
                    load_memory_mb,
                    latency_ms,
                    None if drift is None else _dump(drift),
                    _dump(dict(metadata or {})),
                    now,
                ),
            )
            return self.get_model(name, version, variant)

    def update_model_measurements(
        self,
        name: str,
        version: str,
        variant: str,
        *,
        load_memory_mb: float | None = None,
        latency_ms: float | None = None,
        drift: Mapping[str, Any] | None = None,
    ) -> ModelRecord:
        """Set what the hub measured of a variant (arguments left None are kept)."""
        with self.transaction():
            cur = self.db.execute(
                """
                UPDATE models SET
                    load_memory_mb = coalesce(?, load_memory_mb),
                    latency_ms = coalesce(?, latency_ms),
                    drift = coalesce(?, drift)
                WHERE name = ? AND version = ? AND variant = ?
                """,
                (
                    load_memory_mb,
                    latency_ms,
                    None if drift is None else _dump(drift),
                    name,
                    version,
                    variant,
                ),
            )
            if cur.rowcount == 0:
                raise NotFound(f"no model {name} {version} variant {variant}")
            return self.get_model(name, version, variant)

    def find_model(self, name: str, version: str, variant: str) -> ModelRecord | None:
        row = self._row(
            "SELECT * FROM models WHERE name = ? AND version = ? AND variant = ?",
            (name, version, variant),
        )
        return None if row is None else _model(row)

    def get_model(self, name: str, version: str, variant: str) -> ModelRecord:
        model = self.find_model(name, version, variant)
        if model is None:
            raise NotFound(f"no model {name} {version} variant {variant}")
        return model

    def list_models(self, name: str | None = None, version: str | None = None) -> list[ModelRecord]:
        """Model variants ordered by name, version (as text), variant; optionally filtered."""
        rows = self._rows(
            "SELECT * FROM models WHERE (? IS NULL OR name = ?) AND (? IS NULL OR version = ?) "
            "ORDER BY name, version, variant",
            (name, name, version, version),
        )
        return [_model(r) for r in rows]

    # --- model sets ----------------------------------------------------------------------

    def put_model_set(self, name: str, version: str, document: Mapping[str, Any]) -> ModelSetRecord:
        """Create or replace a draft model set. A published one cannot change: the same
        document again returns it, another raises Immutable."""
        text = _dump(document)
        with self.transaction():
            existing = self.find_model_set(name, version)
            if existing is not None and existing.published:
                if _dump(existing.document) == text:
                    return existing
                raise Immutable(
                    f"model set {name} {version} is published and cannot change; "
                    "give it a new version"
                )
            if existing is None:
                self.db.execute(
                    "INSERT INTO model_sets (name, version, document, published, created_at) "
                    "VALUES (?, ?, ?, 0, ?)",
                    (name, version, text, self.clock()),
                )
            else:
                self.db.execute(
                    "UPDATE model_sets SET document = ? WHERE name = ? AND version = ?",
                    (text, name, version),
                )
            return self.get_model_set(name, version)

    def publish_model_set(self, name: str, version: str) -> ModelSetRecord:
        """Make a model set immutable and usable by policies (idempotent)."""
        with self.transaction():
            existing = self.get_model_set(name, version)
            if existing.published:
                return existing
            self.db.execute(
                "UPDATE model_sets SET published = 1, published_at = ? "
                "WHERE name = ? AND version = ?",
                (self.clock(), name, version),
            )
            return self.get_model_set(name, version)

    def find_model_set(self, name: str, version: str) -> ModelSetRecord | None:
        row = self._row("SELECT * FROM model_sets WHERE name = ? AND version = ?", (name, version))
        return None if row is None else _model_set(row)

    def get_model_set(self, name: str, version: str) -> ModelSetRecord:
        record = self.find_model_set(name, version)
        if record is None:
            raise NotFound(f"no model set {name} {version}")
        return record

    def list_model_sets(
        self, name: str | None = None, *, published: bool | None = None
    ) -> list[ModelSetRecord]:
        """Model sets by name, then creation order."""
        rows = self._rows(
            "SELECT * FROM model_sets WHERE (? IS NULL OR name = ?) "
            "AND (? IS NULL OR published = ?) ORDER BY name, created_at, version",
            (name, name, published, None if published is None else int(published)),
        )
        return [_model_set(r) for r in rows]

    def delete_model_set(self, name: str, version: str) -> None:
        """Delete a draft model set; Immutable for a published one."""
        with self.transaction():
            record = self.get_model_set(name, version)
            if record.published:
                raise Immutable(f"model set {name} {version} is published and cannot be deleted")
            self.db.execute(
                "DELETE FROM model_sets WHERE name = ? AND version = ?", (name, version)
            )

    # --- policies ------------------------------------------------------------------------

    def put_policy(self, name: str, document: Mapping[str, Any]) -> PolicyRecord:
        """Store ``document`` as the active version of policy ``name``.

        A document different from the newest version becomes version newest + 1; the same
        document as the newest version re-activates that version. Either way every other
        version of the policy is deactivated.
        """
        text = _dump(document)
        with self.transaction():
            newest = self._row(
                "SELECT * FROM policies WHERE name = ? ORDER BY version DESC LIMIT 1", (name,)
            )
            self.db.execute("UPDATE policies SET active = 0 WHERE name = ?", (name,))
            if newest is not None and newest["document"] == text:
                version = int(newest["version"])
                self.db.execute(
                    "UPDATE policies SET active = 1 WHERE name = ? AND version = ?",
                    (name, version),
                )
            else:
                version = int(newest["version"]) + 1 if newest is not None else 1
                self.db.execute(
                    "INSERT INTO policies (name, version, document, active, created_at) "
                    "VALUES (?, ?, ?, 1, ?)",
                    (name, version, text, self.clock()),
                )
            return self.get_policy(name, version)

    def activate_policy(self, name: str, version: int) -> PolicyRecord:
        """Make an earlier (or any) stored version of a policy the active one."""
        with self.transaction():
            self.get_policy(name, version)
            self.db.execute("UPDATE policies SET active = 0 WHERE name = ?", (name,))
            self.db.execute(
                "UPDATE policies SET active = 1 WHERE name = ? AND version = ?", (name, version)
            )
            return self.get_policy(name, version)

    def deactivate_policy(self, name: str) -> None:
        """Stop applying policy ``name`` (its versions stay); NotFound if none is active."""
        with self.transaction():
            cur = self.db.execute(
                "UPDATE policies SET active = 0 WHERE name = ? AND active = 1", (name,)
            )
            if cur.rowcount == 0:
                raise NotFound(f"no active policy {name!r}")

    def get_policy(self, name: str, version: int | None = None) -> PolicyRecord:
        """A version of a policy; without ``version``, the active one."""
        if version is None:
            row = self._row("SELECT * FROM policies WHERE name = ? AND active = 1", (name,))
            if row is None:
                raise NotFound(f"no active policy {name!r}")
        else:
            row = self._row(
                "SELECT * FROM policies WHERE name = ? AND version = ?", (name, version)
            )
            if row is None:
                raise NotFound(f"no policy {name!r} version {version}")
        return _policy(row)

    def list_policies(self, *, active_only: bool = True) -> list[PolicyRecord]:
        """Active policies by name (or every version of every policy)."""
        sql = "SELECT * FROM policies"
        if active_only:
            sql += " WHERE active = 1"
        return [_policy(r) for r in self._rows(sql + " ORDER BY name, version")]

    def policy_history(self, name: str) -> list[PolicyRecord]:
        """Every version of one policy, oldest first."""
        rows = self._rows("SELECT * FROM policies WHERE name = ? ORDER BY version", (name,))
        return [_policy(r) for r in rows]

    # --- desired state -------------------------------------------------------------------

    def record_desired(
        self,
        device_id: str,
        generation: int,
        content_hash: str,
        document: Mapping[str, Any],
        *,
        issued_at: float,
        expires_at: float,
    ) -> DesiredRecord:
        """Store a new signed document; Conflict unless ``generation`` is above the newest
        stored for the device (generations only grow)."""
        self._insert_desired(
            device_id,
            generation,
            content_hash,
            _dump(document),
            issued_at=issued_at,
            expires_at=expires_at,
        )
        return DesiredRecord(
            device_id, generation, content_hash, dict(document), issued_at, expires_at, None
        )

    def record_desired_encoded(
        self,
        device_id: str,
        generation: int,
        content_hash: str,
        encoded: bytes,
        *,
        issued_at: float,
        expires_at: float,
    ) -> None:
        """``record_desired`` for a document already encoded as JSON (as it is published),
        stored as is: the fan-out neither parses nor re-encodes it."""
        self._insert_desired(
            device_id,
            generation,
            content_hash,
            encoded.decode("utf-8"),
            issued_at=issued_at,
            expires_at=expires_at,
        )

    def _insert_desired(
        self,
        device_id: str,
        generation: int,
        content_hash: str,
        text: str,
        *,
        issued_at: float,
        expires_at: float,
    ) -> None:
        with self.transaction():
            row = self._row(
                "SELECT max(generation) AS g FROM desired WHERE device_id = ?", (device_id,)
            )
            newest = row["g"] if row and row["g"] is not None else 0
            if generation <= newest:
                raise Conflict(
                    f"device {device_id}: generation {generation} is not above the stored "
                    f"generation {newest}"
                )
            self.db.execute(
                "INSERT INTO desired (device_id, generation, content_hash, document, issued_at, "
                "expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                (device_id, generation, content_hash, text, issued_at, expires_at),
            )

    def mark_desired_published(
        self, device_id: str, generation: int, published_at: float | None = None
    ) -> None:
        """Note that the broker acknowledged the retained publish of a document."""
        with self.transaction():
            cur = self.db.execute(
                "UPDATE desired SET published_at = ? WHERE device_id = ? AND generation = ?",
                (self.clock() if published_at is None else published_at, device_id, generation),
            )
            if cur.rowcount == 0:
                raise NotFound(f"no desired generation {generation} for device {device_id}")

    def delete_desired(self, device_id: str) -> int:
        """Forget every desired document of a device (``device revoke``): nothing is
        re-signed or re-published for it any more. Returns how many were removed."""
        with self.transaction():
            cur = self.db.execute("DELETE FROM desired WHERE device_id = ?", (device_id,))
            return int(cur.rowcount)

    _LATEST_DESIRED = (
        "SELECT d.* FROM desired AS d JOIN (SELECT device_id, max(generation) AS g FROM desired "
        "GROUP BY device_id) AS n ON d.device_id = n.device_id AND d.generation = n.g"
    )

    def latest_desired(self, device_id: str) -> DesiredRecord | None:
        """The newest document stored for a device, or None."""
        row = self._row(
            "SELECT * FROM desired WHERE device_id = ? ORDER BY generation DESC LIMIT 1",
            (device_id,),
        )
        return None if row is None else _desired(row)

    def latest_desired_heads(self) -> dict[str, DesiredHead]:
        """Generation, content hash and times of every device's newest document."""
        rows = self._rows(
            "SELECT d.device_id, d.generation, d.content_hash, d.issued_at, d.expires_at, "
            "d.published_at FROM desired AS d JOIN (SELECT device_id, max(generation) AS g "
            "FROM desired GROUP BY device_id) AS n "
            "ON d.device_id = n.device_id AND d.generation = n.g"
        )
        return {r["device_id"]: DesiredHead(**r) for r in rows}

    def latest_desired_all(self) -> dict[str, DesiredRecord]:
        """The newest document of every device that has one."""
        return {r["device_id"]: _desired(r) for r in self._rows(self._LATEST_DESIRED)}

    def desired_history(self, device_id: str, limit: int = 20) -> list[DesiredRecord]:
        """A device's documents, newest first."""
        rows = self._rows(
            "SELECT * FROM desired WHERE device_id = ? ORDER BY generation DESC LIMIT ?",
            (device_id, limit),
        )
        return [_desired(r) for r in rows]

    def desired_expiring_before(self, ts: float) -> list[DesiredRecord]:
        """Newest documents that expire before ``ts`` (candidates for re-signing)."""
        rows = self._rows(
            f"SELECT * FROM ({self._LATEST_DESIRED}) WHERE expires_at < ? ORDER BY expires_at",
            (ts,),
        )
        return [_desired(r) for r in rows]

    def unpublished_desired(self) -> list[DesiredRecord]:
        """Newest documents whose publish was never acknowledged (to publish again)."""
        rows = self._rows(
            f"SELECT * FROM ({self._LATEST_DESIRED}) WHERE published_at IS NULL ORDER BY device_id"
        )
        return [_desired(r) for r in rows]

    def devices_not_trusting(self, keyids: Iterable[str]) -> list[str]:
        """Devices whose applied desired document does not list every key in ``keyids``
        among its ``trusted_keys`` (or that applied none): retiring another key now would
        leave them unable to verify the next document."""
        wanted = set(keyids)
        with self._lock:
            devices = list(self.db.query("SELECT device_id, applied_generation FROM devices"))
            pending: list[str] = []
            for dev in devices:
                row = self._row(
                    "SELECT document FROM desired WHERE device_id = ? AND generation <= ? "
                    "ORDER BY generation DESC LIMIT 1",
                    (dev["device_id"], dev["applied_generation"]),
                )
                trusted: set[str] = set()
                if row is not None:
                    payload = _load(row["document"]).get("payload", {})
                    trusted = {k.get("keyid") for k in payload.get("trusted_keys", [])}
                if not wanted <= trusted:
                    pending.append(dev["device_id"])
        return sorted(pending)

    # --- events --------------------------------------------------------------------------

    def list_events(
        self,
        *,
        device_id: str | None = None,
        kind: str | None = None,
        since: float | None = None,
        until: float | None = None,
        before_id: int | None = None,
        limit: int = 100,
    ) -> list[EventRecord]:
        """Events newest first (by device time); ``before_id`` pages on from an event id."""
        clauses = ["1"]
        params: list[Any] = []
        for clause, value in (
            ("device_id = ?", device_id),
            ("kind = ?", kind),
            ("ts >= ?", since),
            ("ts < ?", until),
            ("id < ?", before_id),
        ):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        rows = self._rows(
            f"SELECT * FROM events WHERE {' AND '.join(clauses)} ORDER BY id DESC LIMIT ?",
            [*params, limit],
        )
        return [_event(r) for r in rows]

    def count_events(self, device_id: str | None = None) -> int:
        row = self._row(
            "SELECT count(*) AS n FROM events WHERE (? IS NULL OR device_id = ?)",
            (device_id, device_id),
        )
        return int(row["n"]) if row else 0

    # --- telemetry -----------------------------------------------------------------------

    def telemetry_tail(self, device_id: str, limit: int = 20) -> list[TelemetryRecord]:
        """A device's newest raw telemetry, newest first (by session, then seq)."""
        rows = self._rows(
            "SELECT * FROM telemetry_raw WHERE device_id = ? "
            "ORDER BY session DESC, seq DESC LIMIT ?",
            (device_id, limit),
        )
        return [_telemetry(r) for r in rows]

    def telemetry_after(
        self, device_id: str, session: int, seq: int, limit: int = 100
    ) -> list[TelemetryRecord]:
        """Raw telemetry after (session, seq), oldest first: for following a device."""
        rows = self._rows(
            "SELECT * FROM telemetry_raw WHERE device_id = ? AND (session, seq) > (?, ?) "
            "ORDER BY session, seq LIMIT ?",
            (device_id, session, seq, limit),
        )
        return [_telemetry(r) for r in rows]

    def count_telemetry(self, device_id: str | None = None) -> int:
        row = self._row(
            "SELECT count(*) AS n FROM telemetry_raw WHERE (? IS NULL OR device_id = ?)",
            (device_id, device_id),
        )
        return int(row["n"]) if row else 0

    def telemetry_minutes(
        self,
        device_id: str,
        *,
        model: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> list[TelemetryMinute]:
        """Per-minute rollups of a device, oldest first; ``model=""`` for the device rows."""
        rows = self._rows(
            "SELECT * FROM telemetry_minute WHERE device_id = ? AND (? IS NULL OR model = ?) "
            "AND (? IS NULL OR minute >= ?) AND (? IS NULL OR minute < ?) "
            "ORDER BY minute, model",
            (device_id, model, model, since, since, until, until),
        )
        return [_minute_record(r) for r in rows]

    def model_health(
        self, device_ids: Iterable[str], model: str, *, since: float, until: float
    ) -> HealthSummary:
        """Requests, errors and p95 latency of ``model`` on ``device_ids`` over the minutes
        that start in [since, until): what a rollout gate compares between cohorts."""
        ids = sorted(set(device_ids))
        totals = [0, 0, 0, 0.0, 0, None]
        with self._lock:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                row = self._row(
                    "SELECT sum(samples) AS s, sum(requests) AS r, sum(errors) AS e, "
                    "sum(latency_p95_wsum) AS w, sum(latency_weight) AS n, "
                    "max(latency_p95_max) AS m FROM telemetry_minute "
                    f"WHERE model = ? AND minute >= ? AND minute < ? AND device_id IN ({marks})",
                    (model, since, until, *chunk),
                )
                if row is None or row["s"] is None:
                    continue
                totals[0] += row["s"]
                totals[1] += row["r"]
                totals[2] += row["e"]
                totals[3] += row["w"]
                totals[4] += row["n"]
                totals[5] = _nmax(totals[5], row["m"])
        samples, requests, errors, wsum, weight, p95_max = totals
        return HealthSummary(
            samples=int(samples or 0),
            requests=int(requests or 0),
            errors=int(errors or 0),
            latency_p95_avg=float(wsum or 0) / float(weight) if weight else None,
            latency_p95_max=p95_max,
        )

    def prune_telemetry(self, raw_before: float, minutes_before: float | None = None) -> int:
        """Delete raw telemetry (and rollups, when ``minutes_before`` is given) older than
        the given times, in chunks so that ingest is never blocked for long. Returns the
        number of rows deleted."""
        deleted = 0
        for sql, ts in (
            (
                "DELETE FROM telemetry_raw WHERE rowid IN "
                "(SELECT rowid FROM telemetry_raw WHERE ts < ? LIMIT ?)",
                raw_before,
            ),
            (
                "DELETE FROM telemetry_minute WHERE (device_id, model, minute) IN "
                "(SELECT device_id, model, minute FROM telemetry_minute WHERE minute < ? "
                "LIMIT ?)",
                minutes_before,
            ),
        ):
            if ts is None:
                continue
            while True:
                with self.transaction():
                    n = self.db.execute(sql, (ts, PRUNE_CHUNK)).rowcount
                deleted += n
                if n < PRUNE_CHUNK:
                    break
        return deleted

    # --- rollouts ------------------------------------------------------------------------

    def create_rollout(
        self, document: Mapping[str, Any], state: Mapping[str, Any] | None = None
    ) -> RolloutRecord:
        now = self.clock()
        with self.transaction():
            cur = self.db.execute(
                "INSERT INTO rollouts (document, state, created_at, updated_at) "
                "VALUES (?, ?, ?, ?)",
                (_dump(document), _dump(dict(state or {})), now, now),
            )
            rollout_id = int(cur.lastrowid or 0)
        return self.get_rollout(rollout_id)

    def get_rollout(self, rollout_id: int) -> RolloutRecord:
        row = self._row("SELECT * FROM rollouts WHERE id = ?", (rollout_id,))
        if row is None:
            raise NotFound(f"no rollout {rollout_id}")
        return _rollout(row)

    def update_rollout_state(self, rollout_id: int, state: Mapping[str, Any]) -> RolloutRecord:
        with self.transaction():
            cur = self.db.execute(
                "UPDATE rollouts SET state = ?, updated_at = ? WHERE id = ?",
                (_dump(state), self.clock(), rollout_id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"no rollout {rollout_id}")
        return self.get_rollout(rollout_id)

    def list_rollouts(self) -> list[RolloutRecord]:
        return [_rollout(r) for r in self._rows("SELECT * FROM rollouts ORDER BY id")]

    def find_rollout(self, name: str) -> RolloutRecord | None:
        """The rollout whose document is named ``name`` (the newest such), or None."""
        row = self._row(
            "SELECT * FROM rollouts WHERE json_extract(document, '$.name') = ? "
            "ORDER BY id DESC LIMIT 1",
            (name,),
        )
        return None if row is None else _rollout(row)

    def rollout_heads(self, phases: Iterable[str] | None = None) -> list[RolloutHead]:
        """Every rollout (or those in ``phases``) by id: name, phase and times, without
        parsing the documents."""
        sql = (
            "SELECT id, json_extract(document, '$.name') AS name, "
            "coalesce(json_extract(state, '$.phase'), 'pending') AS phase, "
            "created_at, updated_at FROM rollouts"
        )
        params: list[Any] = []
        if phases is not None:
            wanted = sorted(set(phases))
            if not wanted:
                return []
            sql += f" WHERE phase IN ({','.join('?' * len(wanted))})"
            params += wanted
        rows = self._rows(sql + " ORDER BY id", params)
        return [
            RolloutHead(
                id=r["id"],
                name=str(r["name"]),
                phase=str(r["phase"]),
                created_at=r["created_at"],
                updated_at=r["updated_at"],
            )
            for r in rows
        ]

    def record_rollout_events(self, rollout_id: int, events: Sequence[RolloutEventIn]) -> int:
        """Append a rollout's events (``device_id`` ``""``, ``session`` the rollout id, ``seq``
        counting on); no device row is touched. Returns how many were stored."""
        if not events:
            return 0
        with self.transaction():
            row = self._row(
                "SELECT max(seq) AS s FROM events WHERE device_id = ? AND session = ?",
                (ROLLOUT_EVENT_DEVICE, rollout_id),
            )
            seq = int(row["s"]) if row is not None and row["s"] is not None else 0
            received = self.clock()
            for event in events:
                seq += 1
                self.db.execute(
                    "INSERT INTO events (device_id, session, seq, ts, kind, generation, message, "
                    "data, received_at) VALUES (?, ?, ?, ?, ?, NULL, ?, ?, ?)",
                    (
                        ROLLOUT_EVENT_DEVICE,
                        rollout_id,
                        seq,
                        event.ts,
                        event.kind,
                        event.message,
                        _dump(dict(event.data)),
                        received,
                    ),
                )
        return len(events)

    def list_rollout_events(
        self, rollout_id: int, *, limit: int = 100, before_id: int | None = None
    ) -> list[EventRecord]:
        """A rollout's events, newest first; ``before_id`` pages on from an event id."""
        rows = self._rows(
            "SELECT * FROM events WHERE device_id = ? AND session = ? "
            "AND (? IS NULL OR id < ?) ORDER BY id DESC LIMIT ?",
            (ROLLOUT_EVENT_DEVICE, rollout_id, before_id, before_id, limit),
        )
        return [_event(r) for r in rows]

    def device_snapshots(self, device_ids: Iterable[str]) -> dict[str, DeviceSnapshot]:
        """What a rollout observes of each known device among ``device_ids``, by id (one
        query per 500 devices)."""
        ids = sorted(set(device_ids))
        found: dict[str, DeviceSnapshot] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._rows(
                "SELECT d.device_id, d.online, d.last_seen, d.profile_name, "
                "d.applied_generation, d.phase, d.state, "
                "(SELECT max(g.generation) FROM desired AS g WHERE g.device_id = d.device_id) "
                f"AS issued FROM devices AS d WHERE d.device_id IN ({marks})",
                chunk,
            )
            for r in rows:
                found[r["device_id"]] = DeviceSnapshot(
                    device_id=r["device_id"],
                    online=bool(r["online"]),
                    last_seen=r["last_seen"],
                    profile_name=r["profile_name"],
                    applied_generation=r["applied_generation"],
                    phase=r["phase"],
                    state=_load(r["state"]),
                    issued_generation=int(r["issued"] or 0),
                )
        return found

    def desired_contents(
        self, keys: Iterable[tuple[str, int]]
    ) -> dict[tuple[str, int], DesiredContent]:
        """For each stored (device, generation) among ``keys``: its model set, its models'
        versions and its rollout, read inside SQLite (the documents are not parsed here)."""
        wanted = sorted(set(keys))
        found: dict[tuple[str, int], DesiredContent] = {}
        for start in range(0, len(wanted), 400):
            chunk = wanted[start : start + 400]
            values = ",".join("(?, ?)" for _ in chunk)
            params = [part for key in chunk for part in key]
            rows = self._rows(
                "SELECT device_id, generation, "
                "json_extract(document, '$.payload.model_set') AS model_set, "
                "json_extract(document, '$.payload.rollout') AS rollout, "
                "(SELECT json_group_object(json_extract(m.value, '$.name'), "
                "json_extract(m.value, '$.version')) "
                "FROM json_each(document, '$.payload.models') AS m) AS models "
                f"FROM desired WHERE (device_id, generation) IN (VALUES {values})",
                params,
            )
            for r in rows:
                found[(r["device_id"], r["generation"])] = DesiredContent(
                    model_set=_load(r["model_set"]),
                    models={str(k): str(v) for k, v in (_load(r["models"]) or {}).items()},
                    rollout=r["rollout"],
                )
        return found

    def model_figures(
        self, device_ids: Iterable[str], *, since: float, until: float
    ) -> dict[str, dict[str, tuple[int, int, float, int]]]:
        """Per device and model (not the device rows), over the minutes that start in
        [since, until): (requests, errors, latency_p95_wsum, latency_weight), the sums of
        the per-minute rollups that a rollout's health analysis compares."""
        ids = sorted(set(device_ids))
        found: dict[str, dict[str, tuple[int, int, float, int]]] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._rows(
                "SELECT device_id, model, sum(requests) AS r, sum(errors) AS e, "
                "sum(latency_p95_wsum) AS w, sum(latency_weight) AS n FROM telemetry_minute "
                f"WHERE model != ? AND minute >= ? AND minute < ? AND device_id IN ({marks}) "
                "GROUP BY device_id, model",
                (SYSTEM_MODEL, since, until, *chunk),
            )
            for r in rows:
                found.setdefault(r["device_id"], {})[r["model"]] = (
                    int(r["r"] or 0),
                    int(r["e"] or 0),
                    float(r["w"] or 0.0),
                    int(r["n"] or 0),
                )
        return found
