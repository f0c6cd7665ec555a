"""A real HTTP server on 127.0.0.1 for tests: serves files with Range support and injects faults.

    with ArtifactServer() as server:
        url = server.add("/m.onnx", Path("model.onnx"))             # or bytes
        server.push_faults("/m.onnx", Fault(cut_after=1000))       # the next request only
        server.add("/bad", data, fault=Fault(ignore_range=True))    # every request
        ...
        server.requests_for("/m.onnx")[1].headers["Range"]

Faults: an error status, a redirect, a body cut after N bytes (the connection closed, the
headers having announced the whole), a stall after N bytes, a slow body, a lying or missing
Content-Length, other or extra bytes, Range ignored. A stall or delay ends early when the
server stops, and ``stop`` joins every thread it started, so leak checks pass.
"""

from __future__ import annotations

import re
import socket
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass(frozen=True)
class Fault:
    """How to answer one request; the defaults answer correctly."""

    status: int | None = None
    """Answer this status (e.g. 404, 500) with a short text body instead of the file."""
    redirect: str | None = None
    """Answer 302 with this Location (a path on this server or an absolute URL)."""
    ignore_range: bool = False
    """Answer 200 with the whole body even when a Range was asked."""
    cut_after: int | None = None
    """Close the connection after this many body bytes (the headers announce them all)."""
    stall_after: int | None = None
    """Send this many body bytes, then stall ``stall_s`` seconds (or until the server stops)."""
    stall_s: float = 30.0
    chunk_delay_s: float = 0.0
    """Pause between chunks of ``chunk_size`` bytes: a slow body."""
    chunk_size: int = 16 * 1024
    content_length: int | None = None
    """Announce this Content-Length instead of the true one."""
    omit_length: bool = False
    """Send no Content-Length: the body ends when the connection closes."""
    body: bytes | None = None
    """Serve these bytes instead of the file's."""
    extra: bytes = b""
    """Append these bytes to the file's."""


@dataclass
class RecordedRequest:
    """One request as the server saw it, recorded when it arrives.

    ``status``, ``bytes_sent`` and ``complete`` are filled in as the answer goes out; read them
    after ``stop()``, which waits for every answer to end.
    """

    method: str
    path: str
    headers: dict[str, str]
    status: int | None = None
    bytes_sent: int = 0
    complete: bool = False


class _Content:
    """Bytes in memory, a file on disk, or a generated pattern; plus extra bytes at the end."""

    def __init__(self, source: bytes | Path | int, extra: bytes = b"") -> None:
        self._source = source
        self._extra = extra
        if isinstance(source, bytes):
            base = len(source)
        elif isinstance(source, Path):
            base = source.stat().st_size
        else:
            base = source
        self._base = base
        self.size = base + len(extra)

    def read(self, offset: int, n: int) -> bytes:
        out = b""
        if offset < self._base:
            take = min(n, self._base - offset)
            if isinstance(self._source, bytes):
                out = self._source[offset : offset + take]
            elif isinstance(self._source, Path):
                with self._source.open("rb") as handle:
                    handle.seek(offset)
                    out = handle.read(take)
            else:
                out = bytes((offset + i) % 251 for i in range(take))
        if len(out) < n and offset + len(out) >= self._base:
            start = offset + len(out) - self._base
            out += self._extra[start : start + n - len(out)]
        return out


@dataclass
class _Route:
    source: bytes | Path | int
    token: str | None
    default: Fault
    queue: deque[Fault] = field(default_factory=deque)


class _Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True  # server_close() joins the handler threads
    app: ArtifactServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients hanging up mid-body is what the tests provoke; keep stderr quiet."""


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"  # one request per connection; the close ends a body
    disable_nagle_algorithm = True
    timeout = 10

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def do_GET(self) -> None:
        self.server.app._serve(self)


class ArtifactServer:
    """A ThreadingHTTPServer in a background thread, on a free loopback port."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._host = host
        self._routes: dict[str, _Route] = {}
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> ArtifactServer:
        httpd = _Server((self._host, 0), _Handler)
        httpd.app = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="artifact-server"
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, end stalls, close the socket and join every thread."""
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()
        self._httpd = None
        self._thread = None

    def __enter__(self) -> ArtifactServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- configuration -------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def add(
        self,
        path: str,
        source: bytes | Path,
        *,
        token: str | None = None,
        fault: Fault | None = None,
    ) -> str:
        """Serve ``source`` at ``path`` (bytes, or a file streamed from disk); returns its URL.

        ``token``: answer 401 unless ``Authorization: Bearer <token>`` is sent. ``fault``:
        applied to every request that has no queued fault.
        """
        with self._lock:
            self._routes[path] = _Route(source, token, fault or Fault())
        return self.url(path)

    def add_generated(self, path: str, size: int, *, fault: Fault | None = None) -> str:
        """Serve ``size`` generated bytes (a pattern made on the fly, never held in memory)."""
        with self._lock:
            self._routes[path] = _Route(size, None, fault or Fault())
        return self.url(path)

    def push_faults(self, path: str, *faults: Fault) -> None:
        """The next requests to ``path`` get these faults, one each, in order."""
        with self._lock:
            self._routes[path].queue.extend(faults)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def requests_for(self, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == path]

    # --- serving -------------------------------------------------------------------------

    def _serve(self, handler: _Handler) -> None:
        path = handler.path.split("?", 1)[0]
        headers = {k: v for k, v in handler.headers.items()}
        record = RecordedRequest("GET", path, headers)
        with self._lock:
            self._requests.append(record)
            route = self._routes.get(path)
            fault = None
            if route is not None:
                fault = route.queue.popleft() if route.queue else route.default
        sent = 0
        complete = False
        status = 404
        try:
            if route is None or fault is None:
                self._send_text(handler, 404, "not found")
                complete = True
                return
            if route.token is not None and headers.get("Authorization") != f"Bearer {route.token}":
                status = 401
                self._send_text(handler, status, "unauthorized")
                complete = True
                return
            if fault.status is not None:
                status = fault.status
                self._send_text(handler, status, f"injected status {status}")
                complete = True
                return
            if fault.redirect is not None:
                status = 302
                location = fault.redirect
                if location.startswith("/"):
                    location = self.url(location)
                handler.send_response(302)
                handler.send_header("Location", location)
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                complete = True
                return
            content = _Content(fault.body if fault.body is not None else route.source, fault.extra)
            start, end = 0, content.size
            status = 200
            match = _RANGE.match(headers.get("Range", ""))
            if match and not fault.ignore_range:
                first = int(match.group(1))
                last = int(match.group(2)) + 1 if match.group(2) else content.size
                if first >= content.size:
                    status = 416
                    handler.send_response(416)
                    handler.send_header("Content-Range", f"bytes */{content.size}")
                    handler.send_header("Content-Length", "0")
                    handler.end_headers()
                    complete = True
                    return
                start, end, status = first, min(last, content.size), 206
            handler.send_response(status)
            handler.send_header("Content-Type", "application/octet-stream")
            handler.send_header("Accept-Ranges", "bytes")
            if status == 206:
                handler.send_header("Content-Range", f"bytes {start}-{end - 1}/{content.size}")
            if not fault.omit_length:
                length = fault.content_length if fault.content_length is not None else end - start
                handler.send_header("Content-Length", str(length))
            handler.end_headers()
            limit = end - start
            if fault.cut_after is not None:
                limit = min(limit, fault.cut_after)
            stalled = False
            while sent < limit:
                if fault.stall_after is not None and not stalled and sent >= fault.stall_after:
                    stalled = True
                    if self._stopping.wait(fault.stall_s):
                        return
                n = min(fault.chunk_size, limit - sent)
                if fault.stall_after is not None and not stalled:
                    n = min(n, fault.stall_after - sent)
                handler.wfile.write(content.read(start + sent, n))
                sent += n
                if fault.chunk_delay_s and self._stopping.wait(fault.chunk_delay_s):
                    return
            complete = sent == end - start
            if fault.cut_after is not None:
                # Hang up without a clean end: the client sees the body stop short.
                handler.close_connection = True
                handler.connection.shutdown(socket.SHUT_RDWR)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        finally:
            with self._lock:
                record.status, record.bytes_sent, record.complete = status, sent, complete

    @staticmethod
    def _send_text(handler: _Handler, status: int, text: str) -> None:
        body = text.encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "text/plain")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
