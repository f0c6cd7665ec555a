"""``Simulation``: a fleet of simulated agents in this process, or spread over processes.

With ``processes=1`` the devices run in ``threads`` event-loop threads of this process.
With more, each worker process (started with ``spawn``) runs its slice of the fleet and
answers requests over a pipe; the calls here merge what the workers say. Device ids,
profiles and failure modes are planned here, deterministically, before anything starts
(``Simulation.specs``), so callers know which devices will fail without asking.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import resource
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import Any

from contract.profile import FirmwareProfile, HardwareFacts
from hub.simulate.loop import BrokerTarget, Shard
from hub.simulate.model import (
    DeviceSpec,
    DeviceView,
    SimStats,
    SimulationConfig,
    SimulationError,
    connects_at_all,
    facts_for,
    load_profiles,
    plan_devices,
    profile_weights,
)

log = logging.getLogger(__name__)

FDS_PER_PROCESS = 64
"""File descriptors a process needs beside one per device."""
WORKER_START_S = 60.0
REQUEST_TIMEOUT_S = 60.0


def raise_open_file_limit(needed: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards the hard limit; SimulationError when
    even the hard limit is below ``needed``. Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = hard if hard == resource.RLIM_INFINITY else max(soft, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            target = soft
        soft = target
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise SimulationError(
            f"this process may open {soft} files but needs about {needed} "
            f"(one socket per device): raise the limit (ulimit -n, LimitNOFILE=) or use "
            f"more --processes"
        )
    return int(soft)


class LocalFleet:
    """A slice of the fleet in this process: ``threads`` event loops."""

    def __init__(
        self,
        config: SimulationConfig,
        specs: Sequence[DeviceSpec],
        *,
        profiles: dict[str, FirmwareProfile],
        connect_rate: float,
        seed: int,
    ) -> None:
        target = BrokerTarget.from_url(config.broker_url)
        facts: dict[str, HardwareFacts] = {name: facts_for(p) for name, p in profiles.items()}
        threads = max(1, min(config.threads, len(specs) or 1))
        per = -(-len(specs) // threads) if specs else 0
        self.shards = [
            Shard(
                f"{seed}.{i}",
                specs[i * per : (i + 1) * per],
                profiles=profiles,
                facts=facts,
                config=config,
                target=target,
                connect_rate=connect_rate / threads,
                seed=seed * 1000 + i,
            )
            for i in range(threads)
        ]
        self._stopped: SimStats | None = None

    def start(self) -> None:
        for shard in self.shards:
            shard.start()

    def stats(self) -> SimStats:
        if self._stopped is not None:
            return self._stopped
        return SimStats.merge([s.call(s.snapshot) for s in self.shards])

    def devices(self) -> list[DeviceView]:
        return [view for s in self.shards for view in s.call(s.views)]

    def set_offline(self, ids: Sequence[str], offline: bool, offline_for: float | None) -> int:
        wanted = list(ids)
        return sum(
            s.call(functools.partial(s.set_offline, wanted, offline, offline_for))
            for s in self.shards
        )

    def stop(self, timeout: float) -> SimStats:
        if self._stopped is not None:
            return self._stopped
        for shard in self.shards:
            shard.request_stop(timeout)
        deadline = time.monotonic() + timeout + 5.0
        for shard in self.shards:
            if not shard.join(max(0.1, deadline - time.monotonic())):
                log.error("simulator loop %s did not stop in time", shard.name)
        self._stopped = SimStats.merge([s.call(s.snapshot) for s in self.shards])
        return self._stopped


class Simulation:
    """N simulated agents on real MQTT connections. Use as a context manager or call
    ``start`` and ``stop``.

        with Simulation(SimulationConfig(broker_url=..., devices=1000,
                                         trusted_keys=(key.public,))) as sim:
            sim.wait_connected(60)
            ...
            print(sim.stats())
    """

    def __init__(self, config: SimulationConfig) -> None:
        config.check()
        self.config = config
        available = load_profiles(config.profiles_dir)
        weights = profile_weights(config, available)
        self.profiles = {name: available[name] for name, _ in weights}
        self.specs: list[DeviceSpec] = plan_devices(config, weights)
        self.expected_online = sum(1 for s in self.specs if connects_at_all(s, config.failures))
        self._local: LocalFleet | None = None
        self._workers: list[_Worker] = []
        self._started_at: float | None = None
        self._final: SimStats | None = None
        self._pipes = threading.Lock()
        """One request at a time on the workers' pipes."""

    # ---- planning ---------------------------------------------------------------------

    @property
    def device_ids(self) -> list[str]:
        return [s.device_id for s in self.specs]

    def chosen(self, mode: str) -> list[str]:
        """Device ids planned for a failure mode: fail_apply, offline, slow, errors, crash."""
        return [s.device_id for s in self.specs if mode in s.modes]

    def spec(self, device_id: str) -> DeviceSpec:
        for spec in self.specs:
            if spec.device_id == device_id:
                return spec
        raise KeyError(device_id)

    # ---- life cycle -------------------------------------------------------------------

    def start(self) -> Simulation:
        if self._started_at is not None:
            raise SimulationError("the simulation is already started")
        config = self.config
        processes = max(1, min(config.processes, len(self.specs) or 1))
        per = -(-len(self.specs) // processes) if self.specs else 0
        if processes == 1 and not config.isolate:
            raise_open_file_limit(len(self.specs) + FDS_PER_PROCESS)
            self._local = LocalFleet(
                config,
                self.specs,
                profiles=self.profiles,
                connect_rate=config.connect_rate,
                seed=config.seed,
            )
            self._started_at = time.monotonic()
            self._local.start()
            return self
        context = multiprocessing.get_context("spawn")
        self._started_at = time.monotonic()
        try:
            for index in range(processes):
                part = self.specs[index * per : (index + 1) * per]
                self._workers.append(
                    _Worker.spawn(
                        context,
                        config,
                        part,
                        profiles=self.profiles,
                        connect_rate=config.connect_rate / processes,
                        seed=config.seed + index,
                    )
                )
            for worker in self._workers:
                worker.wait_ready(WORKER_START_S)
        except BaseException:
            self._kill_workers()
            raise
        return self

    def stop(self, timeout: float = 30.0) -> SimStats:
        """Publish offline for every connected device, disconnect all and join everything."""
        if self._final is not None:
            return self._final
        if self._local is not None:
            self._final = self._local.stop(timeout)
        elif self._workers:
            with self._pipes:
                parts = []
                for worker in self._workers:
                    try:
                        worker.send(("stop", timeout))
                    except SimulationError as exc:
                        log.error("%s", exc)
                for worker in self._workers:
                    try:
                        parts.append(worker.receive(timeout + 15.0))
                    except SimulationError as exc:
                        log.error("%s", exc)
                self._kill_workers()
            self._final = SimStats.merge(parts)
        else:
            self._final = SimStats()
        return self._final

    def __enter__(self) -> Simulation:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- what is going on -------------------------------------------------------------

    @property
    def elapsed_s(self) -> float:
        return 0.0 if self._started_at is None else time.monotonic() - self._started_at

    def stats(self) -> SimStats:
        """Counters of every device now (the final ones after ``stop``)."""
        if self._final is not None:
            return self._final
        if self._local is not None:
            return self._local.stats()
        return SimStats.merge(self._ask_all(("stats", None)))

    def devices(self) -> list[DeviceView]:
        """Every device as it is now."""
        if self._local is not None:
            return self._local.devices()
        return [view for part in self._ask_all(("devices", None)) for view in part]

    def set_offline(
        self, device_ids: Iterable[str], offline: bool = True, offline_for: float | None = None
    ) -> int:
        """Take devices offline (their Will is published) or let them come back."""
        ids = list(device_ids)
        if self._local is not None:
            return self._local.set_offline(ids, offline, offline_for)
        return sum(self._ask_all(("offline", (ids, offline, offline_for))))

    def wait_for(
        self, predicate: Callable[[SimStats], bool], timeout: float, interval: float = 0.1
    ) -> bool:
        """Poll ``stats()`` until ``predicate`` holds; False after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate(self.stats()):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)

    def wait_connected(self, timeout: float) -> bool:
        """Every device that connects at all has connected once (and said its birth)."""
        return self.wait_for(
            lambda s: s.ever_connected >= self.expected_online and s.births >= self.expected_online,
            timeout,
        )

    # ---- workers ----------------------------------------------------------------------

    def _ask_all(self, request: tuple[str, Any]) -> list[Any]:
        with self._pipes:
            if not self._workers:
                raise SimulationError("the simulation is not running")
            for worker in self._workers:
                worker.send(request)
            return [worker.receive(REQUEST_TIMEOUT_S) for worker in self._workers]

    def _kill_workers(self) -> None:
        for worker in self._workers:
            worker.close()
        self._workers = []


class _Worker:
    """A worker process and the parent's end of its pipe."""

    def __init__(self, process: BaseProcess, pipe: Connection) -> None:
        self.process = process
        self.pipe = pipe

    @classmethod
    def spawn(
        cls,
        context: Any,
        config: SimulationConfig,
        specs: Sequence[DeviceSpec],
        *,
        profiles: dict[str, FirmwareProfile],
        connect_rate: float,
        seed: int,
    ) -> _Worker:
        parent, child = context.Pipe()
        process = context.Process(
            target=worker_main,
            args=(child, config, list(specs)),
            kwargs={"profiles": profiles, "connect_rate": connect_rate, "seed": seed},
            name=f"edgefleet-sim-{seed}",
            daemon=True,
        )
        process.start()
        child.close()
        return cls(process, parent)

    def send(self, request: tuple[str, Any]) -> None:
        try:
            self.pipe.send(request)
        except (OSError, EOFError) as exc:
            raise SimulationError(f"simulator worker {self.process.name} is gone ({exc})") from None

    def receive(self, timeout: float) -> Any:
        try:
            if not self.pipe.poll(timeout):
                raise SimulationError(
                    f"simulator worker {self.process.name} did not answer in {timeout:.0f}s"
                )
            status, value = self.pipe.recv()
        except (OSError, EOFError) as exc:
            raise SimulationError(f"simulator worker {self.process.name} is gone ({exc})") from None
        if status != "ok":
            raise SimulationError(f"simulator worker {self.process.name}: {value}")
        return value

    def wait_ready(self, timeout: float) -> None:
        self.receive(timeout)

    def close(self) -> None:
        self.pipe.close()
        self.process.join(5.0)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5.0)


def worker_main(
    pipe: Connection,
    config: SimulationConfig,
    specs: list[DeviceSpec],
    *,
    profiles: dict[str, FirmwareProfile],
    connect_rate: float,
    seed: int,
) -> None:
    """A worker process: run a slice of the fleet until told to stop (or the parent goes)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    try:
        raise_open_file_limit(len(specs) + FDS_PER_PROCESS)
        fleet = LocalFleet(config, specs, profiles=profiles, connect_rate=connect_rate, seed=seed)
        fleet.start()
    except Exception as exc:
        pipe.send(("error", str(exc)))
        return
    pipe.send(("ok", None))
    handlers: dict[str, Callable[[Any], Any]] = {
        "stats": lambda _: fleet.stats(),
        "devices": lambda _: fleet.devices(),
        "offline": lambda arg: fleet.set_offline(*arg),
    }
    while True:
        try:
            op, arg = pipe.recv()
        except (EOFError, OSError):
            fleet.stop(10.0)  # the parent is gone: say goodbye anyway
            return
        if op == "stop":
            final = fleet.stop(float(arg))
            pipe.send(("ok", final))
            return
        try:
            pipe.send(("ok", handlers[op](arg)))
        except Exception as exc:
            pipe.send(("error", f"{op}: {exc}"))
