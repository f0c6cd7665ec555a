"""The agent daemon: wires the link, the applier, the model host, telemetry and systemd.

Threads: the MQTT link thread (network loop, outbox draining); one worker that handles
desired states and commands in arrival order (applies are serial); the scheduler's
threads (telemetry, probation, pressure, watchdog); the inference API's threads.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from agent import sdnotify
from agent.api import ApiMetrics, InferenceServer, Readiness, RepositoryEntry
from agent.apply import Applier
from agent.cache import ArtifactCache
from agent.config import AgentConfig, hub_public_keys
from agent.desired import Accepted, Refusal, judge_desired, rotated_keys
from agent.facts import collect_facts
from agent.faults import Faults
from agent.fetch import UrlFetcher
from agent.host import ModelHost
from agent.link import BrokerSettings, Incoming, MqttLink, Publication
from agent.outbox import Outbox
from agent.pressure import Pressure, decide
from agent.profiles import detect
from agent.state import AgentState
from agent.status import write_status
from agent.telemetry import ModelCounters, SystemSampler, agent_stats, link_stats
from contract import __version__ as contract_version
from contract.errors import WireError
from contract.messages import (
    MAX_PACKET_BYTES,
    Birth,
    Cmd,
    CmdResult,
    Desired,
    Event,
    InventoryItem,
    Message,
    State,
    Status,
    Telemetry,
    decode,
    encode,
)
from contract.profile import HardwareFacts
from contract.signing import PublicKey, TrustedKeys
from contract.topics import Kind, down_topic, up_topic

log = logging.getLogger(__name__)
RETRIED_FAILURES = frozenset(
    {"fetch_error", "artifact_unavailable", "storage_error", "storage_full", "o_s_error"}
)
"""Failure codes of an update that may pass on their own (a server or link down, a full
disk): the same generation is tried again. Anything else (a hash or size mismatch, a model
that does not load or fails its smoke test, nothing fits) waits for a new generation."""
# A job skipped because its previous run is still going is expected, not worth a warning;
# every run of every job (the probation check runs each second) is not worth a line.
logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
logging.getLogger("apscheduler.executors").setLevel(logging.WARNING)

AGENT_VERSION = contract_version
# Commands are not signed, so none of them may change what the device runs: a rollback
# comes as a new signed generation from the hub, never as a command.
CAPABILITIES = ["rebirth", "oip-v2", "outbox"]
STOP_DRAIN_S = 20.0


class Agent:
    """One device's agent. ``start`` brings it up; ``stop`` drains and says goodbye."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        environ: Mapping[str, str],
        clock: Callable[[], float] = time.time,
        api_factory: Callable[[Agent], Any] | None = None,
        pressure_interval_s: float = 5.0,
    ) -> None:
        self.config = config
        self.device_id = config.device_id
        self.clock = clock
        self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state = AgentState(config.state_db_path)
        self.outbox = Outbox(
            config.outbox_db_path,
            config.telemetry.outbox_max_messages,
            config.telemetry.outbox_max_bytes,
        )
        self.faults = Faults.from_env(environ)
        token = config.artifacts.token()
        fetcher = UrlFetcher(bearer_tokens={"": token} if token else None)
        self.cache = ArtifactCache(
            self.state_dir / "artifacts",
            self.faults.wrap(fetcher),
            timeout=config.artifacts.timeout_s,
            max_bytes=config.artifacts.max_artifact_bytes,
        )
        self.facts = collect_facts(storage_path=self.state_dir)
        self.choice = detect(self.facts, override=config.profile, profiles_dir=config.profiles_dir)
        self.profile = self.choice.profile
        self.host = ModelHost()
        self.applier = Applier(
            state=self.state,
            cache=self.cache,
            host=self.host,
            profile=self.profile,
            facts=self.live_facts,
            reporter=self,
            faults=self.faults,
            clock=clock,
        )
        self._trusted_keys = self._load_trusted_keys()
        self.sampler = SystemSampler(thermal=self.profile.thermal, disk_path=self.state_dir)
        self.counters = ModelCounters()
        self._inbox: queue.Queue[Incoming | None] = queue.Queue(maxsize=256)
        self.dropped_messages: dict[str, int] = {}
        self.link = MqttLink(
            BrokerSettings(
                host=config.broker.host,
                port=config.broker.port,
                client_id=config.client_id,
                tls=config.broker.tls,
                ca_file=_str(config.broker.ca_file),
                cert_file=_str(config.broker.cert_file),
                key_file=_str(config.broker.key_file),
                username=config.broker.username,
                password=config.broker.password_value(),
                keepalive=config.broker.keepalive,
                protocol=config.broker.protocol,
                max_packet_bytes=MAX_PACKET_BYTES,
            ),
            subscriptions=[
                (down_topic(self.device_id, Kind.DESIRED), 1),
                (down_topic(self.device_id, Kind.CMD), 1),
            ],
            next_session=self.state.next_session,
            will=self._will,
            on_connected=self._greeting,
            on_message=self._enqueue,
            outbox=self.outbox,
        )
        self.scheduler = BackgroundScheduler(daemon=True, job_defaults={"coalesce": True})
        self._worker: threading.Thread | None = None
        self._stopped = threading.Event()
        self._sd_status = ""
        self._telemetry_interval = 0.0
        self._retry: _UpdateRetry | None = None
        self._retry_lock = threading.Lock()
        self._last_telemetry = clock()
        self.pressure_interval_s = pressure_interval_s
        self.api = api_factory(self) if api_factory else None

    # ---- life cycle ----------------------------------------------------------------

    def start(self) -> None:
        sdnotify.status("restoring the last applied generation")
        self.applier.restore()
        self.state_changed()
        self._worker = threading.Thread(target=self._work, name="edgefleet-worker", daemon=True)
        self._worker.start()
        if self.api is not None:
            self.api.start()
        self.link.start()
        self._schedule_telemetry()
        self.scheduler.add_job(
            self.applier.check_probation, "interval", seconds=1.0, id="probation", max_instances=1
        )
        self.scheduler.add_job(
            self._check_pressure,
            "interval",
            seconds=self.pressure_interval_s,
            id="pressure",
            max_instances=1,
        )
        watchdog = sdnotify.watchdog_interval()
        if watchdog:
            self.scheduler.add_job(sdnotify.watchdog, "interval", seconds=watchdog, id="watchdog")
        self.scheduler.start()
        ready, why = self.applier.ready()
        sdnotify.ready(why if ready else f"waiting: {why}")

    def stop(self) -> None:
        """Drain in-flight work, publish offline, and release everything."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        sdnotify.stopping("draining")
        self.scheduler.shutdown(wait=True)
        if self.api is not None:
            self.api.stop()
        self._inbox.put(None)
        if self._worker is not None:
            self._worker.join(STOP_DRAIN_S)
        self.host.drain(self.host.table, STOP_DRAIN_S)
        offline = Status(
            state="offline", device_id=self.device_id, session=self.link.session, ts=self.clock()
        )
        self.link.stop(final=[self._publication(offline, retain=True)])
        self.outbox.close()
        self.state.close()

    def run_forever(self) -> int:
        """Run until SIGTERM or SIGINT."""
        done = threading.Event()

        def _on_signal(signum: int, frame: Any) -> None:
            done.set()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        self.start()
        try:
            while not done.wait(1.0):
                pass
        finally:
            self.stop()
        return 0

    # ---- facts ---------------------------------------------------------------------

    def live_facts(self) -> HardwareFacts:
        return self.facts.model_copy(update={"memory_available_mb": self.sampler.available_mb()})

    # ---- trust ---------------------------------------------------------------------

    def _load_trusted_keys(self) -> list[PublicKey]:
        stored = self.state.trusted_keys()
        if stored:
            return [PublicKey.model_validate(k) for k in stored]
        return hub_public_keys(self.config)

    # ---- messages out --------------------------------------------------------------

    def _publication(self, msg: Message, *, retain: bool = False) -> Publication:
        kind = msg.TOPIC[1] if msg.TOPIC else Kind.EVENTS
        return Publication(up_topic(self.device_id, kind), encode(msg), 1, retain)

    def _will(self, session: int) -> Publication:
        will = Status(state="offline", device_id=self.device_id, session=session, ts=self.clock())
        return self._publication(will, retain=True)

    def _greeting(self, session: int) -> list[Publication]:
        online = Status(
            state="online",
            device_id=self.device_id,
            session=session,
            seq=self.state.next_seq(),
            ts=self.clock(),
        )
        return [
            self._publication(online, retain=True),
            self._publication(self._birth(session)),
            self._publication(self._state_message(session), retain=True),
        ]

    def _birth(self, session: int) -> Birth:
        return Birth(
            device_id=self.device_id,
            session=session,
            seq=self.state.next_seq(),
            ts=self.clock(),
            agent_version=AGENT_VERSION,
            facts=self.live_facts(),
            profile=self.profile,
            profile_source="override" if self.choice.how == "override" else "detected",
            labels=dict(self.config.labels),
            capabilities=CAPABILITIES,
            inventory=self._inventory(),
            applied_generation=self.applier.applied_generation,
        )

    def _inventory(self) -> list[InventoryItem]:
        items = []
        for slot in self.host.table.values():
            model = slot.model
            if model is None:
                continue
            items.append(
                InventoryItem(
                    model=model.name,
                    version=model.version,
                    variant=model.variant,
                    precision=model.precision,
                    provider=model.provider,
                    sha256=model.sha256,
                )
            )
        return items

    def _state_message(self, session: int | None = None) -> State:
        status = self.applier.status
        return State(
            device_id=self.device_id,
            session=self.link.session if session is None else session,
            seq=self.state.next_seq(),
            ts=self.clock(),
            applied_generation=self.applier.applied_generation,
            desired_generation=max(status.desired_generation, self.applier.applied_generation),
            phase=status.phase,
            models=self.applier.model_reports(),
            last_error=status.last_error,
            refused_generation=status.refused_generation,
        )

    # Reporter, for the applier
    def event(
        self, kind: str, *, generation: int | None, message: str, data: dict[str, Any]
    ) -> None:
        msg = Event(
            device_id=self.device_id,
            session=self.link.session,
            seq=self.state.next_seq(),
            ts=self.clock(),
            kind=kind,
            generation=generation,
            message=message,
            data=data,
        )
        self._queue(msg)
        self.state_changed()

    def state_changed(self) -> None:
        message = self._state_message()
        try:
            write_status(self.state_dir, message.model_dump(mode="json", by_alias=True))
        except OSError as exc:
            log.warning("cannot write the status file: %s", exc)
        if self.link.connected:
            self.link.publish(self._publication(message, retain=True))
        self._notify_status()

    def _notify_status(self) -> None:
        """Tell systemd the one-line status (``systemctl status``) when it changed."""
        ready, why = self.applier.ready()
        text = why if ready else f"waiting: {why}"
        if text != self._sd_status:
            self._sd_status = text
            sdnotify.status(text)

    def _queue(self, msg: Message) -> None:
        publication = self._publication(msg)
        self.outbox.put(publication.topic, publication.payload, publication.qos)

    # ---- telemetry -----------------------------------------------------------------

    def _schedule_telemetry(self) -> None:
        interval = self.applier.runtime.telemetry_interval_s
        if interval == self._telemetry_interval:
            return
        self._telemetry_interval = interval
        self.scheduler.add_job(
            self.publish_telemetry,
            "interval",
            seconds=interval,
            id="telemetry",
            replace_existing=True,
            max_instances=1,
        )

    def telemetry(self) -> Telemetry:
        now = self.clock()
        interval = max(0.001, now - self._last_telemetry)
        self._last_telemetry = now
        status = self.applier.status
        return Telemetry(
            device_id=self.device_id,
            session=self.link.session,
            seq=self.state.next_seq(),
            ts=now,
            interval_s=interval,
            system=self.sampler.sample(),
            agent=agent_stats(
                AGENT_VERSION,
                self.applier.applied_generation,
                max(status.desired_generation, self.applier.applied_generation),
                status.phase,
            ),
            models=self.counters.interval(self.host.snapshot()),
            link=link_stats(
                self.link.counters.reconnects,
                self.outbox.depth,
                self.outbox.dropped,
                self.link.counters.publish_refused,
                self.dropped_messages,
                oversized=self.link.counters.oversized,
            ),
        )

    def publish_telemetry(self) -> None:
        try:
            self._queue(self.telemetry())
        except Exception:
            log.exception("telemetry failed")
        self._schedule_telemetry()

    # ---- pressure ------------------------------------------------------------------

    def _check_pressure(self) -> None:
        thermal = self.profile.thermal
        pressure = Pressure(
            temperature_c=self.sampler.temperature(),
            throttle_c=thermal.throttle_c if thermal else None,
            available_mb=self.sampler.available_mb(),
            floor_mb=self.applier.runtime.memory_floor_mb,
        )
        priorities = self.applier.priorities()
        shed = self.applier.status.shed
        loaded = {
            name: priorities.get(name, 0)
            for name, slot in self.host.table.items()
            if slot.model is not None
        }
        decision = decide(
            pressure,
            loaded=loaded,
            shed=set(shed),
            priorities=priorities,
            memory_mb=self.applier.memory_of(),
        )
        if decision.shed:
            self.applier.shed(decision.shed, decision.reason)
        elif decision.restore:
            self.applier.restore_model(decision.restore)

    # ---- messages in ---------------------------------------------------------------

    def _enqueue(self, incoming: Incoming) -> None:
        try:
            self._inbox.put_nowait(incoming)
        except queue.Full:
            self._count_drop("inbox_full")

    def _count_drop(self, reason: str) -> None:
        self.dropped_messages[reason] = self.dropped_messages.get(reason, 0) + 1

    def _work(self) -> None:
        while True:
            incoming = self._inbox.get()
            if incoming is None:
                return
            try:
                if incoming.topic.endswith("/down/desired"):
                    self._on_desired(incoming.payload)
                elif incoming.topic.endswith("/down/cmd"):
                    self._on_cmd(incoming)
            except Exception:
                log.exception("handling %s failed", incoming.topic)
                self._count_drop("handler_error")

    def _on_desired(self, payload: bytes) -> None:
        if not payload:
            return
        verdict = judge_desired(
            payload,
            device_id=self.device_id,
            trusted=TrustedKeys(self._trusted_keys),
            last_generation=self.state.last_applied() or 0,
            refused_generations=self.state.refused(),
            now=self.clock(),
        )
        if isinstance(verdict, Refusal):
            if not self._is_applied_document(payload):
                self._refuse(verdict)
            return
        self._accept(verdict, payload)

    def _is_applied_document(self, payload: bytes) -> bool:
        """Whether ``payload`` is the document already applied (a retained redelivery)."""
        active = self.state.active()
        if active is None:
            return False
        try:
            return decode(Desired, payload).signed_payload() == active.document
        except WireError:
            return False

    def _refuse(self, refusal: Refusal) -> None:
        log.warning("desired state refused: %s", refusal.message)
        self._count_drop(f"desired_{refusal.code}")
        self.event(
            "desired.refused",
            generation=refusal.generation,
            message=refusal.message,
            data={"code": str(refusal.code)},
        )

    def _accept(self, accepted: Accepted, payload: bytes) -> None:
        outcome = self.applier.apply(accepted)
        if outcome.ok:
            self._trusted_keys = rotated_keys(self._trusted_keys, accepted.state)
            self.state.set_trusted_keys([k.model_dump() for k in self._trusted_keys])
            self._schedule_telemetry()
        with self._retry_lock:
            if outcome.ok or outcome.code not in RETRIED_FAILURES:
                self._retry = None
            else:
                self._schedule_retry(outcome.generation, outcome.code, payload)
        self.state_changed()

    def _schedule_retry(self, generation: int, code: str, payload: bytes) -> None:
        """Try ``generation`` again later, waiting twice as long as last time for it."""
        settings = self.config.artifacts
        previous = self._retry
        delay = settings.update_retry_s
        if previous is not None and previous.generation == generation:
            delay = min(previous.delay_s * 2, settings.update_retry_max_s)
        self._retry = _UpdateRetry(generation, payload, delay)
        log.info("generation %d failed (%s); trying it again in %.0fs", generation, code, delay)
        self.event(
            "update.retry_scheduled",
            generation=generation,
            message=f"trying generation {generation} again in {delay:.0f}s",
            data={"code": code, "retry_in_s": delay},
        )
        with contextlib.suppress(Exception):  # the scheduler is stopping
            self.scheduler.add_job(
                self._retry_update,
                "date",
                run_date=datetime.fromtimestamp(time.time() + delay, UTC),
                id="update-retry",
                replace_existing=True,
                misfire_grace_time=None,
            )

    def _retry_update(self) -> None:
        """Hand the failed document to the worker again, unless a newer one came since."""
        with self._retry_lock:
            retry = self._retry
        if retry is None or self.applier.status.desired_generation != retry.generation:
            return
        self._enqueue(Incoming(down_topic(self.device_id, Kind.DESIRED), retry.payload))

    def _on_cmd(self, incoming: Incoming) -> None:
        try:
            cmd = decode(Cmd, incoming.payload)
        except WireError as exc:
            self._count_drop(f"cmd_{exc.reason}")
            log.warning("command dropped: %s", exc)
            return
        ok, error = True, None
        result: dict[str, Any] = {}
        if cmd.command == "rebirth":
            self.link.request_rebirth()
        else:
            ok, error = False, f"unknown command {cmd.command!r}"
        reply = CmdResult(
            device_id=self.device_id,
            session=self.link.session,
            seq=self.state.next_seq(),
            ts=self.clock(),
            cmd_id=cmd.cmd_id,
            ok=ok,
            result=result,
            error=error,
        )
        topic = cmd.reply_to or incoming.response_topic or up_topic(self.device_id, Kind.RESULT)
        if not topic.startswith(f"edgefleet/v1/dev/{self.device_id}/up/"):
            topic = up_topic(self.device_id, Kind.RESULT)
        self.link.publish(
            Publication(topic, encode(reply), 1, False, correlation_data=incoming.correlation_data)
        )


def _str(path: Path | None) -> str | None:
    return str(path) if path is not None else None


def make_api(agent: Agent) -> InferenceServer:
    """The local inference API for ``agent``, on the configured bind."""

    def readiness() -> Readiness:
        ready, reason = agent.applier.ready()
        return Readiness(ready, None if ready else reason)

    def repository() -> list[RepositoryEntry]:
        entries = []
        for report in agent.applier.model_reports():
            loading = agent.applier.status.phase in ("staging", "loading")
            state = "READY" if report.ready else ("LOADING" if loading else "UNAVAILABLE")
            entries.append(RepositoryEntry(report.name, report.version, state, report.reason or ""))
        return entries

    return InferenceServer(
        agent.host,
        bind=agent.config.api.bind,
        max_body_bytes=agent.config.api.max_body_bytes,
        readiness=readiness,
        repository=repository,
        metrics=ApiMetrics(),
    )


@dataclass(frozen=True)
class _UpdateRetry:
    generation: int
    payload: bytes
    delay_s: float
