"""The hub's HTTP API over a real uvicorn and a real store: auth on every route, pagination,
filters, errors as JSON, uploads, the real HubService, and a schemathesis run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance
from schemathesis.core.result import Ok

from hub.api import PUBLIC_PATHS, create_app, decode_cursor, encode_cursor
from hub.artifacts import ArtifactStore
from hub.config import load_config
from hub.init import init_hub
from hub.keys import Keyring
from hub.service import HubService
from hub.store import Store
from support import hub_samples
from support.hub_api import (
    TOKEN,
    ApiServer,
    StoreService,
    seed_devices,
    seed_telemetry,
)

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "tests" / "fixtures" / "manifests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXPECTED_PATHS = {
    "/metrics",
    "/v1/health",
    "/v1/devices",
    "/v1/devices/{device_id}",
    "/v1/devices/{device_id}/telemetry",
    "/v1/models",
    "/v1/models/{name}",
    "/v1/modelsets",
    "/v1/modelsets/{name}",
    "/v1/modelsets/{name}/{version}",
    "/v1/policies",
    "/v1/policies/{name}",
    "/v1/plan",
    "/v1/events",
}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "hub.db") as opened:
        yield opened


@pytest.fixture
def service(store: Store, tmp_path: Path) -> StoreService:
    return StoreService(store, tmp_path / "artifacts")


@pytest.fixture
def server(service: StoreService) -> Iterator[ApiServer]:
    with ApiServer(create_app(service, token=TOKEN)) as running:
        yield running


@pytest.fixture
def api(server: ApiServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30.0) as client:
        yield client


def _error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    detail: dict[str, Any] = body["error"]
    return detail


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(method, template, concrete path) of every operation in the OpenAPI document."""
    for template, item in document["paths"].items():
        concrete = template
        for name in ("device_id", "name", "version"):
            concrete = concrete.replace("{" + name + "}", "dev-000" if name == "device_id" else "x")
        for method in item:
            yield method.upper(), template, concrete


# --- auth ------------------------------------------------------------------------------------


def test_every_route_refuses_a_missing_or_wrong_token(server: ApiServer, store: Store) -> None:
    seed_devices(store, 1)
    document = httpx.get(server.url + "/openapi.json").json()
    assert set(document["paths"]) >= EXPECTED_PATHS
    bodies = {
        "/v1/modelsets": (MANIFESTS / "modelset.yaml").read_bytes(),
        "/v1/policies": (MANIFESTS / "policy.yaml").read_bytes(),
        "/v1/models": b"not onnx",
    }
    tried = 0
    with httpx.Client(base_url=server.url, timeout=10.0) as client:
        for method, template, path in _operations(document):
            assert document["paths"][template][method.lower()]["security"] == [{"token": []}]
            params = {"name": "m", "version": "1"} if template == "/v1/models" else None
            for headers in (
                {},
                {"Authorization": "Bearer wrong-token-0123456789"},
                {"Authorization": f"Bearer {TOKEN}x"},
                {"Authorization": f"Basic {TOKEN}"},
                {"Authorization": TOKEN},
            ):
                response = client.request(
                    method, path, headers=headers, params=params, content=bodies.get(template)
                )
                _error(response, 401, "unauthorized")
                assert response.headers["www-authenticate"] == "Bearer"
                tried += 1
    assert tried >= 5 * len(EXPECTED_PATHS)
    # nothing was written by the refused writes
    assert store.list_model_sets() == [] and store.list_policies() == []
    assert store.list_models() == []


def test_only_the_openapi_document_is_public(server: ApiServer) -> None:
    assert {"/openapi.json"} == PUBLIC_PATHS
    assert httpx.get(server.url + "/openapi.json").status_code == 200
    for path in ("/docs", "/redoc"):
        assert httpx.get(server.url + path).status_code == 404


def test_the_right_token_is_accepted_everywhere(api: httpx.Client, store: Store) -> None:
    seed_devices(store, 1)
    document = api.get("/openapi.json").json()
    for method, _template, path in _operations(document):
        if method != "GET":
            continue
        response = api.get(path)
        assert response.status_code in (200, 404), (path, response.text)


# --- devices ---------------------------------------------------------------------------------


def test_pagination_walks_every_device_once(api: httpx.Client, store: Store) -> None:
    ids = seed_devices(store, 23)
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 5}
        if cursor is not None:
            params["cursor"] = cursor
        page = api.get("/v1/devices", params=params).json()
        seen += [d["device_id"] for d in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids
    assert pages == 5
    # a page that ends exactly at the end has no next cursor
    assert api.get("/v1/devices", params={"limit": 23}).json()["next_cursor"] is None
    default = api.get("/v1/devices").json()
    assert len(default["items"]) == 23 and default["next_cursor"] is None


def test_pagination_with_a_filter(api: httpx.Client, store: Store) -> None:
    ids = seed_devices(store, 12)
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 2, "label": "site=warehouse"}
        if cursor is not None:
            params["cursor"] = cursor
        page = api.get("/v1/devices", params=params).json()
        seen += [d["device_id"] for d in page["items"]]
        if (cursor := page["next_cursor"]) is None:
            break
    assert seen == ids[1::2]


def test_device_filters(api: httpx.Client, store: Store) -> None:
    ids = seed_devices(store, 6)
    store.record_birth(
        hub_samples.birth(
            "gw-1",
            labels={"site": "lab"},
            profile=hub_samples.PROFILE.model_copy(update={"name": "intel-n100"}),
        ),
        hub_samples.TS,
    )

    def listed(**params: Any) -> list[str]:
        response = api.get("/v1/devices", params=params)
        assert response.status_code == 200, response.text
        return [d["device_id"] for d in response.json()["items"]]

    assert listed(label="site=lab") == [*ids[0::2], "gw-1"]
    assert listed(label=["site=lab", "n=2"]) == ["dev-002"]
    assert listed(online="false") == ids[1::2]
    assert listed(online="true", label="site=lab") == [*ids[0::2], "gw-1"]
    assert listed(profile="intel-n100") == ["gw-1"]
    assert listed(profile="raspberry-pi-4-4gb") == ids
    assert listed(model="det") == ids[0::2]
    assert listed(model="det", model_version="4.0") == ids[0::2]
    assert listed(model_version="5.0") == []
    assert listed(model="rec") == []
    detail = _error(api.get("/v1/devices", params={"label": "site"}), 422, "invalid_request")
    assert "key=value" in detail["message"]
    _error(api.get("/v1/devices", params={"online": "maybe"}), 422, "invalid_request")


def test_device_detail(api: httpx.Client, store: Store) -> None:
    seed_devices(store, 1)
    seed_telemetry(store, "dev-000", 3)
    store.record_desired(
        "dev-000",
        4,
        "c" * 64,
        {"payload": {"model_set": {"name": "ocr", "version": "1"}}},
        issued_at=hub_samples.TS,
        expires_at=hub_samples.TS + 3600,
    )
    body = api.get("/v1/devices/dev-000").json()
    assert body["device_id"] == "dev-000"
    assert body["online"] is True
    assert body["state"]["phase"] == "committed"
    assert body["state"]["schema"] == "edgefleet.state/1"
    assert body["models"] == [
        {
            "name": "det",
            "version": "4.0",
            "variant": "det-int8",
            "precision": "int8",
            "provider": None,
            "ready": True,
        }
    ]
    assert body["desired"]["generation"] == 4
    assert body["desired"]["model_set"] == {"name": "ocr", "version": "1"}
    assert body["last_telemetry"]["seq"] == 12
    assert body["last_telemetry"]["message"]["system"]["cpu_percent"] == 37.5
    assert body["facts"]["architecture"] == "aarch64"
    assert body["profile_document"]["name"] == "raspberry-pi-4-4gb"
    detail = _error(api.get("/v1/devices/nope"), 404, "not_found")
    assert "nope" in detail["message"]


def test_telemetry_tail_and_follow(api: httpx.Client, store: Store) -> None:
    seed_devices(store, 1)
    seed_telemetry(store, "dev-000", 5)
    page = api.get("/v1/devices/dev-000/telemetry", params={"limit": 2}).json()
    assert [i["seq"] for i in page["items"]] == [13, 14]
    cursor = page["next_cursor"]
    again = api.get("/v1/devices/dev-000/telemetry", params={"cursor": cursor}).json()
    assert again["items"] == [] and again["next_cursor"] == cursor
    seed_telemetry(store, "dev-000", 3, start_seq=15)
    new = api.get("/v1/devices/dev-000/telemetry", params={"cursor": cursor}).json()
    assert [i["seq"] for i in new["items"]] == [15, 16, 17]
    empty = api.get(
        "/v1/devices/dev-000/telemetry", params={"limit": 1, "cursor": new["next_cursor"]}
    )
    assert empty.json()["items"] == []
    _error(api.get("/v1/devices/ghost/telemetry"), 404, "not_found")
    _error(
        api.get("/v1/devices/dev-000/telemetry", params={"cursor": encode_cursor(["a"])}),
        422,
        "invalid_cursor",
    )


def test_events_filters_and_pages(api: httpx.Client, store: Store) -> None:
    seed_devices(store, 4)
    for seq in range(10, 16):
        store.record_event(
            hub_samples.event(
                "dev-000", seq=seq, kind="update.failed" if seq % 2 else "model.throttled"
            ),
            hub_samples.TS,
        )
    everything = api.get("/v1/events", params={"limit": 1000}).json()["items"]
    assert len(everything) == 8
    ids = [e["id"] for e in everything]
    assert ids == sorted(ids, reverse=True)
    walked: list[int] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = api.get("/v1/events", params=params).json()
        walked += [e["id"] for e in page["items"]]
        if (cursor := page["next_cursor"]) is None:
            break
    assert walked == ids
    failed = api.get("/v1/events", params={"kind": "update.failed"}).json()["items"]
    assert [e["seq"] for e in failed] == [15, 13, 11]
    assert {
        e["device_id"] for e in api.get("/v1/events", params={"device": "dev-002"}).json()["items"]
    } == {"dev-002"}
    since = api.get("/v1/events", params={"since": hub_samples.TS + 14}).json()["items"]
    assert [e["seq"] for e in since] == [15, 14]


# --- model sets, policies, plan --------------------------------------------------------------


def test_a_bad_model_set_is_a_422_naming_line_and_field(api: httpx.Client) -> None:
    bad = (MANIFESTS / "bad-precision.yaml").read_bytes()
    detail = _error(
        api.post("/v1/modelsets", content=bad, params={"source": "bad.yaml"}),
        422,
        "invalid_manifest",
    )
    assert detail["line"] == 13
    assert detail["field"] == "models[0].variants[0].precision"
    assert detail["message"].startswith("bad.yaml:13: models[0].variants[0].precision: ")
    syntax = _error(
        api.post("/v1/modelsets", content=(MANIFESTS / "bad-syntax.yaml").read_bytes()),
        422,
        "invalid_manifest",
    )
    assert syntax["message"].startswith("modelset.yaml:")
    _error(api.post("/v1/modelsets", content=b""), 422, "invalid_request")
    _error(api.post("/v1/modelsets", content=b"\xff\xfe"), 422, "invalid_request")
    _error(api.post("/v1/policies", content=b"- a list"), 422, "invalid_manifest")


def test_model_sets_and_policies(api: httpx.Client, store: Store) -> None:
    seed_devices(store, 4)
    applied = api.post(
        "/v1/modelsets",
        content=(MANIFESTS / "modelset.yaml").read_bytes(),
        params={"source": "ms.yaml"},
    )
    assert applied.status_code == 200, applied.text
    assert applied.json()["document"]["schema"] == "edgefleet.modelset/1"
    assert applied.json()["published"] is True
    listed = api.get("/v1/modelsets").json()
    assert [(s["name"], s["version"]) for s in listed["items"]] == [("ocr", "2024.06.1")]
    assert api.get("/v1/modelsets/ocr").json()["version"] == "2024.06.1"
    assert (
        api.get("/v1/modelsets/ocr/2024.06.1").json()["document"]["models"][0]["name"] == "ocr-det"
    )
    _error(api.get("/v1/modelsets/ocr/9"), 404, "not_found")
    _error(api.get("/v1/modelsets/none"), 404, "not_found")

    policy = api.post("/v1/policies", content=(MANIFESTS / "policy.yaml").read_bytes())
    assert policy.status_code == 200, policy.text
    assert (policy.json()["name"], policy.json()["version"], policy.json()["active"]) == (
        "warehouse-ocr",
        1,
        True,
    )
    assert [p["name"] for p in api.get("/v1/policies").json()["items"]] == ["warehouse-ocr"]
    assert api.get("/v1/policies/warehouse-ocr").json()["document"]["priority"] == 10
    assert api.get("/v1/policies/warehouse-ocr", params={"version": 1}).json()["version"] == 1
    _error(api.get("/v1/policies/warehouse-ocr", params={"version": 2}), 404, "not_found")
    orphan = (MANIFESTS / "policy.yaml").read_text().replace("version: 2024.06.1", "version: '9'")
    detail = _error(api.post("/v1/policies", content=orphan), 422, "unresolvable_policy")
    assert "ocr 9" in detail["message"]

    plan = api.get("/v1/plan", params={"label": "site=warehouse"}).json()["items"]
    assert [p["device_id"] for p in plan] == ["dev-001", "dev-003"]
    assert plan[0]["policy"] == "warehouse-ocr"
    assert plan[0]["model_set"] == {"name": "ocr", "version": "2024.06.1"}
    assert {r["model"] for r in plan[0]["rows"]} == {"ocr-det", "ocr-rec", "ocr-cls"}
    assert plan[0]["plan"]["profile"] == "raspberry-pi-4-4gb"
    lab = api.get("/v1/plan", params={"device": ["dev-000"]}).json()["items"]
    assert [(p["device_id"], p["status"]) for p in lab] == [("dev-000", "unassigned")]
    assert len(api.get("/v1/plan").json()["items"]) == 4
    _error(api.get("/v1/plan", params={"profile": "Not A Profile"}), 422, "invalid_request")


def test_lists_page_in_memory(api: httpx.Client, store: Store) -> None:
    text = (MANIFESTS / "modelset.yaml").read_text()
    for n in range(7):
        response = api.post(
            "/v1/modelsets", content=text.replace("version: 2024.06.1", f"version: '{n}'")
        )
        assert response.status_code == 200, response.text
    versions: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = api.get("/v1/modelsets", params=params).json()
        versions += [s["version"] for s in page["items"]]
        if (cursor := page["next_cursor"]) is None:
            break
    assert versions == [str(n) for n in range(7)]
    _error(api.get("/v1/modelsets", params={"cursor": "bm9wZQ"}), 422, "invalid_cursor")


def test_cursors_round_trip_and_refuse_garbage() -> None:
    assert decode_cursor(encode_cursor(["a", 1.5, "b"]), [str, float, str]) == ["a", 1.5, "b"]
    assert decode_cursor(encode_cursor([3]), [int]) == [3]
    for bad in ("", "!!", encode_cursor([True]), encode_cursor(["a", "b"]), encode_cursor([1.5])):
        with pytest.raises(Exception, match="cursor"):
            decode_cursor(bad, [int])


# --- models ----------------------------------------------------------------------------------


def test_upload_a_model(api: httpx.Client, ocr_models: dict[str, Path]) -> None:
    data = ocr_models["cls"].read_bytes()
    response = api.post(
        "/v1/models",
        params={"name": "ocr-cls", "version": "2.0", "precision": "fp32", "filename": "cls.onnx"},
        content=data,
    )
    assert response.status_code == 200, response.text
    (variant,) = response.json()
    assert (variant["name"], variant["version"], variant["size"]) == ("ocr-cls", "2.0", len(data))
    assert variant["inputs"][0]["name"] == "x"
    listed = api.get("/v1/models").json()
    assert [(m["name"], m["variant"]) for m in listed["items"]] == [("ocr-cls", "ocr-cls-fp32")]
    detail = api.get("/v1/models/ocr-cls").json()
    assert detail["versions"] == ["2.0"]
    _error(api.get("/v1/models/ocr-cls", params={"version": "3"}), 404, "not_found")
    _error(api.get("/v1/models/nothing"), 404, "not_found")


def test_a_bad_upload_names_the_file_not_a_temporary_path(api: httpx.Client) -> None:
    detail = _error(
        api.post(
            "/v1/models",
            params={"name": "m", "version": "1", "filename": "mine.onnx"},
            content=b"definitely not onnx",
        ),
        422,
        "invalid_model",
    )
    assert detail["message"].startswith("mine.onnx: ")
    assert "edgefleet-upload" not in detail["message"]
    _error(
        api.post("/v1/models", params={"name": "m", "version": "1"}, content=b""),
        422,
        "invalid_request",
    )
    _error(
        api.post("/v1/models", params={"name": "Bad Name", "version": "1"}, content=b"x"),
        422,
        "invalid_request",
    )
    _error(
        api.post(
            "/v1/models", params={"name": "m", "version": "1", "input_shape": "x=1,0"}, content=b"x"
        ),
        422,
        "invalid_request",
    )


def test_uploads_over_the_cap_are_refused(service: StoreService) -> None:
    app = create_app(service, token=TOKEN, max_upload_bytes=1000)
    with ApiServer(app) as server, httpx.Client(base_url=server.url, headers=AUTH) as client:
        declared = client.post(
            "/v1/models", params={"name": "m", "version": "1"}, content=b"x" * 1001
        )
        _error(declared, 413, "too_large")

        def chunks() -> Iterator[bytes]:
            for _ in range(20):
                yield b"y" * 100

        streamed = client.post("/v1/models", params={"name": "m", "version": "1"}, content=chunks())
        _error(streamed, 413, "too_large")
    assert service.store.list_models() == []


# --- metrics, errors -------------------------------------------------------------------------


def test_metrics_are_prometheus_text(api: httpx.Client) -> None:
    response = api.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "edgefleet_hub_ingest_dropped_total" in response.text
    assert "edgefleet_hub_devices_online" in response.text


def test_errors_are_json(api: httpx.Client) -> None:
    _error(api.get("/v1/nothing-here"), 404, "not_found")
    _error(api.delete("/v1/devices"), 405, "method_not_allowed")
    _error(api.get("/v1/devices", params={"limit": 0}), 422, "invalid_request")
    _error(api.get("/v1/devices", params={"limit": 1001}), 422, "invalid_request")
    _error(api.get("/v1/devices", params={"cursor": "garbage"}), 422, "invalid_cursor")
    health = api.get("/v1/health").json()
    assert health["status"] == "ok" and health["schema_version"] >= 1


# --- the real HubService -----------------------------------------------------------------------


@pytest.fixture
def real_hub(tmp_path: Path) -> Iterator[tuple[ApiServer, HubService]]:
    created = init_hub(tmp_path / "hub", hub_id="hub-test")
    config = load_config(created.config_path)
    with Store(config.store_path) as store:
        service = HubService(
            config,
            store,
            artifacts=ArtifactStore(config.artifacts_dir),
            keys=Keyring(config.keys_dir, config.public_keys_path),
            publisher=None,
        )
        with ApiServer(create_app(service)) as server:
            yield server, service


def test_the_real_service_behind_the_api(
    real_hub: tuple[ApiServer, HubService], ocr_models: dict[str, Path]
) -> None:
    server, service = real_hub
    token = service.config.api_token()
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=300.0
    ) as api:
        _error(httpx.get(server.url + "/v1/health"), 401, "unauthorized")
        assert api.get("/v1/health").json()["hub_id"] == "hub-test"
        seed_devices(service.store, 2)

        # the fixture's artifacts are not stored: the registry refuses, naming line and field
        refused = api.post(
            "/v1/modelsets",
            content=(MANIFESTS / "modelset.yaml").read_bytes(),
            params={"source": "ocr.yaml"},
        )
        detail = _error(refused, 422, "invalid_manifest")
        assert detail["message"].startswith("ocr.yaml:") and detail["line"] and detail["field"]

        added = api.post(
            "/v1/models",
            params={"name": "ocr-cls", "version": "2.0", "input_shape": "x=1,3,48,192"},
            content=ocr_models["cls"].read_bytes(),
        )
        assert added.status_code == 200, added.text
        (variant,) = added.json()
        assert variant["load_memory_mb"] and variant["latency_ms"]

        model_set = {
            "schema": "edgefleet.modelset/1",
            "name": "cls-only",
            "version": "1",
            "models": [
                {
                    "name": "ocr-cls",
                    "version": "2.0",
                    "priority": 10,
                    "variants": [
                        {
                            "name": variant["variant"],
                            "precision": variant["precision"],
                            "artifact": {"sha256": variant["sha256"], "size": variant["size"]},
                            "requires": {"memory_mb": 64},
                        }
                    ],
                }
            ],
        }
        applied = api.post("/v1/modelsets", content=json.dumps(model_set))
        assert applied.status_code == 200, applied.text
        again = json.loads(json.dumps(model_set))
        again["models"][0]["priority"] = 11
        _error(api.post("/v1/modelsets", content=json.dumps(again)), 409, "conflict")

        policy = (
            "schema: edgefleet.policy/1\nname: lab\nselector: {labels: {site: lab}}\n"
            "model_set: {name: cls-only, version: '1'}\n"
        )
        assert api.post("/v1/policies", content=policy).status_code == 200
        missing = policy.replace("version: '1'", "version: '2'")
        detail = _error(
            api.post("/v1/policies", content=missing, params={"source": "p.yaml"}),
            422,
            "invalid_manifest",
        )
        assert detail["message"].startswith("p.yaml:")

        plan = api.get("/v1/plan").json()["items"]
        by_device = {p["device_id"]: p for p in plan}
        assert by_device["dev-000"]["policy"] == "lab"
        assert by_device["dev-001"]["status"] == "unassigned"
        shown = api.get("/v1/devices/dev-000").json()
        assert shown["desired"] is not None and shown["desired"]["model_set"]["name"] == "cls-only"


# --- schemathesis ------------------------------------------------------------------------------


MAX_EXAMPLES = 25
"""Generated requests per operation: enough to reach every parameter, small enough for the
suite (the whole run takes seconds)."""


def test_schemathesis_finds_no_server_error(
    server: ApiServer, service: StoreService, store: Store
) -> None:
    """Requests generated from the OpenAPI document (with the token) never get a 5xx, and
    every answer matches the document."""
    seed_devices(store, 3)
    seed_telemetry(store, "dev-000", 3)
    service.apply_model_set((MANIFESTS / "modelset.yaml").read_text(), "modelset.yaml")
    service.apply_policy((MANIFESTS / "policy.yaml").read_text(), "policy.yaml")
    api_schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    checks = [not_a_server_error, response_schema_conformance]
    failures: dict[str, str] = {}
    operations = 0
    for result in api_schema.get_all_operations():
        assert isinstance(result, Ok), result
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            response = case.call(headers=AUTH, timeout=30)
            case.validate_response(response, checks=checks)

        try:
            check()
        except Exception as exc:  # every operation is tried; failures reported together
            failures[operation.label] = f"{type(exc).__name__}: {exc}"[:2000]
    assert operations >= len(EXPECTED_PATHS)
    # generated ids hardly ever exist: the stored objects' answers are checked explicitly
    for path, parameters in (
        ("/v1/devices/{device_id}", {"device_id": "dev-000"}),
        ("/v1/devices/{device_id}/telemetry", {"device_id": "dev-000"}),
        ("/v1/modelsets/{name}", {"name": "ocr"}),
        ("/v1/modelsets/{name}/{version}", {"name": "ocr", "version": "2024.06.1"}),
        ("/v1/policies/{name}", {"name": "warehouse-ocr"}),
    ):
        case = api_schema[path]["GET"].Case(path_parameters=parameters)
        response = case.call(headers=AUTH, timeout=30)
        assert response.status_code == 200, (path, response.text)
        case.validate_response(response, checks=checks)
    assert not failures, "\n\n".join(f"{k}: {v}" for k, v in failures.items())
