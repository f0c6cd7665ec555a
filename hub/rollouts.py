"""The rollout driver: connects the pure engine (``hub.rollout``) to the store and the
controller. docs/rollouts.md ("The driver") tells the story; in short:

- ``start(text, source)`` loads the spec (``edgefleet.rollout/1``), binds it to its policy's
  current model set, selects the policy's devices (revoked ones left out), refuses devices
  another rollout holds, stores the spec and the planned state in the ``rollouts`` table and
  steps it once.
- ``tick(now)`` steps every pending, running or paused rollout: it reads what the engine
  observes (devices, the model set each device's applied and newest generation carry for
  the rollout's policy, the reported state, health figures over the engine's window),
  calls ``step``, **persists the new state first, then executes the actions, then records
  the events**. The hub server calls it from an APScheduler job every
  ``ROLLOUT_TICK_S`` and soon after ingest stored a state, status or event of a device
  the driver watches (``watching``).
- ``pause``, ``resume``, ``abort`` and ``rollback`` (``operate``) run the engine's
  operations the same way; ``resume`` also steps at once.
- ``recover()`` runs once when the hub starts: it makes the controller's pins equal to
  ``expected_pins`` of every rollout (the newest rollout that includes a device decides
  its pin of that rollout's policy) and finishes a promotion a crash interrupted, so an
  action lost between the persist and its execution is redone; the next tick continues
  where the last one stopped.

Actions: ``Pin`` / ``Unpin`` change one policy's entry in the device's pins and keep its
other entries (``set_pins`` replaces the whole mapping); ``Promote`` writes a new policy
version naming the target, only if the policy still names ``expected``
(``RolloutConflict`` otherwise). Then the touched devices are reconciled (every device
after a promotion), which signs and publishes their new desired documents.

Events are rows of the store's ``events`` table with ``device_id`` ``""`` (no device has an
empty id), ``session`` = the rollout's id and ``seq`` counting per rollout; ``kind`` is the
engine's (``rollout.running``, ``cohort.started``, ``gate.failed``, ...) and ``data`` holds
``rollout``, ``cohort`` and ``device_id`` beside the engine's own data. The driver adds
``rollout.created``, ``driver.recovered`` (pins or a promotion redone after a restart)
and ``driver.action_failed`` (an action that could not be executed, with why).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from contract.errors import EdgefleetError
from contract.manifests import ModelSet, ModelSetRef, Policy
from hub.controller import PINS_PREFIX, DevicePins, view_of
from hub.enroll import revoked_devices
from hub.errors import Conflict, NotFound, RolloutConflict, RolloutError
from hub.rollout import (
    ACTIVE_PHASES,
    CohortProgress,
    DeviceObservation,
    HealthFigures,
    Observations,
    Pin,
    Promote,
    RolloutEvent,
    RolloutSpec,
    RolloutState,
    StepResult,
    Unpin,
    Window,
    abort,
    check_conflicts,
    device_ids,
    expected_pins,
    health_window,
    load_spec,
    load_state,
    new_rollout,
    pause,
    progress,
    resume,
    rollback,
    select_targets,
    step,
)
from hub.store import (
    DesiredContent,
    DeviceSnapshot,
    EventRecord,
    RolloutEventIn,
    RolloutHead,
    RolloutRecord,
    Store,
)

log = logging.getLogger(__name__)

ROLLOUT_TICK_S = 1.0
"""How often the hub server steps the active rollouts (ingest wakes them sooner)."""
EVENTS_SHOWN = 20
"""Events a ``view`` carries by default."""
MAX_REASON = 500
CLAIMING_PHASES = frozenset({*ACTIVE_PHASES, "failed"})
"""Phases in which a rollout may hold devices (``claimed_devices``)."""
TELEMETRY_FRESH_S = 120.0
"""A request rate read from telemetry older than this (plus 3 intervals) is unknown."""

Operation = Literal["pause", "resume", "abort", "rollback"]
OPERATIONS: tuple[Operation, ...] = ("pause", "resume", "abort", "rollback")
_ENGINE_OPERATIONS: dict[str, Callable[[RolloutSpec, RolloutState, float, str], StepResult]] = {
    "pause": pause,
    "resume": resume,
    "abort": abort,
    "rollback": rollback,
}


class RolloutHost(Protocol):
    """What the driver needs of ``hub.service.HubService``: the pins and reconcile."""

    def get_pins(self, device_id: str) -> DevicePins | None: ...

    def set_pins(
        self, device_id: str, pins: Mapping[str, ModelSetRef], *, rollout: str | None = None
    ) -> None: ...

    def reconcile(self, device_ids: Iterable[str] | None = None) -> object: ...


@dataclass(frozen=True)
class RolloutView:
    """One rollout as stored: its spec, its state, times, and its newest events."""

    id: int
    spec: RolloutSpec
    state: RolloutState
    created_at: float
    updated_at: float
    events: tuple[EventRecord, ...] = ()

    @property
    def name(self) -> str:
        return self.spec.name

    def progress(self) -> list[CohortProgress]:
        """Every cohort with its devices counted by status and its latest gate results."""
        return progress(self.state)


@dataclass
class _Loaded:
    id: int
    spec: RolloutSpec
    state: RolloutState
    created_at: float
    updated_at: float

    def view(self, events: Sequence[EventRecord] = ()) -> RolloutView:
        return RolloutView(
            self.id, self.spec, self.state, self.created_at, self.updated_at, tuple(events)
        )


@dataclass
class _Fixes:
    """What ``recover`` changed for one rollout."""

    pinned: list[str] = field(default_factory=list)
    unpinned: list[str] = field(default_factory=list)
    promoted: str | None = None


def clean_reason(reason: str | None, default: str) -> str:
    """One line of at most ``MAX_REASON`` characters (``default`` when empty)."""
    text = " ".join((reason or "").split())
    return (text or default)[:MAX_REASON]


class RolloutDriver:
    """Steps the rollouts stored in ``store`` and executes their actions through ``host``.
    Thread-safe: one operation at a time (the scheduler's ticks, the API's commands)."""

    def __init__(
        self, host: RolloutHost, store: Store, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.host = host
        self.store = store
        self.clock = clock
        self._lock = threading.RLock()
        self._cache: dict[int, _Loaded] = {}
        """Active rollouts as last loaded or stepped; finished ones are read from the store."""
        self._contents: dict[str, dict[int, DesiredContent]] = {}
        """Per device, the stored contents of the generations its last observation named."""
        self._set_models: dict[tuple[str, str], dict[str, str] | None] = {}
        self._watched: frozenset[str] = frozenset()
        self.ticks = 0
        """Ticks run so far."""
        self.last_tick_s = 0.0
        """How long the last tick took (seconds)."""

    # --- reading ---------------------------------------------------------------------------

    def _load(self, head: RolloutHead | RolloutRecord) -> _Loaded:
        cached = self._cache.get(head.id)
        if cached is not None and cached.updated_at == head.updated_at:
            return cached
        record = head if isinstance(head, RolloutRecord) else self.store.get_rollout(head.id)
        spec = RolloutSpec.model_validate(record.document)
        loaded = _Loaded(
            record.id, spec, load_state(record.state), record.created_at, record.updated_at
        )
        self._remember(loaded)
        return loaded

    def _remember(self, loaded: _Loaded) -> None:
        if loaded.state.phase in ACTIVE_PHASES:
            self._cache[loaded.id] = loaded
        else:
            self._cache.pop(loaded.id, None)

    def _by_name(self, name: str) -> _Loaded:
        record = self.store.find_rollout(name)
        if record is None:
            raise NotFound(f"no rollout {name!r}")
        return self._load(record)

    def view(self, name: str, *, events: int = EVENTS_SHOWN) -> RolloutView:
        """The rollout ``name`` with its newest ``events`` (NotFound if there is none)."""
        with self._lock:
            loaded = self._by_name(name)
            recent = self.store.list_rollout_events(loaded.id, limit=events) if events else []
            return loaded.view(recent)

    def list_views(self, phases: Iterable[str] | None = None) -> list[RolloutView]:
        """Every rollout (or those in ``phases``), oldest first, without events."""
        with self._lock:
            return [self._load(h).view() for h in self.store.rollout_heads(phases)]

    def watching(self, device_id: str) -> bool:
        """Whether a pending, running or paused rollout includes ``device_id`` (ingest asks:
        news of such a device is worth a tick)."""
        return device_id in self._watched

    def _refresh_watched(self) -> None:
        watched: set[str] = set()
        for head in self.store.rollout_heads(ACTIVE_PHASES):
            watched.update(self._load(head).state.devices)
        self._watched = frozenset(watched)

    # --- start -----------------------------------------------------------------------------

    def start(self, text: str, source: str) -> RolloutView:
        """Create a rollout from its YAML (``edgefleet.rollout/1``) and step it once.

        ManifestError for a bad document (file, line, field); Conflict when a rollout of
        that name exists; RolloutError when its policy is not active, the target model set
        is not published or equals the baseline; RolloutConflict when another rollout
        holds some of its devices."""
        return self.start_spec(load_spec(text, source))

    def start_spec(self, spec: RolloutSpec) -> RolloutView:
        """``start`` for a spec already validated."""
        with self._lock:
            now = self.clock()
            if self.store.find_rollout(spec.name) is not None:
                raise Conflict(f"a rollout named {spec.name} exists already; choose another name")
            try:
                record = self.store.get_policy(spec.policy)
            except NotFound:
                raise RolloutError(
                    f"rollout {spec.name}: no active policy {spec.policy!r}"
                ) from None
            policy = Policy.model_validate(record.document)
            bound = spec.bind(policy.name, policy.model_set)
            target = bound.target_ref
            model_set = self.store.find_model_set(target.name, target.version)
            if model_set is None or not model_set.published:
                raise RolloutError(
                    f"rollout {spec.name}: model set {target.name} {target.version} is not "
                    "published (apply it first)"
                )
            revoked = revoked_devices(self.store)
            views = [view_of(b) for b in self.store.device_briefs() if b.device_id not in revoked]
            devices = select_targets(bound, policy, views)
            others = {
                h.name: self._load(h).state for h in self.store.rollout_heads(CLAIMING_PHASES)
            }
            check_conflicts(devices, others)
            state = new_rollout(bound, devices, now)
            created = self.store.create_rollout(
                bound.model_dump(mode="json", by_alias=True), state.model_dump(mode="json")
            )
            baseline = bound.baseline_ref
            self.store.record_rollout_events(
                created.id,
                [
                    _event_in(
                        RolloutEvent(
                            kind="rollout.created",
                            at=now,
                            rollout=bound.name,
                            reason=(
                                f"policy {bound.policy}: {baseline.name} {baseline.version} -> "
                                f"{target.name} {target.version}; {len(devices)} device(s) in "
                                f"{len(state.cohorts)} cohort(s)"
                            ),
                            data={"devices": len(devices)},
                        )
                    )
                ],
            )
            loaded = self._load(created)
            log.info("rollout %s created: %d device(s)", bound.name, len(devices))
            self._step(loaded, now)
            self._refresh_watched()
            return self.view(bound.name)

    # --- operations ------------------------------------------------------------------------

    def operate(self, name: str, operation: str, reason: str | None = None) -> RolloutView:
        """``pause``, ``resume``, ``abort`` or ``rollback`` the rollout ``name`` with a
        reason (InvalidTransition when its phase does not allow it)."""
        engine_op = _ENGINE_OPERATIONS.get(operation)
        if engine_op is None:
            raise RolloutError(f"unknown rollout operation {operation!r}")
        with self._lock:
            loaded = self._by_name(name)
            now = self.clock()
            why = clean_reason(reason, f"{operation} by an operator")
            loaded = self._commit(loaded, engine_op(loaded.spec, loaded.state, now, why))
            log.info("rollout %s: %s (%s)", name, operation, why)
            if operation == "resume":
                self._step(loaded, now)
            self._refresh_watched()
            return self.view(name)

    def pause(self, name: str, reason: str | None = None) -> RolloutView:
        return self.operate(name, "pause", reason)

    def resume(self, name: str, reason: str | None = None) -> RolloutView:
        return self.operate(name, "resume", reason)

    def abort(self, name: str, reason: str | None = None) -> RolloutView:
        return self.operate(name, "abort", reason)

    def rollback(self, name: str, reason: str | None = None) -> RolloutView:
        return self.operate(name, "rollback", reason)

    # --- ticks -----------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> float | None:
        """Step every pending, running or paused rollout; returns the earliest time one of
        them has something to do without news (``wake_at``), or None. A rollout whose step
        fails is logged and left for the next tick."""
        with self._lock:
            started = time.monotonic()
            at = self.clock() if now is None else now
            wakes: list[float] = []
            for head in self.store.rollout_heads(ACTIVE_PHASES):
                try:
                    wake = self._step(self._load(head), at)
                except Exception:
                    log.exception("rollout %s: step failed", head.name)
                    continue
                if wake is not None:
                    wakes.append(wake)
            self._refresh_watched()
            self.ticks += 1
            self.last_tick_s = time.monotonic() - started
            return min(wakes) if wakes else None

    def _step(self, loaded: _Loaded, now: float) -> float | None:
        window = health_window(loaded.spec, loaded.state, now)
        observations = self.observe(loaded.spec, loaded.state, now, window)
        result = step(loaded.spec, loaded.state, observations, now)
        self._commit(loaded, result)
        return result.wake_at

    def _commit(self, loaded: _Loaded, result: StepResult) -> _Loaded:
        """Persist the state, then execute the actions, then record the events."""
        if result.actions or result.events or result.state != loaded.state:
            record = self.store.update_rollout_state(
                loaded.id, result.state.model_dump(mode="json")
            )
            loaded = _Loaded(
                loaded.id, loaded.spec, result.state, loaded.created_at, record.updated_at
            )
            self._remember(loaded)
        failures = self._execute(loaded.spec, result.actions)
        events = [_event_in(e) for e in result.events] + failures
        self.store.record_rollout_events(loaded.id, events)
        if result.state.phase not in ACTIVE_PHASES:
            for device_id in device_ids(result.state):
                self._contents.pop(device_id, None)
        return loaded

    # --- observations ----------------------------------------------------------------------

    def observe(
        self, spec: RolloutSpec, state: RolloutState, now: float, window: Window | None
    ) -> Observations:
        """What the engine needs of the rollout's devices, read from the store."""
        ids = device_ids(state)
        snapshots = self.store.device_snapshots(ids)
        self._cache_contents(ids, snapshots)
        figures: Mapping[str, Mapping[str, tuple[int, int, float, int]]] = {}
        if window is not None:
            figures = self.store.model_figures(ids, since=window.since, until=window.until)
        devices: dict[str, DeviceObservation] = {}
        for device_id in ids:
            snapshot = snapshots.get(device_id)
            if snapshot is None:
                continue  # not known (any more): offline to the engine
            rate = None
            if spec.only_when_idle and state.devices[device_id].status == "waiting":
                rate = self._request_rate(device_id, now)
            devices[device_id] = self._observation(spec, snapshot, figures.get(device_id, {}), rate)
        return Observations(devices=devices, window=window)

    def _cache_contents(self, ids: Iterable[str], snapshots: Mapping[str, DeviceSnapshot]) -> None:
        """Keep, for each of ``ids``, the contents of exactly the generations its snapshot
        names (applied and issued), reading the missing ones from the store."""
        wanted: dict[str, set[int]] = {}
        for device_id in ids:
            snapshot = snapshots.get(device_id)
            if snapshot is None:
                self._contents.pop(device_id, None)
                continue
            generations = {
                g for g in (snapshot.applied_generation, snapshot.issued_generation) if g > 0
            }
            if self._contents.get(device_id, {}).keys() != generations:
                wanted[device_id] = generations
        missing = [
            (device_id, g)
            for device_id, generations in wanted.items()
            for g in generations
            if g not in self._contents.get(device_id, {})
        ]
        found = self.store.desired_contents(missing) if missing else {}
        for device_id, generations in wanted.items():
            known = self._contents.get(device_id, {})
            kept = {g: known[g] for g in generations if g in known}
            kept.update({g: found[device_id, g] for g in generations if (device_id, g) in found})
            self._contents[device_id] = kept

    def _observation(
        self,
        spec: RolloutSpec,
        s: DeviceSnapshot,
        figures: Mapping[str, tuple[int, int, float, int]],
        rate: float | None,
    ) -> DeviceObservation:
        reported = s.state or {}
        models = reported.get("models") or []
        last_error = reported.get("last_error") or None
        failed = [
            g
            for g in (
                last_error.get("generation") if isinstance(last_error, dict) else None,
                reported.get("refused_generation"),
            )
            if isinstance(g, int)
        ]
        error = None
        if isinstance(last_error, dict):
            error = f"{last_error.get('code', 'error')}: {last_error.get('message', '')}".strip()
        return DeviceObservation(
            online=s.online,
            last_seen=s.last_seen,
            profile=s.profile_name,
            applied=self._policy_set(spec, s.device_id, s.applied_generation),
            applied_generation=s.applied_generation,
            phase=s.phase,
            ready=bool(models) and all(bool(m.get("ready")) for m in models),
            issued=self._policy_set(spec, s.device_id, s.issued_generation),
            issued_generation=s.issued_generation,
            failed_generation=max(failed) if failed else None,
            error=error,
            request_rate=rate,
            health={
                model: HealthFigures(requests, errors, wsum, weight)
                for model, (requests, errors, wsum, weight) in figures.items()
            },
        )

    def _policy_set(self, spec: RolloutSpec, device_id: str, generation: int) -> ModelSetRef | None:
        """The model set a stored generation uses for the rollout's policy, as far as the
        rollout cares: the document's model set when it is the baseline or the target (the
        policy is the device's top policy); else the baseline or the target whose every
        model the document carries at its version (a lower-layer policy); else None."""
        if generation <= 0:
            return None
        content = self._contents.get(device_id, {}).get(generation)
        if content is None:
            return None
        candidates = (spec.target_ref, spec.baseline_ref)
        if content.model_set is not None:
            try:
                top = ModelSetRef.model_validate(content.model_set)
            except ValueError:
                top = None
            if top in candidates:
                return top
        for candidate in candidates:
            models = self._models_of(candidate)
            if models and all(content.models.get(n) == v for n, v in models.items()):
                return candidate
        return None

    def _models_of(self, ref: ModelSetRef) -> dict[str, str] | None:
        key = (ref.name, ref.version)
        if key not in self._set_models:
            record = self.store.find_model_set(ref.name, ref.version)
            models = None
            if record is not None:
                parsed = ModelSet.model_validate(record.document)
                models = {m.name: m.version for m in parsed.models}
            self._set_models[key] = models
        return self._set_models[key]

    def _request_rate(self, device_id: str, now: float) -> float | None:
        """Requests per second in the device's newest telemetry, if it is recent."""
        tail = self.store.telemetry_tail(device_id, 1)
        if not tail:
            return None
        payload = tail[0].payload
        interval = payload.get("interval_s")
        if not isinstance(interval, int | float) or interval <= 0:
            return None
        if now - tail[0].ts > TELEMETRY_FRESH_S + 3 * interval:
            return None
        models = payload.get("models") or {}
        requests = sum(int(m.get("requests", 0)) for m in models.values() if isinstance(m, dict))
        return requests / float(interval)

    # --- actions ---------------------------------------------------------------------------

    def _execute(
        self, spec: RolloutSpec, actions: Sequence[Pin | Unpin | Promote]
    ) -> list[RolloutEventIn]:
        """Run the actions in order, then reconcile what they touched; the failures as
        events (``driver.action_failed``)."""
        touched: list[str] = []
        promoted = False
        failures: list[RolloutEventIn] = []
        for action in actions:
            try:
                if isinstance(action, Pin):
                    self._set_entry(action.device_id, action.policy, action.model_set, spec.name)
                    touched.append(action.device_id)
                elif isinstance(action, Unpin):
                    self._set_entry(action.device_id, action.policy, None, spec.name)
                    touched.append(action.device_id)
                else:
                    self._promote(action)
                    promoted = True
            except EdgefleetError as exc:
                log.warning("rollout %s: %s failed: %s", spec.name, _describe(action), exc)
                failures.append(
                    RolloutEventIn(
                        ts=self.clock(),
                        kind="driver.action_failed",
                        message=f"{_describe(action)}: {exc}",
                        data={
                            "rollout": spec.name,
                            "device_id": getattr(action, "device_id", None),
                        },
                    )
                )
        if promoted or touched:
            try:
                self.host.reconcile(None if promoted else touched)
            except Exception:
                log.exception("rollout %s: reconcile after its actions failed", spec.name)
        return failures

    def _set_entry(
        self, device_id: str, policy: str, ref: ModelSetRef | None, rollout: str
    ) -> bool:
        """Set (``ref``) or drop (None) one policy's pin of a device, keeping its other
        pins; False when nothing changed."""
        current = self.host.get_pins(device_id)
        entries = dict(current.model_sets) if current is not None else {}
        owner = current.rollout if current is not None else None
        if ref is None:
            if policy not in entries:
                return False
            del entries[policy]
            label = owner if owner != rollout else None
        else:
            if entries.get(policy) == ref and owner == rollout:
                return False
            entries[policy] = ref
            label = rollout
        self.host.set_pins(device_id, entries, rollout=label if entries else None)
        return True

    def _promote(self, action: Promote) -> bool:
        """Make the policy name ``action.model_set`` (a new policy version) if it names
        ``action.expected``; nothing when it already names the model set; RolloutConflict
        otherwise. True when a version was written."""
        with self.store.transaction():
            try:
                record = self.store.get_policy(action.policy)
            except NotFound:
                raise RolloutConflict(
                    f"cannot promote: policy {action.policy} is not active any more"
                ) from None
            document = dict(record.document)
            current = ModelSetRef.model_validate(document.get("model_set"))
            if current == action.model_set:
                return False
            if current != action.expected:
                raise RolloutConflict(
                    f"cannot promote policy {action.policy} to {action.model_set.name} "
                    f"{action.model_set.version}: it names {current.name} {current.version}, "
                    f"not {action.expected.name} {action.expected.version}"
                )
            target = self.store.find_model_set(action.model_set.name, action.model_set.version)
            if target is None or not target.published:
                raise RolloutConflict(
                    f"cannot promote policy {action.policy}: model set "
                    f"{action.model_set.name} {action.model_set.version} is not published"
                )
            document["model_set"] = action.model_set.model_dump(mode="json")
            Policy.model_validate(document)
            written = self.store.put_policy(action.policy, document)
        log.info(
            "rollout %s: policy %s version %d names %s %s",
            action.rollout,
            action.policy,
            written.version,
            action.model_set.name,
            action.model_set.version,
        )
        return True

    # --- after a restart -------------------------------------------------------------------

    def recover(self, *, reconcile: bool = True) -> list[str]:
        """Make the controller's pins equal to what the rollouts expect (the newest rollout
        that includes a device decides the pin of its policy) and finish an interrupted
        promotion. Returns the devices whose pins changed; reconciles them (every device
        after a promotion) when ``reconcile``."""
        with self._lock:
            now = self.clock()
            pins = {
                key.removeprefix(PINS_PREFIX): DevicePins.from_json(value)
                for key, value in self.store.list_meta(PINS_PREFIX).items()
            }
            deciding: dict[tuple[str, str], _Loaded] = {}
            newest_per_policy: dict[str, _Loaded] = {}
            by_id: dict[int, _Loaded] = {}
            for head in self.store.rollout_heads():
                try:
                    loaded = by_id[head.id] = self._load(head)
                except (EdgefleetError, ValueError) as exc:
                    log.error("rollout %s cannot be loaded: %s", head.name, exc)
                    continue
                newest_per_policy[loaded.spec.policy] = loaded
                for device_id in loaded.state.devices:
                    deciding[(device_id, loaded.spec.policy)] = loaded
            fixes: dict[int, _Fixes] = {}
            changed: list[str] = []
            for (device_id, policy), loaded in sorted(deciding.items()):
                want = expected_pins(loaded.spec, loaded.state).get(device_id)
                current = pins.get(device_id)
                entry = current.model_sets.get(policy) if current is not None else None
                name = loaded.spec.name
                try:
                    if want is not None and entry != want:
                        self._set_entry(device_id, policy, want, name)
                        fixes.setdefault(loaded.id, _Fixes()).pinned.append(device_id)
                        changed.append(device_id)
                    elif (
                        want is None
                        and entry is not None
                        and current is not None
                        and (current.rollout == name or entry == loaded.spec.target_ref)
                    ):
                        self._set_entry(device_id, policy, None, name)
                        fixes.setdefault(loaded.id, _Fixes()).unpinned.append(device_id)
                        changed.append(device_id)
                except EdgefleetError as exc:
                    log.warning("rollout %s: pins of %s not restored: %s", name, device_id, exc)
            promoted = False
            for loaded in newest_per_policy.values():
                action = _interrupted_promotion(loaded)
                if action is None:
                    continue
                try:
                    if self._promote(action):
                        promoted = True
                        fixes.setdefault(
                            loaded.id, _Fixes()
                        ).promoted = f"{action.model_set.name} {action.model_set.version}"
                except EdgefleetError as exc:
                    log.warning("rollout %s: promotion not redone: %s", loaded.spec.name, exc)
            for rollout_id, fix in fixes.items():
                loaded = by_id[rollout_id]
                parts = []
                if fix.pinned:
                    parts.append(f"{len(fix.pinned)} pin(s) restored")
                if fix.unpinned:
                    parts.append(f"{len(fix.unpinned)} pin(s) removed")
                if fix.promoted:
                    parts.append(f"policy {loaded.spec.policy} promoted to {fix.promoted}")
                self.store.record_rollout_events(
                    rollout_id,
                    [
                        RolloutEventIn(
                            ts=now,
                            kind="driver.recovered",
                            message="after a restart: " + ", ".join(parts),
                            data={"rollout": loaded.spec.name},
                        )
                    ],
                )
                log.info("rollout %s recovered: %s", loaded.spec.name, ", ".join(parts))
            self._refresh_watched()
            if reconcile and (promoted or changed):
                try:
                    self.host.reconcile(None if promoted else sorted(set(changed)))
                except Exception:
                    log.exception("reconcile after the rollouts' recovery failed")
            return sorted(set(changed))


def _interrupted_promotion(loaded: _Loaded) -> Promote | None:
    """The promotion a crash may have cut off for the newest rollout of a policy: to the
    target after success, back to the baseline after a rollback of a promoted rollout."""
    spec, state = loaded.spec, loaded.state
    if state.phase == "succeeded" and state.promoted:
        return Promote(spec.policy, spec.target_ref, spec.baseline_ref, spec.name)
    was_promoted = spec.promotes and any(t.to_phase == "succeeded" for t in state.transitions)
    if state.phase == "rolled_back" and was_promoted:
        return Promote(spec.policy, spec.baseline_ref, spec.target_ref, spec.name)
    return None


def _describe(action: Pin | Unpin | Promote) -> str:
    if isinstance(action, Pin):
        ref = action.model_set
        return f"pin {action.device_id} {action.policy} to {ref.name} {ref.version}"
    if isinstance(action, Unpin):
        return f"unpin {action.device_id} {action.policy}"
    ref = action.model_set
    return f"promote {action.policy} to {ref.name} {ref.version}"


def _event_in(event: RolloutEvent) -> RolloutEventIn:
    data: dict[str, Any] = {"rollout": event.rollout}
    if event.cohort is not None:
        data["cohort"] = event.cohort
    if event.device_id is not None:
        data["device_id"] = event.device_id
    data.update(event.data)
    return RolloutEventIn(ts=event.at, kind=event.kind, message=event.reason, data=data)
