"""hub.artifacts: the content-addressed directory and its HTTP server (real sockets)."""

from __future__ import annotations

import hashlib
import http.client
import os
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hub.artifacts import ArtifactServer, ArtifactStore
from hub.errors import ArtifactNotFound, InvalidSha256

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DATA = bytes(range(256)) * 4  # 1024 bytes, every offset distinguishable mod 256
MISSING = "0" * 64


# --- store -----------------------------------------------------------------------------------


def test_add_file_stores_under_its_hash(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    src = tmp_path / "model.onnx"
    src.write_bytes(DATA)

    sha256, size, stored = store.add_file(src)

    assert sha256 == hashlib.sha256(DATA).hexdigest()
    assert size == len(DATA)
    assert stored == tmp_path / "store" / "sha256" / sha256
    assert stored.read_bytes() == DATA
    assert store.path(sha256) == stored
    assert store.exists(sha256)
    assert list(store) == [sha256]
    with store.open(sha256) as f:
        assert f.read() == DATA
    assert list((tmp_path / "store" / "tmp").iterdir()) == []


def test_add_file_is_idempotent(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    src = tmp_path / "a.bin"
    src.write_bytes(DATA)
    first = store.add_file(src)
    inode = first.path.stat().st_ino

    again = store.add_file(src)
    copy = tmp_path / "b.bin"
    copy.write_bytes(DATA)
    same_content = store.add_file(copy)

    assert again == first == same_content
    assert first.path.stat().st_ino == inode  # left as it was, not rewritten
    assert list(store) == [first.sha256]
    assert list((tmp_path / "store" / "tmp").iterdir()) == []


def test_add_file_replaces_a_damaged_copy(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    src = tmp_path / "a.bin"
    src.write_bytes(DATA)
    stored = store.add_file(src)
    stored.path.write_bytes(DATA[:10])  # truncated by some accident
    assert store.add_file(src).path.read_bytes() == DATA


def test_store_refuses_malformed_and_unknown_hashes(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    for bad in ["abc", "A" * 64, "../" + "0" * 61, "g" * 64]:
        with pytest.raises(InvalidSha256):
            store.exists(bad)
        with pytest.raises(InvalidSha256):
            store.path(bad)
    assert not store.exists(MISSING)
    with pytest.raises(ArtifactNotFound, match=MISSING):
        store.path(MISSING)
    with pytest.raises(ArtifactNotFound):
        store.open(MISSING)


def test_add_missing_file_raises_and_leaves_nothing(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(FileNotFoundError):
        store.add_file(tmp_path / "nope")
    assert list((tmp_path / "store" / "tmp").iterdir()) == []


# --- HTTP ------------------------------------------------------------------------------------


@dataclass
class Served:
    server: ArtifactServer
    sha256: str
    port: int

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def request(
        self,
        method: str,
        path: str | None = None,
        headers: dict[str, str] | None = None,
        *,
        auth: bool = True,
    ) -> tuple[http.client.HTTPResponse, bytes]:
        conn = self.connect()
        try:
            all_headers = {**(AUTH if auth else {}), **(headers or {})}
            conn.request(method, path or f"/artifacts/{self.sha256}", headers=all_headers)
            response = conn.getresponse()
            return response, response.read()
        finally:
            conn.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    store = ArtifactStore(tmp_path / "store")
    src = tmp_path / "artifact.bin"
    src.write_bytes(DATA)
    sha256 = store.add_file(src).sha256
    with ArtifactServer(store, bind=("127.0.0.1", 0), token=TOKEN) as server:
        yield Served(server, sha256, server.address[1])


def test_full_get(served: Served) -> None:
    response, body = served.request("GET")
    assert response.status == 200
    assert body == DATA
    assert response.getheader("Content-Length") == str(len(DATA))
    assert response.getheader("ETag") == f'"{served.sha256}"'
    assert response.getheader("Accept-Ranges") == "bytes"
    assert response.getheader("Content-Type") == "application/octet-stream"
    assert served.server.base_url == f"http://127.0.0.1:{served.port}/artifacts"


def test_head(served: Served) -> None:
    response, body = served.request("HEAD", headers={"Range": "bytes=0-9"})
    assert response.status == 200  # Range is defined for GET only
    assert body == b""
    assert response.getheader("Content-Length") == str(len(DATA))
    assert response.getheader("ETag") == f'"{served.sha256}"'


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [
        ("bytes=10-19", 10, 19),
        ("bytes=1000-", 1000, 1023),
        ("bytes=-24", 1000, 1023),
        ("bytes=0-0", 0, 0),
        ("bytes=1020-5000", 1020, 1023),  # the end is clamped to the file
        ("bytes=-5000", 0, 1023),  # a suffix longer than the file is the whole file
    ],
)
def test_range(served: Served, header: str, first: int, last: int) -> None:
    response, body = served.request("GET", headers={"Range": header})
    assert response.status == 206
    assert body == DATA[first : last + 1]
    assert response.getheader("Content-Range") == f"bytes {first}-{last}/{len(DATA)}"
    assert response.getheader("Content-Length") == str(last - first + 1)
    assert response.getheader("ETag") == f'"{served.sha256}"'


@pytest.mark.parametrize("header", ["bytes=1024-", "bytes=5000-6000", "bytes=-0"])
def test_unsatisfiable_range(served: Served, header: str) -> None:
    response, _ = served.request("GET", headers={"Range": header})
    assert response.status == 416
    assert response.getheader("Content-Range") == f"bytes */{len(DATA)}"


@pytest.mark.parametrize("header", ["bytes=0-1,5-6", "bytes=9-2", "items=0-1", "bytes=x-y"])
def test_unsupported_or_invalid_range_serves_whole_file(served: Served, header: str) -> None:
    response, body = served.request("GET", headers={"Range": header})
    assert response.status == 200
    assert body == DATA


def test_if_none_match(served: Served) -> None:
    etag = f'"{served.sha256}"'
    for header in [etag, f"W/{etag}", f'"other", {etag}', "*"]:
        response, body = served.request("GET", headers={"If-None-Match": header})
        assert response.status == 304, header
        assert body == b""
        assert response.getheader("ETag") == etag
    response, body = served.request("GET", headers={"If-None-Match": '"other"'})
    assert response.status == 200
    assert body == DATA


def test_if_range(served: Served) -> None:
    etag = f'"{served.sha256}"'
    response, body = served.request("GET", headers={"Range": "bytes=4-7", "If-Range": etag})
    assert response.status == 206
    assert body == DATA[4:8]
    for stale in ['"0000"', f"W/{etag}", "Wed, 21 Oct 2015 07:28:00 GMT"]:
        response, body = served.request("GET", headers={"Range": "bytes=4-7", "If-Range": stale})
        assert response.status == 200, stale
        assert body == DATA


@pytest.mark.parametrize(
    ("authorization", "invalid"),
    [
        (None, False),
        ("Bearer wrong", True),
        (f"Bearer {TOKEN}x", True),
        (f"Basic {TOKEN}", True),
        ("Bearer", True),
    ],
)
def test_token_required(served: Served, authorization: str | None, invalid: bool) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    for method in ["GET", "HEAD"]:
        response, body = served.request(method, headers=headers, auth=False)
        assert response.status == 401
        challenge = response.getheader("WWW-Authenticate") or ""
        assert challenge.startswith("Bearer ")
        assert ('error="invalid_token"' in challenge) == invalid
        assert DATA not in body


def test_token_scheme_is_case_insensitive(served: Served) -> None:
    response, body = served.request("GET", headers={"Authorization": f"bearer {TOKEN}"})
    assert response.status == 200
    assert body == DATA


def test_auth_is_checked_before_the_path(served: Served) -> None:
    response, _ = served.request("GET", f"/artifacts/{MISSING}", auth=False)
    assert response.status == 401


def test_unknown_hash_is_404(served: Served) -> None:
    response, _ = served.request("GET", f"/artifacts/{MISSING}")
    assert response.status == 404
    response, body = served.request("HEAD", f"/artifacts/{MISSING}")
    assert response.status == 404
    assert body == b""


@pytest.mark.parametrize(
    "path",
    ["/artifacts/abc", "/artifacts/" + "A" * 64, "/artifacts/%2e%2e%2fsecret", "/artifacts/"],
)
def test_malformed_hash_is_400(served: Served, path: str) -> None:
    response, _ = served.request("GET", path)
    assert response.status == 400


def test_other_paths_are_404(served: Served) -> None:
    response, _ = served.request("GET", f"/sha256/{served.sha256}")
    assert response.status == 404


def test_other_methods_are_405(served: Served) -> None:
    response, _ = served.request("POST", f"/artifacts/{served.sha256}")
    assert response.status == 405
    assert response.getheader("Allow") == "GET, HEAD"


def test_keep_alive_serves_several_requests_on_one_connection(served: Served) -> None:
    conn = served.connect()
    try:
        for header in ["bytes=0-9", "bytes=10-19", None]:
            conn.request(
                "GET",
                f"/artifacts/{served.sha256}",
                headers={**AUTH, **({"Range": header} if header else {})},
            )
            if header == "bytes=0-9":
                sock = conn.sock
            response = conn.getresponse()
            response.read()
            assert response.status in (200, 206)
            assert conn.sock is sock  # not reconnected
    finally:
        conn.close()


def test_stop_cuts_idle_keep_alive_connections(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    src = tmp_path / "x"
    src.write_bytes(DATA)
    sha256 = store.add_file(src).sha256
    server = ArtifactServer(store, bind=("127.0.0.1", 0), token=None)
    server.start()
    conn = http.client.HTTPConnection("127.0.0.1", server.address[1], timeout=10)
    conn.request("GET", f"/artifacts/{sha256}")  # no token configured: no auth needed
    response = conn.getresponse()
    assert response.read() == DATA
    server.stop()  # must not wait for the client's idle connection (the thread check follows)
    conn.close()


def test_large_file_is_streamed(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    src = tmp_path / "big.bin"
    size = 20 * 1024 * 1024
    with open(src, "wb") as f:
        for i in range(size // (1024 * 1024)):
            f.write(os.urandom(1024 * 1023) + bytes([i]) * 1024)
    expected = hashlib.sha256(src.read_bytes()).hexdigest()
    sha256 = store.add_file(src).sha256
    assert sha256 == expected

    with ArtifactServer(store, bind=("127.0.0.1", 0), token=TOKEN) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.address[1], timeout=30)
        try:
            tracemalloc.start()
            conn.request("GET", f"/artifacts/{sha256}", headers=AUTH)
            response = conn.getresponse()
            assert response.status == 200
            assert response.getheader("Content-Length") == str(size)
            digest = hashlib.sha256()
            received = 0
            while chunk := response.read(64 * 1024):
                digest.update(chunk)
                received += len(chunk)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            assert received == size
            assert digest.hexdigest() == sha256
            # Server and client share this process: if either held the file whole, the peak
            # of Python allocations would exceed 20 MiB. Streaming keeps it near the chunks.
            assert peak < 4 * 1024 * 1024, peak

            middle = size // 2
            conn.request(
                "GET", f"/artifacts/{sha256}", headers={**AUTH, "Range": f"bytes={middle}-"}
            )
            response = conn.getresponse()
            assert response.status == 206
            tail = response.read()
            with open(src, "rb") as f:
                f.seek(middle)
                assert tail == f.read()
        finally:
            if tracemalloc.is_tracing():
                tracemalloc.stop()
            conn.close()


def test_empty_token_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="token"):
        ArtifactServer(ArtifactStore(tmp_path), bind=("127.0.0.1", 0), token="")
