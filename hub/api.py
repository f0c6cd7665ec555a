"""The hub's HTTP API: JSON under ``/v1``, an OpenAPI document, Prometheus ``/metrics``.

``create_app(service, token=...)`` builds the FastAPI application; ``hub.server`` serves it
with uvicorn and the CLI (``hub.client``) is its client. The routes (docs/hub-api.md):

    GET  /v1/health                          hub id, versions
    GET  /v1/devices                         filters: label=k=v (repeated), profile, online,
                                             model, model_version; paginated
    GET  /v1/devices/{device_id}             reported state, desired generation, telemetry
    GET  /v1/devices/{device_id}/telemetry   raw telemetry, oldest first; cursor follows
    GET  /v1/models                          every variant of every model; paginated
    GET  /v1/models/{name}                   the variants of one model (optional ?version=)
    POST /v1/models                          upload one ONNX file (the body) and register it
    GET  /v1/modelsets                       paginated; GET /v1/modelsets/{name}[/{version}]
    POST /v1/modelsets                       apply a model-set YAML document (the body)
    GET  /v1/policies                        paginated; GET /v1/policies/{name}[?version=]
    POST /v1/policies                        apply a policy YAML document (the body)
    GET  /v1/plan                            what matching devices would run (label, profile,
                                             device)
    GET  /v1/events                          newest first; filters device, kind, since
    GET  /v1/rollouts                        every rollout, oldest first; paginated; ?phase=
    POST /v1/rollouts                        start a rollout from its YAML document (the body)
    GET  /v1/rollouts/{name}                 spec, phase, cohorts with gate values, events;
                                             ?events=N, ?devices=true
    POST /v1/rollouts/{name}/pause|resume|abort|rollback   optional body {"reason": ...}
    GET  /metrics                            the hub's Prometheus metrics (text format)

Every route needs ``Authorization: Bearer <token>``; only ``/openapi.json`` is public (the
same document for every hub, no fleet data). A missing or wrong token is a 401.

Lists are pages ``{"items": [...], "next_cursor": ...}``: ``?limit=`` (1 to 1000, default
100) and ``?cursor=`` (the ``next_cursor`` of the page before, opaque); a null
``next_cursor`` ends the list. Every error, the API's own and the service's, is a JSON
object ``{"error": {"code": ..., "message": ..., "field": ..., "line": ...}}`` (``field``
and ``line`` only for a manifest error) with a 4xx status for what the caller can fix;
a 5xx means the hub itself failed.

Writes go through the hub's service (``HubServiceLike``); reads go to the store.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import re
import sqlite3
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, TypeVar

from fastapi import Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from contract import __version__
from contract.errors import EdgefleetError, ManifestError, TrustError, WireError
from contract.manifests import (
    NAME_PATTERN,
    VERSION_PATTERN,
    ModelSet,
    ModelSetRef,
    Policy,
    Selector,
)
from contract.messages import InventoryItem, State, Telemetry
from contract.profile import FirmwareProfile, HardwareFacts, Precision
from hub.api_models import (
    CohortOut,
    DesiredSummary,
    DeviceDetail,
    DeviceModel,
    DeviceSummary,
    ErrorDetail,
    ErrorResponse,
    EventOut,
    GateCheckOut,
    GateOut,
    Health,
    ModelDetail,
    ModelSetOut,
    ModelVariant,
    Page,
    PlanDevice,
    PlanOut,
    PlanRowOut,
    PlanWarning,
    PolicyOut,
    RolloutCommand,
    RolloutDetail,
    RolloutDeviceOut,
    RolloutEventOut,
    RolloutSummary,
    TelemetryItem,
    TelemetryPage,
    TransitionOut,
)
from hub.config import HubConfig
from hub.errors import (
    ArtifactNotFound,
    ConfigError,
    Conflict,
    Immutable,
    IngestError,
    InvalidModelName,
    InvalidSha256,
    InvalidTransition,
    KeyringError,
    MeasureError,
    ModelFileError,
    ModelSetConflict,
    NotFound,
    PolicyError,
    QuantizeError,
    RegistryError,
    RolloutConflict,
    RolloutError,
    StoreError,
)
from hub.metrics import CONTENT_TYPE, HubMetrics
from hub.plan import DevicePlan, render_plan_table
from hub.rollout import GateResult, counts_of
from hub.rollouts import OPERATIONS, RolloutView
from hub.store import (
    DeviceRecord,
    EventRecord,
    ModelRecord,
    ModelSetRecord,
    PolicyRecord,
    Store,
    TelemetryRecord,
)

log = logging.getLogger(__name__)

API_PREFIX = "/v1"
PUBLIC_PATHS = frozenset({"/openapi.json"})
"""The only paths served without the bearer token."""
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_MANIFEST_BYTES = 1024 * 1024
"""Largest model-set or policy document accepted (bytes)."""
DEFAULT_MAX_UPLOAD_BYTES = 2 * 1024 * 1024 * 1024
"""Largest ONNX upload accepted by default (bytes)."""
UPLOAD_CHUNK = 1024 * 1024
_FILENAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_SOURCE_MAX = 200

T = TypeVar("T")


class HubServiceLike(Protocol):
    """What the API needs of ``hub.service.HubService``: its configuration, store and
    metrics, and its write operations."""

    @property
    def config(self) -> HubConfig: ...

    @property
    def store(self) -> Store: ...

    @property
    def metrics(self) -> HubMetrics | None: ...

    def add_model(
        self,
        path: Path,
        *,
        name: str,
        version: str,
        variant: str | None = None,
        precision: str | None = None,
        quantize_int8: bool = False,
        input_shapes: dict[str, list[int]] | None = None,
        memory_mb: int | None = None,
    ) -> list[ModelRecord]: ...

    def apply_model_set(self, text: str, source: str) -> ModelSetRecord: ...

    def apply_policy(self, text: str, source: str) -> PolicyRecord: ...

    def plan(self, selector: Selector | None = None) -> list[DevicePlan]: ...

    def start_rollout(self, text: str, source: str) -> RolloutView: ...

    def operate_rollout(
        self, name: str, operation: str, reason: str | None = None
    ) -> RolloutView: ...

    def rollout(self, name: str, *, events: int = 20) -> RolloutView: ...

    def list_rollouts(self) -> list[RolloutView]: ...


# --- errors --------------------------------------------------------------------------------


class ApiError(Exception):
    """An error the API answers with ``status`` and an ``ErrorResponse``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        line: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(code=code, message=message, field=field, line=line)
        self.headers = headers

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=self.detail).model_dump(mode="json", exclude_none=True)
        return JSONResponse(body, status_code=self.status, headers=self.headers)


_ERROR_STATUS: tuple[tuple[type[BaseException], int, str], ...] = (
    (NotFound, 404, "not_found"),
    (ArtifactNotFound, 404, "not_found"),
    (Immutable, 409, "immutable"),
    (Conflict, 409, "conflict"),
    (ModelSetConflict, 409, "conflict"),
    (ManifestError, 422, "invalid_manifest"),
    (InvalidModelName, 422, "invalid_request"),
    (ModelFileError, 422, "invalid_model"),
    (MeasureError, 422, "invalid_model"),
    (QuantizeError, 422, "invalid_model"),
    (InvalidSha256, 422, "invalid_request"),
    (PolicyError, 422, "unresolvable_policy"),
    (RolloutConflict, 409, "conflict"),
    (InvalidTransition, 409, "invalid_transition"),
    (RolloutError, 422, "refused"),
    (RegistryError, 422, "refused"),
    (WireError, 422, "invalid_request"),
    (ConfigError, 500, "hub_config"),
    (KeyringError, 500, "hub_keys"),
    (TrustError, 500, "hub_keys"),
    (StoreError, 503, "store_unavailable"),
    (IngestError, 503, "ingest_unavailable"),
)
"""How the service's errors answer: the first matching class wins; any other
``EdgefleetError`` is a 400 ``refused`` (the hub refused the request on purpose)."""


def api_error(exc: EdgefleetError, message: str | None = None) -> ApiError:
    """The ``ApiError`` for one of the service's errors (``message`` replaces its text)."""
    status, code = 400, "refused"
    for cls, cls_status, cls_code in _ERROR_STATUS:
        if isinstance(exc, cls):
            status, code = cls_status, cls_code
            break
    text = " ".join((message if message is not None else str(exc)).split())
    if isinstance(exc, ManifestError):
        return ApiError(status, code, text, field=exc.field, line=exc.line)
    return ApiError(status, code, text or type(exc).__name__)


def _validation_message(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    return f"{loc}: {first.get('msg', 'invalid')}" if loc else str(first.get("msg", "invalid"))


def _http_code(status: int) -> str:
    return {
        400: "bad_request",
        401: "unauthorized",
        403: "forbidden",
        404: "not_found",
        405: "method_not_allowed",
        413: "too_large",
        415: "unsupported_media_type",
    }.get(status, "http_error")


def _install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def on_service_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, EdgefleetError)
        error = api_error(exc)
        if error.status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, exc)
        return error.response()

    async def on_busy(request: Request, exc: Exception) -> Response:
        log.warning("%s %s: store busy: %s", request.method, request.url.path, exc)
        return ApiError(
            503, "store_busy", f"the store is busy ({exc}); retry", headers={"Retry-After": "1"}
        ).response()

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return ApiError(422, "invalid_request", _validation_message(exc)).response()

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        message = exc.detail if isinstance(exc.detail, str) else str(exc.status_code)
        headers = dict(exc.headers) if exc.headers else None
        return ApiError(
            exc.status_code, _http_code(exc.status_code), message, headers=headers
        ).response()

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        return ApiError(500, "internal", "internal error; see the hub's log").response()

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(EdgefleetError, on_service_error)
    app.add_exception_handler(sqlite3.OperationalError, on_busy)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or wrong bearer token."},
    422: {"model": ErrorResponse, "description": "Invalid parameters or document."},
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "No such object."}
}
_WRITE: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorResponse, "description": "Conflicts with what is stored."},
    413: {"model": ErrorResponse, "description": "The body is too large."},
}


# --- conversions ---------------------------------------------------------------------------


def _device_models(state: dict[str, Any] | None) -> list[DeviceModel]:
    if not state:
        return []
    return [DeviceModel.model_validate(m) for m in state.get("models", [])]


def device_summary(device: DeviceRecord) -> DeviceSummary:
    return DeviceSummary(
        device_id=device.device_id,
        labels=device.labels,
        profile=device.profile_name,
        agent_version=device.agent_version,
        online=device.online,
        first_seen=device.first_seen,
        last_seen=device.last_seen,
        applied_generation=device.applied_generation,
        desired_generation=device.desired_generation,
        phase=device.phase,
        models=_device_models(device.state),
    )


def _telemetry_item(record: TelemetryRecord) -> TelemetryItem:
    return TelemetryItem(
        session=record.session,
        seq=record.seq,
        ts=record.ts,
        received_at=record.received_at,
        message=Telemetry.model_validate(record.payload),
    )


def device_detail(store: Store, device: DeviceRecord) -> DeviceDetail:
    desired = store.latest_desired(device.device_id)
    desired_out = None
    if desired is not None:
        ref = desired.document.get("payload", {}).get("model_set")
        desired_out = DesiredSummary(
            generation=desired.generation,
            content_hash=desired.content_hash,
            issued_at=desired.issued_at,
            expires_at=desired.expires_at,
            published_at=desired.published_at,
            model_set=ModelSetRef.model_validate(ref) if isinstance(ref, dict) else None,
        )
    tail = store.telemetry_tail(device.device_id, 1)
    return DeviceDetail(
        **device_summary(device).model_dump(),
        profile_source=device.profile_source,
        facts=None if device.facts is None else HardwareFacts.model_validate(device.facts),
        profile_document=(
            None if device.profile is None else FirmwareProfile.model_validate(device.profile)
        ),
        capabilities=device.capabilities,
        inventory=[InventoryItem.model_validate(i) for i in device.inventory],
        session=device.session,
        born_at=device.born_at,
        state=None if device.state is None else State.model_validate(device.state),
        state_at=device.state_at,
        desired=desired_out,
        last_telemetry=_telemetry_item(tail[0]) if tail else None,
    )


def model_set_out(record: ModelSetRecord) -> ModelSetOut:
    return ModelSetOut(
        name=record.name,
        version=record.version,
        published=record.published,
        created_at=record.created_at,
        published_at=record.published_at,
        document=ModelSet.model_validate(record.document),
    )


def policy_out(record: PolicyRecord) -> PolicyOut:
    return PolicyOut(
        name=record.name,
        version=record.version,
        active=record.active,
        created_at=record.created_at,
        document=Policy.model_validate(record.document),
    )


def plan_device_out(device: DevicePlan) -> PlanDevice:
    resolution = device.resolution
    return PlanDevice(
        device_id=device.device_id,
        status=device.status,
        message=device.message,
        profile=device.profile,
        policy=resolution.policy,
        policies=list(resolution.policies),
        model_set=resolution.model_set,
        warnings=[PlanWarning(code=w.code, message=w.message) for w in resolution.warnings],
        plan=device.plan,
        rows=[PlanRowOut.model_validate(row.as_dict()) for row in render_plan_table([device])],
    )


def _gate_out(result: GateResult) -> GateOut:
    return GateOut(
        name=result.name,
        status=result.status,
        value=result.value,
        threshold=result.threshold,
        reason=result.reason,
        checks=[
            GateCheckOut(
                name=c.name,
                status=c.status,
                value=c.value,
                threshold=c.threshold,
                reason=c.reason,
            )
            for c in result.checks
        ],
    )


def rollout_summary(view: RolloutView) -> RolloutSummary:
    spec, state = view.spec, view.state
    current = state.cohorts[state.cohort].name if state.cohort < len(state.cohorts) else None
    return RolloutSummary(
        id=view.id,
        name=spec.name,
        policy=spec.policy,
        model_set=spec.target_ref,
        baseline=spec.baseline,
        phase=state.phase,
        reason=state.reason,
        cohort=state.cohort,
        cohort_name=current,
        cohorts=len(state.cohorts),
        devices=len(state.devices),
        counts=counts_of(state),
        held=state.held,
        promoted=state.promoted,
        created_at=view.created_at,
        updated_at=view.updated_at,
        started_at=state.started_at,
        finished_at=state.finished_at,
    )


def rollout_detail(view: RolloutView, *, devices: bool = False) -> RolloutDetail:
    state = view.state
    cohorts = []
    for cohort, shown in zip(state.cohorts, view.progress(), strict=True):
        by_status = dict(shown.by_status)
        cohorts.append(
            CohortOut(
                index=shown.index,
                name=shown.name,
                status=shown.status,
                total=shown.total,
                healthy=by_status.get("healthy", 0),
                failed=by_status.get("failed", 0) + by_status.get("timed_out", 0),
                by_status=by_status,
                gates=[_gate_out(g) for g in shown.gates.values()],
                started_at=cohort.started_at,
                bake_until=shown.bake_until,
                finished_at=cohort.finished_at,
                health_evaluations=cohort.health.evaluations if cohort.health else None,
            )
        )
    device_rows = None
    if devices:
        device_rows = [
            RolloutDeviceOut(
                device_id=device_id,
                cohort=a.cohort,
                status=a.status,
                pinned=a.pinned,
                generation=a.generation,
                switched_at=a.switched_at,
                finished_at=a.finished_at,
                reason=a.reason,
            )
            for cohort in state.cohorts
            for device_id in cohort.devices
            for a in (state.devices[device_id],)
        ]
    events = []
    for e in view.events:
        data = dict(e.data)
        cohort_index = data.pop("cohort", None)
        device = data.pop("device_id", None)
        data.pop("rollout", None)
        events.append(
            RolloutEventOut(
                id=e.id,
                ts=e.ts,
                kind=e.kind,
                reason=e.message,
                cohort=cohort_index if isinstance(cohort_index, int) else None,
                device_id=device if isinstance(device, str) else None,
                data=data,
            )
        )
    return RolloutDetail(
        **rollout_summary(view).model_dump(),
        spec=view.spec,
        cohort_progress=cohorts,
        gates=[_gate_out(g) for g in state.gates.values()],
        transitions=[
            TransitionOut(
                at=t.at,
                from_phase=t.from_phase,
                to_phase=t.to_phase,
                cohort=t.cohort,
                reason=t.reason,
            )
            for t in state.transitions
        ],
        events=events,
        device_progress=device_rows,
    )


# --- parameters ----------------------------------------------------------------------------


def encode_cursor(key: Sequence[str | int | float]) -> str:
    """An opaque cursor for the sort key of the last item of a page."""
    raw = json.dumps(list(key), separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, types: Sequence[type]) -> list[Any]:
    """The sort key inside ``cursor``; a 422 unless it holds values of ``types``."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        key = json.loads(raw)
    except (binascii.Error, ValueError):
        key = None
    if (
        not isinstance(key, list)
        or len(key) != len(types)
        or not all(
            isinstance(v, t) and not isinstance(v, bool) and not (t is int and isinstance(v, float))
            for v, t in zip(key, types, strict=True)
        )
    ):
        raise ApiError(422, "invalid_cursor", "cursor: not a cursor this list returned")
    return [float(v) if t is float else v for v, t in zip(key, types, strict=True)]


def parse_labels(values: Sequence[str]) -> dict[str, str]:
    """``["k=v", ...]`` as a mapping; a 422 for an entry without ``=`` or a key twice."""
    labels: dict[str, str] = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise ApiError(422, "invalid_request", f"label: expected key=value, got {value!r}")
        if key in labels and labels[key] != val:
            raise ApiError(422, "invalid_request", f"label: {key!r} is given twice")
        labels[key] = val
    return labels


def parse_input_shapes(values: Sequence[str]) -> dict[str, list[int]] | None:
    """``["x=1,3,48,192", ...]`` as input name -> shape; a 422 for anything else."""
    shapes: dict[str, list[int]] = {}
    for value in values:
        name, sep, dims = value.rpartition("=")
        try:
            shape = [int(d) for d in dims.split(",")]
        except ValueError:
            shape = []
        if not sep or not name or not shape or any(d < 1 for d in shape) or name in shapes:
            raise ApiError(
                422,
                "invalid_request",
                f"input_shape: expected NAME=D1,D2,... with positive sizes, once per input, "
                f"got {value!r}",
            )
        shapes[name] = shape
    return shapes or None


def _page_of(
    items: Sequence[T],
    key: Callable[[T], tuple[Any, ...]],
    cursor: str | None,
    limit: int,
    types: Sequence[type],
) -> tuple[list[T], str | None]:
    """An in-memory page of ``items`` (any order): those whose key follows the cursor's."""
    ordered = sorted(items, key=key)
    if cursor is not None:
        after = tuple(decode_cursor(cursor, types))
        ordered = [item for item in ordered if key(item) > after]
    page = ordered[:limit]
    more = len(ordered) > limit
    return page, encode_cursor(key(page[-1])) if more and page else None


async def _read_body(request: Request, limit: int) -> bytes:
    _check_length(request, limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _check_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "too_large", f"the body is larger than the limit of {limit} bytes")


def _document_text(body: bytes) -> str:
    if not body.strip():
        raise ApiError(422, "invalid_request", "the body is empty; send the YAML document")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(422, "invalid_request", "the body is not UTF-8 text") from None


def _source(source: str | None, default: str) -> str:
    if not source:
        return default
    text = "".join(c if c.isprintable() else "?" for c in source)
    return text[:_SOURCE_MAX]


Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Items per page.")]
Cursor = Annotated[
    str | None, Query(max_length=1024, description="next_cursor of the previous page.")
]
LabelQuery = Annotated[
    list[str], Query(description="key=value; repeat for several (all must match).")
]
ManifestSource = Annotated[
    str | None,
    Query(max_length=_SOURCE_MAX, description="File name the errors should name."),
]
_BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="token",
    description="The hub's API token (api.token_file in hub.toml).",
)
_YAML_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/yaml": {"schema": {"type": "string"}}},
    }
}
_ONNX_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


# --- the application -----------------------------------------------------------------------


def create_app(
    service: HubServiceLike,
    *,
    token: str | None = None,
    metrics: HubMetrics | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    upload_dir: Path | None = None,
) -> FastAPI:
    """The API over ``service``; every route but ``/openapi.json`` needs ``token``.

    ``token`` defaults to the service configuration's (``[api]`` token or token_file);
    ``metrics`` (default: the service's, else a fresh registry) is served at ``/metrics``.
    Uploads larger than ``max_upload_bytes`` are refused; they are staged in
    ``upload_dir`` (the system's temporary directory when None).
    """
    if token is None:
        token = service.config.api_token()
    if not token:
        raise ValueError("the API needs a non-empty token")
    expected = token.encode()
    hub_metrics = metrics or service.metrics or HubMetrics()
    store = service.store

    def require_token(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
    ) -> None:
        given = credentials.credentials.encode() if credentials is not None else b""
        if not hmac.compare_digest(given, expected):
            message = (
                "wrong API token"
                if credentials is not None
                else "missing API token (send Authorization: Bearer TOKEN)"
            )
            raise ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(
        title="edgefleet hub API",
        version=__version__,
        description=(
            "The control plane of an edgefleet fleet. Every route needs the hub's bearer "
            "token. Lists are paginated with ?limit= and ?cursor=; errors are "
            '{"error": {"code", "message"}}.'
        ),
        docs_url=None,
        redoc_url=None,
        dependencies=[Depends(require_token)],
        responses=ERROR_RESPONSES,
    )
    _install_error_handlers(app)
    v1 = API_PREFIX

    # --- hub ---------------------------------------------------------------------------

    @app.get(f"{v1}/health", response_model=Health, tags=["hub"])
    def health() -> Health:
        """The hub answers and the token is right."""
        return Health(
            hub_id=store.get_meta("hub_id"),
            version=__version__,
            schema_version=store.schema_version,
        )

    @app.get(
        "/metrics",
        tags=["hub"],
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    def prometheus() -> Response:
        """The hub's Prometheus metrics: ingest, drops by reason, devices online, publish
        latency, the broker's drop counter."""
        return Response(hub_metrics.render(), media_type=CONTENT_TYPE)

    # --- devices -----------------------------------------------------------------------

    @app.get(f"{v1}/devices", response_model=Page[DeviceSummary], tags=["devices"])
    def list_devices(
        *,
        label: LabelQuery = [],  # noqa: B006 (FastAPI copies defaults)
        profile: str | None = None,
        online: bool | None = None,
        model: str | None = None,
        model_version: str | None = None,
        limit: Limit = DEFAULT_LIMIT,
        cursor: Cursor = None,
    ) -> Page[DeviceSummary]:
        """Devices by id, filtered by labels, profile name, online, and a model (name and
        or version) in their reported state."""
        after = decode_cursor(cursor, [str])[0] if cursor is not None else None
        found = store.list_devices(
            online=online,
            profile=profile,
            labels=parse_labels(label),
            model=model,
            model_version=model_version,
            after=after,
            limit=limit + 1,
        )
        page = found[:limit]
        next_cursor = encode_cursor([page[-1].device_id]) if len(found) > limit else None
        return Page(items=[device_summary(d) for d in page], next_cursor=next_cursor)

    @app.get(
        f"{v1}/devices/{{device_id}}",
        response_model=DeviceDetail,
        tags=["devices"],
        responses=_NOT_FOUND,
    )
    def show_device(device_id: str) -> DeviceDetail:
        """One device with its reported state, desired generation and newest telemetry."""
        return device_detail(store, store.get_device(device_id))

    @app.get(
        f"{v1}/devices/{{device_id}}/telemetry",
        response_model=TelemetryPage,
        tags=["devices"],
        responses=_NOT_FOUND,
    )
    def device_telemetry(
        device_id: str,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 20,
        cursor: Cursor = None,
    ) -> TelemetryPage:
        """Without a cursor: the newest ``limit`` messages. With one: up to ``limit`` that
        came after it. Oldest first either way; poll with ``next_cursor`` to follow."""
        store.get_device(device_id)
        if cursor is None:
            records = list(reversed(store.telemetry_tail(device_id, limit)))
            position = [-1, -1]
        else:
            position = decode_cursor(cursor, [int, int])
            records = store.telemetry_after(device_id, position[0], position[1], limit)
        if records:
            position = [records[-1].session, records[-1].seq]
        return TelemetryPage(
            items=[_telemetry_item(r) for r in records], next_cursor=encode_cursor(position)
        )

    # --- models ------------------------------------------------------------------------

    @app.get(f"{v1}/models", response_model=Page[ModelVariant], tags=["models"])
    def list_models(
        name: str | None = None,
        version: str | None = None,
        limit: Limit = DEFAULT_LIMIT,
        cursor: Cursor = None,
    ) -> Page[ModelVariant]:
        """Every variant of every model version, by name, version and variant."""
        page, next_cursor = _page_of(
            store.list_models(name, version),
            lambda m: (m.name, m.version, m.variant),
            cursor,
            limit,
            [str, str, str],
        )
        return Page(items=[ModelVariant.model_validate(m) for m in page], next_cursor=next_cursor)

    @app.get(
        f"{v1}/models/{{name}}", response_model=ModelDetail, tags=["models"], responses=_NOT_FOUND
    )
    def show_model(name: str, version: str | None = None) -> ModelDetail:
        """The versions and variants of one model (of one version with ``?version=``)."""
        variants = store.list_models(name, version)
        if not variants:
            what = f"model {name}" + (f" version {version}" if version is not None else "")
            raise ApiError(404, "not_found", f"no {what}")
        return ModelDetail(
            name=name,
            versions=sorted({m.version for m in variants}),
            variants=[ModelVariant.model_validate(m) for m in variants],
        )

    @app.post(
        f"{v1}/models",
        response_model=list[ModelVariant],
        tags=["models"],
        responses=_WRITE,
        openapi_extra=_ONNX_BODY,
    )
    async def add_model(
        request: Request,
        *,
        name: Annotated[str, Query(pattern=NAME_PATTERN)],
        version: Annotated[str, Query(pattern=VERSION_PATTERN)],
        variant: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
        precision: Precision | None = None,
        quantize: Literal["int8"] | None = None,
        input_shape: Annotated[
            list[str], Query(description="NAME=D1,D2,... for an input with dynamic sizes.")
        ] = [],  # noqa: B006
        memory_mb: Annotated[int | None, Query(ge=1)] = None,
        filename: Annotated[str | None, Query(max_length=128)] = None,
    ) -> list[ModelVariant]:
        """Register an ONNX file (the body): inspected, measured, stored by hash; with
        ``quantize=int8`` an int8 variant is derived too. Returns the variants stored."""
        shapes = parse_input_shapes(input_shape)
        _check_length(request, max_upload_bytes)
        shown = filename if filename and _FILENAME.match(filename) else f"{name}-{version}.onnx"
        with tempfile.TemporaryDirectory(prefix="edgefleet-upload-", dir=upload_dir) as tmp:
            path = Path(tmp) / shown
            size = 0
            with path.open("wb") as out:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > max_upload_bytes:
                        raise _too_large(max_upload_bytes)
                    out.write(chunk)
            if size == 0:
                raise ApiError(422, "invalid_request", "the body is empty; send the ONNX file")
            try:
                records = await run_in_threadpool(
                    service.add_model,
                    path,
                    name=name,
                    version=version,
                    variant=variant,
                    precision=precision,
                    quantize_int8=quantize == "int8",
                    input_shapes=shapes,
                    memory_mb=memory_mb,
                )
            except EdgefleetError as exc:
                raise api_error(exc, str(exc).replace(f"{tmp}/", "")) from exc
        return [ModelVariant.model_validate(m) for m in records]

    # --- model sets --------------------------------------------------------------------

    @app.get(f"{v1}/modelsets", response_model=Page[ModelSetOut], tags=["model sets"])
    def list_model_sets(
        name: str | None = None,
        published: bool | None = None,
        limit: Limit = DEFAULT_LIMIT,
        cursor: Cursor = None,
    ) -> Page[ModelSetOut]:
        """Model sets by name, then by when they were created."""
        page, next_cursor = _page_of(
            store.list_model_sets(name, published=published),
            lambda s: (s.name, s.created_at, s.version),
            cursor,
            limit,
            [str, float, str],
        )
        return Page(items=[model_set_out(s) for s in page], next_cursor=next_cursor)

    @app.get(
        f"{v1}/modelsets/{{name}}",
        response_model=ModelSetOut,
        tags=["model sets"],
        responses=_NOT_FOUND,
    )
    def newest_model_set(name: str) -> ModelSetOut:
        """The newest version of a model set."""
        versions = store.list_model_sets(name)
        if not versions:
            raise ApiError(404, "not_found", f"no model set {name}")
        return model_set_out(versions[-1])

    @app.get(
        f"{v1}/modelsets/{{name}}/{{version}}",
        response_model=ModelSetOut,
        tags=["model sets"],
        responses=_NOT_FOUND,
    )
    def show_model_set(name: str, version: str) -> ModelSetOut:
        """One version of a model set."""
        return model_set_out(store.get_model_set(name, version))

    @app.post(
        f"{v1}/modelsets",
        response_model=ModelSetOut,
        tags=["model sets"],
        responses=_WRITE,
        openapi_extra=_YAML_BODY,
    )
    async def apply_model_set(request: Request, source: ManifestSource = None) -> ModelSetOut:
        """Apply a model-set YAML document (the body); errors name ``source``, line, field."""
        text = _document_text(await _read_body(request, MAX_MANIFEST_BYTES))
        record = await run_in_threadpool(
            service.apply_model_set, text, _source(source, "modelset.yaml")
        )
        return model_set_out(record)

    # --- policies ----------------------------------------------------------------------

    @app.get(f"{v1}/policies", response_model=Page[PolicyOut], tags=["policies"])
    def list_policies(
        all_versions: Annotated[
            bool, Query(alias="all", description="Every version, not only the active ones.")
        ] = False,
        limit: Limit = DEFAULT_LIMIT,
        cursor: Cursor = None,
    ) -> Page[PolicyOut]:
        """Active policies by name (every version of each with ``?all=true``)."""
        page, next_cursor = _page_of(
            store.list_policies(active_only=not all_versions),
            lambda p: (p.name, p.version),
            cursor,
            limit,
            [str, int],
        )
        return Page(items=[policy_out(p) for p in page], next_cursor=next_cursor)

    @app.get(
        f"{v1}/policies/{{name}}",
        response_model=PolicyOut,
        tags=["policies"],
        responses=_NOT_FOUND,
    )
    def show_policy(name: str, version: Annotated[int | None, Query(ge=1)] = None) -> PolicyOut:
        """The active version of a policy, or the given ``version``."""
        return policy_out(store.get_policy(name, version))

    @app.post(
        f"{v1}/policies",
        response_model=PolicyOut,
        tags=["policies"],
        responses=_WRITE,
        openapi_extra=_YAML_BODY,
    )
    async def apply_policy(request: Request, source: ManifestSource = None) -> PolicyOut:
        """Apply a policy YAML document (the body); errors name ``source``, line, field."""
        text = _document_text(await _read_body(request, MAX_MANIFEST_BYTES))
        record = await run_in_threadpool(service.apply_policy, text, _source(source, "policy.yaml"))
        return policy_out(record)

    # --- plan, events --------------------------------------------------------------------

    @app.get(f"{v1}/plan", response_model=PlanOut, tags=["plan"])
    def plan(
        label: LabelQuery = [],  # noqa: B006
        profile: Annotated[list[str], Query(description="Profile name; repeatable.")] = [],  # noqa: B006
        device: Annotated[list[str], Query(description="Device id; repeatable.")] = [],  # noqa: B006
    ) -> PlanOut:
        """What each device matching the selector would run, before anything is published:
        the contract's ``select`` over its reported profile and facts. All parts given must
        match; none given: every device."""
        labels = parse_labels(label)
        try:
            selector = (
                Selector(labels=labels, profiles=profile, devices=device)
                if labels or profile or device
                else None
            )
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(p) for p in error["loc"])
            raise ApiError(422, "invalid_request", f"{where}: {error['msg']}") from None
        return PlanOut(items=[plan_device_out(d) for d in service.plan(selector)])

    @app.get(f"{v1}/events", response_model=Page[EventOut], tags=["events"])
    def list_events(
        device: str | None = None,
        kind: str | None = None,
        since: Annotated[float | None, Query(description="Unix seconds (device time).")] = None,
        limit: Limit = DEFAULT_LIMIT,
        cursor: Cursor = None,
    ) -> Page[EventOut]:
        """Device events, newest first."""
        before = decode_cursor(cursor, [int])[0] if cursor is not None else None
        found: list[EventRecord] = store.list_events(
            device_id=device, kind=kind, since=since, before_id=before, limit=limit + 1
        )
        page = found[:limit]
        next_cursor = encode_cursor([page[-1].id]) if len(found) > limit else None
        return Page(items=[EventOut.model_validate(e) for e in page], next_cursor=next_cursor)

    # --- rollouts ----------------------------------------------------------------------

    @app.get(f"{v1}/rollouts", response_model=Page[RolloutSummary], tags=["rollouts"])
    def list_rollouts(
        phase: Annotated[
            list[str], Query(description="Only rollouts in this phase; repeatable.")
        ] = [],  # noqa: B006
        limit: Limit = DEFAULT_LIMIT,
        cursor: Cursor = None,
    ) -> Page[RolloutSummary]:
        """Every rollout (or those in the phases given), oldest first."""
        views = [v for v in service.list_rollouts() if not phase or v.state.phase in phase]
        page, next_cursor = _page_of(views, lambda v: (v.id,), cursor, limit, [int])
        return Page(items=[rollout_summary(v) for v in page], next_cursor=next_cursor)

    @app.post(
        f"{v1}/rollouts",
        response_model=RolloutDetail,
        tags=["rollouts"],
        responses=_WRITE,
        openapi_extra=_YAML_BODY,
    )
    async def start_rollout(request: Request, source: ManifestSource = None) -> RolloutDetail:
        """Start a rollout from its YAML document (``edgefleet.rollout/1``, the body): bound
        to its policy's current model set, planned into cohorts and stepped once. 409 when a
        rollout of that name exists or another rollout holds some of its devices."""
        text = _document_text(await _read_body(request, MAX_MANIFEST_BYTES))
        view = await run_in_threadpool(service.start_rollout, text, _source(source, "rollout.yaml"))
        return rollout_detail(view)

    @app.get(
        f"{v1}/rollouts/{{name}}",
        response_model=RolloutDetail,
        tags=["rollouts"],
        responses=_NOT_FOUND,
    )
    def show_rollout(
        name: str,
        events: Annotated[int, Query(ge=0, le=MAX_LIMIT, description="Newest events.")] = 20,
        devices: Annotated[bool, Query(description="Every device and its status.")] = False,
    ) -> RolloutDetail:
        """One rollout: spec, phase, cohorts with their progress and gate values, the
        rollout-wide gates, transitions and the newest events."""
        return rollout_detail(service.rollout(name, events=events), devices=devices)

    def _operation_route(operation: str) -> None:
        async def operate(name: str, command: RolloutCommand | None = None) -> RolloutDetail:
            reason = command.reason if command is not None else None
            view = await run_in_threadpool(service.operate_rollout, name, operation, reason)
            return rollout_detail(view)

        descriptions = {
            "pause": "Hold a pending or running rollout: no device is switched and no gate "
            "decides until it is resumed.",
            "resume": "Continue a paused rollout where it was.",
            "abort": "Stop the rollout and send every device it pinned back to the baseline.",
            "rollback": "Undo the rollout (and its promotion): every device it moved goes back "
            "to the baseline.",
        }
        operate.__name__ = f"{operation}_rollout"
        app.post(
            f"{v1}/rollouts/{{name}}/{operation}",
            response_model=RolloutDetail,
            tags=["rollouts"],
            responses={**_NOT_FOUND, 409: _WRITE[409]},
            summary=f"{operation.capitalize()} a rollout",
            description=descriptions[operation] + " 409 when its phase does not allow it.",
        )(operate)

    for operation in OPERATIONS:
        _operation_route(operation)

    return app
