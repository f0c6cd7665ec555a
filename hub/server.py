"""``edgefleet-hub serve``: the hub process.

``HubServer(config).start()`` brings up, in order:

1. the SQLite store and the signing keys (a missing key fails here, before anything runs);
2. the artifact server (``[artifacts] serve``, ``bind``, ``token_file``) in its own threads;
3. the controller loop: one thread that reconciles what ingest hooks queue (a birth
   reconciles its device; an ``update.rolled_back`` event holds the device);
4. the MQTT ingest (``hub.ingest``), whose connection the controller publishes through; on
   connect it publishes the hub ``online`` (retained; ``offline`` is its Will);
5. a full reconcile and a publish of every document the broker never acknowledged;
6. the periodic jobs (APScheduler): re-sign documents near expiry (every
   ``resign_before_s / 4``, between 1 s and 1 h), publish unacknowledged documents again
   (every ``PUBLISH_PENDING_INTERVAL_S``), reconcile every device (every
   ``RECONCILE_INTERVAL_S``, for changes made outside this process), and step the
   rollouts (``hub.rollouts``: every ``ROLLOUT_TICK_S``, and soon after ingest stored a
   state, status or event of a device an active rollout includes); before the first full
   reconcile the rollouts' pins are recovered (``RolloutDriver.recover``), so a hub killed
   at any point resumes every rollout where it was;
7. the HTTP API, when ``hub/api.py`` provides ``create_app(service)``, served by uvicorn
   in a thread at ``[api] bind``.

``stop()`` undoes it in reverse order: the ingest writes what it holds and publishes the
hub ``offline`` before it disconnects. ``run_server(path)`` runs one until SIGTERM or
SIGINT, telling systemd (``$NOTIFY_SOCKET``) ``READY=1`` once everything is up, and
returns the exit status: 0 after a clean stop, 2 when the hub cannot start.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from contract.errors import EdgefleetError
from hub.artifacts import ArtifactServer, ArtifactStore
from hub.config import HubConfig, load_config
from hub.controller import ControllerLoop
from hub.errors import ConfigError, HubError
from hub.ingest import Ingest, IngestHooks
from hub.keys import Keyring
from hub.metrics import HubMetrics
from hub.rollouts import ROLLOUT_TICK_S
from hub.service import HubService
from hub.store import Store

log = logging.getLogger(__name__)

PUBLISH_PENDING_INTERVAL_S = 30.0
RECONCILE_INTERVAL_S = 300.0
"""A full reconcile this often catches what changed outside this process (a key added
with the CLI, a policy applied by another hub process)."""
ROLLOUT_WAKE_GAP_S = 0.2
"""Ingest wakes the rollouts at most this often (the periodic tick runs anyway)."""
API_MODULE = "hub.api"
API_START_TIMEOUT_S = 15.0
EXIT_OK = 0
EXIT_ERROR = 2


def resign_interval(config: HubConfig) -> float:
    """How often the re-sign job looks for documents near expiry."""
    return min(3600.0, max(1.0, config.desired.resign_before_s / 4))


class HubServer:
    """Every part of the running hub; ``start()``/``stop()`` or ``with``."""

    def __init__(self, config: HubConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.metrics = HubMetrics()
        self.store: Store | None = None
        self.service: HubService | None = None
        self.ingest: Ingest | None = None
        self.loop: ControllerLoop | None = None
        self.artifact_server: ArtifactServer | None = None
        self.scheduler: BackgroundScheduler | None = None
        self._api: Any = None
        self._api_thread: threading.Thread | None = None
        self._started = False
        self._wake_lock = threading.Lock()
        self._wake_pending = False
        self._last_rollout_tick = 0.0

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start everything; on any failure stop what was started and raise."""
        if self._started:
            raise RuntimeError("the hub server is already started")
        self._started = True
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        config = self.config
        self.store = store = Store(config.store_path, clock=self.clock)
        keys = Keyring(config.keys_dir, config.public_keys_path, clock=self.clock)
        keys.signing_keys()  # fail now on a missing or unreadable key
        artifacts = ArtifactStore(config.artifacts_dir)
        if config.artifacts.serve:
            try:
                self.artifact_server = ArtifactServer(
                    artifacts, bind=config.artifacts.bind_address(), token=config.artifacts_token()
                )
            except OSError as exc:
                raise HubError(
                    f"the artifact server cannot listen on {config.artifacts.bind}: "
                    f"{exc.strerror or exc} (artifacts.bind)"
                ) from exc
            self.artifact_server.start()
        hooks = IngestHooks()
        self.ingest = ingest = Ingest(config, store, metrics=self.metrics, hooks=hooks)
        self.service = service = HubService(
            config, store, artifacts=artifacts, keys=keys, publisher=ingest, clock=self.clock
        )
        service.metrics = self.metrics
        self.loop = loop = ControllerLoop(service.controller)
        loop.attach(hooks)
        hooks.on_state.append(self._on_device_news)
        hooks.on_status.append(self._on_device_news)
        hooks.on_event.append(self._on_device_news)
        service.rollouts.recover(reconcile=False)  # the full reconcile below publishes
        loop.start()
        ingest.start()
        loop.request_all()
        self.scheduler = BackgroundScheduler(
            daemon=True, job_defaults={"coalesce": True, "max_instances": 1}
        )
        self.scheduler.add_job(
            self._job(service.resign_due), "interval", seconds=resign_interval(config), id="resign"
        )
        self.scheduler.add_job(
            self._job(service.publish_pending),
            "interval",
            seconds=PUBLISH_PENDING_INTERVAL_S,
            id="publish-pending",
        )
        self.scheduler.add_job(
            loop.request_all, "interval", seconds=RECONCILE_INTERVAL_S, id="reconcile"
        )
        self.scheduler.add_job(
            self._tick_rollouts,
            "interval",
            seconds=ROLLOUT_TICK_S,
            id="rollouts",
            next_run_time=datetime.now(UTC),
        )
        self.scheduler.start()
        self._start_api(service)

    def _tick_rollouts(self) -> None:
        """The rollouts job: step every active rollout (errors are logged, never raised)."""
        with self._wake_lock:
            self._wake_pending = False
        service = self.service
        if service is None:
            return
        driver = service.rollouts
        try:
            ticks = driver.ticks
            driver.tick()
            if driver.ticks != ticks:
                self.metrics.rollout_tick_seconds.observe(driver.last_tick_s)
        except Exception:
            log.exception("rollout tick failed")
        finally:
            self._last_rollout_tick = time.monotonic()

    def _on_device_news(self, device_id: str, message: object) -> None:
        """Ingest hook: news of a device an active rollout includes steps the rollouts
        soon (at most one wake-up pending; at least ``ROLLOUT_WAKE_GAP_S`` after a tick)."""
        service, scheduler = self.service, self.scheduler
        if service is None or scheduler is None or not service.rollouts.watching(device_id):
            return
        with self._wake_lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        delay = max(0.0, self._last_rollout_tick + ROLLOUT_WAKE_GAP_S - time.monotonic())
        try:
            scheduler.add_job(
                self._tick_rollouts,
                "date",
                run_date=datetime.fromtimestamp(time.time() + delay, UTC),
                misfire_grace_time=None,
            )
        except Exception:  # the scheduler is stopping: the next start ticks anyway
            with self._wake_lock:
                self._wake_pending = False

    @staticmethod
    def _job(work: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            try:
                work()
            except Exception:
                log.exception("hub job %s failed", getattr(work, "__name__", work))

        return run

    def _start_api(self, service: HubService) -> None:
        """Serve ``hub.api.create_app(service)`` with uvicorn, when hub/api.py exists."""
        # The HTTP API is another module's (hub/api.py, create_app(service) -> ASGI app).
        # Until it exists the hub runs without it; an API that exists but fails to import
        # is an error, not a silent omission.
        if importlib.util.find_spec(API_MODULE) is None:
            log.warning(
                "the HTTP API is not installed (%s missing); serving without it", API_MODULE
            )
            return
        import uvicorn

        create_app = importlib.import_module(API_MODULE).create_app
        host, _, port = self.config.api.bind.rpartition(":")
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(service),
                host=host.strip("[]"),
                port=int(port),
                log_level="warning",
                access_log=False,
            )
        )
        thread = threading.Thread(target=server.run, name="hub-api", daemon=True)
        self._api, self._api_thread = server, thread
        thread.start()
        deadline = time.monotonic() + API_START_TIMEOUT_S
        while not server.started:
            if not thread.is_alive():
                raise HubError(f"the HTTP API could not listen on {self.config.api.bind}")
            if time.monotonic() > deadline:
                raise HubError(f"the HTTP API did not start in {API_START_TIMEOUT_S:g} s")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop everything that was started, in reverse order; safe to call twice."""
        if self._api is not None:
            self._api.should_exit = True
        if self._api_thread is not None:
            self._api_thread.join(30.0)
            self._api_thread = None
        self._api = None
        if self.scheduler is not None:
            if self.scheduler.running:
                self.scheduler.shutdown(wait=True)
            self.scheduler = None
        if self.loop is not None:
            self.loop.stop()
            self.loop = None
        if self.ingest is not None:
            self.ingest.stop()
            self.ingest = None
        if self.artifact_server is not None:
            self.artifact_server.stop()
            self.artifact_server = None
        if self.store is not None:
            self.store.close()
            self.store = None
        self._started = False

    def __enter__(self) -> HubServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def describe(self) -> str:
        """One line: what runs where."""
        parts = [f"hub {self.config.hub_id}", f"broker {self.config.broker.url}"]
        if self.artifact_server is not None:
            host, port = self.artifact_server.address
            parts.append(f"artifacts http://{host}:{port}/artifacts")
        parts.append(f"api http://{self.config.api.bind}" if self._api else "no api")
        return ", ".join(parts)


class IngestWorker:
    """An extra ingest process beside the hub (``edgefleet-hub ingest-worker``): the same
    store and shared subscription, nothing else. For fleets whose telemetry one hub
    process cannot write alone; it needs MQTT 5, a shared group and gap detection off (a
    device's messages are spread over the processes, so none of them sees every seq)."""

    def __init__(self, config: HubConfig, index: int) -> None:
        source = str(config.source) if config.source is not None else "hub.toml"
        if config.broker.protocol != "5":
            raise ConfigError(source, "broker.protocol", '"5" for ingest workers')
        if not config.broker.shared_group:
            raise ConfigError(source, "broker.shared_group", "a group name for ingest workers")
        if config.ingest.detect_gaps:
            raise ConfigError(
                source,
                "ingest.detect_gaps",
                "false when ingest workers share the devices' messages with the hub",
            )
        self.config = config
        self.index = index
        self.store: Store | None = None
        self.ingest: Ingest | None = None

    def start(self) -> None:
        try:
            self.store = Store(self.config.store_path)
            self.ingest = Ingest(self.config, self.store, worker_index=self.index)
            self.ingest.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Write what is waiting and disconnect; safe to call twice."""
        if self.ingest is not None:
            self.ingest.stop()
            self.ingest = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def describe(self) -> str:
        return (
            f"ingest worker {self.index} of hub {self.config.hub_id}, "
            f"broker {self.config.broker.url}"
        )


def _sd_notify(*assignments: str) -> None:
    """One datagram to systemd's ``$NOTIFY_SOCKET`` (no-op outside systemd)."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto("\n".join(assignments).encode(), address)
    except OSError as exc:
        log.warning("sd_notify failed: %s", exc)


GC_GEN0_THRESHOLD = 10_000
"""Allocations between young-generation collections (CPython's default is 700)."""


def tune_gc_for_serving() -> None:
    """Keep the garbage collector off what start-up built, and run it less often.

    Ingest allocates and frees thousands of short-lived objects per batch; with the
    defaults the collector's passes cost more than validating the messages. Objects that
    live from start-up on are frozen (never scanned again); cycles still get collected.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, older, oldest)


def run_server(config_path: Path, *, ingest_worker: int | None = None) -> int:
    """Run the hub (or, with ``ingest_worker``, that ingest worker) until SIGTERM or
    SIGINT; 0 after a clean stop, 2 if it cannot start."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    server: HubServer | IngestWorker | None = None
    try:
        try:
            config = load_config(config_path)
            if ingest_worker is None:
                server = HubServer(config)
            else:
                server = IngestWorker(config, ingest_worker)
            server.start()
            tune_gc_for_serving()
        except (EdgefleetError, OSError) as exc:  # OSError: a port in use, a path unwritable
            print(f"edgefleet-hub: error: {' '.join(str(exc).split())}", file=sys.stderr)
            return EXIT_ERROR
        log.info("serving: %s", server.describe())
        _sd_notify("READY=1", f"STATUS=serving {server.describe()}")
        while not stopping.wait(1.0):
            pass
        _sd_notify("STOPPING=1")
        log.info("stopping")
        server.stop()
        return EXIT_OK
    finally:
        if server is not None:
            server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
