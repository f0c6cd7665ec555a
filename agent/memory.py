"""Give freed heap memory back to the operating system after large transient allocations."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Mapping

log = logging.getLogger(__name__)

ARENA_LIMIT = 2
"""glibc malloc arenas the agent keeps (glibc's own default: eight per core)."""

_M_ARENA_MAX = -8


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def release_freed_memory() -> bool:
    """Call glibc's ``malloc_trim(0)``; False where there is no glibc (musl, macOS).

    Loading a model reads its file and builds the session in worker threads: the freed
    buffers stay in per-thread arenas and inflate the resident size of a long-lived agent
    unless they are trimmed.
    """
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is None:
        return False
    try:
        trim(0)
    except OSError as exc:  # pragma: no cover - defensive
        log.debug("malloc_trim failed: %s", exc)
        return False
    return True


def cap_malloc_arenas(environ: Mapping[str, str], limit: int = ARENA_LIMIT) -> bool:
    """Have glibc keep at most ``limit`` malloc arenas; False where nothing was set.

    Every thread that loads a model or runs inference otherwise gets an arena of its own,
    and freed session buffers stay spread over them: a long-lived agent's resident size
    creeps up by megabytes an hour with no live object behind it (docs/soak.md). Call it
    before any thread starts. An operator's ``MALLOC_ARENA_MAX`` wins: glibc has read it
    already, so nothing is set.
    """
    if "MALLOC_ARENA_MAX" in environ:
        return False
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    if mallopt is None:
        return False
    try:
        accepted = mallopt(_M_ARENA_MAX, limit)
    except OSError as exc:  # pragma: no cover - defensive
        log.debug("mallopt failed: %s", exc)
        return False
    return bool(accepted)
