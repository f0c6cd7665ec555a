"""``HubService``: the one object the HTTP API, the CLI's local commands and the server call.

It ties the registry (``hub.registry``: models, model sets, policies), the controller
(``hub.controller``: desired documents, re-signing, pins) and ``plan`` (``hub.plan``) to one
store, one artifact directory, the signing keys and an MQTT publisher. Every method is
safe to call from several threads (the API's worker threads, the server's jobs).

``apply_policy`` reconciles every device right away; the report of the last reconcile the
service ran is kept in ``last_report``. Rollouts go through ``rollouts`` (``hub.rollouts``,
the driver of the rollout engine); the server ticks it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from contract.manifests import ModelSetRef, Selector
from contract.profile import FirmwareProfile, HardwareFacts
from hub.artifacts import ArtifactStore
from hub.config import HubConfig
from hub.controller import Controller, DevicePins, Publisher, ReconcileReport, view_of
from hub.keys import Keyring
from hub.metrics import HubMetrics
from hub.plan import DevicePlan, plan_device
from hub.registry import Registry
from hub.resolve import selector_matches
from hub.rollouts import RolloutDriver, RolloutView
from hub.store import DeviceRecord, ModelRecord, ModelSetRecord, PolicyRecord, Store


class HubService:
    """Registry, controller and plan over one store."""

    def __init__(
        self,
        config: HubConfig,
        store: Store,
        *,
        artifacts: ArtifactStore,
        keys: Keyring,
        publisher: Publisher | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.artifacts = artifacts
        self.keys = keys
        self.clock = clock
        self.registry = Registry(store, artifacts)
        self.controller = Controller(config, store, keys=keys, publisher=publisher, clock=clock)
        self.last_report: ReconcileReport | None = None
        self.metrics: HubMetrics | None = None
        """The running hub's metrics (set by the server; None elsewhere)."""
        self.rollouts = RolloutDriver(self, store, clock=clock)
        """The rollouts' driver (the server ticks it; see ``hub.rollouts``)."""

    @property
    def publisher(self) -> Publisher | None:
        return self.controller.publisher

    # --- registry ------------------------------------------------------------------------

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
        measure: bool = True,
    ) -> list[ModelRecord]:
        """Inspect, measure (when every input's shape is known) and store a model file;
        with ``quantize_int8`` also an int8 variant and its drift. See ``Registry``."""
        return self.registry.add_model(
            path,
            name=name,
            version=version,
            variant=variant,
            precision=precision,
            quantize_int8=quantize_int8,
            input_shapes=input_shapes,
            memory_mb=memory_mb,
            measure=measure,
        )

    def apply_model_set(self, text: str, source: str) -> ModelSetRecord:
        """Validate a model-set YAML against the stored artifacts and publish it."""
        return self.registry.apply_model_set(text, source)

    def apply_policy(self, text: str, source: str) -> PolicyRecord:
        """Store a policy YAML as its name's active version, then reconcile every device."""
        record = self.registry.apply_policy(text, source)
        self.reconcile()
        return record

    def plan(self, selector: Selector | None = None) -> list[DevicePlan]:
        """What every device matching ``selector`` (default: all) would run, computed with
        ``contract.select`` from the profile and facts it reported, before anything is
        published. Devices in id order."""
        world = self.controller.world()
        plans = []
        for device in self.store.list_devices(limit=None):
            if selector is not None and not selector_matches(selector, view_of(device)):
                continue
            profile, facts = _reported(device)
            plans.append(plan_device(world.resolve(device), profile, facts))
        return plans

    # --- controller ----------------------------------------------------------------------

    def reconcile(self, device_ids: Iterable[str] | None = None) -> ReconcileReport:
        """Resolve, sign, record and publish (retained) what changed; see ``Controller``."""
        report = self.controller.reconcile(device_ids)
        self.last_report = report
        return report

    def resign_due(self) -> ReconcileReport:
        """Re-sign (or publish anew) the documents that expire within ``resign_before_s``."""
        report = self.controller.resign_due()
        self.last_report = report
        return report

    def publish_pending(self) -> int:
        """Publish again the documents the broker never acknowledged."""
        return self.controller.publish_pending()

    def set_pins(
        self, device_id: str, pins: Mapping[str, ModelSetRef], *, rollout: str | None = None
    ) -> None:
        """Pin policies of one device to other model sets (an empty mapping clears); the
        next reconcile of the device applies them."""
        self.controller.set_pins(device_id, pins, rollout=rollout)

    def get_pins(self, device_id: str) -> DevicePins | None:
        return self.controller.get_pins(device_id)

    def mark_rolled_back(self, device_id: str, generation: int) -> bool:
        """Hold the device on its current content (it rolled back from ``generation``)."""
        return self.controller.mark_rolled_back(device_id, generation)

    # --- rollouts ------------------------------------------------------------------------

    def start_rollout(self, text: str, source: str) -> RolloutView:
        """Create a rollout from its YAML (``edgefleet.rollout/1``) and step it once."""
        return self.rollouts.start(text, source)

    def operate_rollout(self, name: str, operation: str, reason: str | None = None) -> RolloutView:
        """``pause``, ``resume``, ``abort`` or ``rollback`` a rollout, with a reason."""
        return self.rollouts.operate(name, operation, reason)

    def rollout(self, name: str, *, events: int = 20) -> RolloutView:
        """One rollout with its newest ``events``."""
        return self.rollouts.view(name, events=events)

    def list_rollouts(self) -> list[RolloutView]:
        """Every rollout, oldest first."""
        return self.rollouts.list_views()


def _reported(device: DeviceRecord) -> tuple[FirmwareProfile | None, HardwareFacts | None]:
    profile = FirmwareProfile.model_validate(device.profile) if device.profile else None
    facts = HardwareFacts.model_validate(device.facts) if device.facts else None
    return profile, facts
