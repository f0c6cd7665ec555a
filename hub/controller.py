"""The controller: every device's signed desired state, from the policies to the broker.

A thin driver over the pure rules (``hub.resolve``, ``hub.desired``; docs/hub.md and
docs/decisions/0007-layered-policies.md). One ``reconcile`` call:

1. reads the world once: the active policies, the published model sets they and the pins
   name (parsed once per process: published sets never change), every device's pins and
   rolled-back mark, the active signing keys and the artifact base URLs;
2. per device: ``resolve`` the policies, then ``next_document`` against the newest stored
   document (its generation, expiry, content hash, and whether the device rolled back from
   that content) and the newest generation the device reports having seen;
3. records every new document in the store (generations only grow: the store refuses one
   that does not), then publishes it retained, QoS 1, on the device's ``down/desired``, and
   marks it published once the broker acknowledged it.

Recording before publishing means a generation number is never handed out twice; a crash
between the two leaves an unpublished document that ``publish_pending`` sends later (the
server does so at start and periodically). Without a publisher (an operator's process that
is not the hub server) documents are recorded and left for the server to publish.

``resign_due`` reconciles the devices whose newest document expires within
``desired.resign_before_s``: unchanged content is re-signed with a new generation, changed
content published. A device that reported ``update.rolled_back`` for the current content is
held (``mark_rolled_back``): nothing is re-sent until the content changes.

Pins (``set_pins``) replace a policy's model set for one device (rollouts); they live in
``hub_meta`` under ``pins/<device>``, rolled-back marks under ``rolled_back/<device>``.

Revoked devices (``hub.enroll.revoked_devices``: ``device revoke`` marked them) are left out
of every reconcile and republish: a revoked device that sends a birth before the broker
reloaded its CRL gets no desired state again.

``ControllerLoop`` runs the controller off the ingest thread in the hub server: ingest
hooks only queue device ids; one thread reconciles whatever is queued, coalesced.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from contract.manifests import ModelSet, ModelSetRef, Policy
from contract.messages import Birth, Event, EventKind, State, encode
from contract.signing import PublicKey, SigningKey
from contract.topics import Kind, down_topic
from hub.config import HubConfig
from hub.desired import ContentHashes, Decision, PreviousDesired, next_document
from hub.enroll import revoked_devices
from hub.errors import Conflict, PolicyError, UnknownModelSet
from hub.ingest import IngestHooks
from hub.keys import Keyring
from hub.resolve import DeviceView, ModelSetKey, Resolution, resolve
from hub.store import DesiredRecord, Store

log = logging.getLogger(__name__)
_T = TypeVar("_T")

PINS_PREFIX = "pins/"
ROLLED_BACK_PREFIX = "rolled_back/"
CHUNK = 500
"""Devices decided, recorded (one store transaction) and published at a time."""
ACK_TIMEOUT_S = 30.0
"""How long a reconcile waits for the broker to acknowledge what it published."""
REPUBLISH_AFTER_S = 30.0
"""A device that reports not having received the newest document this long after the
broker acknowledged it is sent it again (at most this often)."""

Outcome = Literal["published", "resigned", "unchanged", "unassigned", "held", "failed"]
_OUTCOMES: dict[str, Outcome] = {
    "publish": "published",
    "resign": "resigned",
    "unchanged": "unchanged",
    "unassigned": "unassigned",
    "hold": "held",
}


class DeviceLike(Protocol):
    """What the controller needs of a device (``DeviceRecord`` or ``DeviceBrief``)."""

    @property
    def device_id(self) -> str: ...
    @property
    def labels(self) -> dict[str, str]: ...
    @property
    def profile_name(self) -> str | None: ...
    @property
    def applied_generation(self) -> int: ...
    @property
    def desired_generation(self) -> int: ...


class DesiredLike(Protocol):
    """What the controller needs of a stored document (``DesiredRecord``, ``DesiredHead``)."""

    @property
    def generation(self) -> int: ...
    @property
    def expires_at(self) -> float: ...
    @property
    def content_hash(self) -> str: ...


class Publisher(Protocol):
    """Sends one MQTT message (the ingest's client in the server; a fake in tests).

    What it returns may have ``wait_for_publish(timeout)`` and ``is_published()`` (paho's
    ``MQTTMessageInfo``): the controller then marks a document published only once the
    broker acknowledged it. Anything else counts as acknowledged when ``publish`` returns.
    """

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> object: ...


@dataclass(frozen=True)
class DevicePins:
    """A device's per-policy model-set overrides, and the rollout that set them."""

    model_sets: Mapping[str, ModelSetRef]
    rollout: str | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "model_sets": {
                    policy: ref.model_dump(mode="json") for policy, ref in self.model_sets.items()
                },
                "rollout": self.rollout,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> DevicePins:
        data = json.loads(text)
        return cls(
            model_sets={
                policy: ModelSetRef.model_validate(ref)
                for policy, ref in data.get("model_sets", {}).items()
            },
            rollout=data.get("rollout"),
        )


@dataclass(frozen=True)
class World:
    """What every device is resolved against in one reconcile or plan."""

    policies: tuple[Policy, ...]
    model_sets: Mapping[ModelSetKey, ModelSet]
    pins: Mapping[str, DevicePins]

    def resolve(self, device: DeviceLike) -> Resolution:
        """The layered resolution for ``device`` (PolicyError when it cannot be made)."""
        pins = self.pins.get(device.device_id)
        return resolve(
            view_of(device),
            self.policies,
            self.model_sets,
            overrides=pins.model_sets if pins is not None else None,
        )


@dataclass
class ReconcileReport:
    """What one reconcile did: counts per outcome, and the details worth showing."""

    published: int = 0
    resigned: int = 0
    unchanged: int = 0
    unassigned: int = 0
    held: int = 0
    failed: int = 0
    unacknowledged: int = 0
    """Documents recorded but not acknowledged by the broker (or no publisher): they stay
    unpublished in the store and ``publish_pending`` sends them again."""
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    generations: dict[str, int] = field(default_factory=dict)
    """The new generation of every device that got a document."""
    errors: dict[str, str] = field(default_factory=dict)
    warnings: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def devices(self) -> int:
        return len(self.outcomes)

    def count(self, device_id: str, outcome: Outcome) -> None:
        self.outcomes[device_id] = outcome
        setattr(self, outcome, getattr(self, outcome) + 1)

    def summary(self) -> str:
        return (
            f"{self.devices} devices: {self.published} published, {self.resigned} re-signed, "
            f"{self.unchanged} unchanged, {self.unassigned} unassigned, {self.held} held, "
            f"{self.failed} failed, {self.unacknowledged} unacknowledged "
            f"({self.seconds:.3f} s)"
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON data (for the API)."""
        return {
            "published": self.published,
            "resigned": self.resigned,
            "unchanged": self.unchanged,
            "unassigned": self.unassigned,
            "held": self.held,
            "failed": self.failed,
            "unacknowledged": self.unacknowledged,
            "outcomes": dict(self.outcomes),
            "generations": dict(self.generations),
            "errors": dict(self.errors),
            "warnings": {k: list(v) for k, v in self.warnings.items()},
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class _Round:
    """What one reconcile read once and every chunk uses."""

    world: World
    latest: Mapping[str, DesiredLike]
    rolled: Mapping[str, str]
    signing: Sequence[SigningKey]
    trusted: Sequence[PublicKey]
    report: ReconcileReport
    hashes: ContentHashes = field(default_factory=ContentHashes)


@dataclass
class _Pending:
    device_id: str
    generation: int
    ack: object


def view_of(device: DeviceLike) -> DeviceView:
    """What resolution needs of a device: id, labels, reported profile name."""
    return DeviceView(device_id=device.device_id, labels=device.labels, profile=device.profile_name)


def artifact_base_urls(config: HubConfig) -> list[str]:
    """The base URLs put in every document: the external ones first (a CDN or S3 takes the
    load), then the hub's own artifact server when it serves (the fallback)."""
    urls = [url.rstrip("/") for url in config.artifacts.base_urls]
    if config.artifacts.serve and config.artifacts.own_url not in urls:
        urls.append(config.artifacts.own_url)
    return urls


class Controller:
    """Decides, signs, records and publishes desired documents. Thread-safe: one reconcile
    at a time per controller."""

    def __init__(
        self,
        config: HubConfig,
        store: Store,
        *,
        keys: Keyring,
        publisher: Publisher | None,
        clock: Callable[[], float] = time.time,
        ack_timeout_s: float = ACK_TIMEOUT_S,
    ) -> None:
        self.config = config
        self.store = store
        self.keys = keys
        self.publisher = publisher
        self.clock = clock
        self.ack_timeout_s = ack_timeout_s
        self.base_urls = artifact_base_urls(config)
        self._lock = threading.RLock()
        self._model_sets: dict[ModelSetKey, ModelSet] = {}

    # --- the world -----------------------------------------------------------------------

    def world(self) -> World:
        """Active policies, the published model sets they and the pins name, and the pins."""
        policies = tuple(
            Policy.model_validate(record.document) for record in self.store.list_policies()
        )
        pins = {
            key.removeprefix(PINS_PREFIX): DevicePins.from_json(value)
            for key, value in self.store.list_meta(PINS_PREFIX).items()
        }
        refs = {(p.model_set.name, p.model_set.version) for p in policies}
        for device_pins in pins.values():
            refs.update((ref.name, ref.version) for ref in device_pins.model_sets.values())
        return World(policies=policies, model_sets=self._load_model_sets(refs), pins=pins)

    def _load_model_sets(self, refs: Iterable[ModelSetKey]) -> dict[ModelSetKey, ModelSet]:
        found: dict[ModelSetKey, ModelSet] = {}
        for key in refs:
            cached = self._model_sets.get(key)
            if cached is None:
                record = self.store.find_model_set(*key)
                if record is None or not record.published:
                    continue  # resolve() raises MissingModelSet for the devices it concerns
                cached = self._model_sets[key] = ModelSet.model_validate(record.document)
            found[key] = cached
        return found

    # --- pins and rollbacks --------------------------------------------------------------

    def set_pins(
        self, device_id: str, pins: Mapping[str, ModelSetRef], *, rollout: str | None = None
    ) -> None:
        """Replace the device's pins (policy name -> model set); an empty mapping clears
        them. Every pinned model set must be published. Takes effect on the next reconcile
        of the device."""
        self.store.get_device(device_id)
        key = PINS_PREFIX + device_id
        if not pins:
            self.store.delete_meta(key)
            return
        for policy, ref in pins.items():
            record = self.store.find_model_set(ref.name, ref.version)
            if record is None or not record.published:
                raise UnknownModelSet(
                    f"pins of device {device_id}",
                    None,
                    f"pins.{policy}",
                    f"model set {ref.name} {ref.version} is not published",
                    name=ref.name,
                    version=ref.version,
                )
        self.store.set_meta(key, DevicePins(dict(pins), rollout).to_json())

    def get_pins(self, device_id: str) -> DevicePins | None:
        value = self.store.get_meta(PINS_PREFIX + device_id)
        return DevicePins.from_json(value) if value is not None else None

    def mark_rolled_back(self, device_id: str, generation: int) -> bool:
        """Note that the device rolled back from ``generation``: while the newest document
        has that content, the device is held (nothing re-sent). False when the hub has no
        such generation for the device."""
        record = next(
            (d for d in self.store.desired_history(device_id, 50) if d.generation == generation),
            None,
        )
        if record is None:
            return False
        mark = {"generation": generation, "content_hash": record.content_hash}
        self.store.set_meta(ROLLED_BACK_PREFIX + device_id, json.dumps(mark, sort_keys=True))
        return True

    def _rolled_back_hashes(self, device_ids: Iterable[str] | None) -> dict[str, str]:
        if device_ids is None:
            marks = {
                key.removeprefix(ROLLED_BACK_PREFIX): value
                for key, value in self.store.list_meta(ROLLED_BACK_PREFIX).items()
            }
        else:
            marks = {}
            for device_id in device_ids:
                value = self.store.get_meta(ROLLED_BACK_PREFIX + device_id)
                if value is not None:
                    marks[device_id] = value
        return {device: json.loads(value)["content_hash"] for device, value in marks.items()}

    # --- reconcile -----------------------------------------------------------------------

    def reconcile(self, device_ids: Iterable[str] | None = None) -> ReconcileReport:
        """Bring the given devices (default: every known device) to their desired state."""
        started = time.monotonic()
        report = ReconcileReport()
        with self._lock:
            world = self.world()
            signing = self.keys.signing_keys()
            trusted = self.keys.public_keys()
            devices: list[DeviceLike] = []
            latest: dict[str, DesiredLike] = {}
            if device_ids is None:
                devices.extend(self.store.device_briefs())
                latest.update(self.store.latest_desired_heads())
                rolled = self._rolled_back_hashes(None)
            else:
                wanted = list(dict.fromkeys(device_ids))
                for device_id in wanted:
                    device = self.store.find_device(device_id)
                    if device is None:
                        report.errors[device_id] = f"no device {device_id!r}"
                        report.count(device_id, "failed")
                    else:
                        devices.append(device)
                known = [d.device_id for d in devices]
                for device_id in known:
                    record = self.store.latest_desired(device_id)
                    if record is not None:
                        latest[device_id] = record
                rolled = self._rolled_back_hashes(known)
            revoked = revoked_devices(self.store)
            if revoked:
                devices = [d for d in devices if d.device_id not in revoked]
            round_ = _Round(world, latest, rolled, signing, trusted, report)
            pending: list[_Pending] = []
            for chunk in _chunks(devices, CHUNK):
                pending.extend(self._reconcile_chunk(chunk, round_))
            self._settle(pending, report)
        report.seconds = time.monotonic() - started
        if report.published or report.resigned or report.failed:
            log.info("reconcile: %s", report.summary())
        for device_id, error in list(report.errors.items())[:5]:
            log.warning("reconcile: device %s: %s", device_id, error)
        return report

    def _reconcile_chunk(self, devices: Sequence[DeviceLike], round_: _Round) -> list[_Pending]:
        world, latest, rolled, report = round_.world, round_.latest, round_.rolled, round_.report
        now = self.clock()
        decided: list[tuple[DeviceLike, Decision]] = []
        for device in devices:
            device_id = device.device_id
            try:
                resolution = world.resolve(device)
            except PolicyError as exc:
                report.errors[device_id] = str(exc)
                report.count(device_id, "failed")
                continue
            if resolution.warnings:
                report.warnings[device_id] = [str(w) for w in resolution.warnings]
            previous = latest.get(device_id)
            pins = world.pins.get(device_id)
            decision = next_document(
                _previous(previous, rolled.get(device_id)),
                resolution,
                device_id=device_id,
                now=now,
                validity_s=self.config.desired.validity_s,
                resign_before_s=self.config.desired.resign_before_s,
                keys=round_.signing,
                trusted_keys=round_.trusted,
                base_urls=self.base_urls,
                rollout=pins.rollout if pins is not None else None,
                device_generation=max(device.applied_generation, device.desired_generation),
                hashes=round_.hashes,
            )
            if decision.document is None:
                report.count(device_id, _OUTCOMES[decision.kind])
            else:
                decided.append((device, decision))
        if not decided:
            return []

        payloads: list[tuple[str, int, bytes]] = []
        with self.store.transaction():
            for device, decision in decided:
                document = decision.document
                assert document is not None and decision.content_hash is not None
                payload = encode(document)
                state = document.payload
                try:
                    self.store.record_desired_encoded(
                        device.device_id,
                        state.generation,
                        decision.content_hash,
                        payload,
                        issued_at=state.issued_at,
                        expires_at=state.expires_at,
                    )
                except Conflict as exc:  # another process recorded one first
                    report.errors[device.device_id] = str(exc)
                    report.count(device.device_id, "failed")
                    continue
                if decision.content_changed and device.device_id in rolled:
                    self.store.delete_meta(ROLLED_BACK_PREFIX + device.device_id)
                report.count(device.device_id, _OUTCOMES[decision.kind])
                report.generations[device.device_id] = state.generation
                payloads.append((device.device_id, state.generation, payload))
        return self._publish(payloads)

    def _publish(self, payloads: Iterable[tuple[str, int, bytes]]) -> list[_Pending]:
        pending = []
        for device_id, generation, payload in payloads:
            ack: object = None
            if self.publisher is not None:
                try:
                    ack = self.publisher.publish(
                        down_topic(device_id, Kind.DESIRED), payload, qos=1, retain=True
                    )
                except Exception as exc:  # a closed client, a full queue: retried later
                    log.warning("publish of %s generation %d: %s", device_id, generation, exc)
                    ack = exc
            pending.append(_Pending(device_id, generation, ack))
        return pending

    def _settle(self, pending: Sequence[_Pending], report: ReconcileReport) -> None:
        """Wait for the broker's acknowledgements; mark what was acknowledged published."""
        if self.publisher is None:
            report.unacknowledged += len(pending)
            return
        deadline = time.monotonic() + self.ack_timeout_s
        acked: list[tuple[str, int, float]] = []
        for item in pending:
            if _acknowledged(item.ack, deadline):
                acked.append((item.device_id, item.generation, self.clock()))
            else:
                report.unacknowledged += 1
        for chunk in _chunks(acked, CHUNK):
            with self.store.transaction():
                for device_id, generation, at in chunk:
                    self.store.mark_desired_published(device_id, generation, at)

    # --- periodic jobs -------------------------------------------------------------------

    def resign_due(self) -> ReconcileReport:
        """Reconcile the devices whose newest document expires within ``resign_before_s``."""
        horizon = self.clock() + self.config.desired.resign_before_s
        due = [record.device_id for record in self.store.desired_expiring_before(horizon)]
        if not due:
            return ReconcileReport()
        return self.reconcile(due)

    def publish_pending(self) -> int:
        """Publish again every newest document the broker never acknowledged; returns how
        many were acknowledged now."""
        if self.publisher is None:
            return 0
        with self._lock:
            revoked = revoked_devices(self.store)
            return self._republish(
                [r for r in self.store.unpublished_desired() if r.device_id not in revoked]
            )

    def republish(self, device_ids: Iterable[str]) -> int:
        """Publish the newest stored document of each device again, as it is (same
        generation, same signatures): for a device that never received it, e.g. after the
        broker lost its retained messages. Returns how many were acknowledged."""
        if self.publisher is None:
            return 0
        with self._lock:
            revoked = revoked_devices(self.store)
            records = [
                self.store.latest_desired(device_id)
                for device_id in device_ids
                if device_id not in revoked
            ]
            return self._republish([r for r in records if r is not None])

    def _republish(self, records: Sequence[DesiredRecord]) -> int:
        payloads = [
            (
                r.device_id,
                r.generation,
                json.dumps(r.document, separators=(",", ":"), ensure_ascii=False).encode(),
            )
            for r in records
        ]
        report = ReconcileReport()
        self._settle(self._publish(payloads), report)
        return len(records) - report.unacknowledged


def _previous(record: DesiredLike | None, rolled_back_hash: str | None) -> PreviousDesired | None:
    if record is None:
        return None
    return PreviousDesired(
        generation=record.generation,
        expires_at=record.expires_at,
        content_hash=record.content_hash,
        rolled_back=rolled_back_hash is not None and rolled_back_hash == record.content_hash,
    )


def _acknowledged(ack: object, deadline: float) -> bool:
    if isinstance(ack, BaseException):
        return False
    wait = getattr(ack, "wait_for_publish", None)
    published = getattr(ack, "is_published", None)
    if not callable(wait) or not callable(published):
        return True  # a publisher that does not report acknowledgements
    try:
        wait(max(0.0, deadline - time.monotonic()))
        return bool(published())
    except (RuntimeError, ValueError):  # not queued, or the connection is gone
        return False


def _chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class ControllerLoop:
    """Runs a controller off the ingest thread: hooks queue work, one thread does it.

    ``attach(hooks)`` registers: a birth queues a reconcile of the device; a state whose
    reported generation is above the hub's newest document queues one too (the device has
    seen a newer generation: a hub restored from a backup); a state showing that the device
    never received the newest document (``_compare``) has it published again as it is; an
    ``update.rolled_back`` event marks the device's generation rolled back (the controller
    then holds it).
    ``request_all()`` queues every device. Work queued while a reconcile runs is coalesced
    into the next one.
    """

    def __init__(self, controller: Controller, *, name: str = "hub-controller") -> None:
        self.controller = controller
        self._name = name
        self._cond = threading.Condition()
        self._devices: set[str] = set()
        self._all = False
        self._rollbacks: list[tuple[str, int]] = []
        self._states: dict[str, State] = {}
        self._republished: dict[str, float] = {}
        self._stop = False
        self._busy = False
        self._thread: threading.Thread | None = None
        self.reports: int = 0
        """Reconciles run so far."""

    def attach(self, hooks: IngestHooks) -> None:
        hooks.on_birth.append(self._on_birth)
        hooks.on_state.append(self._on_state)
        hooks.on_event.append(self._on_event)

    def _on_birth(self, device_id: str, birth: Birth) -> None:
        self.request([device_id])

    def _on_state(self, device_id: str, state: State) -> None:
        with self._cond:
            self._states[device_id] = state
            self._cond.notify()

    def _on_event(self, device_id: str, event: Event) -> None:
        if event.kind == EventKind.UPDATE_ROLLED_BACK and event.generation is not None:
            with self._cond:
                self._rollbacks.append((device_id, event.generation))
                self._cond.notify()

    def request(self, device_ids: Iterable[str]) -> None:
        with self._cond:
            self._devices.update(device_ids)
            self._cond.notify()

    def request_all(self) -> None:
        with self._cond:
            self._all = True
            self._cond.notify()

    def idle(self, timeout: float = 10.0) -> bool:
        """Wait until nothing is queued or running; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._busy or self._has_work():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the controller loop is already started")
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _has_work(self) -> bool:
        return bool(self._all or self._devices or self._rollbacks or self._states)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._has_work():
                    self._cond.wait()
                if self._stop:
                    return
                everything, self._all = self._all, False
                devices, self._devices = self._devices, set()
                rollbacks, self._rollbacks = self._rollbacks, []
                states, self._states = self._states, {}
                self._busy = True
            try:
                self._work(everything, devices, rollbacks, states)
            except Exception:
                log.exception("controller: reconcile failed")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _work(
        self,
        everything: bool,
        devices: set[str],
        rollbacks: list[tuple[str, int]],
        states: dict[str, State],
    ) -> None:
        controller = self.controller
        for device_id, generation in rollbacks:
            if controller.mark_rolled_back(device_id, generation):
                log.info("device %s rolled back from generation %d; held", device_id, generation)
        resend = []
        for device_id, state in states.items():
            latest = controller.store.latest_desired(device_id)
            if latest is None:
                continue
            verdict = _compare(
                state,
                latest,
                wall=controller.clock(),
                now=time.monotonic(),
                republished_at=self._republished.get(device_id),
            )
            if verdict == "ahead":
                devices.add(device_id)
            elif verdict == "missing":
                resend.append(device_id)
                self._republished[device_id] = time.monotonic()
        if resend:
            log.info("republishing the newest document to %d device(s)", len(resend))
            controller.republish(resend)
        if everything:
            controller.publish_pending()
            controller.reconcile()
        elif devices:
            controller.reconcile(sorted(devices))
        self.reports += 1


def _compare(
    state: State, latest: DesiredRecord, *, wall: float, now: float, republished_at: float | None
) -> Literal["ahead", "missing", "fine"]:
    """How a device's reported generations stand against the hub's newest document.

    ``ahead``: the device has seen a newer generation than the hub's newest (a hub restored
    from a backup): reconcile, which numbers the next document above it. ``missing``: the
    device has not received the newest document although the broker acknowledged it a
    while ago (``REPUBLISH_AFTER_S``), did not refuse it, and was not sent it again lately:
    publish it again as it is.
    """
    seen = max(state.applied_generation, state.desired_generation)
    if seen > latest.generation:
        return "ahead"
    if (
        seen < latest.generation
        and state.refused_generation != latest.generation
        and latest.published_at is not None
        and wall - latest.published_at >= REPUBLISH_AFTER_S
        and (republished_at is None or now - republished_at >= REPUBLISH_AFTER_S)
    ):
        return "missing"
    return "fine"
