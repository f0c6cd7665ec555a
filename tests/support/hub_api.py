"""The hub's HTTP API for tests: a real uvicorn on 127.0.0.1 in a thread, and a small service.

    with ApiServer(create_app(service, token=TOKEN)) as server:
        httpx.get(server.url + "/v1/devices", headers=...)

``StoreService`` implements ``hub.api.HubServiceLike`` over a real ``Store`` with the
contract's own loaders, ``resolve`` and ``plan_device``, for tests that must not wait for
the full ``hub.service.HubService`` (which also measures and quantizes models). Its
rollouts run on the real ``hub.rollouts.RolloutDriver``; pins are stored as the controller
stores them and ``reconcile`` only records which devices it was asked for.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType

import uvicorn
from fastapi import FastAPI

from contract.manifests import ModelSet, ModelSetRef, Policy, Selector
from contract.profile import FirmwareProfile, HardwareFacts
from contract.yaml_source import load_model_set, load_policy
from hub.artifacts import ArtifactStore
from hub.config import HubConfig
from hub.controller import PINS_PREFIX, DevicePins
from hub.errors import MissingModelSet
from hub.metrics import HubMetrics
from hub.onnx_inspect import inspect_model
from hub.plan import DevicePlan, plan_device
from hub.resolve import DeviceView, ModelSetKey, resolve, selector_matches
from hub.rollouts import RolloutDriver, RolloutView
from hub.store import ModelRecord, ModelSetRecord, PolicyRecord, Store
from support import hub_samples

TOKEN = "test-token-0123456789abcdef"


class StoreService:
    """``HubServiceLike`` over a real store: YAML through the contract, real ONNX inspection
    (no measuring), plans from ``resolve`` and ``select``."""

    def __init__(self, store: Store, artifacts_dir: Path) -> None:
        self.config = HubConfig()
        self.store = store
        self.metrics: HubMetrics | None = None
        self.artifacts = ArtifactStore(artifacts_dir)
        self.rollouts = RolloutDriver(self, store)
        self.reconciled: list[list[str] | None] = []
        """The device ids of every ``reconcile`` call (None: all)."""

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
    ) -> list[ModelRecord]:
        info = inspect_model(path)
        stored = self.artifacts.add_file(path)
        self.store.add_artifact(stored.sha256, stored.size, str(stored.path))
        precision = precision or "fp32"
        record = self.store.add_model(
            name=name,
            version=version,
            variant=variant or f"{name}-{precision}",
            precision=precision,
            sha256=stored.sha256,
            size=stored.size,
            inputs=[{"name": t.name, "type": t.type, "shape": t.shape} for t in info.inputs],
            outputs=[{"name": t.name, "type": t.type, "shape": t.shape} for t in info.outputs],
            opset=info.opset,
            load_memory_mb=memory_mb,
        )
        return [record]

    def apply_model_set(self, text: str, source: str) -> ModelSetRecord:
        model_set = load_model_set(text, source)
        document = model_set.model_dump(mode="json", by_alias=True)
        self.store.put_model_set(model_set.name, model_set.version, document)
        return self.store.publish_model_set(model_set.name, model_set.version)

    def apply_policy(self, text: str, source: str) -> PolicyRecord:
        policy = load_policy(text, source)
        ref = policy.model_set
        if self.store.find_model_set(ref.name, ref.version) is None:
            raise MissingModelSet(policy.name, ref.name, ref.version)
        return self.store.put_policy(policy.name, policy.model_dump(mode="json", by_alias=True))

    def plan(self, selector: Selector | None = None) -> list[DevicePlan]:
        policies = [Policy.model_validate(p.document) for p in self.store.list_policies()]
        model_sets: dict[ModelSetKey, ModelSet] = {
            (s.name, s.version): ModelSet.model_validate(s.document)
            for s in self.store.list_model_sets()
        }
        plans = []
        for device in self.store.list_devices(limit=None):
            profile = (
                None if device.profile is None else FirmwareProfile.model_validate(device.profile)
            )
            facts = None if device.facts is None else HardwareFacts.model_validate(device.facts)
            view = DeviceView(device.device_id, device.labels, device.profile_name, facts, profile)
            if selector is not None and not selector_matches(selector, view):
                continue
            plans.append(plan_device(resolve(view, policies, model_sets), profile, facts))
        return plans

    # --- pins and rollouts (the real driver) -------------------------------------------

    def get_pins(self, device_id: str) -> DevicePins | None:
        value = self.store.get_meta(PINS_PREFIX + device_id)
        return None if value is None else DevicePins.from_json(value)

    def set_pins(
        self, device_id: str, pins: Mapping[str, ModelSetRef], *, rollout: str | None = None
    ) -> None:
        self.store.get_device(device_id)
        if not pins:
            self.store.delete_meta(PINS_PREFIX + device_id)
        else:
            self.store.set_meta(PINS_PREFIX + device_id, DevicePins(dict(pins), rollout).to_json())

    def reconcile(self, device_ids: Iterable[str] | None = None) -> None:
        self.reconciled.append(None if device_ids is None else list(device_ids))

    def start_rollout(self, text: str, source: str) -> RolloutView:
        return self.rollouts.start(text, source)

    def operate_rollout(self, name: str, operation: str, reason: str | None = None) -> RolloutView:
        return self.rollouts.operate(name, operation, reason)

    def rollout(self, name: str, *, events: int = 20) -> RolloutView:
        return self.rollouts.view(name, events=events)

    def list_rollouts(self) -> list[RolloutView]:
        return self.rollouts.list_views()


def seed_devices(store: Store, count: int) -> list[str]:
    """``count`` devices dev-000...: births with labels site=lab|warehouse (alternating),
    even ones online with a reported state, telemetry and an event, odd ones offline."""
    ids = []
    for n in range(count):
        device_id = f"dev-{n:03d}"
        site = "lab" if n % 2 == 0 else "warehouse"
        store.record_birth(
            hub_samples.birth(device_id, labels={"site": site, "n": str(n)}), hub_samples.TS
        )
        if n % 2 == 0:
            store.record_state(hub_samples.state(device_id), hub_samples.TS)
            store.record_event(hub_samples.event(device_id), hub_samples.TS)
        else:
            store.record_status(hub_samples.will(device_id, 1), hub_samples.TS)
        ids.append(device_id)
    return ids


def seed_telemetry(store: Store, device_id: str, count: int, start_seq: int = 10) -> None:
    from hub.store import TelemetryIn

    items = []
    for seq in range(start_seq, start_seq + count):
        message = hub_samples.telemetry(device_id, seq=seq)
        items.append(
            TelemetryIn(message, message.model_dump_json(by_alias=True), hub_samples.TS + seq)
        )
    store.record_telemetry(items)


class ApiServer:
    """uvicorn serving ``app`` on a free loopback port in a thread; ``stop`` joins it."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, name="api-server"
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 10.0
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the API server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10.0)
        self._sock.close()

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
