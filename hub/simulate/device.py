"""One simulated agent: what it says on the wire and how it treats a desired state.

It mirrors the real agent (agent/daemon.py, agent/apply.py, agent/desired.py) with the
contract code both use, minus ONNX Runtime: a desired state is judged by the same rules
(signature from a trusted key, this device, a newer generation, not expired, not rolled
back here), the plan is ``contract.select`` for the device's profile and facts, and
"applying" is waiting ``apply_delay_s``. Events, retained state, status, birth and
telemetry carry a per-connection ``session`` and a per-device ``seq`` like the agent's.

Nothing here touches a socket or a clock directly: the event loop hands every device a
``Port`` (publish, timers, time, dropping the connection), and calls ``greeting``,
``on_desired``, ``on_cmd`` and ``telemetry_tick``. All calls for one device happen in one
event-loop thread.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from contract import __version__ as contract_version
from contract.errors import MissingSignature, TrustError, UnknownKey, WireError
from contract.manifests import RuntimePolicy
from contract.messages import (
    AgentStats,
    Birth,
    Cmd,
    CmdResult,
    Desired,
    DesiredState,
    Event,
    InventoryItem,
    LastError,
    Latency,
    LinkStats,
    Message,
    ModelReport,
    ModelStats,
    Phase,
    State,
    Status,
    SystemStats,
    Telemetry,
    decode,
    encode,
)
from contract.profile import FirmwareProfile, HardwareFacts
from contract.select import Choice, Plan, select
from contract.signing import TrustedKeys
from contract.topics import PREFIX, Kind
from hub.simulate.model import (
    P95_OVER_P50,
    P99_OVER_P50,
    DeviceSpec,
    SimulationConfig,
    base_latency_ms,
)

log = logging.getLogger(__name__)

AGENT_VERSION = f"{contract_version}+sim"
CAPABILITIES = ["rebirth", "outbox", "simulated"]
"""As the agent's: commands are not signed, so none changes what the device runs."""
DEFAULT_TELEMETRY_INTERVAL_S = RuntimePolicy().telemetry_interval_s
SIMULATED_RSS_MB = 170
SMOKE_TEST_CODE = "smoke_test_error"


class Port(Protocol):
    """What a device needs from its event loop."""

    def publish(
        self,
        device: SimDevice,
        topic: str,
        payload: bytes,
        *,
        qos: int,
        retain: bool,
        correlation_data: bytes | None = None,
    ) -> bool:
        """Hand a message to the device's connection; False when it is not connected."""
        ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> None: ...

    def now(self) -> float:
        """Unix time."""
        ...

    def go_offline(self, device: SimDevice, offline_for: float | None) -> None:
        """Drop the connection without a DISCONNECT (the broker publishes the Will) and stay
        away ``offline_for`` seconds (None: until the simulation stops)."""
        ...

    def trusted_keys(self, keys: tuple[tuple[str, str], ...]) -> TrustedKeys:
        """A shared TrustedKeys for a key set (devices with equal keys share one)."""
        ...


@dataclass
class Serving:
    generation: int
    state: DesiredState
    plan: Plan
    raw: bytes
    """The document as received, to recognise a retained redelivery."""


@dataclass(frozen=True)
class Refusal:
    code: str
    message: str
    generation: int | None = None


class SimDevice:
    """A simulated agent. The event loop owns its connection; this owns its behaviour."""

    def __init__(
        self,
        spec: DeviceSpec,
        *,
        profile: FirmwareProfile,
        facts: HardwareFacts,
        config: SimulationConfig,
        port: Port,
        trusted: TrustedKeys,
        rng: random.Random,
    ) -> None:
        self.spec = spec
        self.device_id = spec.device_id
        self.profile = profile
        self.facts = facts
        self.config = config
        self.port = port
        self.trusted = trusted
        self.rng = rng
        self._up = f"{PREFIX}/dev/{spec.device_id}/up/"
        self.session = 0
        """The session of the current (or, while away, the last) established connection:
        what everything the device says carries, as with the agent."""
        self.attempts = 0
        """Connection attempts: each takes a new session number for its Will."""
        self.seq = 0
        self.connected = False
        self.ever_connected = False
        self.started_at = 0.0
        self.reconnects = 0
        # What it serves and where it is in applying.
        self.serving: Serving | None = None
        self.previous: Serving | None = None
        self.max_activated = 0
        self.refused: set[int] = set()
        self.phase: Phase = "idle"
        self.desired_generation = 0
        self.last_error: LastError | None = None
        self.refused_generation: int | None = None
        self.applying = False
        self.pending: bytes | None = None
        self.token = 0
        """Bumped by every apply, rollback and stop: older timers see a new token and quit."""
        self.went_offline = False
        self.outbox: deque[tuple[str, bytes, int]] = deque()
        self.outbox_dropped = 0
        self.telemetry_running = False
        self.last_telemetry = 0.0
        self.counters: dict[str, int] = {}

    # ---- output ---------------------------------------------------------------------

    def topic(self, kind: Kind) -> str:
        return self._up + kind.value

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def _send(self, kind: Kind, msg: Message, *, retain: bool = False, qos: int = 1) -> None:
        """Publish now, or keep it in the outbox while disconnected (events, telemetry)."""
        topic, payload = self.topic(kind), encode(msg)
        if self.connected and self.port.publish(self, topic, payload, qos=qos, retain=retain):
            return
        if len(self.outbox) >= self.config.outbox_limit:
            self.outbox.popleft()
            self.outbox_dropped += 1
        self.outbox.append((topic, payload, qos))

    def _publish_state(self) -> None:
        """The retained state, only while connected (the greeting carries it otherwise)."""
        if self.connected:
            payload = encode(self.state_message())
            self.port.publish(self, self.topic(Kind.STATE), payload, qos=1, retain=True)
            self._count("states")

    def next_session(self) -> int:
        """A new session number for a connection attempt."""
        self.attempts += 1
        return self.attempts

    def will(self, session: int) -> tuple[str, bytes]:
        """The Will of the connection attempt ``session``."""
        msg = Status(state="offline", device_id=self.device_id, session=session, ts=self.port.now())
        return self.topic(Kind.STATUS), encode(msg)

    def offline_status(self) -> bytes:
        """The offline status published on a clean stop."""
        msg = Status(
            state="offline",
            device_id=self.device_id,
            session=self.session,
            seq=self.next_seq(),
            ts=self.port.now(),
        )
        return encode(msg)

    def greeting(self) -> None:
        """Online status, birth and retained state; then what waited in the outbox."""
        now = self.port.now()
        online = Status(
            state="online",
            device_id=self.device_id,
            session=self.session,
            seq=self.next_seq(),
            ts=now,
        )
        self.port.publish(self, self.topic(Kind.STATUS), encode(online), qos=1, retain=True)
        self.port.publish(self, self.topic(Kind.BIRTH), encode(self.birth()), qos=1, retain=False)
        self._count("births")
        self._publish_state()

    def flush_outbox(self) -> None:
        while self.outbox and self.connected:
            topic, payload, qos = self.outbox[0]
            if not self.port.publish(self, topic, payload, qos=qos, retain=False):
                return
            self.outbox.popleft()

    def birth(self) -> Birth:
        return Birth(
            device_id=self.device_id,
            session=self.session,
            seq=self.next_seq(),
            ts=self.port.now(),
            agent_version=AGENT_VERSION,
            facts=self.facts,
            profile=self.profile,
            profile_source="override",
            labels=dict(self.config.labels),
            capabilities=CAPABILITIES,
            inventory=self.inventory(),
            applied_generation=self.applied_generation,
        )

    def inventory(self) -> list[InventoryItem]:
        if self.serving is None:
            return []
        return [
            InventoryItem(
                model=c.model,
                version=c.version,
                variant=c.variant,
                precision=c.precision,
                provider=c.provider,
                sha256=c.sha256,
            )
            for c in self.serving.plan.chosen
        ]

    @property
    def applied_generation(self) -> int:
        return self.serving.generation if self.serving else 0

    def state_message(self) -> State:
        return State(
            device_id=self.device_id,
            session=self.session,
            seq=self.next_seq(),
            ts=self.port.now(),
            applied_generation=self.applied_generation,
            desired_generation=max(self.desired_generation, self.applied_generation),
            phase=self.phase,
            models=self.model_reports(),
            last_error=self.last_error,
            refused_generation=self.refused_generation,
        )

    def model_reports(self) -> list[ModelReport]:
        if self.serving is None:
            return []
        reports = []
        for entry in self.serving.plan.entries:
            if isinstance(entry, Choice):
                reports.append(
                    ModelReport(
                        name=entry.model,
                        version=entry.version,
                        variant=entry.variant,
                        precision=entry.precision,
                        provider=entry.provider,
                        ready=True,
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

    def event(self, kind: str, generation: int | None, message: str, data: dict[str, Any]) -> None:
        msg = Event(
            device_id=self.device_id,
            session=self.session,
            seq=self.next_seq(),
            ts=self.port.now(),
            kind=kind,
            generation=generation,
            message=message,
            data=data,
        )
        self._send(Kind.EVENTS, msg)
        self._count("events")

    # ---- telemetry ------------------------------------------------------------------

    @property
    def telemetry_interval(self) -> float:
        if self.config.telemetry_interval_s is not None:
            return self.config.telemetry_interval_s
        if self.serving is not None:
            return self.serving.state.runtime.telemetry_interval_s
        return DEFAULT_TELEMETRY_INTERVAL_S

    def start_telemetry(self) -> None:
        """Begin the telemetry timer (once): the first report after a random part of an
        interval, so a fleet that connects at once does not report at once."""
        if self.telemetry_running:
            return
        self.telemetry_running = True
        self.last_telemetry = self.port.now()
        self.port.call_later(self.rng.uniform(0.05, 1.0) * self.telemetry_interval, self._tick)

    def _tick(self) -> None:
        if not self.telemetry_running:
            return
        try:
            self._send(Kind.TELEMETRY, self.telemetry(), qos=self.config.telemetry_qos)
            self._count("telemetry")
        finally:
            self.port.call_later(self.telemetry_interval * self.rng.uniform(0.95, 1.05), self._tick)

    def _version(self) -> str | None:
        return self.serving.state.model_set.version if self.serving else None

    def latency_factor(self) -> float:
        f = self.config.failures
        if self.spec.slow and (f.slow_version is None or f.slow_version == self._version()):
            return f.slow_factor
        return 1.0

    def error_rate(self) -> float:
        f = self.config.failures
        if self.spec.errors and (f.error_version is None or f.error_version == self._version()):
            return f.error_rate
        return 0.0

    def p50_ms(self, choice: Choice) -> float:
        return base_latency_ms(choice.model, choice.precision, self.profile) * self.latency_factor()

    def telemetry(self) -> Telemetry:
        now = self.port.now()
        interval = max(0.001, now - self.last_telemetry)
        self.last_telemetry = now
        rng = self.rng
        models: dict[str, ModelStats] = {}
        used = 0
        if self.serving is not None:
            error_rate = self.error_rate()
            for entry in self.serving.plan.entries:
                if not isinstance(entry, Choice):
                    models[entry.model] = ModelStats(version=entry.version, state="failed")
                    continue
                used += entry.memory_mb
                requests = round(self.config.request_rate * interval * rng.uniform(0.8, 1.2))
                errors = sum(1 for _ in range(requests) if rng.random() < error_rate)
                latency = None
                if requests > errors:
                    p50 = self.p50_ms(entry) * rng.uniform(0.95, 1.05)
                    latency = Latency(p50=p50, p95=p50 * P95_OVER_P50, p99=p50 * P99_OVER_P50)
                models[entry.model] = ModelStats(
                    version=entry.version,
                    variant=entry.variant,
                    provider=entry.provider,
                    state="ready",
                    requests=requests,
                    errors=errors,
                    latency_ms=latency,
                )
        facts = self.facts
        total = facts.memory_total_mb
        available = max(0, (facts.memory_available_mb or total) - used)
        thermal = self.profile.thermal
        load = rng.uniform(0.1, 1.5)
        return Telemetry(
            device_id=self.device_id,
            session=self.session,
            seq=self.next_seq(),
            ts=now,
            interval_s=interval,
            system=SystemStats(
                cpu_percent=rng.uniform(5.0, 40.0),
                load_1=load,
                load_5=load * 0.9,
                load_15=load * 0.8,
                memory_used_mb=max(0, total - available),
                memory_available_mb=available,
                disk_free_mb=facts.storage_free_mb or 0,
                temperature_c=rng.uniform(40.0, 55.0) if thermal else None,
                uptime_s=max(0.0, now - self.started_at),
            ),
            agent=AgentStats(
                version=AGENT_VERSION,
                rss_mb=SIMULATED_RSS_MB,
                applied_generation=self.applied_generation,
                desired_generation=max(self.desired_generation, self.applied_generation),
                phase=self.phase,
            ),
            models=models,
            link=LinkStats(
                reconnects=self.reconnects,
                outbox_depth=len(self.outbox),
                dropped=self.outbox_dropped,
            ),
        )

    # ---- desired state --------------------------------------------------------------

    def judge(self, payload: bytes) -> tuple[Desired, str] | Refusal:
        """agent/desired.py's rules: parse, trusted signature, this device, newer, not
        expired, not rolled back here."""
        try:
            envelope = decode(Desired, payload)
        except WireError as exc:
            return Refusal("malformed", str(exc))
        state = envelope.payload
        try:
            keyid = envelope.verify(self.trusted)
        except MissingSignature as exc:
            return Refusal("missing_signature", str(exc), state.generation)
        except UnknownKey as exc:
            return Refusal("unknown_key", str(exc), state.generation)
        except TrustError as exc:
            return Refusal("bad_signature", str(exc), state.generation)
        if state.device_id != self.device_id:
            return Refusal(
                "wrong_device",
                f"document is for device {state.device_id!r}, this is {self.device_id!r}",
                state.generation,
            )
        if state.generation <= self.max_activated:
            return Refusal(
                "stale_generation",
                f"generation {state.generation} is not newer than {self.max_activated}",
                state.generation,
            )
        now = self.port.now()
        if state.expires_at <= now:
            return Refusal(
                "expired", f"document expired {now - state.expires_at:.0f}s ago", state.generation
            )
        if state.generation in self.refused:
            return Refusal(
                "rolled_back",
                f"generation {state.generation} was rolled back here; waiting for a newer one",
                state.generation,
            )
        return envelope, keyid

    def on_desired(self, payload: bytes) -> None:
        if not payload:
            return
        if self.applying:
            self.pending = payload  # applies are serial; the newest waiting one wins
            return
        verdict = self.judge(payload)
        if isinstance(verdict, Refusal):
            if self.serving is None or payload != self.serving.raw:
                self._count("desired_refused")
                self.event(
                    "desired.refused",
                    verdict.generation,
                    verdict.message,
                    {"code": verdict.code},
                )
                self._publish_state()
            return
        envelope, _ = verdict
        f = self.config.failures
        if self.spec.offline and f.offline_mode == "on_update" and not self.went_offline:
            # Gone mid-rollout, before applying; the retained document comes back later.
            self.went_offline = True
            self.port.go_offline(self, f.offline_for_s)
            return
        self._count("desired_accepted")
        self._accept(envelope.payload, payload)

    def _accept(self, state: DesiredState, raw: bytes) -> None:
        generation = state.generation
        self.desired_generation = max(self.desired_generation, generation)
        self.refused = {g for g in self.refused if g > generation}
        serving = self.serving
        if serving is not None and _same_content(serving.state, state):
            # A re-signed document with equal content: record it, reload nothing.
            self.serving = Serving(generation, state, serving.plan, raw)
            self.max_activated = max(self.max_activated, generation)
            self._rotate_keys(state)
            if self.phase in ("failed", "rolled_back"):
                # Back on what it serves (a rollout's rollback re-issues it): that
                # generation's phase, not the failure's; the failure stays in last_error.
                self.phase = "committed"
            self._publish_state()
            return
        self.token += 1
        self.applying = True
        self.phase = "staging"
        self.event(
            "update.started",
            generation,
            f"applying generation {generation}",
            {"model_set": state.model_set.model_dump()},
        )
        self._publish_state()
        token = self.token
        delay = self.config.apply_delay_s * self.rng.uniform(0.5, 1.5)
        self.port.call_later(delay, lambda: self._finish(token, state, raw))

    def _finish(self, token: int, state: DesiredState, raw: bytes) -> None:
        if token != self.token:
            return
        self.applying = False
        try:
            self._complete(state, raw)
        finally:
            pending, self.pending = self.pending, None
            if pending is not None:
                self.on_desired(pending)

    def _complete(self, state: DesiredState, raw: bytes) -> None:
        generation = state.generation
        f = self.config.failures
        plan = select(state.models, self.profile, self.facts)
        if state.models and not plan.chosen:
            reasons = "; ".join(s.message for s in plan.skipped)
            self._fail(generation, "nothing_fits", f"no model fits this device: {reasons}")
        elif self.spec.crash and f.crash_version == state.model_set.version:
            first = plan.chosen[0].model if plan.chosen else "the model set"
            self._fail(
                generation,
                SMOKE_TEST_CODE,
                f"{first}: simulated smoke test failure of model set "
                f"{state.model_set.name} {state.model_set.version}",
            )
        elif self.spec.fail_apply:
            self._fail(generation, f.fail_code, f"simulated failure ({f.fail_code})")
        else:
            self._switch(state, plan, raw)

    def _fail(self, generation: int, code: str, message: str) -> None:
        self._count("applies_failed")
        self.last_error = LastError(generation=generation, code=code, message=message)
        self.phase = "failed"
        self.event(
            "update.failed",
            generation,
            message,
            {"code": code, "serving": self.applied_generation},
        )
        self._publish_state()

    def _switch(self, state: DesiredState, plan: Plan, raw: bytes) -> None:
        self._count("applies_ok")
        generation = state.generation
        self.previous = self.serving
        self.serving = Serving(generation, state, plan, raw)
        self.max_activated = max(self.max_activated, generation)
        self._rotate_keys(state)
        self.last_error = None
        probation = state.runtime.probation_s
        self.phase = "probation" if probation > 0 else "committed"
        self.event(
            "update.activated",
            generation,
            f"generation {generation} serving",
            {"plan": plan.model_dump(mode="json")},
        )
        if probation <= 0:
            self._commit()  # its state report covers the switch too
            return
        self._publish_state()
        token = self.token
        runtime = state.runtime
        rate = self.config.request_rate * max(1, len(plan.chosen))
        if rate > 0:
            # The agent judges the window once enough requests arrived.
            enough_after = max(1, runtime.min_requests_for_probation) / rate
            if enough_after < probation:
                self.port.call_later(enough_after, lambda: self._check_probation(token, False))
        self.port.call_later(probation, lambda: self._check_probation(token, True))

    def _rotate_keys(self, state: DesiredState) -> None:
        if state.trusted_keys:
            keys = tuple(sorted((k.keyid, k.public_key) for k in state.trusted_keys))
            self.trusted = self.port.trusted_keys(keys)

    def breach(self) -> str | None:
        """agent/probation.py's judgement of the simulated window, or None."""
        if self.serving is None or self.config.request_rate <= 0:
            return None
        runtime = self.serving.state.runtime
        error_rate = self.error_rate()
        for choice in sorted(self.serving.plan.chosen, key=lambda c: c.model):
            if error_rate > runtime.max_error_rate:
                return (
                    f"{choice.model}: error rate {error_rate:.1%} exceeds "
                    f"{runtime.max_error_rate:.1%}"
                )
            limit = runtime.for_model(choice.model).max_latency_p95_ms
            p95 = self.p50_ms(choice) * P95_OVER_P50
            if limit is not None and p95 > limit:
                return f"{choice.model}: latency p95 {p95:.1f} ms exceeds {limit} ms"
        return None

    def _check_probation(self, token: int, final: bool) -> None:
        if token != self.token or self.phase != "probation":
            return
        reason = self.breach()
        if reason is not None:
            self.rollback(f"probation: {reason}")
        elif final:
            self._commit()

    def _commit(self) -> None:
        assert self.serving is not None
        self._count("commits")
        self.phase = "committed"
        generation = self.serving.generation
        self.event("update.committed", generation, f"generation {generation} committed", {})
        self._publish_state()

    def rollback(self, reason: str) -> bool:
        """Serve the previous generation again (a probation breach); refuse the current one
        from now on."""
        current, previous = self.serving, self.previous
        if current is None or previous is None:
            return False
        self._count("rollbacks")
        self.token += 1
        self.serving, self.previous = previous, None
        self.refused.add(current.generation)
        self.refused_generation = current.generation
        self.last_error = LastError(
            generation=current.generation, code="rolled_back", message=reason
        )
        self.phase = "rolled_back"
        self.event(
            "update.rolled_back",
            current.generation,
            reason,
            {"restored": previous.generation},
        )
        self._publish_state()
        return True

    # ---- commands -------------------------------------------------------------------

    def on_cmd(
        self, payload: bytes, response_topic: str | None, correlation_data: bytes | None
    ) -> None:
        try:
            cmd = decode(Cmd, payload)
        except WireError as exc:
            log.debug("%s: command dropped: %s", self.device_id, exc)
            return
        self._count("commands")
        ok, error = True, None
        if cmd.command == "rebirth":
            self.greeting()
        else:
            ok, error = False, f"unknown command {cmd.command!r}"
        reply = CmdResult(
            device_id=self.device_id,
            session=self.session,
            seq=self.next_seq(),
            ts=self.port.now(),
            cmd_id=cmd.cmd_id,
            ok=ok,
            error=error,
        )
        topic = cmd.reply_to or response_topic or self.topic(Kind.RESULT)
        if not topic.startswith(self._up):
            topic = self.topic(Kind.RESULT)
        self.port.publish(
            self, topic, encode(reply), qos=1, retain=False, correlation_data=correlation_data
        )

    def stop(self) -> None:
        """Cancel pending applies and probation timers, stop telemetry."""
        self.token += 1
        self.telemetry_running = False


def _same_content(a: DesiredState, b: DesiredState) -> bool:
    return (
        a.models == b.models
        and a.runtime == b.runtime
        and a.artifact_base_urls == b.artifact_base_urls
    )
