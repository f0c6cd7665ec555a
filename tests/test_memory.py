"""glibc's arena cap (agent/memory.py), observed in a fresh interpreter through malloc_info."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path

import pytest

import agent.memory
from agent.cli import main

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)

# Eight threads allocate at once; glibc gives each new thread an arena of its own until it
# reaches its limit. malloc_info writes one <heap nr=...> element per arena.
_PROBE = textwrap.dedent(
    """
    import ctypes, ctypes.util, os, sys, tempfile, threading
    from agent.memory import cap_malloc_arenas

    capped = cap_malloc_arenas(os.environ) if sys.argv[1] == "cap" else None
    barrier = threading.Barrier(8)
    kept = []

    def allocate():
        barrier.wait()
        kept.append([bytearray(4096) for _ in range(64)])
        barrier.wait()

    threads = [threading.Thread(target=allocate) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    with tempfile.NamedTemporaryFile(suffix=".xml") as report:
        stream = libc.fopen(report.name.encode(), b"w")
        libc.malloc_info(0, stream)
        libc.fclose(stream)
        heaps = open(report.name).read().count("<heap nr=")
    print(capped, heaps)
    """
)


def _probe(mode: str, **extra_env: str) -> tuple[str, int]:
    env = {key: value for key, value in os.environ.items() if key != "MALLOC_ARENA_MAX"}
    env.update(extra_env)
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    capped, heaps = done.stdout.split()
    return capped, int(heaps)


def test_without_the_cap_each_thread_gets_an_arena() -> None:
    _, heaps = _probe("none")
    assert heaps > 2


def test_the_cap_keeps_two_arenas_however_many_threads_allocate() -> None:
    capped, heaps = _probe("cap")
    assert capped == "True"
    assert heaps <= 2


def test_an_operators_malloc_arena_max_is_left_as_set() -> None:
    capped, heaps = _probe("cap", MALLOC_ARENA_MAX="4")
    assert capped == "False"
    assert 2 < heaps <= 4


def test_the_run_command_caps_the_arenas_before_it_reads_its_configuration(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: list[Mapping[str, str]] = []

    def cap(environ: Mapping[str, str]) -> bool:
        seen.append(environ)
        return True

    monkeypatch.setattr(agent.memory, "cap_malloc_arenas", cap)
    assert main(["run", "--config", str(tmp_path / "absent.toml")]) != 0
    assert seen == [os.environ]
