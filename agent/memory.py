"""Give freed heap memory back to the operating system after large transient allocations."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)


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
