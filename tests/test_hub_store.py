"""The hub's SQLite store: migrations from every version, ingest rules, registry, desired."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from contract.messages import Latency, ModelStats, Telemetry, encode
from hub.errors import Conflict, Immutable, NotFound, SchemaTooNew
from hub.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    SYSTEM_MODEL,
    Migration,
    Store,
    TelemetryIn,
    migrate,
    open_database,
    schema_version,
)
from support import hub_samples as samples

SHA_A = "a" * 64
SHA_B = "b" * 64
NOW = 1_800_000_000.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "hub.db", clock=lambda: NOW)
    yield s
    s.close()


def telemetry_in(t: Telemetry, received_at: float = NOW) -> TelemetryIn:
    return TelemetryIn(t, encode(t).decode(), received_at)


# --- migrations ----------------------------------------------------------------------------


def test_migrations_are_numbered_from_one_without_gaps() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))


def test_a_new_store_is_at_the_latest_version_in_wal_mode(store: Store) -> None:
    assert store.schema_version == SCHEMA_VERSION
    assert store.db.journal_mode == "wal"


def _schema(path: Path) -> list[tuple[str, str, str]]:
    db = open_database(path)
    try:
        rows = db.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY name"
        ).fetchall()
    finally:
        db.close()
    return [(t, n, " ".join((sql or "").split())) for t, n, sql in rows]


# Rows written at a version, with raw SQL because no accessor of that version exists any
# more; each must survive every later migration.
SEEDS: dict[int, list[str]] = {
    1: [
        "INSERT INTO hub_meta (key, value) VALUES ('hub_id', 'hub-old')",
        "INSERT INTO devices (device_id, labels, session, online, first_seen, last_seen) "
        "VALUES ('pi-old', '{\"site\":\"a\"}', 4, 1, 1.0, 2.0)",
    ],
    2: [
        f"INSERT INTO artifacts (sha256, size, path, created_at) VALUES ('{SHA_A}', 10, 'p', 1.0)",
        "INSERT INTO models (name, version, variant, precision, sha256, size, created_at) "
        f"VALUES ('det', '1', 'det-fp32', 'fp32', '{SHA_A}', 10, 1.0)",
        "INSERT INTO model_sets (name, version, document, published, created_at) "
        "VALUES ('ocr', '1', '{}', 1, 1.0)",
        "INSERT INTO policies (name, version, document, active, created_at) "
        "VALUES ('all', 1, '{}', 1, 1.0)",
    ],
    3: [
        "INSERT INTO desired (device_id, generation, content_hash, document, issued_at, "
        "expires_at) VALUES ('pi-old', 3, 'h', '{}', 1.0, 2.0)",
    ],
    4: [
        "INSERT INTO events (device_id, session, seq, ts, kind, received_at) "
        "VALUES ('pi-old', 4, 9, 1.0, 'update.started', 1.0)",
        "INSERT INTO telemetry_raw (device_id, session, seq, ts, payload, received_at) "
        "VALUES ('pi-old', 4, 10, 1.0, '{}', 1.0)",
    ],
}


@pytest.mark.parametrize("start", range(SCHEMA_VERSION))
def test_migrating_from_every_earlier_version(tmp_path: Path, start: int) -> None:
    path = tmp_path / "old.db"
    db = open_database(path)
    assert migrate(db, start) == start
    for version in range(1, start + 1):
        for statement in SEEDS.get(version, []):
            db.execute(statement)
    db.close()

    with Store(path) as migrated:
        assert migrated.schema_version == SCHEMA_VERSION
        if start >= 1:
            device = migrated.get_device("pi-old")
            assert (device.labels, device.session, device.online) == ({"site": "a"}, 4, True)
            assert migrated.get_meta("hub_id") == "hub-old"
        if start >= 2:
            assert migrated.get_model("det", "1", "det-fp32").sha256 == SHA_A
            assert migrated.get_model_set("ocr", "1").published
            assert migrated.get_policy("all").version == 1
        if start >= 3:
            latest = migrated.latest_desired("pi-old")
            assert latest is not None and latest.generation == 3
        if start >= 4:
            assert migrated.count_events("pi-old") == 1
            assert migrated.count_telemetry("pi-old") == 1
    Store(tmp_path / "fresh.db").close()
    assert _schema(path) == _schema(tmp_path / "fresh.db")


def test_a_database_from_a_newer_hub_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    db = open_database(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(SchemaTooNew, match=r"newer than this hub"):
        Store(path)


def test_a_failing_migration_leaves_the_previous_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = Migration(
        SCHEMA_VERSION + 1, "broken", ("CREATE TABLE half (x)", "CREATE TABLE nonsense (")
    )
    monkeypatch.setattr("hub.store.MIGRATIONS", (*MIGRATIONS, broken))
    monkeypatch.setattr("hub.store.SCHEMA_VERSION", SCHEMA_VERSION + 1)
    path = tmp_path / "hub.db"
    with pytest.raises(sqlite3.OperationalError):
        Store(path)
    db = open_database(path)
    try:
        assert schema_version(db) == SCHEMA_VERSION
        assert "half" not in db.table_names()
    finally:
        db.close()


def test_meta(store: Store) -> None:
    assert store.get_meta("x") is None
    store.set_meta("x", "1")
    store.set_meta("x", "2")
    assert store.get_meta("x") == "2"


# --- devices -------------------------------------------------------------------------------


def test_birth_creates_the_device_with_its_identity(store: Store) -> None:
    assert store.record_birth(samples.birth("pi-1", session=2, seq=7), NOW)
    device = store.get_device("pi-1")
    assert device.profile_name == "raspberry-pi-4-4gb"
    assert device.profile is not None and device.profile["budgets"]["threads"] == 4
    assert device.facts is not None and device.facts["architecture"] == "aarch64"
    assert device.labels == {"site": "lab"}
    assert device.inventory[0]["variant"] == "det-int8"
    assert (device.session, device.birth_session, device.last_seq, device.online) == (
        2,
        2,
        7,
        True,
    )
    with pytest.raises(NotFound):
        store.get_device("nope")


def test_a_birth_of_an_older_session_is_ignored(store: Store) -> None:
    store.record_birth(samples.birth("pi-1", session=3, labels={"v": "new"}), NOW)
    assert not store.record_birth(samples.birth("pi-1", session=2, labels={"v": "old"}), NOW)
    assert store.get_device("pi-1").labels == {"v": "new"}


def test_a_late_will_of_an_older_session_is_ignored(store: Store) -> None:
    store.record_status(samples.status("pi-1", session=5, seq=0), NOW)
    assert not store.record_status(samples.will("pi-1", session=4), NOW)
    assert store.get_device("pi-1").online
    assert store.record_status(samples.will("pi-1", session=5), NOW)
    assert not store.get_device("pi-1").online


def test_offline_ends_a_session(store: Store) -> None:
    store.record_status(samples.will("pi-1", session=5), NOW)
    assert not store.record_status(samples.status("pi-1", session=5, seq=3), NOW)
    store.record_birth(samples.birth("pi-1", session=5, seq=4), NOW)
    assert not store.get_device("pi-1").online
    assert store.record_status(samples.status("pi-1", session=6, seq=9), NOW)
    device = store.get_device("pi-1")
    assert (device.online, device.session, device.last_seq) == (True, 6, 9)


def test_state_keeps_the_newest_by_session_then_seq(store: Store) -> None:
    store.record_birth(samples.birth("pi-1", session=2, seq=1), NOW)
    assert store.record_state(samples.state("pi-1", session=2, seq=5, applied=4), NOW)
    assert not store.record_state(samples.state("pi-1", session=2, seq=3, applied=3), NOW)
    assert not store.record_state(samples.state("pi-1", session=1, seq=99, applied=2), NOW)
    device = store.get_device("pi-1")
    assert (device.applied_generation, device.phase) == (4, "committed")
    assert device.state is not None and device.state["seq"] == 5
    assert store.record_state(samples.state("pi-1", session=3, seq=1, applied=5), NOW)
    assert store.get_device("pi-1").applied_generation == 5


def test_messages_before_a_birth_create_the_device(store: Store) -> None:
    store.record_telemetry([telemetry_in(samples.telemetry("pi-9", session=4, seq=10))])
    device = store.get_device("pi-9")
    assert (device.session, device.birth_session, device.last_seq, device.online) == (
        4,
        None,
        10,
        True,
    )
    assert device.profile is None


def test_device_filters_and_pages(store: Store) -> None:
    for i, site in enumerate(["a", "b", "a", "c"]):
        store.record_birth(samples.birth(f"pi-{i}", labels={"site": site, "line": "x"}), NOW)
    store.record_state(samples.state("pi-2", seq=9), NOW)
    store.record_status(samples.will("pi-3", session=1), NOW)
    assert [d.device_id for d in store.list_devices(labels={"site": "a"})] == ["pi-0", "pi-2"]
    assert [d.device_id for d in store.list_devices(online=False)] == ["pi-3"]
    assert store.count_devices(profile="raspberry-pi-4-4gb") == 4
    assert store.count_devices(profile="other") == 0
    assert [d.device_id for d in store.list_devices(model="det", model_version="4.0")] == ["pi-2"]
    assert store.list_devices(model="det", model_version="5.0") == []
    page1 = store.list_devices(limit=2)
    page2 = store.list_devices(after=page1[-1].device_id, limit=2)
    assert [d.device_id for d in page1 + page2] == ["pi-0", "pi-1", "pi-2", "pi-3"]
    assert store.count_devices(online=True, labels={"line": "x"}) == 3
    store.delete_device("pi-0")
    with pytest.raises(NotFound):
        store.delete_device("pi-0")


def test_device_cursors(store: Store) -> None:
    store.record_status(samples.status("pi-1", session=3, seq=4), NOW)
    store.record_birth(samples.birth("pi-1", session=3, seq=5), NOW)
    cursor = store.device_cursors()["pi-1"]
    assert (cursor.session, cursor.birth_session, cursor.last_seq, cursor.online) == (
        3,
        3,
        5,
        True,
    )


# --- telemetry and events ------------------------------------------------------------------


def test_telemetry_is_stored_once_and_rolled_up_per_minute(store: Store) -> None:
    first = samples.telemetry("pi-1", seq=2, ts=NOW)
    second = samples.telemetry(
        "pi-1",
        seq=3,
        ts=NOW + 10,
        models={
            "det": ModelStats(
                version="4.0",
                state="ready",
                requests=40,
                errors=3,
                latency_ms=Latency(p50=10, p95=80.0, p99=99.0),
            )
        },
    )
    assert store.record_telemetry([telemetry_in(first), telemetry_in(second)]) == [True, True]
    assert store.record_telemetry([telemetry_in(first), telemetry_in(first)]) == [False, False]
    assert store.count_telemetry("pi-1") == 2
    rows = {r.model: r for r in store.telemetry_minutes("pi-1")}
    det = rows["det"]
    assert (det.samples, det.requests, det.errors) == (2, 160, 4)
    assert det.latency_p95_max == 80.0
    assert det.latency_p95_avg == pytest.approx((48.5 * 120 + 80.0 * 40) / 160)
    assert det.latency_p99_max == 99.0
    device = rows[SYSTEM_MODEL]
    assert (device.samples, device.requests, device.errors) == (2, 200, 4)
    assert device.cpu_percent_avg == pytest.approx(37.5)
    assert device.memory_used_mb_max == 1200 and device.temperature_c_max == 61.2
    assert rows["rec"].samples == 1


def test_duplicates_within_one_batch_count_once(store: Store) -> None:
    t = samples.telemetry("pi-1", seq=2, ts=NOW)
    assert store.record_telemetry([telemetry_in(t), telemetry_in(t)]) == [True, False]
    assert store.telemetry_minutes("pi-1", model="det")[0].samples == 1


def test_outbox_replays_of_an_older_session_are_stored(store: Store) -> None:
    store.record_birth(samples.birth("pi-1", session=5, seq=50), NOW)
    assert store.record_telemetry([telemetry_in(samples.telemetry("pi-1", session=4, seq=40))]) == [
        True
    ]
    device = store.get_device("pi-1")
    assert (device.session, device.last_seq) == (5, 50)
    tail = store.telemetry_tail("pi-1")
    assert [(r.session, r.seq) for r in tail] == [(4, 40)]
    later = store.telemetry_after("pi-1", 4, 39)
    assert [r.seq for r in later] == [40]
    assert tail[0].payload["schema"] == "edgefleet.telemetry/1"


def test_prune_deletes_old_raw_telemetry_and_rollups(store: Store) -> None:
    old = samples.telemetry("pi-1", seq=2, ts=NOW - 10 * 86400)
    new = samples.telemetry("pi-1", seq=3, ts=NOW)
    store.record_telemetry([telemetry_in(old), telemetry_in(new)])
    deleted = store.prune_telemetry(NOW - 7 * 86400, NOW - 7 * 86400)
    assert deleted == 1 + 3  # one raw row, three rollup rows (device, det, rec)
    assert [r.seq for r in store.telemetry_tail("pi-1")] == [3]
    assert {r.minute for r in store.telemetry_minutes("pi-1")} == {int(NOW // 60) * 60}


def test_model_health_over_devices_and_a_window(store: Store) -> None:
    for device in ("a", "b", "c"):
        store.record_telemetry([telemetry_in(samples.telemetry(device, seq=2, ts=NOW))])
    health = store.model_health(["a", "b"], "det", since=NOW - 60, until=NOW + 60)
    assert (health.samples, health.requests, health.errors) == (2, 240, 2)
    assert health.error_rate == pytest.approx(2 / 240)
    assert health.latency_p95_avg == pytest.approx(48.5)
    empty = store.model_health(["a"], "det", since=NOW + 600, until=NOW + 900)
    assert (empty.requests, empty.error_rate, empty.latency_p95_avg) == (0, None, None)


def test_events_and_results_are_stored_once(store: Store) -> None:
    assert store.record_event(samples.event("pi-1", seq=4), NOW)
    assert not store.record_event(samples.event("pi-1", seq=4), NOW)
    assert store.record_result(samples.result("pi-1", seq=5, ok=False, error="no such model"), NOW)
    assert not store.record_result(samples.result("pi-1", seq=5), NOW)
    events = store.list_events(device_id="pi-1")
    assert [e.kind for e in events] == ["cmd.result", "update.committed"]
    assert events[0].data == {
        "cmd_id": "c-1",
        "ok": False,
        "result": {"p95_ms": 48.0},
        "error": "no such model",
    }
    assert store.list_events(kind="update.committed")[0].generation == 1
    assert store.list_events(before_id=events[0].id) == events[1:]
    assert store.count_events() == 2


# --- registry ------------------------------------------------------------------------------


def test_artifacts_and_models(store: Store) -> None:
    with pytest.raises(NotFound, match="store the file first"):
        store.add_model(
            name="det", version="1", variant="det-fp32", precision="fp32", sha256=SHA_A, size=10
        )
    artifact = store.add_artifact(SHA_A, 10, "aa/aaaa")
    assert store.add_artifact(SHA_A, 10, "elsewhere") == artifact
    with pytest.raises(Conflict):
        store.add_artifact(SHA_A, 11, "aa/aaaa")
    model = store.add_model(
        name="det",
        version="1",
        variant="det-fp32",
        precision="fp32",
        sha256=SHA_A,
        size=10,
        inputs=[{"name": "x", "shape": [1, 3, -1, -1]}],
        outputs=[{"name": "y"}],
        opset=17,
        load_memory_mb=12.5,
        latency_ms=3.2,
    )
    assert model.inputs[0]["shape"] == [1, 3, -1, -1] and model.opset == 17
    assert (
        store.add_model(
            name="det", version="1", variant="det-fp32", precision="fp32", sha256=SHA_A, size=10
        )
        == model
    )
    store.add_artifact(SHA_B, 5, "bb/bbbb")
    with pytest.raises(Conflict, match="new version"):
        store.add_model(
            name="det", version="1", variant="det-fp32", precision="fp32", sha256=SHA_B, size=5
        )
    int8 = store.add_model(
        name="det",
        version="1",
        variant="det-int8",
        precision="int8",
        sha256=SHA_B,
        size=5,
        drift={"max_abs": 0.01},
    )
    assert int8.drift == {"max_abs": 0.01}
    updated = store.update_model_measurements("det", "1", "det-int8", latency_ms=2.0)
    assert (updated.latency_ms, updated.drift) == (2.0, {"max_abs": 0.01})
    assert [m.variant for m in store.list_models("det")] == ["det-fp32", "det-int8"]
    with pytest.raises(Conflict):
        store.delete_artifact(SHA_A)
    assert [a.sha256 for a in store.list_artifacts()] == [SHA_A, SHA_B]


def test_published_model_sets_are_immutable(store: Store) -> None:
    store.put_model_set("ocr", "1", {"models": ["det"]})
    store.put_model_set("ocr", "1", {"models": ["det", "rec"]})
    assert store.get_model_set("ocr", "1").document == {"models": ["det", "rec"]}
    published = store.publish_model_set("ocr", "1")
    assert published.published and published.published_at == NOW
    assert store.put_model_set("ocr", "1", {"models": ["det", "rec"]}) == published
    with pytest.raises(Immutable):
        store.put_model_set("ocr", "1", {"models": []})
    with pytest.raises(Immutable):
        store.delete_model_set("ocr", "1")
    with pytest.raises(sqlite3.IntegrityError, match="immutable"):
        store.db.execute("UPDATE model_sets SET document = '{}' WHERE name = 'ocr'")
    store.put_model_set("ocr", "2", {})
    store.delete_model_set("ocr", "2")
    assert [s.version for s in store.list_model_sets("ocr")] == ["1"]
    assert store.list_model_sets(published=False) == []


def test_policies_are_versioned_per_name(store: Store) -> None:
    first = store.put_policy("all", {"priority": 1})
    assert (first.version, first.active) == (1, True)
    assert store.put_policy("all", {"priority": 1}).version == 1
    second = store.put_policy("all", {"priority": 2})
    assert second.version == 2
    assert store.get_policy("all") == second
    assert not store.get_policy("all", 1).active
    store.put_policy("pilot", {"priority": 9})
    assert [(p.name, p.version) for p in store.list_policies()] == [("all", 2), ("pilot", 1)]
    store.activate_policy("all", 1)
    assert store.get_policy("all").version == 1
    assert len(store.list_policies(active_only=False)) == 3
    store.deactivate_policy("pilot")
    with pytest.raises(NotFound):
        store.get_policy("pilot")
    assert [p.version for p in store.policy_history("all")] == [1, 2]
    with pytest.raises(sqlite3.IntegrityError, match="immutable"):
        store.db.execute("UPDATE policies SET document = '{}' WHERE name = 'all'")


# --- desired state -------------------------------------------------------------------------


def _doc(*keyids: str) -> dict[str, object]:
    return {"payload": {"trusted_keys": [{"keyid": k, "public_key": "x"} for k in keyids]}}


def test_desired_generations_only_grow(store: Store) -> None:
    store.record_desired("pi-1", 1, "h1", _doc("k1"), issued_at=NOW, expires_at=NOW + 100)
    with pytest.raises(Conflict):
        store.record_desired("pi-1", 1, "h2", _doc("k1"), issued_at=NOW, expires_at=NOW + 100)
    store.record_desired("pi-1", 3, "h3", _doc("k1"), issued_at=NOW, expires_at=NOW + 50)
    store.record_desired("pi-2", 1, "h1", _doc("k1"), issued_at=NOW, expires_at=NOW + 500)
    latest = store.latest_desired("pi-1")
    assert latest is not None and (latest.generation, latest.published_at) == (3, None)
    assert {d: r.generation for d, r in store.latest_desired_all().items()} == {
        "pi-1": 3,
        "pi-2": 1,
    }
    assert [r.device_id for r in store.desired_expiring_before(NOW + 60)] == ["pi-1"]
    store.mark_desired_published("pi-1", 3, NOW + 1)
    assert [r.device_id for r in store.unpublished_desired()] == ["pi-2"]
    assert [r.generation for r in store.desired_history("pi-1")] == [3, 1]
    with pytest.raises(NotFound):
        store.mark_desired_published("pi-1", 2)


def test_an_encoded_document_is_stored_as_published(store: Store) -> None:
    encoded = json.dumps(_doc("k1"), separators=(",", ":")).encode()
    store.record_desired_encoded("pi-1", 2, "h1", encoded, issued_at=NOW, expires_at=NOW + 9)
    latest = store.latest_desired("pi-1")
    assert latest is not None
    assert (latest.generation, latest.content_hash, latest.document) == (2, "h1", _doc("k1"))
    with pytest.raises(Conflict, match="generation 2 is not above the stored generation 2"):
        store.record_desired_encoded("pi-1", 2, "h2", encoded, issued_at=NOW, expires_at=NOW + 9)


def test_devices_not_trusting_a_key(store: Store) -> None:
    for device in ("old", "new", "none"):
        store.record_birth(samples.birth(device), NOW)
    store.record_desired("old", 1, "h", _doc("k1"), issued_at=NOW, expires_at=NOW + 9)
    store.record_desired("new", 1, "h", _doc("k1"), issued_at=NOW, expires_at=NOW + 9)
    store.record_desired("new", 2, "h", _doc("k1", "k2"), issued_at=NOW, expires_at=NOW + 9)
    store.record_state(samples.state("old", applied=1), NOW)
    store.record_state(samples.state("new", applied=2), NOW)
    assert store.devices_not_trusting(["k2"]) == ["none", "old"]
    assert store.devices_not_trusting(["k1"]) == ["none"]


def test_rollouts(store: Store) -> None:
    rollout = store.create_rollout({"model_set": "ocr"})
    assert rollout.state == {}
    updated = store.update_rollout_state(rollout.id, {"phase": "canary"})
    assert updated.state == {"phase": "canary"}
    assert [r.id for r in store.list_rollouts()] == [rollout.id]
    with pytest.raises(NotFound):
        store.get_rollout(999)
