"""ArtifactCache with the real UrlFetcher and a real HTTP server: verified installs, fallback
URLs, mismatches, interrupted and killed downloads resumed, ENOSPC, gc, concurrent ensure."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cache import ArtifactCache
from agent.errors import (
    ArtifactTooLarge,
    ArtifactUnavailable,
    FetchError,
    HashMismatch,
    NotCached,
    SizeMismatch,
    StorageFull,
)
from agent.fetch import RetryPolicy, UrlFetcher
from contract.manifests import Artifact
from support.http_server import ArtifactServer, Fault

REPO_ROOT = Path(__file__).resolve().parent.parent
SIZE = 300_000


class SimulatedCrash(BaseException):
    """Stands for a kill: nothing in the cache may catch it."""


class CrashingFetcher:
    """Writes ``source[offset:stop]`` into the partial file, then 'crashes' or fails."""

    def __init__(self, source: bytes, stop: int, error: BaseException | None = None) -> None:
        self.source = source
        self.stop = stop
        self.error = error if error is not None else SimulatedCrash()

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
        with dest.open("r+b" if dest.exists() else "wb") as handle:
            handle.seek(offset)
            handle.truncate()
            handle.write(self.source[offset : self.stop])
        raise self.error


def artifact_for(data: bytes, url: str | None = None) -> Artifact:
    return Artifact(sha256=hashlib.sha256(data).hexdigest(), size=len(data), url=url)


def fast_fetcher() -> UrlFetcher:
    return UrlFetcher(retry=RetryPolicy(attempts=2, backoff_s=0.0), sleep=lambda _: None)


@pytest.fixture
def server() -> Iterator[ArtifactServer]:
    with ArtifactServer() as running:
        yield running


@pytest.fixture
def data() -> bytes:
    return os.urandom(SIZE)


@pytest.fixture
def cache(tmp_path: Path) -> ArtifactCache:
    return ArtifactCache(tmp_path / "cache", fast_fetcher(), timeout=5.0)


def partial_of(cache: ArtifactCache, artifact: Artifact) -> Path:
    return cache.root / "partial" / f"{artifact.sha256}.part"


def test_ensure_downloads_verifies_and_installs(
    server: ArtifactServer, cache: ArtifactCache, data: bytes
) -> None:
    artifact = artifact_for(data)
    server.add(f"/store/{artifact.sha256}", data)
    assert not cache.has(artifact.sha256)
    path = cache.ensure(artifact, [server.url("/store")])
    assert path == cache.root / "sha256" / artifact.sha256
    assert path.read_bytes() == data
    assert path.stat().st_mode & 0o222 == 0  # read-only
    assert cache.has(artifact.sha256) and cache.path(artifact.sha256) == path
    assert list((cache.root / "partial").iterdir()) == []
    assert cache.hashes() == {artifact.sha256}
    assert cache.usage_bytes() == SIZE
    # A verified file is trusted: no second request.
    assert cache.ensure(artifact, [server.url("/store")]) == path
    assert len(server.requests) == 1


def test_real_ocr_model(server: ArtifactServer, cache: ArtifactCache) -> None:
    import rapidocr_onnxruntime

    model = (
        Path(rapidocr_onnxruntime.__file__).parent
        / "models"
        / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    )
    raw = model.read_bytes()
    artifact = artifact_for(raw, url=server.add("/models/cls.onnx", model))
    server.push_faults("/models/cls.onnx", Fault(cut_after=len(raw) // 3))
    path = cache.ensure(artifact)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == artifact.sha256
    assert server.requests[1].headers["Range"] == f"bytes={len(raw) // 3}-"

    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()


def test_candidate_urls(cache: ArtifactCache, data: bytes) -> None:
    artifact = artifact_for(data)
    bases = ["http://a/store/", "http://b", "http://b/"]
    assert cache.candidate_urls(artifact, bases) == [
        f"http://a/store/{artifact.sha256}",
        f"http://b/{artifact.sha256}",
    ]
    own = artifact_for(data, url="https://cdn/x.onnx")
    assert cache.candidate_urls(own, bases) == ["https://cdn/x.onnx"]


def test_falls_through_404_and_500_to_the_next_url(
    server: ArtifactServer, cache: ArtifactCache, data: bytes
) -> None:
    artifact = artifact_for(data)
    server.add(f"/broken/{artifact.sha256}", data, fault=Fault(status=500))
    server.add(f"/good/{artifact.sha256}", data)
    bases = [server.url("/missing"), server.url("/broken"), server.url("/good")]
    assert cache.ensure(artifact, bases).read_bytes() == data
    statuses = [(r.path.split("/")[1], r.headers.get("Range")) for r in server.requests]
    assert statuses == [("missing", None), ("broken", None), ("broken", None), ("good", None)]


def test_every_url_failing_is_unavailable_with_each_reason(
    server: ArtifactServer, cache: ArtifactCache, data: bytes
) -> None:
    artifact = artifact_for(data)
    server.add(f"/broken/{artifact.sha256}", data, fault=Fault(status=500))
    bases = [server.url("/missing"), server.url("/broken")]
    with pytest.raises(ArtifactUnavailable) as info:
        cache.ensure(artifact, bases)
    failures = info.value.failures
    assert [url for url, _ in failures] == [f"{b}/{artifact.sha256}" for b in bases]
    assert all(isinstance(error, FetchError) for _, error in failures)
    assert [error.status for _, error in failures if isinstance(error, FetchError)] == [404, 500]
    assert artifact.sha256 in str(info.value) and "HTTP 404" in str(info.value)
    assert not cache.has(artifact.sha256)


def test_no_url_at_all(cache: ArtifactCache, data: bytes) -> None:
    with pytest.raises(ArtifactUnavailable, match="no URL to fetch it from"):
        cache.ensure(artifact_for(data), [])


def test_hash_mismatch_removes_the_partial_and_tries_the_next_url(
    server: ArtifactServer, cache: ArtifactCache, data: bytes
) -> None:
    artifact = artifact_for(data)
    tampered = bytes([data[0] ^ 1]) + data[1:]
    server.add(f"/evil/{artifact.sha256}", tampered)
    with pytest.raises(ArtifactUnavailable) as info:
        cache.ensure(artifact, [server.url("/evil")])
    [(_, error)] = info.value.failures
    assert isinstance(error, HashMismatch)
    assert error.expected == artifact.sha256
    assert error.actual == hashlib.sha256(tampered).hexdigest()
    assert not partial_of(cache, artifact).exists()
    assert list((cache.root / "sha256").iterdir()) == []
    # A good mirror after the bad one delivers.
    server.add(f"/good/{artifact.sha256}", data)
    path = cache.ensure(artifact, [server.url("/evil"), server.url("/good")])
    assert path.read_bytes() == data


@pytest.mark.parametrize(
    "fault",
    [
        Fault(body=os.urandom(SIZE - 1000)),  # truncated file, honest length
        Fault(extra=b"x" * 1000),  # extended file, honest length
        Fault(omit_length=True, extra=b"x" * 1000),  # extended, no length
        Fault(content_length=SIZE + 1000),  # length lies upwards
    ],
    ids=["truncated", "extended", "extended-no-length", "length-lies"],
)
def test_size_mismatch_removes_the_partial(
    server: ArtifactServer, cache: ArtifactCache, data: bytes, fault: Fault
) -> None:
    artifact = artifact_for(data)
    url = server.add("/a", data, fault=fault)
    with pytest.raises(ArtifactUnavailable) as info:
        cache.ensure(artifact_for(data, url=url))
    [(failed_url, error)] = info.value.failures
    assert failed_url == url
    assert isinstance(error, SizeMismatch)
    assert error.expected == SIZE
    assert not partial_of(cache, artifact).exists()
    assert not cache.has(artifact.sha256)


def test_body_cut_short_every_time_is_kept_for_resume(
    server: ArtifactServer, cache: ArtifactCache, data: bytes
) -> None:
    artifact = artifact_for(data)
    url = server.add("/a", data, fault=Fault(cut_after=0))
    server.push_faults("/a", Fault(cut_after=1234))
    with pytest.raises(ArtifactUnavailable) as info:
        cache.ensure(artifact_for(data, url=url))
    assert "connection closed at byte 1234" in str(info.value)
    assert partial_of(cache, artifact).read_bytes() == data[:1234]
    assert not cache.has(artifact.sha256)


@pytest.mark.parametrize("stop", [0, 1, 150_000, SIZE - 1])
def test_crash_mid_download_then_resume(
    server: ArtifactServer, tmp_path: Path, data: bytes, stop: int
) -> None:
    artifact = artifact_for(data)
    url = server.add("/a", data)
    root = tmp_path / "cache"
    crashed = ArtifactCache(root, CrashingFetcher(data, stop))
    with pytest.raises(SimulatedCrash):
        crashed.ensure(artifact_for(data, url=url))
    assert list((root / "sha256").iterdir()) == []
    assert partial_of(crashed, artifact).stat().st_size == stop
    assert not crashed.has(artifact.sha256)

    restarted = ArtifactCache(root, fast_fetcher())
    assert restarted.ensure(artifact_for(data, url=url)).read_bytes() == data
    [request] = server.requests
    assert request.headers.get("Range") == (f"bytes={stop}-" if stop else None)


def test_crash_after_complete_download_installs_without_network(
    server: ArtifactServer, tmp_path: Path, data: bytes
) -> None:
    artifact = artifact_for(data, url=server.url("/nothing-here"))
    root = tmp_path / "cache"
    with pytest.raises(SimulatedCrash):
        ArtifactCache(root, CrashingFetcher(data, SIZE)).ensure(artifact)
    assert ArtifactCache(root, fast_fetcher()).ensure(artifact).read_bytes() == data
    assert server.requests == []


def test_complete_but_wrong_partial_is_discarded(
    server: ArtifactServer, cache: ArtifactCache, data: bytes
) -> None:
    artifact = artifact_for(data, url=server.add("/a", data))
    partial_of(cache, artifact).write_bytes(os.urandom(SIZE))
    assert cache.ensure(artifact).read_bytes() == data
    [request] = server.requests
    assert "Range" not in request.headers


def test_resumed_garbage_is_retried_from_zero(
    server: ArtifactServer, cache: ArtifactCache, data: bytes
) -> None:
    artifact = artifact_for(data, url=server.add("/a", data))
    partial_of(cache, artifact).write_bytes(b"\0" * 1000)  # not the artifact's first bytes
    assert cache.ensure(artifact).read_bytes() == data
    first, second = server.requests
    assert first.headers["Range"] == "bytes=1000-"
    assert "Range" not in second.headers


def test_partial_longer_than_the_artifact_is_discarded(
    server: ArtifactServer, cache: ArtifactCache, data: bytes
) -> None:
    artifact = artifact_for(data, url=server.add("/a", data))
    partial_of(cache, artifact).write_bytes(b"\0" * (SIZE + 1))
    assert cache.ensure(artifact).read_bytes() == data
    assert "Range" not in server.requests[0].headers


def test_killed_process_leaves_only_a_partial_that_resumes(
    server: ArtifactServer, tmp_path: Path, data: bytes
) -> None:
    """SIGKILL a real process mid-download; the next cache resumes from its partial file."""
    artifact = artifact_for(data)
    url = server.add("/a", data)
    server.push_faults("/a", Fault(chunk_size=8192, chunk_delay_s=0.02))
    root = tmp_path / "cache"
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from agent.cache import ArtifactCache\n"
        "from contract.manifests import Artifact\n"
        "a = Artifact(sha256=sys.argv[2], size=int(sys.argv[3]), url=sys.argv[4])\n"
        "ArtifactCache(Path(sys.argv[1])).ensure(a)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(root), artifact.sha256, str(SIZE), url], env=env
    )
    part = root / "partial" / f"{artifact.sha256}.part"
    try:
        deadline = time.monotonic() + 20
        while not (part.exists() and part.stat().st_size >= 50_000):
            assert child.poll() is None, "the child ended before it could be killed"
            assert time.monotonic() < deadline, "the download did not start"
            time.sleep(0.01)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert list((root / "sha256").iterdir()) == []
    kept = part.stat().st_size
    assert 50_000 <= kept < SIZE

    assert (
        ArtifactCache(root, fast_fetcher()).ensure(artifact_for(data, url=url)).read_bytes() == data
    )
    assert server.requests[-1].headers["Range"] == f"bytes={kept}-"


def test_enospc_from_the_fetcher_is_storage_full_and_removes_the_partial(
    cache: ArtifactCache, data: bytes
) -> None:
    artifact = artifact_for(data, url="http://127.0.0.1:9/a")
    cache.fetcher = CrashingFetcher(data, 1000, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(StorageFull):
        cache.ensure(artifact)
    assert not partial_of(cache, artifact).exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_real_enospc_while_writing(
    server: ArtifactServer, cache: ArtifactCache, data: bytes
) -> None:
    """The partial file is a link to /dev/full, whose writes fail with ENOSPC."""
    artifact = artifact_for(data, url=server.add("/a", data))
    part = partial_of(cache, artifact)
    part.symlink_to("/dev/full")
    with pytest.raises(StorageFull) as info:
        cache.ensure(artifact)
    assert info.value.errno == errno.ENOSPC
    assert not part.is_symlink()
    assert not cache.has(artifact.sha256)


def test_too_little_free_space_is_refused_before_downloading(
    server: ArtifactServer, tmp_path: Path, data: bytes
) -> None:
    root = tmp_path / "cache"
    cache = ArtifactCache(root, fast_fetcher(), min_free_bytes=1 << 62)
    artifact = artifact_for(data, url=server.add("/a", data))
    partial_of(cache, artifact).write_bytes(data[:1000])
    with pytest.raises(StorageFull) as info:
        cache.ensure(artifact)
    assert info.value.needed == SIZE - 1000 + (1 << 62)
    assert info.value.free is not None and info.value.free < info.value.needed
    assert "bytes needed" in str(info.value)
    assert server.requests == []
    assert partial_of(cache, artifact).exists()  # kept: nothing was wrong with it


def test_artifact_above_the_cap_is_refused(
    server: ArtifactServer, tmp_path: Path, data: bytes
) -> None:
    cache = ArtifactCache(tmp_path / "cache", fast_fetcher(), max_bytes=SIZE - 1)
    artifact = artifact_for(data, url=server.add("/a", data))
    with pytest.raises(ArtifactTooLarge) as info:
        cache.ensure(artifact)
    assert artifact.sha256 in str(info.value)
    assert server.requests == []


def test_damaged_final_file_is_replaced(
    server: ArtifactServer, cache: ArtifactCache, data: bytes
) -> None:
    artifact = artifact_for(data, url=server.add("/a", data))
    (cache.root / "sha256" / artifact.sha256).write_bytes(data[:10])
    assert cache.ensure(artifact).read_bytes() == data


def test_wrong_size_claim_keeps_the_intact_cached_copy(
    server: ArtifactServer, cache: ArtifactCache, data: bytes
) -> None:
    artifact = artifact_for(data, url=server.add("/a", data))
    path = cache.ensure(artifact)
    wrong = Artifact(sha256=artifact.sha256, size=SIZE + 1, url=artifact.url)
    with pytest.raises(SizeMismatch) as info:
        cache.ensure(wrong)
    assert (info.value.expected, info.value.actual) == (SIZE + 1, SIZE)
    assert path.read_bytes() == data
    assert len(server.requests) == 1


def test_file_url_artifact(cache: ArtifactCache, data: bytes, tmp_path: Path) -> None:
    source = tmp_path / "model.onnx"
    source.write_bytes(data)
    assert cache.ensure(artifact_for(data, url=source.as_uri())).read_bytes() == data


def test_bearer_token_reaches_the_hub_store(server: ArtifactServer, tmp_path: Path) -> None:
    data = os.urandom(1000)
    artifact = artifact_for(data)
    server.add(f"/artifacts/{artifact.sha256}", data, token="t0ken")
    fetcher = UrlFetcher(bearer_tokens={server.url("/artifacts"): "t0ken"})
    cache = ArtifactCache(tmp_path / "cache", fetcher)
    assert cache.ensure(artifact, [server.url("/artifacts")]).read_bytes() == data
    assert server.requests[0].headers["Authorization"] == "Bearer t0ken"


def test_lookups(cache: ArtifactCache) -> None:
    sha = "ab" * 32
    assert not cache.has(sha)
    with pytest.raises(NotCached, match=sha):
        cache.path(sha)
    for bad in ["../etc/passwd", "AB" * 32, "ab" * 31]:
        with pytest.raises(ValueError, match="sha256"):
            cache.has(bad)


def test_gc_keeps_exactly_the_keep_set(
    server: ArtifactServer, cache: ArtifactCache, data: bytes
) -> None:
    blobs = [data[i * 1000 : (i + 1) * 1000] for i in range(3)]
    artifacts = [artifact_for(blob, url=server.add(f"/{i}", blob)) for i, blob in enumerate(blobs)]
    for artifact in artifacts:
        cache.ensure(artifact)
    pending = "cd" * 32  # a download to resume, in the keep set
    stale = "ef" * 32  # a download nobody wants any more
    (cache.root / "partial" / f"{pending}.part").write_bytes(b"p" * 10)
    (cache.root / "partial" / f"{stale}.part").write_bytes(b"s" * 20)
    (cache.root / "sha256" / "junk").write_bytes(b"j" * 5)
    assert cache.usage_bytes() == 3000 + 10 + 20 + 5

    keep = {artifacts[0].sha256, artifacts[2].sha256, pending}
    result = cache.gc(keep)
    assert cache.hashes() == {artifacts[0].sha256, artifacts[2].sha256}
    assert sorted(result.removed) == sorted([artifacts[1].sha256, "junk"])
    assert result.removed_partials == [stale]
    assert result.freed_bytes == 1000 + 20 + 5
    assert sorted(p.name for p in (cache.root / "partial").iterdir()) == [f"{pending}.part"]
    assert cache.usage_bytes() == 2000 + 10
    assert cache.gc(keep).freed_bytes == 0


def test_concurrent_ensure_of_one_hash_downloads_once(
    server: ArtifactServer, cache: ArtifactCache, data: bytes
) -> None:
    artifact = artifact_for(
        data, url=server.add("/a", data, fault=Fault(chunk_size=32 * 1024, chunk_delay_s=0.02))
    )
    barrier = threading.Barrier(2)
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        barrier.wait()
        try:
            results.append(cache.ensure(artifact))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=worker, name=f"ensure-{i}") for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(results) == 2 and results[0] == results[1]
    assert results[0].read_bytes() == data
    assert len(server.requests) == 1


def test_gc_spares_a_download_in_progress(
    server: ArtifactServer, cache: ArtifactCache, data: bytes
) -> None:
    artifact = artifact_for(
        data, url=server.add("/a", data, fault=Fault(chunk_size=16 * 1024, chunk_delay_s=0.02))
    )
    part = partial_of(cache, artifact)
    done: list[Path] = []
    thread = threading.Thread(target=lambda: done.append(cache.ensure(artifact)), name="ensure")
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not (part.exists() and part.stat().st_size > 0):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        result = cache.gc(set())
    finally:
        thread.join()
    assert result.removed_partials == []
    assert done and done[0].read_bytes() == data
