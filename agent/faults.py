"""Fault points for crash-safety tests: ``EDGEFLEET_FAULT=<point>`` kills the agent there.

Points, in the order an apply reaches them:

    download   half of an artifact's body is on disk
    verify     an artifact's body is complete on disk, not yet verified
    load       the first new session is loaded, the others are not
    switch     the new table serves, nothing is persisted yet
    persist    the new generation is persisted, nothing is reported yet

The process is killed with SIGKILL, as a power cut would stop it: no handler runs.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from pathlib import Path

from agent.fetch import Fetcher

FAULT_ENV = "EDGEFLEET_FAULT"
POINTS = ("download", "verify", "load", "switch", "persist")


class Faults:
    def __init__(self, point: str | None = None) -> None:
        if point is not None and point not in POINTS:
            raise ValueError(f"unknown fault point {point!r}; expected one of {', '.join(POINTS)}")
        self.point = point

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Faults:
        return cls(environ.get(FAULT_ENV) or None)

    def hit(self, point: str) -> None:
        if point == self.point:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(self, fetcher: Fetcher) -> Fetcher:
        """The fetcher itself, or one that dies during or right after a download."""
        if self.point not in ("download", "verify"):
            return fetcher
        return _DyingFetcher(fetcher, self)


class _DyingFetcher:
    def __init__(self, inner: Fetcher, faults: Faults) -> None:
        self._inner = inner
        self._faults = faults

    def fetch(
        self,
        url: str,
        dest: Path,
        *,
        expected_size: int,
        offset: int = 0,
        timeout: float,
        max_bytes: int,
    ) -> None:
        self._inner.fetch(
            url,
            dest,
            expected_size=expected_size,
            offset=offset,
            timeout=timeout,
            max_bytes=max_bytes,
        )
        if self._faults.point == "download":
            with dest.open("r+b") as handle:
                handle.truncate(max(offset, dest.stat().st_size // 2))
                handle.flush()
                os.fsync(handle.fileno())
        self._faults.hit(self._faults.point or "")
