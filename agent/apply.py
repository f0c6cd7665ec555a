"""Apply a generation: stage, load beside the old, smoke-test, switch, persist, report, watch.

The order guarantees that a failure (or a crash) at any step leaves the old set serving:
nothing is opened before the cache verified it, new sessions load beside the old ones,
the switch is one swap of the active table, and ``AgentState.activate`` is the commit
point that decides what a restarted agent serves.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.desired import Accepted
from agent.errors import AgentError, ArtifactUnavailable
from agent.faults import Faults
from agent.host import ModelHost, Slot, load_model, thread_budget
from agent.memory import release_freed_memory
from agent.probation import find_breach
from agent.state import AgentState, Generation
from contract.errors import EdgefleetError
from contract.manifests import ModelSpec, RuntimePolicy
from contract.messages import DesiredState, LastError, ModelReport, Phase
from contract.profile import FirmwareProfile, HardwareFacts
from contract.select import Choice, Plan, Skip, select, supported_providers

log = logging.getLogger(__name__)

LOAD_WORKERS = 3
"""Models fetched and loaded at once during an apply."""


def providers_of(choice: Choice, spec: ModelSpec, profile: FirmwareProfile) -> list[str]:
    """The providers a chosen variant's session is created with: the chosen one first, then
    the profile's next ones that the variant supports (``load_model`` leaves out those this
    ONNX Runtime lacks)."""
    variant = next(v for v in spec.variants if v.name == choice.variant)
    order = supported_providers(variant, profile)
    if choice.provider not in order:
        return [choice.provider]
    return order[order.index(choice.provider) :]


class Reporter(Protocol):
    """Where the applier reports to (the daemon publishes over MQTT)."""

    def event(
        self, kind: str, *, generation: int | None, message: str, data: dict[str, Any]
    ) -> None: ...

    def state_changed(self) -> None: ...


@dataclass
class Outcome:
    ok: bool
    generation: int
    code: str = ""
    message: str = ""


@dataclass
class Serving:
    """The generation being served and what was chosen for it."""

    generation: int
    state: DesiredState
    plan: Plan
    activated_at: float
    probation_until: float | None = None


@dataclass
class _Failure(Exception):
    code: str
    message: str


@dataclass
class ApplierStatus:
    phase: Phase = "idle"
    desired_generation: int = 0
    last_error: LastError | None = None
    refused_generation: int | None = None
    shed: dict[str, str] = field(default_factory=dict)


def error_code(exc: BaseException) -> str:
    """A short machine-readable code for an error, from its class name.

    For an artifact no URL delivered, the code of the last URL's failure (hash_mismatch,
    size_mismatch, fetch_error) says more than artifact_unavailable.
    """
    if isinstance(exc, ArtifactUnavailable) and exc.failures:
        exc = exc.failures[-1][1]
    name = type(exc).__name__
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


class Applier:
    """Owns which generation the model host serves."""

    def __init__(
        self,
        *,
        state: AgentState,
        cache: Any,
        host: ModelHost,
        profile: FirmwareProfile,
        facts: Callable[[], HardwareFacts],
        reporter: Reporter,
        faults: Faults | None = None,
        clock: Callable[[], float] = time.time,
        drain_timeout_s: float = 30.0,
    ) -> None:
        self._state = state
        self._cache = cache
        self._host = host
        self._profile = profile
        self._facts = facts
        self._reporter = reporter
        self._faults = faults or Faults()
        self._clock = clock
        self._drain_timeout_s = drain_timeout_s
        self._lock = threading.RLock()
        self.status = ApplierStatus()
        self.serving: Serving | None = None

    # ---- queries -------------------------------------------------------------------

    @property
    def runtime(self) -> RuntimePolicy:
        return self.serving.state.runtime if self.serving else RuntimePolicy()

    @property
    def applied_generation(self) -> int:
        return self.serving.generation if self.serving else 0

    def model_reports(self) -> list[ModelReport]:
        """Every model of the served generation: ready, or why not."""
        serving = self.serving
        if serving is None:
            return []
        table = self._host.table
        reports = []
        for entry in serving.plan.entries:
            if isinstance(entry, Choice):
                slot = table.get(entry.model)
                ready = slot is not None and slot.model is not None
                reason = None if ready else (slot.reason if slot else "not loaded")
                reports.append(
                    ModelReport(
                        name=entry.model,
                        version=entry.version,
                        variant=entry.variant,
                        precision=entry.precision,
                        provider=slot.model.provider if slot and slot.model else entry.provider,
                        ready=ready,
                        reason=reason,
                    )
                )
            else:
                reports.append(
                    ModelReport(
                        name=entry.model,
                        version=entry.version,
                        ready=False,
                        reason=f"{entry.reason}: {entry.message}",
                    )
                )
        return reports

    def ready(self) -> tuple[bool, str]:
        """Whether the desired set is loaded and smoke-tested, and if not, why."""
        if self.serving is None:
            return False, "no generation applied yet"
        if self.status.phase in ("staging", "loading"):
            return False, f"applying generation {self.status.desired_generation}"
        missing = [r.name for r in self.model_reports() if not r.ready]
        chosen = {c.model for c in self.serving.plan.chosen}
        unready = [name for name in missing if name in chosen]
        if unready:
            return False, f"not serving: {', '.join(unready)}"
        return True, f"generation {self.serving.generation} ready"

    # ---- start-up ------------------------------------------------------------------

    def restore(self) -> None:
        """Serve what the state says is active (after a restart); forget interrupted applies."""
        with self._lock:
            interrupted = self._state.discard_staged("interrupted by a restart")
            for generation in interrupted:
                log.warning("generation %d was interrupted by a restart", generation)
            active = self._state.active()
            if active is None:
                return
            try:
                self._serve_recorded(active)
            except (EdgefleetError, OSError) as exc:
                log.error("cannot restore generation %d: %s", active.generation, exc)
                self.status.last_error = LastError(
                    generation=active.generation, code=error_code(exc), message=str(exc)
                )
                self.status.phase = "failed"
                return
            assert self.serving is not None
            until = active.activated_at or 0.0
            until += self.serving.state.runtime.probation_s
            if until > self._clock():
                self.serving.probation_until = until
                self.status.phase = "probation"
            else:
                self.status.phase = "committed"
            self.status.desired_generation = max(self.status.desired_generation, active.generation)

    def _serve_recorded(self, record: Generation) -> None:
        state = DesiredState.model_validate(record.document)
        plan = Plan.model_validate(record.plan)
        table = self._load_table(state, plan, download=True)
        old = self._host.swap(table)
        self._host.drain(old, self._drain_timeout_s)
        release_freed_memory()
        self.serving = Serving(
            generation=record.generation,
            state=state,
            plan=plan,
            activated_at=record.activated_at or self._clock(),
        )

    # ---- apply ---------------------------------------------------------------------

    def apply(self, accepted: Accepted) -> Outcome:
        """Apply a verified desired state; on any failure the old set keeps serving."""
        with self._lock:
            desired = accepted.state
            generation = desired.generation
            self.status.desired_generation = max(self.status.desired_generation, generation)
            if self.serving and self._same_content(self.serving.state, desired):
                return self._adopt_without_reload(accepted)
            self._set_phase("staging")
            self._reporter.event(
                "update.started",
                generation=generation,
                message=f"applying generation {generation}",
                data={"model_set": desired.model_set.model_dump()},
            )
            try:
                plan = self._plan(desired)
                self._state.record_staged(generation, accepted.signed_payload, _dump(plan))
                self._set_phase("loading")
                table = self._load_table(desired, plan, download=True, applying=True)
            except (_Failure, EdgefleetError, OSError, ValueError) as exc:
                return self._fail(generation, exc)
            self._switch(generation, desired, plan, table)
            return Outcome(ok=True, generation=generation)

    def _plan(self, desired: DesiredState) -> Plan:
        plan = select(desired.models, self._profile, self._facts_for_planning())
        if desired.models and not plan.chosen:
            reasons = "; ".join(s.message for s in plan.skipped)
            raise _Failure("nothing_fits", f"no model fits this device: {reasons}")
        return plan

    def _facts_for_planning(self) -> HardwareFacts:
        facts = self._facts()
        if facts.memory_available_mb is None or self.serving is None:
            return facts
        held = sum(c.memory_mb for c in self.serving.plan.chosen)
        return facts.model_copy(update={"memory_available_mb": facts.memory_available_mb + held})

    def _load_table(
        self, desired: DesiredState, plan: Plan, *, download: bool, applying: bool = False
    ) -> dict[str, Slot]:
        """Fetch, load and smoke-test every chosen model (a few at a time); then the skips.

        Each model is a fetch-then-load pipeline of its own, so one model's download overlaps
        another's session creation. The first failure is raised once all have finished.
        ``applying``: an apply, not a restore or rollback (the ``load`` fault point is here).
        """
        specs = {spec.name: spec for spec in desired.models}
        priorities = {c.model: specs[c.model].priority for c in plan.chosen}
        threads = thread_budget(self._profile.budgets.threads, priorities)

        def prepare(choice: Choice) -> Slot:
            spec = specs[choice.model]
            model_path, golden_path = self._artifacts(spec, choice, desired, download=download)
            model = load_model(
                model_path,
                spec,
                providers=providers_of(choice, spec, self._profile),
                intra_op_threads=threads[choice.model],
                golden_path=golden_path,
                variant=choice.variant,
            )
            return Slot(model, desired.runtime.for_model(choice.model))

        table: dict[str, Slot] = {}
        failures: list[BaseException] = []
        workers = max(1, min(LOAD_WORKERS, len(plan.chosen)))
        with ThreadPoolExecutor(workers, thread_name_prefix="edgefleet-load") as pool:
            futures = [(c.model, pool.submit(prepare, c)) for c in plan.chosen]
            for index, (name, future) in enumerate(futures):
                try:
                    table[name] = future.result()
                except Exception as exc:
                    failures.append(exc)
                if index == 0 and applying:
                    self._faults.hit("load")
        if failures:
            raise failures[0]
        for skip in plan.skipped:
            table[skip.model] = Slot.unavailable(
                skip.model,
                f"left out on this device: {skip.reason}: {skip.message}",
                version=skip.version,
                runtime=desired.runtime.for_model(skip.model),
            )
        return table

    def _artifacts(
        self, spec: ModelSpec, choice: Choice, desired: DesiredState, *, download: bool
    ) -> tuple[Path, Path | None]:
        variant = next(v for v in spec.variants if v.name == choice.variant)
        urls = desired.artifact_base_urls
        if download:
            model_path = self._cache.ensure(variant.artifact, urls)
            golden = self._cache.ensure(spec.golden.artifact, urls) if spec.golden else None
        else:
            model_path = self._cache.path(variant.artifact.sha256)
            golden = self._cache.path(spec.golden.artifact.sha256) if spec.golden else None
        return Path(model_path), (Path(golden) if golden else None)

    def _switch(
        self, generation: int, desired: DesiredState, plan: Plan, table: dict[str, Slot]
    ) -> None:
        old = self._host.swap(table)
        self._faults.hit("switch")
        self._state.activate(generation)
        self._faults.hit("persist")
        now = self._clock()
        probation = desired.runtime.probation_s
        self.serving = Serving(
            generation=generation,
            state=desired,
            plan=plan,
            activated_at=now,
            probation_until=now + probation if probation > 0 else None,
        )
        self.status.last_error = None
        self._set_phase("probation" if probation > 0 else "committed")
        self._reporter.event(
            "update.activated",
            generation=generation,
            message=f"generation {generation} serving",
            data={"plan": _dump(plan)},
        )
        self._host.drain(old, self._drain_timeout_s)
        self._collect_garbage()
        release_freed_memory()
        if probation <= 0:
            self._commit()

    def _adopt_without_reload(self, accepted: Accepted) -> Outcome:
        """A re-signed document with the same content: record it, keep the sessions."""
        assert self.serving is not None
        generation = accepted.state.generation
        self._state.record_staged(generation, accepted.signed_payload, _dump(self.serving.plan))
        self._state.activate(generation)
        self.serving.generation = generation
        self.serving.state = accepted.state
        if self.status.phase in ("failed", "rolled_back"):
            # Back on what it serves (the hub re-issued it after a failed or rolled-back
            # generation, e.g. a rollout's rollback): that generation's phase, not the
            # failure's. The failure stays in last_error.
            until = self.serving.probation_until
            self.status.phase = (
                "probation" if until is not None and until > self._clock() else "committed"
            )
        self._reporter.state_changed()
        return Outcome(ok=True, generation=generation, code="unchanged")

    @staticmethod
    def _same_content(a: DesiredState, b: DesiredState) -> bool:
        keys = ("models", "runtime", "artifact_base_urls")
        da = a.model_dump(mode="json", include=set(keys))
        db = b.model_dump(mode="json", include=set(keys))
        return da == db

    def _fail(self, generation: int, exc: BaseException) -> Outcome:
        code = exc.code if isinstance(exc, _Failure) else error_code(exc)
        message = exc.message if isinstance(exc, _Failure) else str(exc)
        log.error("generation %d failed: %s", generation, message)
        if self._state.get(generation) is not None:
            with contextlib.suppress(LookupError, ValueError):
                self._state.mark_failed(generation, f"{code}: {message}")
        self.status.last_error = LastError(generation=generation, code=code, message=message)
        self._set_phase("failed")
        self._reporter.event(
            "update.failed",
            generation=generation,
            message=message,
            data={"code": code, "serving": self.applied_generation},
        )
        return Outcome(ok=False, generation=generation, code=code, message=message)

    def _collect_garbage(self) -> None:
        try:
            self._cache.gc(set(self._state.keep_hashes()))
        except (AgentError, OSError) as exc:
            log.warning("artifact cache clean-up failed: %s", exc)

    # ---- probation and rollback ----------------------------------------------------

    def check_probation(self) -> None:
        """Roll back on a breach during probation; commit once the window has passed."""
        with self._lock:
            serving = self.serving
            if serving is None or serving.probation_until is None:
                return
            stats = {
                name: slot.stats.snapshot()
                for name, slot in self._host.table.items()
                if slot.model is not None
            }
            breach = find_breach(stats, serving.state.runtime)
            if breach is not None:
                self.rollback(f"probation: {breach.message}")
            elif self._clock() >= serving.probation_until:
                self._commit()

    def _commit(self) -> None:
        assert self.serving is not None
        self.serving.probation_until = None
        self._set_phase("committed")
        self._reporter.event(
            "update.committed",
            generation=self.serving.generation,
            message=f"generation {self.serving.generation} committed",
            data={},
        )

    def rollback(self, reason: str) -> bool:
        """Serve the previous generation again (from the cache); refuse the current one."""
        with self._lock:
            previous = self._state.previous()
            current = self.serving
            if previous is None or current is None:
                log.error("cannot roll back (%s): no previous generation", reason)
                return False
            try:
                state = DesiredState.model_validate(previous.document)
                plan = Plan.model_validate(previous.plan)
                table = self._load_table(state, plan, download=False)
            except (EdgefleetError, OSError, ValueError) as exc:
                log.error("rollback to %d failed: %s", previous.generation, exc)
                return False
            old = self._host.swap(table)
            self._state.rollback(reason)
            self.serving = Serving(
                generation=previous.generation,
                state=state,
                plan=plan,
                activated_at=self._clock(),
            )
            self.status.refused_generation = current.generation
            self.status.last_error = LastError(
                generation=current.generation, code="rolled_back", message=reason
            )
            self._set_phase("rolled_back")
            self._reporter.event(
                "update.rolled_back",
                generation=current.generation,
                message=reason,
                data={"restored": previous.generation},
            )
            self._host.drain(old, self._drain_timeout_s)
            release_freed_memory()
            return True

    # ---- pressure ------------------------------------------------------------------

    def shed(self, name: str, reason: str) -> None:
        """Unload ``name``; requests get 503 with ``reason`` until it is restored."""
        with self._lock:
            old = self._host.mark_unavailable(name, f"shed: {reason}")
            self.status.shed[name] = reason
            self._host.drain(old, self._drain_timeout_s)
            self._reporter.event(
                "pressure.shed",
                generation=self.applied_generation,
                message=f"{name} unloaded: {reason}",
                data={"model": name, "reason": reason},
            )

    def restore_model(self, name: str) -> bool:
        """Reload a shed model from the cache."""
        with self._lock:
            serving = self.serving
            if serving is None or name not in self.status.shed:
                return False
            try:
                entry = serving.plan.entry(name)
            except KeyError:
                self.status.shed.pop(name, None)
                return False
            if isinstance(entry, Skip):
                self.status.shed.pop(name, None)
                return False
            single = serving.plan.model_copy(update={"entries": (entry,)})
            try:
                table = self._load_table(serving.state, single, download=False)
            except (EdgefleetError, OSError, ValueError) as exc:
                log.error("cannot reload %s: %s", name, exc)
                return False
            merged = dict(self._host.table)
            merged[name] = table[name]
            old = self._host.swap(merged)
            self._host.drain([old[name]] if name in old else [], self._drain_timeout_s)
            self.status.shed.pop(name, None)
            self._reporter.event(
                "pressure.restored",
                generation=self.applied_generation,
                message=f"{name} reloaded",
                data={"model": name},
            )
            return True

    def priorities(self) -> Mapping[str, int]:
        if self.serving is None:
            return {}
        return {spec.name: spec.priority for spec in self.serving.state.models}

    def memory_of(self) -> Mapping[str, int]:
        if self.serving is None:
            return {}
        return {c.model: c.memory_mb for c in self.serving.plan.chosen}

    # ---- helpers -------------------------------------------------------------------

    def _set_phase(self, phase: Phase) -> None:
        self.status.phase = phase
        self._reporter.state_changed()


def _dump(plan: Plan) -> dict[str, Any]:
    return plan.model_dump(mode="json")
