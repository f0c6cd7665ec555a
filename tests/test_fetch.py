"""UrlFetcher against a real HTTP server on 127.0.0.1: resume, restarts, size caps, timeouts,
status handling, bearer tokens, file:// URLs, and ENOSPC."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import (
    ArtifactTooLarge,
    FetchError,
    SizeMismatch,
    StorageError,
    StorageFull,
)
from agent.fetch import Fetcher, RetryPolicy, UrlFetcher
from support.http_server import ArtifactServer, Fault

SIZE = 300_000
TIMEOUT = 5.0
MAX = 10 * 1024 * 1024


@pytest.fixture
def server() -> Iterator[ArtifactServer]:
    with ArtifactServer() as running:
        yield running


@pytest.fixture
def data() -> bytes:
    return os.urandom(SIZE)


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def fetcher(sleeps: list[float]) -> UrlFetcher:
    """Three attempts; backoff delays are recorded instead of slept."""
    return UrlFetcher(
        retry=RetryPolicy(attempts=3, backoff_s=0.5, max_backoff_s=2.0), sleep=sleeps.append
    )


def fetch(fetcher: Fetcher, url: str, dest: Path, size: int, **kw: float) -> None:
    fetcher.fetch(
        url,
        dest,
        expected_size=size,
        offset=int(kw.get("offset", 0)),
        timeout=kw.get("timeout", TIMEOUT),
        max_bytes=int(kw.get("max_bytes", MAX)),
    )


def test_full_download(
    server: ArtifactServer, fetcher: UrlFetcher, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/a", data)
    dest = tmp_path / "a.part"
    fetch(fetcher, url, dest, SIZE)
    assert dest.read_bytes() == data
    [request] = server.requests_for("/a")
    assert "Range" not in request.headers
    assert request.headers["Accept-Encoding"] == "identity"


def test_resume_with_range_after_connection_cut(
    server: ArtifactServer, fetcher: UrlFetcher, data: bytes, tmp_path: Path, sleeps: list[float]
) -> None:
    url = server.add("/a", data)
    server.push_faults("/a", Fault(cut_after=100_000))
    dest = tmp_path / "a.part"
    fetch(fetcher, url, dest, SIZE)
    assert dest.read_bytes() == data
    first, second = server.requests_for("/a")
    assert "Range" not in first.headers
    assert second.headers["Range"] == "bytes=100000-"
    server.stop()
    assert second.status == 206
    assert second.bytes_sent == SIZE - 100_000
    assert len(sleeps) == 1  # progress was made: the base delay, not an escalated one


def test_server_cutting_every_response_still_completes(
    server: ArtifactServer, fetcher: UrlFetcher, data: bytes, tmp_path: Path
) -> None:
    """Each attempt makes progress, so the attempt budget (3) does not run out."""
    url = server.add("/a", data, fault=Fault(cut_after=40_000))
    dest = tmp_path / "a.part"
    fetch(fetcher, url, dest, SIZE)
    assert dest.read_bytes() == data
    assert len(server.requests_for("/a")) == 8


def test_resume_from_offset_discards_bytes_after_it(
    server: ArtifactServer, fetcher: UrlFetcher, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/a", data)
    dest = tmp_path / "a.part"
    dest.write_bytes(data[:1000] + b"garbage after the offset")
    fetch(fetcher, url, dest, SIZE, offset=1000)
    assert dest.read_bytes() == data
    [request] = server.requests_for("/a")
    assert request.headers["Range"] == "bytes=1000-"


def test_server_ignoring_range_restarts_from_zero(
    server: ArtifactServer, fetcher: UrlFetcher, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/a", data, fault=Fault(ignore_range=True))
    dest = tmp_path / "a.part"
    dest.write_bytes(b"x" * 5000)  # wrong bytes: proves the restart rewrote them
    fetch(fetcher, url, dest, SIZE, offset=5000)
    assert dest.read_bytes() == data
    [request] = server.requests_for("/a")
    assert request.headers["Range"] == "bytes=5000-"
    server.stop()
    assert request.status == 200


def test_416_without_content_range_restarts_from_zero(
    server: ArtifactServer, fetcher: UrlFetcher, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/a", data)
    server.push_faults("/a", Fault(status=416))
    dest = tmp_path / "a.part"
    dest.write_bytes(data[:5000])
    fetch(fetcher, url, dest, SIZE, offset=5000)
    assert dest.read_bytes() == data
    first, second = server.requests_for("/a")
    assert first.headers["Range"] == "bytes=5000-"
    assert "Range" not in second.headers


def test_416_naming_another_size_is_a_size_mismatch(
    server: ArtifactServer, fetcher: UrlFetcher, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/a", data[:4000])
    dest = tmp_path / "a.part"
    dest.write_bytes(data[:5000])
    with pytest.raises(SizeMismatch) as info:
        fetch(fetcher, url, dest, SIZE, offset=5000)
    assert (info.value.expected, info.value.actual) == (SIZE, 4000)
    assert url in str(info.value)


def test_longer_file_refused_from_its_content_length(
    server: ArtifactServer, fetcher: UrlFetcher, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/a", data, fault=Fault(extra=b"more"))
    dest = tmp_path / "a.part"
    with pytest.raises(SizeMismatch) as info:
        fetch(fetcher, url, dest, SIZE)
    assert (info.value.expected, info.value.actual) == (SIZE, SIZE + 4)
    assert f"{url}: expected {SIZE} bytes, got {SIZE + 4}" == str(info.value)
    assert dest.stat().st_size == 0
    assert len(server.requests_for("/a")) == 1  # not retried


def test_shorter_file_refused_from_its_content_length(
    server: ArtifactServer, fetcher: UrlFetcher, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/a", data[:-1])
    with pytest.raises(SizeMismatch) as info:
        fetch(fetcher, url, tmp_path / "a.part", SIZE)
    assert info.value.actual == SIZE - 1


def test_content_length_lying_upwards_is_refused(
    server: ArtifactServer, fetcher: UrlFetcher, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/a", data, fault=Fault(content_length=SIZE + 1000))
    with pytest.raises(SizeMismatch):
        fetch(fetcher, url, tmp_path / "a.part", SIZE)


def test_bytes_past_content_length_are_never_read(
    server: ArtifactServer, fetcher: UrlFetcher, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/a", data, fault=Fault(content_length=SIZE, extra=b"x" * 50_000))
    dest = tmp_path / "a.part"
    fetch(fetcher, url, dest, SIZE)
    assert dest.read_bytes() == data


def test_body_without_length_stops_once_past_expected_size(
    server: ArtifactServer, fetcher: UrlFetcher, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/a", data, fault=Fault(omit_length=True, extra=b"x" * 50_000))
    dest = tmp_path / "a.part"
    with pytest.raises(SizeMismatch) as info:
        fetch(fetcher, url, dest, SIZE)
    assert info.value.at_least
    assert "got more than" in str(info.value)
    assert dest.stat().st_size == SIZE


def test_body_without_length_completes(
    server: ArtifactServer, fetcher: UrlFetcher, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/a", data, fault=Fault(omit_length=True))
    dest = tmp_path / "a.part"
    fetch(fetcher, url, dest, SIZE)
    assert dest.read_bytes() == data


def test_size_cap_refuses_before_any_request(
    server: ArtifactServer, fetcher: UrlFetcher, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/a", data)
    with pytest.raises(ArtifactTooLarge) as info:
        fetch(fetcher, url, tmp_path / "a.part", SIZE, max_bytes=SIZE - 1)
    assert (info.value.size, info.value.limit) == (SIZE, SIZE - 1)
    assert server.requests == []


def test_size_cap_refuses_a_huge_content_length_without_reading(
    server: ArtifactServer, fetcher: UrlFetcher, tmp_path: Path
) -> None:
    url = server.add_generated("/huge", 64 * 1024 * 1024)
    dest = tmp_path / "a.part"
    with pytest.raises(ArtifactTooLarge) as info:
        fetch(fetcher, url, dest, 1000, max_bytes=100_000)
    assert info.value.size == 64 * 1024 * 1024
    assert dest.stat().st_size == 0
    server.stop()
    [request] = server.requests
    assert not request.complete


def test_unannounced_huge_body_is_not_read_to_the_end(
    server: ArtifactServer, fetcher: UrlFetcher, tmp_path: Path
) -> None:
    total = 64 * 1024 * 1024
    url = server.add_generated("/huge", total, fault=Fault(omit_length=True))
    dest = tmp_path / "a.part"
    with pytest.raises(SizeMismatch):
        fetch(fetcher, url, dest, 100_000, max_bytes=200_000)
    assert dest.stat().st_size == 100_000
    server.stop()
    [request] = server.requests
    assert not request.complete
    assert request.bytes_sent < total


def test_404_is_not_retried(
    server: ArtifactServer, fetcher: UrlFetcher, tmp_path: Path, sleeps: list[float]
) -> None:
    url = server.url("/missing")
    with pytest.raises(FetchError) as info:
        fetch(fetcher, url, tmp_path / "a.part", SIZE)
    assert info.value.status == 404
    assert not info.value.retryable
    assert str(info.value) == f"{url}: HTTP 404 Not Found"
    assert len(server.requests) == 1
    assert sleeps == []


def test_500_is_retried_with_capped_exponential_backoff(
    server: ArtifactServer, data: bytes, tmp_path: Path
) -> None:
    sleeps: list[float] = []
    fetcher = UrlFetcher(
        retry=RetryPolicy(attempts=5, backoff_s=0.5, max_backoff_s=1.5, jitter=0.0),
        sleep=sleeps.append,
    )
    url = server.add("/a", data, fault=Fault(status=500))
    with pytest.raises(FetchError) as info:
        fetch(fetcher, url, tmp_path / "a.part", SIZE)
    assert info.value.status == 500
    assert info.value.attempts == 5
    assert "HTTP 500" in str(info.value)
    assert "after 5 attempts" in str(info.value)
    assert sleeps == [0.5, 1.0, 1.5, 1.5]
    assert len(server.requests) == 5


def test_500_then_success(
    server: ArtifactServer, fetcher: UrlFetcher, data: bytes, tmp_path: Path, sleeps: list[float]
) -> None:
    url = server.add("/a", data)
    server.push_faults("/a", Fault(status=503), Fault(status=500))
    dest = tmp_path / "a.part"
    fetch(fetcher, url, dest, SIZE)
    assert dest.read_bytes() == data
    assert len(sleeps) == 2
    assert 0.25 <= sleeps[0] <= 0.5 and 0.5 <= sleeps[1] <= 1.0  # jitter takes up to half off


def test_stalled_body_times_out(server: ArtifactServer, data: bytes, tmp_path: Path) -> None:
    fetcher = UrlFetcher(retry=RetryPolicy(attempts=2, backoff_s=0.0), sleep=lambda _: None)
    url = server.add("/a", data, fault=Fault(stall_after=0))
    server.push_faults("/a", Fault(stall_after=20_000))
    dest = tmp_path / "a.part"
    started = time.monotonic()
    with pytest.raises(FetchError) as info:
        fetch(fetcher, url, dest, SIZE, timeout=0.3)
    assert time.monotonic() - started < 5
    assert info.value.retryable
    assert "timed out after 0.3 s" in str(info.value)
    assert info.value.attempts == 3  # the first made progress, then two without
    assert dest.read_bytes() == data[:20_000]  # kept for a later resume


def test_stall_then_resume(
    server: ArtifactServer, fetcher: UrlFetcher, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/a", data)
    server.push_faults("/a", Fault(stall_after=20_000))
    dest = tmp_path / "a.part"
    fetch(fetcher, url, dest, SIZE, timeout=0.3)
    assert dest.read_bytes() == data
    assert server.requests_for("/a")[1].headers["Range"] == "bytes=20000-"


def test_slow_body_within_timeout_completes(
    server: ArtifactServer, fetcher: UrlFetcher, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/a", data, fault=Fault(chunk_delay_s=0.01, chunk_size=32 * 1024))
    dest = tmp_path / "a.part"
    fetch(fetcher, url, dest, SIZE, timeout=1.0)
    assert dest.read_bytes() == data


def test_connection_refused(fetcher: UrlFetcher, tmp_path: Path, sleeps: list[float]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/a"
    with pytest.raises(FetchError) as info:
        fetch(fetcher, url, tmp_path / "a.part", SIZE)
    assert info.value.retryable
    assert info.value.attempts == 3
    assert "refused" in str(info.value).lower()
    assert url in str(info.value)


def test_bearer_token_sent_under_its_prefix_only(
    server: ArtifactServer, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/artifacts/a", data, token="s3cret")
    server.add("/artifacts-elsewhere/a", data)
    fetcher = UrlFetcher(bearer_tokens={server.url("/artifacts/"): "s3cret"})
    fetch(fetcher, url, tmp_path / "a.part", SIZE)
    assert (tmp_path / "a.part").read_bytes() == data
    fetch(fetcher, server.url("/artifacts-elsewhere/a"), tmp_path / "b.part", SIZE)
    first, second = server.requests
    assert first.headers["Authorization"] == "Bearer s3cret"
    assert "Authorization" not in second.headers


def test_missing_token_is_401_and_not_retried(
    server: ArtifactServer, fetcher: UrlFetcher, data: bytes, tmp_path: Path
) -> None:
    url = server.add("/a", data, token="s3cret")
    with pytest.raises(FetchError) as info:
        fetch(fetcher, url, tmp_path / "a.part", SIZE)
    assert info.value.status == 401
    assert len(server.requests) == 1


def test_redirect_followed_without_the_token(
    server: ArtifactServer, data: bytes, tmp_path: Path
) -> None:
    server.add("/store/a", data, fault=Fault(redirect="/cdn/a"))
    server.add("/cdn/a", data)
    fetcher = UrlFetcher(bearer_tokens={server.base_url: "s3cret"})
    dest = tmp_path / "a.part"
    fetch(fetcher, server.url("/store/a"), dest, SIZE)
    assert dest.read_bytes() == data
    [store] = server.requests_for("/store/a")
    [cdn] = server.requests_for("/cdn/a")
    assert store.headers["Authorization"] == "Bearer s3cret"
    assert "Authorization" not in cdn.headers


@pytest.mark.parametrize("target", ["file", "ftp"])
def test_redirect_away_from_http_is_refused(
    server: ArtifactServer, fetcher: UrlFetcher, data: bytes, tmp_path: Path, target: str
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(data)
    location = secret.as_uri() if target == "file" else "ftp://127.0.0.1/secret"
    server.add("/a", data, fault=Fault(redirect=location))
    with pytest.raises(FetchError) as info:
        fetch(fetcher, server.url("/a"), tmp_path / "a.part", SIZE)
    assert info.value.status == 302
    assert not info.value.retryable
    assert location in str(info.value)


def test_file_url(fetcher: UrlFetcher, data: bytes, tmp_path: Path) -> None:
    source = tmp_path / "dir with space" / "model.onnx"
    source.parent.mkdir()
    source.write_bytes(data)
    dest = tmp_path / "a.part"
    dest.write_bytes(data[:777])
    fetch(fetcher, source.as_uri(), dest, SIZE, offset=777)
    assert dest.read_bytes() == data


def test_file_url_errors(fetcher: UrlFetcher, data: bytes, tmp_path: Path) -> None:
    source = tmp_path / "model.onnx"
    source.write_bytes(data)
    with pytest.raises(SizeMismatch):
        fetch(fetcher, source.as_uri(), tmp_path / "a.part", SIZE + 1)
    with pytest.raises(ArtifactTooLarge):
        fetch(fetcher, source.as_uri(), tmp_path / "a.part", 10, max_bytes=100)
    missing = (tmp_path / "missing").as_uri()
    with pytest.raises(FetchError) as info:
        fetch(fetcher, missing, tmp_path / "a.part", SIZE)
    assert not info.value.retryable
    assert missing in str(info.value)
    with pytest.raises(FetchError, match="remote host"):
        fetch(fetcher, "file://elsewhere/x", tmp_path / "a.part", SIZE)


def test_unsupported_scheme(fetcher: UrlFetcher, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="unsupported URL scheme 'ftp'"):
        fetch(fetcher, "ftp://example.invalid/a", tmp_path / "a.part", SIZE)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_enospc_is_storage_full(server: ArtifactServer, fetcher: UrlFetcher, data: bytes) -> None:
    url = server.add("/a", data)
    with pytest.raises(StorageFull) as info:
        fetch(fetcher, url, Path("/dev/full"), SIZE)
    assert info.value.path == "/dev/full"
    assert "no space left" in str(info.value)


def test_unwritable_destination_is_a_storage_error(
    fetcher: UrlFetcher, data: bytes, tmp_path: Path
) -> None:
    source = tmp_path / "model.onnx"
    source.write_bytes(data)
    with pytest.raises(StorageError) as info:
        fetch(fetcher, source.as_uri(), tmp_path / "no-such-dir" / "a.part", SIZE)
    assert not isinstance(info.value, StorageFull)


def test_retry_policy_delays() -> None:
    policy = RetryPolicy(attempts=3, backoff_s=1.0, max_backoff_s=5.0, jitter=0.5)
    for retry, ceiling in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 5.0), (100, 5.0)]:
        for _ in range(20):
            assert ceiling / 2 <= policy.delay(retry) <= ceiling
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)
