"""The hub's content-addressed artifact directory, and an HTTP server for it.

Layout: ``<root>/sha256/<hash>`` holds each file under its own sha256 (lowercase hex);
``<root>/tmp/`` holds files being added. A file is added by copying it into ``tmp`` while
hashing it, ``fsync``, then ``os.replace`` onto its final name and ``fsync`` of the
directory, so a crash never leaves a half-written file under a hash name.

``ArtifactServer`` serves ``GET``/``HEAD /artifacts/<sha256>`` with single-range requests,
the hash as a strong ETag, ``If-None-Match``, ``If-Range`` and an optional bearer token. It
streams each file in fixed-size chunks.

The hash, carried in the signed desired state, is what a device trusts — not the server. So
a desired state may also name an external base URL (``artifact_base_urls``), and any static
HTTP server, S3 bucket or CDN that serves these files by hash works: publish the
``<root>/sha256/`` directory as is and give its URL as the base (the agent fetches
``<base>/<sha256>`` and verifies hash and size before using the file).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.server
import io
import json
import logging
import os
import re
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

from hub.errors import ArtifactNotFound, InvalidSha256

log = logging.getLogger(__name__)

CHUNK_SIZE = 64 * 1024  # a send must finish within idle_s: 64 KiB in 60 s is ~1 KiB/s
URL_PREFIX = "/artifacts/"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def check_sha256(value: str) -> str:
    """Return ``value`` if it is 64 lowercase hex digits, else raise InvalidSha256."""
    if not _SHA256.match(value):
        raise InvalidSha256(value)
    return value


class StoredArtifact(NamedTuple):
    """A file in the store: its hash, size in bytes, and where it lies."""

    sha256: str
    size: int
    path: Path


class ArtifactStore:
    """Files under ``root`` named by their sha256. Safe for several threads and processes."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._files = self.root / "sha256"
        self._tmp = self.root / "tmp"
        self._files.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)

    @property
    def files_dir(self) -> Path:
        """The directory of files named by hash (what a static server would publish)."""
        return self._files

    def add_file(self, path: Path | str) -> StoredArtifact:
        """Copy ``path`` into the store under its sha256; return (sha256, size, stored path).

        Idempotent: adding the same content again leaves the stored file as it is. Raises
        OSError when ``path`` cannot be read or the store cannot be written.
        """
        with open(path, "rb") as source:
            fd, tmp_name = tempfile.mkstemp(prefix="add-", suffix=".part", dir=self._tmp)
            tmp = Path(tmp_name)
            try:
                return self._add(source, fd, tmp)
            finally:
                tmp.unlink(missing_ok=True)

    def _add(self, source: io.BufferedReader, fd: int, tmp: Path) -> StoredArtifact:
        digest = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(CHUNK_SIZE):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        sha256 = digest.hexdigest()
        final = self._files / sha256
        if not _has_size(final, size):
            os.replace(tmp, final)
            _fsync_dir(self._files)
        return StoredArtifact(sha256, size, final)

    def path(self, sha256: str) -> Path:
        """Where the artifact lies. Raises InvalidSha256, or ArtifactNotFound if absent."""
        final = self._files / check_sha256(sha256)
        if not final.is_file():
            raise ArtifactNotFound(sha256)
        return final

    def exists(self, sha256: str) -> bool:
        """Whether the artifact is stored. Raises InvalidSha256 for a malformed hash."""
        return (self._files / check_sha256(sha256)).is_file()

    def open(self, sha256: str) -> io.BufferedReader:
        """Open the artifact for reading. Raises InvalidSha256, or ArtifactNotFound."""
        try:
            return open(self._files / check_sha256(sha256), "rb")
        except (FileNotFoundError, IsADirectoryError):
            raise ArtifactNotFound(sha256) from None

    def __iter__(self) -> Iterator[str]:
        """The hashes of the stored files, in no particular order."""
        for entry in os.scandir(self._files):
            if _SHA256.match(entry.name) and entry.is_file():
                yield entry.name


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except FileNotFoundError:
        return False


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- HTTP ------------------------------------------------------------------------------------


class _Server(http.server.ThreadingHTTPServer):
    """Joins its handler threads on close, and can cut idle keep-alive connections."""

    daemon_threads = False
    block_on_close = True

    def __init__(
        self, address: tuple[str, int], store: ArtifactStore, token: str | None, idle_s: float
    ) -> None:
        self.store = store
        self.token = token.encode() if token is not None else None
        self.idle_s = idle_s
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def cut_connections(self) -> None:
        """Shut every open connection down, so that its handler thread returns."""
        with self._open_lock:
            connections = list(self._open)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else ~40 ms per keep-alive response (Nagle + delayed ACK)
    server_version = "edgefleet-artifacts"
    sys_version = ""
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.idle_s)  # idle keep-alive connections end

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _refuse_method(self) -> None:
        self.close_connection = True  # a request body may follow; do not parse it as a request
        self._send_error(405, "only GET and HEAD", {"Allow": "GET, HEAD"})

    def do_POST(self) -> None:
        self._refuse_method()

    def do_PUT(self) -> None:
        self._refuse_method()

    def do_DELETE(self) -> None:
        self._refuse_method()

    def do_PATCH(self) -> None:
        self._refuse_method()

    # --- request handling ---

    def _serve(self, *, body: bool) -> None:
        if not self._authorized():
            return
        path = urlsplit(self.path).path
        if not path.startswith(URL_PREFIX):
            self._send_error(404, "not found")
            return
        sha256 = unquote(path[len(URL_PREFIX) :])
        if not _SHA256.match(sha256):
            self._send_error(400, "expected /artifacts/<sha256> (64 lowercase hex digits)")
            return
        try:
            file = self.server.store.open(sha256)
        except ArtifactNotFound:
            self._send_error(404, f"no artifact {sha256}")
            return
        with file:
            size = os.fstat(file.fileno()).st_size
            etag = f'"{sha256}"'
            common = {
                "ETag": etag,
                "Accept-Ranges": "bytes",
                "Cache-Control": "max-age=31536000, immutable",
            }
            if _etag_matches(self.headers.get("If-None-Match"), sha256):
                self._send_head(304, common)
                return
            span = self._requested_range(size, sha256) if body else None
            if isinstance(span, str):  # unsatisfiable
                self._send_error(416, "range not satisfiable", {"Content-Range": f"bytes */{size}"})
                return
            if span is None:
                first, last = 0, size - 1
                self._send_head(200, {**common, "Content-Length": str(size)}, octets=True)
            else:
                first, last = span
                headers = {
                    **common,
                    "Content-Length": str(last - first + 1),
                    "Content-Range": f"bytes {first}-{last}/{size}",
                }
                self._send_head(206, headers, octets=True)
            if body:
                self._stream(file, first, last - first + 1)

    def _authorized(self) -> bool:
        expected = self.server.token
        if expected is None:
            return True
        scheme, _, given = (self.headers.get("Authorization") or "").strip().partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected):
            return True
        challenge = 'Bearer realm="edgefleet-artifacts"'
        if scheme:
            challenge += ', error="invalid_token"'
        self._send_error(401, "a valid bearer token is required", {"WWW-Authenticate": challenge})
        return False

    def _requested_range(self, size: int, sha256: str) -> tuple[int, int] | str | None:
        """(first, last) to serve, "unsatisfiable", or None to serve the whole file.

        Multiple ranges, other units and malformed values are ignored (the whole file is
        served), as RFC 9110 allows. An ``If-Range`` that is not our strong ETag (a date
        included: no Last-Modified is given) also means the whole file.
        """
        header = self.headers.get("Range")
        if header is None:
            return None
        if_range = self.headers.get("If-Range")
        if if_range is not None and if_range.strip() != f'"{sha256}"':
            return None
        match = _RANGE.match(header.strip().replace(" ", ""))
        if match is None or (not match.group(1) and not match.group(2)):
            return None
        start, end = match.group(1), match.group(2)
        if not start:  # bytes=-n: the last n bytes
            suffix = int(end)
            if suffix == 0 or size == 0:
                return "unsatisfiable"
            return max(0, size - suffix), size - 1
        first = int(start)
        last = int(end) if end else size - 1
        if end and last < first:
            return None
        if first >= size:
            return "unsatisfiable"
        return first, min(last, size - 1)

    # --- responses ---

    def _send_head(self, status: int, headers: dict[str, str], *, octets: bool = False) -> None:
        self.send_response(status)
        if octets:
            self.send_header("Content-Type", "application/octet-stream")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _send_error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        payload = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _stream(self, file: io.BufferedReader, offset: int, count: int) -> None:
        file.seek(offset)
        buffer = bytearray(min(CHUNK_SIZE, max(count, 1)))
        view = memoryview(buffer)
        try:
            while count > 0:
                n = file.readinto(view[: min(count, len(buffer))])
                if not n:  # the file shrank under us; the client sees a short body
                    self.close_connection = True
                    return
                self.wfile.write(view[:n])
                count -= n
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


def _etag_matches(header: str | None, sha256: str) -> bool:
    """Weak comparison of an If-None-Match list with our ETag (``*`` matches)."""
    if header is None:
        return False
    tags = [tag.strip() for tag in header.split(",")]
    return any(tag == "*" or tag.removeprefix("W/") == f'"{sha256}"' for tag in tags)


class ArtifactServer:
    """Serves an ArtifactStore over HTTP/1.1 at ``/artifacts/<sha256>``.

    ``bind`` is (host, port); port 0 picks a free one. With a ``token``, every request must
    carry ``Authorization: Bearer <token>``. ``idle_s`` closes keep-alive connections idle
    that long. Use ``start()``/``stop()`` or ``with``.
    """

    def __init__(
        self,
        store: ArtifactStore,
        *,
        bind: tuple[str, int],
        token: str | None,
        idle_s: float = 60.0,
    ) -> None:
        if token is not None and not token:
            raise ValueError("token must be None (no auth) or a non-empty string")
        self._httpd = _Server(bind, store, token, idle_s)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the server listens on."""
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def base_url(self) -> str:
        """``http://host:port/artifacts``: the base URL agents append ``/<sha256>`` to."""
        host, port = self.address
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}/artifacts"

    def start(self) -> None:
        """Serve in a background thread."""
        if self._thread is not None:
            raise RuntimeError("the artifact server is already started")
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="artifact-server", kwargs={"poll_interval": 0.05}
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, cut open connections, join every thread, close the socket."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.cut_connections()
        self._httpd.server_close()

    def __enter__(self) -> ArtifactServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
