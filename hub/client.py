"""A client of the hub's HTTP API (httpx): what the ``edgefleet-hub`` commands call.

    with HubClient("http://127.0.0.1:8600", token) as hub:
        for device in hub.iter_devices(labels={"site": "lab"}):
            ...

Every method returns the API's own response models (``hub.api_models``). Any failure is a
``ClientError`` carrying the server's error code and message (``HubUnreachable`` when no
response came back), so the CLI prints it as one line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from hub.api_models import (
    DeviceDetail,
    DeviceSummary,
    ErrorResponse,
    EventOut,
    Health,
    ModelDetail,
    ModelSetOut,
    ModelVariant,
    Page,
    PlanOut,
    PolicyOut,
    RolloutDetail,
    RolloutSummary,
    TelemetryPage,
)
from hub.errors import ClientError, HubUnreachable

DEFAULT_TIMEOUT_S = 30.0
UPLOAD_TIMEOUT_S = 1800.0
"""Adding a model measures it (and may quantize it) before the hub answers."""
PAGE_SIZE = 500
CHUNK = 1024 * 1024

M = TypeVar("M", bound=BaseModel)
Params = Mapping[str, str | int | float | bool | list[str] | None]


def _params(params: Params) -> list[tuple[str, str | int | float | bool | None]]:
    """Query parameters, None left out, lists repeated, booleans as true/false."""
    pairs: list[tuple[str, str | int | float | bool | None]] = []
    for key, value in params.items():
        values = value if isinstance(value, list) else [value]
        for item in values:
            if item is None:
                continue
            text = ("true" if item else "false") if isinstance(item, bool) else str(item)
            pairs.append((key, text))
    return pairs


def _labels(labels: Mapping[str, str] | None) -> list[str]:
    return [f"{key}={value}" for key, value in (labels or {}).items()]


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            yield chunk


class HubClient:
    """The hub's API at ``url`` (``http://host:port``) with a bearer ``token``."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            timeout=timeout,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HubClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- transport -----------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Params | None = None,
        content: bytes | Iterable[bytes] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        try:
            response = self._http.request(
                method,
                path,
                params=_params(params or {}),
                content=content,
                headers=headers,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.TimeoutException as exc:
            raise HubUnreachable(f"the hub at {self.url} did not answer in time ({exc})") from exc
        except httpx.HTTPError as exc:
            reason = str(exc) or type(exc).__name__
            raise HubUnreachable(f"cannot reach the hub at {self.url}: {reason}") from exc
        if response.is_success:
            return response
        raise self._error(response)

    def _error(self, response: httpx.Response) -> ClientError:
        status = response.status_code
        try:
            detail = ErrorResponse.model_validate_json(response.content).error
        except ValidationError:
            text = " ".join(response.text.split())[:200] or response.reason_phrase
            return ClientError(f"HTTP {status} from {self.url}: {text}", status=status)
        return ClientError(detail.message, status=status, code=detail.code)

    def _get(self, model: type[M], path: str, params: Params | None = None) -> M:
        return self._parse(model, self._request("GET", path, params=params))

    def _parse(self, model: type[M], response: httpx.Response) -> M:
        try:
            return model.model_validate_json(response.content)
        except ValidationError as exc:
            raise ClientError(
                f"unexpected answer from {self.url}{response.request.url.path}: "
                f"{exc.error_count()} problems, first: {exc.errors()[0]['msg']}",
                status=response.status_code,
            ) from exc

    def _pages(self, model: type[M], path: str, params: Params, limit: int | None) -> Iterator[M]:
        """Every item of a paginated list (at most ``limit``), page after page."""
        page_type: type[Page[M]] = Page[model]  # type: ignore[valid-type]
        cursor: str | None = None
        left = limit
        while left is None or left > 0:
            size = PAGE_SIZE if left is None else min(PAGE_SIZE, left)
            page = self._get(page_type, path, {**params, "limit": size, "cursor": cursor})
            yield from page.items
            if left is not None:
                left -= len(page.items)
            if page.next_cursor is None or not page.items:
                return
            cursor = page.next_cursor

    # --- hub -----------------------------------------------------------------------------

    def health(self) -> Health:
        """The hub answers and the token is right."""
        return self._get(Health, "/v1/health")

    def metrics(self) -> str:
        """The hub's Prometheus metrics, in the text format."""
        return self._request("GET", "/metrics").text

    # --- devices -------------------------------------------------------------------------

    def iter_devices(
        self,
        *,
        labels: Mapping[str, str] | None = None,
        profile: str | None = None,
        online: bool | None = None,
        model: str | None = None,
        model_version: str | None = None,
        limit: int | None = None,
    ) -> Iterator[DeviceSummary]:
        """Devices by id that match every filter given (at most ``limit``)."""
        params: dict[str, Any] = {
            "label": _labels(labels),
            "profile": profile,
            "online": online,
            "model": model,
            "model_version": model_version,
        }
        return self._pages(DeviceSummary, "/v1/devices", params, limit)

    def device(self, device_id: str) -> DeviceDetail:
        return self._get(DeviceDetail, f"/v1/devices/{_segment(device_id)}")

    def telemetry(
        self, device_id: str, *, limit: int = 20, cursor: str | None = None
    ) -> TelemetryPage:
        """The newest ``limit`` messages, or those after ``cursor``; oldest first."""
        return self._get(
            TelemetryPage,
            f"/v1/devices/{_segment(device_id)}/telemetry",
            {"limit": limit, "cursor": cursor},
        )

    # --- models --------------------------------------------------------------------------

    def iter_models(
        self, *, name: str | None = None, version: str | None = None
    ) -> Iterator[ModelVariant]:
        return self._pages(ModelVariant, "/v1/models", {"name": name, "version": version}, None)

    def model(self, name: str, version: str | None = None) -> ModelDetail:
        return self._get(ModelDetail, f"/v1/models/{_segment(name)}", {"version": version})

    def add_model(
        self,
        path: Path,
        *,
        name: str,
        version: str,
        variant: str | None = None,
        precision: str | None = None,
        quantize: str | None = None,
        input_shapes: Mapping[str, Iterable[int]] | None = None,
        memory_mb: int | None = None,
    ) -> list[ModelVariant]:
        """Upload an ONNX file; the hub inspects, measures and stores it (and derives an
        int8 variant with ``quantize="int8"``). Returns the variants stored."""
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ClientError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        shapes = [
            f"{input_name}={','.join(str(d) for d in dims)}"
            for input_name, dims in (input_shapes or {}).items()
        ]
        response = self._request(
            "POST",
            "/v1/models",
            params={
                "name": name,
                "version": version,
                "variant": variant,
                "precision": precision,
                "quantize": quantize,
                "input_shape": shapes,
                "memory_mb": memory_mb,
                "filename": path.name,
            },
            content=_file_chunks(path),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            timeout=UPLOAD_TIMEOUT_S,
        )
        adapter = TypeAdapter(list[ModelVariant])
        try:
            return adapter.validate_json(response.content)
        except ValidationError as exc:
            raise ClientError(f"unexpected answer from {self.url}/v1/models: {exc}") from exc

    # --- model sets and policies -----------------------------------------------------------

    def iter_model_sets(self, *, name: str | None = None) -> Iterator[ModelSetOut]:
        return self._pages(ModelSetOut, "/v1/modelsets", {"name": name}, None)

    def model_set(self, name: str, version: str | None = None) -> ModelSetOut:
        """One version of a model set; the newest without ``version``."""
        path = f"/v1/modelsets/{_segment(name)}"
        if version is not None:
            path += f"/{_segment(version)}"
        return self._get(ModelSetOut, path)

    def apply_model_set(self, text: str, source: str) -> ModelSetOut:
        """Apply a model-set YAML document; errors name ``source``, the line and field."""
        return self._apply(ModelSetOut, "/v1/modelsets", text, source)

    def iter_policies(self, *, all_versions: bool = False) -> Iterator[PolicyOut]:
        return self._pages(PolicyOut, "/v1/policies", {"all": all_versions}, None)

    def policy(self, name: str, version: int | None = None) -> PolicyOut:
        """The active version of a policy, or ``version``."""
        return self._get(PolicyOut, f"/v1/policies/{_segment(name)}", {"version": version})

    def apply_policy(self, text: str, source: str) -> PolicyOut:
        """Apply a policy YAML document; errors name ``source``, the line and field."""
        return self._apply(PolicyOut, "/v1/policies", text, source)

    def _apply(self, model: type[M], path: str, text: str, source: str) -> M:
        response = self._request(
            "POST",
            path,
            params={"source": source},
            content=text.encode("utf-8"),
            headers={"Content-Type": "application/yaml"},
        )
        return self._parse(model, response)

    # --- plan, events --------------------------------------------------------------------

    def plan(
        self,
        *,
        labels: Mapping[str, str] | None = None,
        profiles: Iterable[str] = (),
        devices: Iterable[str] = (),
    ) -> PlanOut:
        """What every device matching the selector would run (all devices without one)."""
        return self._get(
            PlanOut,
            "/v1/plan",
            {"label": _labels(labels), "profile": list(profiles), "device": list(devices)},
        )

    def iter_events(
        self,
        *,
        device: str | None = None,
        kind: str | None = None,
        since: float | None = None,
        limit: int | None = 100,
    ) -> Iterator[EventOut]:
        """Events newest first (at most ``limit``; None for all)."""
        params: dict[str, Any] = {"device": device, "kind": kind, "since": since}
        return self._pages(EventOut, "/v1/events", params, limit)

    # --- rollouts ------------------------------------------------------------------------

    def start_rollout(self, text: str, source: str) -> RolloutDetail:
        """Start a rollout from its YAML document (``edgefleet.rollout/1``); errors name
        ``source``, the line and field."""
        return self._apply(RolloutDetail, "/v1/rollouts", text, source)

    def iter_rollouts(self, *, phases: Iterable[str] = ()) -> Iterator[RolloutSummary]:
        """Every rollout (or those in ``phases``), oldest first."""
        return self._pages(RolloutSummary, "/v1/rollouts", {"phase": list(phases)}, None)

    def rollout(self, name: str, *, events: int = 20, devices: bool = False) -> RolloutDetail:
        """One rollout: spec, phase, cohorts with gate values, the newest ``events``; every
        device with ``devices``."""
        return self._get(
            RolloutDetail,
            f"/v1/rollouts/{_segment(name)}",
            {"events": events, "devices": devices},
        )

    def operate_rollout(self, name: str, operation: str, reason: str = "") -> RolloutDetail:
        """``pause``, ``resume``, ``abort`` or ``rollback`` a rollout, with a reason."""
        response = self._request(
            "POST",
            f"/v1/rollouts/{_segment(name)}/{_segment(operation)}",
            content=json.dumps({"reason": reason}).encode(),
            headers={"Content-Type": "application/json"},
        )
        return self._parse(RolloutDetail, response)


def _segment(value: str) -> str:
    """``value`` as one URL path segment (``/`` and the rest percent-encoded)."""
    from urllib.parse import quote

    return quote(value, safe="")
