"""The local inference API over HTTP/1.1: the standard library's request handler, one thread
per connection up to a limit, keep-alive, Nagle off.

    server = InferenceServer(host, bind="127.0.0.1:8501", max_body_bytes=16 << 20,
                             readiness=..., repository=..., metrics=ApiMetrics())
    server.start()
    ...
    server.stop(timeout=10.0)   # stop accepting, finish in-flight requests, close

Why this shape, and not ThreadingHTTPServer or a framework: docs/decisions/0005. The
protocol's tensors and documents (JSON, binary) are :mod:`agent.api.oip`; this module
routes, reads bodies within the limit, maps errors to statuses and feeds
:class:`~agent.api.metrics.ApiMetrics`.

Connections beyond ``max_connections`` are answered 503 and closed by the accepting
thread, so a flood of clients cannot create threads. A connection idle for ``timeout_s``
(or stalled in the middle of a body) is closed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import selectors
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from importlib import metadata
from types import TracebackType
from typing import Any, ClassVar, cast
from urllib.parse import unquote

import numpy as np

from agent.api import oip
from agent.api.metrics import ApiMetrics
from agent.api.oip import Readiness, RepositoryEntry
from agent.errors import InferenceError, ModelNotFound, ModelUnavailable, Overloaded
from agent.host import ModelHost

logger = logging.getLogger(__name__)

DEFAULT_BIND = "127.0.0.1:8501"
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
SERVER_NAME = "edgefleet-agent"
EXTENSIONS = ("binary_tensor_data", "model_repository")

_MODEL_ROUTE = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(?:/(ready|infer))?/?$")
_CHUNK_SIZE = re.compile(rb"^[0-9A-Fa-f]{1,16}$")
_SMALL_WRITE = 64 * 1024
_MAX_LINE = 65536
_MAX_FIELDS = 100


def _agent_version() -> str:
    try:
        return metadata.version("edgefleet")
    except metadata.PackageNotFoundError:
        return "0+unknown"


# --- what the daemon plugs in ----------------------------------------------------------


def host_readiness(host: ModelHost) -> Callable[[], Readiness]:
    """Readiness read from the host alone: ready when it holds models and all serve."""

    def readiness() -> Readiness:
        table = host.table
        if not table:
            return Readiness(False, "no models are loaded")
        down = sorted(f"{name} ({slot.reason})" for name, slot in table.items() if slot.reason)
        if down:
            return Readiness(False, f"not serving: {', '.join(down)}")
        return Readiness(True)

    return readiness


def host_repository(host: ModelHost) -> list[RepositoryEntry]:
    """Index entries for the host's active table: READY, or UNAVAILABLE with the reason."""
    entries = []
    for name, slot in sorted(host.table.items()):
        if slot.state == "active":
            entries.append(RepositoryEntry(name, slot.version, "READY"))
        else:
            entries.append(RepositoryEntry(name, slot.version, "UNAVAILABLE", slot.reason or ""))
    return entries


def parse_bind(bind: str) -> tuple[socket.AddressFamily, str | tuple[str, int]]:
    """``host:port``, ``[v6]:port`` or ``unix:/path`` -> (family, socket address)."""
    if bind.startswith("unix:"):
        path = bind[len("unix:") :]
        if not path:
            raise ValueError("unix: bind needs a path")
        return socket.AF_UNIX, path
    host, sep, port_text = bind.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"bind {bind!r} is not host:port, [v6]:port or unix:/path")
    host = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, (host, int(port_text))


# --- transport -------------------------------------------------------------------------


class _BodyError(Exception):
    """The request body cannot be read as declared; the connection is closed after it."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(message)


class _Connection:
    """One accepted socket and whether it is between requests (and may be closed)."""

    __slots__ = ("address", "busy", "closing", "linger", "sock")

    def __init__(self, sock: socket.socket, address: Any) -> None:
        self.sock = sock
        self.address = address
        self.busy = False
        self.closing = False
        self.linger = False
        """A body was left unread: drain it before closing, so the client sees the answer."""


def _is_count(text: str) -> bool:
    """ASCII decimal digits of a 64-bit count ("²" is a digit to str.isdigit, not to int)."""
    return text.isascii() and text.isdigit() and len(text) <= 19


def _drain_and_close(sock: socket.socket, *, limit: int = 64 << 20, seconds: float = 2.0) -> None:
    """Close after an answer sent with the body unread: half-close, then read and drop what
    the client still sends (bounded), so it reads the answer rather than a reset."""
    deadline = time.monotonic() + seconds
    dropped = 0
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        while dropped < limit:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
            if not chunk:
                break
            dropped += len(chunk)


def _error_of(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, _BodyError | oip.ProtocolError):
        return exc.status, exc.message
    if isinstance(exc, ModelUnavailable | Overloaded):
        return exc.status, str(exc)
    if isinstance(exc, InferenceError):
        return exc.status, str(exc)
    logger.error("inference API: unexpected error", exc_info=exc)
    return 500, f"internal error: {type(exc).__name__}: {exc}"


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 handler of one connection; routes to the server's endpoints."""

    protocol_version = "HTTP/1.1"
    server_version = SERVER_NAME

    def __init__(self, conn: _Connection, app: InferenceServer) -> None:
        self.conn = conn
        self.app = app
        self.started = 0.0
        self.has_body = False
        self.body_read = False
        self.expect_continue = False
        self.fields: dict[str, str] = {}
        super().__init__(conn.sock, conn.address, cast(Any, app))

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("inference API: " + format, *args)

    def address_string(self) -> str:
        return str(self.client_address[0]) if isinstance(self.client_address, tuple) else "unix"

    # -- request loop --

    def handle_one_request(self) -> None:
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if self.raw_requestline in (b"\r\n", b"\n"):  # a stray line end: skip one
                self.raw_requestline = self.rfile.readline(65537)
        except OSError:  # idle timeout, or closed by stop()
            self.close_connection = True
            return
        if not self.raw_requestline or not self.app._begin(self.conn):
            self.close_connection = True
            return
        try:
            self.started = time.perf_counter()
            self.command = ""
            self.has_body = self.body_read = self.expect_continue = False
            if len(self.raw_requestline) > 65536:
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                return
            if not self.parse_request():
                return
            encoding = self.fields.get("transfer-encoding")
            length = self.fields.get("content-length")
            self.has_body = encoding is not None or (length is not None and length.strip() != "0")
            self._dispatch()
        finally:
            if self.app._end(self.conn):
                self.close_connection = True

    def parse_request(self) -> bool:
        """Parse the request line and header fields (a strict, small replacement for the
        standard library's email-based parser: about 2 us instead of 19 us a request).

        Field names are lower-cased into :attr:`fields`; repeated fields are joined with
        ", " (so two Content-Length fields are refused as not a number); obsolete line
        folding is refused. ``Expect: 100-continue`` is remembered and answered only when
        the body is wanted, so a refusal goes out without it.
        """
        self.command = ""
        self.request_version = self.default_request_version
        self.close_connection = True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if len(words) != 3 or not words[2].startswith("HTTP/"):
            self.send_error(400, f"bad request line {self.requestline[:80]!r}")
            return False
        command, path, version = words
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            self.send_error(505, f"{version} is not supported")
            return False
        fields: dict[str, str] = {}
        for _ in range(_MAX_FIELDS):
            line = self.rfile.readline(_MAX_LINE + 1)
            if len(line) > _MAX_LINE:
                self.send_error(431, "a header field is too long")
                return False
            if line in (b"\r\n", b"\n", b""):
                break
            name, colon, value = line.partition(b":")
            if not colon or not name or name[:1] in b" \t" or name[-1:] in b" \t":
                self.send_error(400, f"malformed header field {bytes(line[:80])!r}")
                return False
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1").strip()
            fields[key] = f"{fields[key]}, {text}" if key in fields else text
        else:
            self.send_error(431, f"more than {_MAX_FIELDS} header fields")
            return False
        self.command, self.path, self.request_version = command, path, version
        self.fields = fields
        tokens = {t.strip() for t in fields.get("connection", "").lower().split(",")}
        if "close" in tokens:
            self.close_connection = True
        else:
            self.close_connection = version == "HTTP/1.0" and "keep-alive" not in tokens
        if version == "HTTP/1.1" and fields.get("expect", "").lower() == "100-continue":
            self.expect_continue = True
        return True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Answer a request that could not be parsed, then close (draining what is left)."""
        self.close_connection = self.conn.linger = True
        text = message or HTTPStatus(code).phrase
        self._reply(code, oip.error_body(text))

    # -- responses --

    def _reply(
        self,
        status: int,
        body: bytes = b"",
        *,
        content_type: str = "application/json",
        headers: Iterable[tuple[str, str]] = (),
        buffers: Sequence[memoryview] = (),
    ) -> None:
        if self.has_body and not self.body_read:
            self.close_connection = self.conn.linger = True
        if self.app._stopping:
            self.close_connection = True
        extra = sum(len(b) for b in buffers)
        lines = [
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body) + extra}",
        ]
        lines.extend(f"{key}: {value}" for key, value in headers)
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if self.command == "HEAD":  # the length is announced, the body never sent
            self.wfile.write(head)
        elif extra <= _SMALL_WRITE:
            self.wfile.write(b"".join([head, body, *buffers]))
        else:
            self.wfile.write(head + body)
            for buffer in buffers:
                self.wfile.write(buffer)

    def _json(self, status: int, doc: Any) -> None:
        self._reply(status, oip.dumps(doc))

    def _error(self, status: int, message: str) -> None:
        self._reply(status, oip.error_body(message))

    # -- request bodies --

    def _content_length(self) -> int | None:
        value = self.fields.get("content-length")
        if value is None:
            return None
        value = value.strip()
        if not _is_count(value):
            raise _BodyError(400, f"Content-Length {value!r} is not a byte count")
        return int(value)

    def _continue(self) -> None:
        if self.expect_continue:
            self.expect_continue = False
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _too_large(self, size: int, *, at_least: bool = False) -> _BodyError:
        more = "more than " if at_least else ""
        return _BodyError(
            413,
            f"request body of {more}{size} bytes exceeds the limit of "
            f"{self.app.max_body_bytes} bytes",
        )

    def _read_into(self, view: memoryview) -> None:
        got = 0
        try:
            while got < len(view):
                n = self.rfile.readinto(view[got:])
                if not n:
                    raise _BodyError(400, f"the body ended after {got} of {len(view)} bytes")
                got += n
        except TimeoutError:
            raise _BodyError(408, f"timed out reading the body ({got} bytes came)") from None

    def _read_exact(self, size: int) -> bytearray:
        buffer = bytearray(size)
        self._read_into(memoryview(buffer))
        return buffer

    def _read_chunked(self) -> bytearray:
        limit = self.app.max_body_bytes
        body = bytearray()
        self._continue()
        try:
            while True:
                line = self.rfile.readline(1024)
                size_text = line.split(b";", 1)[0].strip()
                if not line.endswith(b"\n") or not _CHUNK_SIZE.match(size_text):
                    raise _BodyError(400, f"malformed chunk size line {bytes(line[:40])!r}")
                size = int(size_text, 16)
                if size == 0:
                    break
                if len(body) + size > limit:
                    raise self._too_large(len(body) + size, at_least=True)
                chunk = self.rfile.read(size)
                if len(chunk) != size or self.rfile.readline(3).strip():
                    raise _BodyError(400, "a chunk of the body is cut short or malformed")
                body += chunk
            for _ in range(64):  # trailer fields, ignored
                if self.rfile.readline(8192).strip() == b"":
                    break
            else:
                raise _BodyError(400, "too many trailer fields")
        except TimeoutError:
            raise _BodyError(408, "timed out reading the body") from None
        return body

    def _chunked(self) -> bool:
        encoding = self.fields.get("transfer-encoding")
        if encoding is None:
            return False
        if encoding.strip().lower() != "chunked":
            raise _BodyError(501, f"Transfer-Encoding {encoding!r} is not supported")
        return True

    def _check_encoding(self) -> None:
        encoding = self.fields.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            raise _BodyError(415, f"Content-Encoding {encoding!r} is not supported")

    def _read_body(self) -> bytes | bytearray:
        self._check_encoding()
        if self._chunked():
            body = self._read_chunked()
        else:
            length = self._content_length()
            if length is None:
                body = bytearray()
            else:
                if length > self.app.max_body_bytes:
                    raise self._too_large(length)
                self._continue()
                body = self._read_exact(length)
        self.body_read = True
        return body

    def _read_infer_body(self) -> tuple[bytes | bytearray, memoryview]:
        """The JSON header and the binary section after it (read into aligned memory)."""
        self._check_encoding()
        value = self.fields.get("inference-header-content-length")
        header_length: int | None = None
        if value is not None:
            value = value.strip()
            if not _is_count(value):
                raise _BodyError(400, f"Inference-Header-Content-Length {value!r} is not a count")
            header_length = int(value)
        if self._chunked():
            body = self._read_chunked()
            self.body_read = True
            if header_length is None:
                return body, memoryview(b"")
            if header_length > len(body):
                raise oip.ProtocolError(
                    f"Inference-Header-Content-Length {header_length} is larger than the "
                    f"body ({len(body)} bytes)"
                )
            return body[:header_length], memoryview(body)[header_length:]
        length = self._content_length() or 0
        if length > self.app.max_body_bytes:
            raise self._too_large(length)
        if header_length is None:
            header_length = length
        elif header_length > length:
            raise _BodyError(
                400,
                f"Inference-Header-Content-Length {header_length} is larger than the body "
                f"({length} bytes)",
            )
        self._continue()
        header = self._read_exact(header_length)
        binary = np.empty(length - header_length, dtype=np.uint8)
        view = binary.data
        self._read_into(view)
        self.body_read = True
        return header, view

    # -- routes --

    _FIXED_ROUTES: ClassVar[dict[str, tuple[str, str]]] = {
        "/v2": ("GET", "_server_metadata"),
        "/v2/health/live": ("GET", "_live"),
        "/v2/health/ready": ("GET", "_ready"),
        "/v2/repository/index": ("POST", "_repository_index"),
        "/metrics": ("GET", "_metrics"),
    }

    def _dispatch(self) -> None:
        path = self.path.partition("?")[0]
        method = self.command
        route = self._FIXED_ROUTES.get(path.rstrip("/") or "/")
        if route is not None:
            allowed, action = route
            if method != allowed:
                self._method_not_allowed(allowed)
                return
            getattr(self, action)()
            return
        match = _MODEL_ROUTE.match(path)
        if match is None:
            self._error(404, f"no endpoint {path}")
            return
        name, version, verb = (unquote(match[1]), match[2], match[3])
        version = unquote(version) if version is not None else None
        if verb == "infer":
            if method != "POST":
                self._method_not_allowed("POST")
                return
            self._infer(name, version)
            return
        if method != "GET":
            self._method_not_allowed("GET")
            return
        if verb == "ready":
            self._model_ready(name, version)
        else:
            self._model_metadata(name, version)

    def _method_not_allowed(self, allowed: str) -> None:
        self._reply(
            405,
            oip.error_body(f"{self.command} is not allowed here; use {allowed}"),
            headers=[("Allow", allowed)],
        )

    def _server_metadata(self) -> None:
        self._json(
            200,
            {"name": SERVER_NAME, "version": self.app.version, "extensions": list(EXTENSIONS)},
        )

    def _live(self) -> None:
        self._json(200, {"live": True})

    def _ready(self) -> None:
        state = self.app.readiness()
        if state.ready:
            self._json(200, {"ready": True})
        else:
            self._json(400, {"ready": False, "error": state.reason or "not ready"})

    def _metrics(self) -> None:
        body, content_type = self.app.metrics.render()
        self._reply(200, body, content_type=content_type)

    def _repository_index(self) -> None:
        try:
            ready_only = oip.parse_index_request(self._read_body())
        except (_BodyError, oip.ProtocolError) as exc:
            self._error(*self._failure(exc))
            return
        entries = self.app.repository()
        self._json(200, [e.to_dict() for e in entries if not ready_only or e.state == "READY"])

    def _not_found(self, name: str, version: str | None) -> str:
        slot = self.app.host.table.get(name)
        if slot is not None:
            return f"model {name!r} has no version {version!r} loaded (it has {slot.version!r})"
        for entry in self.app.repository():
            if entry.name == name and entry.reason:
                return f"model {name!r} is not loaded: {entry.state}: {entry.reason}"
        return f"model {name!r} is not loaded"

    def _model_metadata(self, name: str, version: str | None) -> None:
        slot = self.app.host.table.get(name)
        if slot is None or (version is not None and slot.version != version):
            self._error(404, self._not_found(name, version))
            return
        model = slot.model
        if model is None:
            self._error(503, f"model {name!r} is unavailable: {slot.reason or slot.state}")
            return
        doc = oip.model_metadata(name, model.version, model.inputs, model.outputs)
        self._json(200, doc)

    def _model_ready(self, name: str, version: str | None) -> None:
        slot = self.app.host.table.get(name)
        if slot is None or (version is not None and slot.version != version):
            self._error(404, self._not_found(name, version))
            return
        if slot.state == "active":
            self._json(200, {"name": name, "ready": True})
        else:
            reason = slot.reason or slot.state
            self._json(400, {"name": name, "ready": False, "error": reason})

    def _failure(self, exc: BaseException, version: str | None = None) -> tuple[int, str]:
        """The status and message that answer ``exc`` (``version``: the one asked for)."""
        if isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
            raise exc  # the client went away: nothing to answer
        status, message = _error_of(exc)
        if isinstance(exc, _BodyError):
            self.close_connection = True
        if status == 404 and isinstance(exc, ModelNotFound):
            message = self._not_found(exc.model, version)
        return status, message

    def _infer(self, name: str, version: str | None) -> None:
        app = self.app
        served: str | None = None
        try:
            header, binary = self._read_infer_body()
            request = oip.parse_infer_request(header, binary)
            waited = time.perf_counter()
            with app.host.acquire(name, version=version) as lease:
                running = time.perf_counter()
                model = lease.model
                served = model.version
                oip.check_inputs(request.inputs, model.inputs)
                names = oip.output_names(request, model.outputs)
                values = lease.run(request.feeds(), names)
                done = time.perf_counter()
            encoded = oip.encode_infer_response(
                model_name=name,
                model_version=served,
                request_id=request.id,
                outputs=[(n, values[n], request.output_binary(n)) for n in names],
            )
        except Exception as exc:
            status, message = self._failure(exc, version)
            app.metrics.record(*app._labels(name, served), status)
            self._error(status, message)
            return
        headers = []
        if encoded.binary:
            headers.append(("Inference-Header-Content-Length", str(len(encoded.json))))
        # Counted before the answer is sent, so a client that has its answer sees it counted.
        app.metrics.record(
            name,
            served or "",
            200,
            duration_s=time.perf_counter() - self.started,
            queue_s=running - waited,
            compute_s=done - running,
        )
        self._reply(
            200,
            encoded.json,
            content_type=encoded.content_type,
            headers=headers,
            buffers=encoded.buffers,
        )


# --- server ----------------------------------------------------------------------------


class InferenceServer:
    """The Open Inference Protocol over HTTP/1.1 for the models of one :class:`ModelHost`."""

    def __init__(
        self,
        host: ModelHost,
        *,
        bind: str = DEFAULT_BIND,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        readiness: Callable[[], Readiness] | None = None,
        repository: Callable[[], list[RepositoryEntry]] | None = None,
        metrics: ApiMetrics | None = None,
        max_connections: int = 32,
        timeout_s: float = 30.0,
    ) -> None:
        """Nothing is opened until :meth:`start`.

        ``readiness`` answers /v2/health/ready (default: :func:`host_readiness`);
        ``repository`` lists /v2/repository/index (default: :func:`host_repository`);
        ``max_connections`` bounds the connection threads; ``timeout_s`` closes idle or
        stalled connections.
        """
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be positive")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.host = host
        self.bind = bind
        self.family, self._address = parse_bind(bind)
        self.max_body_bytes = max_body_bytes
        self.readiness = readiness if readiness is not None else host_readiness(host)
        self.repository = repository if repository is not None else lambda: host_repository(host)
        self.metrics = metrics if metrics is not None else ApiMetrics()
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self.version = _agent_version()
        self.metrics.observe_host(host, self.readiness, lambda: len(self._connections))
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._connections: dict[_Connection, threading.Thread] = {}
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._stopping = False
        self._count = 0

    # -- lifecycle --

    @property
    def address(self) -> str:
        """Where it listens: ``host:port`` (the real port once started) or ``unix:/path``."""
        if self.family == socket.AF_UNIX:
            return f"unix:{self._address}"
        host, port = cast(tuple[str, int], self._address)
        if self._listener is not None:
            port = self._listener.getsockname()[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def port(self) -> int | None:
        """The TCP port once started; None for a Unix socket."""
        if self.family == socket.AF_UNIX or self._listener is None:
            return None
        return int(self._listener.getsockname()[1])

    def start(self) -> None:
        """Open the socket and start accepting (a stale Unix socket file is replaced)."""
        if self._listener is not None or self._stopping:
            raise RuntimeError("the server was started already")
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            if self.family == socket.AF_UNIX:
                path = cast(str, self._address)
                with contextlib.suppress(FileNotFoundError):
                    if not stat.S_ISSOCK(os.lstat(path).st_mode):
                        raise FileExistsError(f"{path} exists and is not a socket")
                    os.unlink(path)
            else:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(self._address)
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._listener = sock
        self._wake_r, self._wake_w = socket.socketpair()
        self._acceptor = threading.Thread(
            target=self._accept_loop, name="edgefleet-api-accept", daemon=True
        )
        self._acceptor.start()
        logger.info("inference API listening on %s", self.address)

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop accepting, let in-flight requests finish (up to ``timeout`` seconds), close
        every connection and join every thread. False if requests were cut off."""
        with self._lock:
            if self._stopping:
                return True
            self._stopping = True
            for conn in self._connections:
                if not conn.busy:
                    self._close(conn)
        if self._wake_w is not None:
            self._wake_w.send(b"x")
        if self._acceptor is not None:
            self._acceptor.join()
        self._close_listener()
        deadline = time.monotonic() + timeout
        drained = True
        with self._lock:
            while self._connections:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    drained = False
                    for conn in self._connections:
                        self._close(conn)
                    break
                self._idle.wait(remaining)
            threads = list(self._connections.values())
        # Threads whose socket was shut end at once; one still inside session.run ends when
        # the run does (it is a daemon thread): wait for it a little, not for ever.
        grace = time.monotonic() + (5.0 if drained else 0.5)
        for thread in threads:
            thread.join(max(grace - time.monotonic(), 0.0))
        return drained

    def __enter__(self) -> InferenceServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            if self.family == socket.AF_UNIX:
                with contextlib.suppress(OSError):
                    os.unlink(cast(str, self._address))
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()

    # -- connections --

    def _accept_loop(self) -> None:
        listener, wake = self._listener, self._wake_r
        assert listener is not None and wake is not None
        lingering: dict[socket.socket, float] = {}
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(wake, selectors.EVENT_READ)
            while True:
                now = time.monotonic()
                for sock in [s for s, deadline in lingering.items() if deadline <= now]:
                    selector.unregister(sock)
                    sock.close()
                    del lingering[sock]
                timeout = max(min(lingering.values()) - now, 0.0) if lingering else None
                for key, _ in selector.select(timeout):
                    if key.fileobj is wake:
                        for sock in lingering:
                            sock.close()
                        return
                    if key.fileobj is listener:
                        self._accept(listener, selector, lingering)
                        continue
                    sock = cast(socket.socket, key.fileobj)
                    try:
                        more = sock.recv(65536)
                    except OSError:
                        more = b""
                    if not more:
                        selector.unregister(sock)
                        sock.close()
                        del lingering[sock]

    def _accept(
        self,
        listener: socket.socket,
        selector: selectors.BaseSelector,
        lingering: dict[socket.socket, float],
    ) -> None:
        try:
            sock, address = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # e.g. EMFILE: back off a little
            logger.warning("inference API: accept failed: %s", exc)
            time.sleep(0.05)
            return
        if self._admit(sock, address):
            return
        # Refused: answer 503 at once, then read and drop what the client sends for up to a
        # second (no thread), so it reads the answer rather than a connection reset.
        self.metrics.connections_refused.inc()
        reason = (
            "the server is stopping"
            if self._stopping
            else f"too many connections (the limit is {self.max_connections})"
        )
        body = oip.error_body(reason)
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
        )
        try:
            sock.setblocking(False)
            sock.send(head.encode("latin-1") + body)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        if len(lingering) >= 64:
            sock.close()
            return
        lingering[sock] = time.monotonic() + 1.0
        selector.register(sock, selectors.EVENT_READ)

    def _admit(self, sock: socket.socket, address: Any) -> bool:
        """Start a thread for the connection; False when over the limit or stopping."""
        with self._lock:
            if self._stopping or len(self._connections) >= self.max_connections:
                return False
            sock.setblocking(True)
            conn = _Connection(sock, address)
            self._count += 1
            thread = threading.Thread(
                target=self._serve,
                args=(conn,),
                name=f"edgefleet-api-{self._count}",
                daemon=True,
            )
            self._connections[conn] = thread
            thread.start()
            return True

    def _serve(self, conn: _Connection) -> None:
        try:
            conn.sock.settimeout(self.timeout_s)
            if conn.sock.family != socket.AF_UNIX:
                # Without this every keep-alive response waits ~40 ms for a delayed ACK.
                conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _Handler(conn, self)
        except OSError as exc:
            logger.debug("inference API: connection ended: %s", exc)
        except Exception:
            logger.exception("inference API: connection failed")
        finally:
            if conn.linger and not conn.closing:
                _drain_and_close(conn.sock)
            conn.sock.close()
            with self._lock:
                del self._connections[conn]
                self._idle.notify_all()

    def _close(self, conn: _Connection) -> None:
        """Wake a connection's thread by shutting its socket (lock held)."""
        conn.closing = True
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_RDWR)

    def _begin(self, conn: _Connection) -> bool:
        """A request arrived on ``conn``: False when stop() has closed it meanwhile."""
        with self._lock:
            if conn.closing:
                return False
            conn.busy = True
            return True

    def _end(self, conn: _Connection) -> bool:
        """The request is answered: True when the connection must close (stopping)."""
        with self._lock:
            conn.busy = False
            return self._stopping

    def _labels(self, name: str, version: str | None) -> tuple[str, str]:
        """Bounded metric labels: unknown models count as model ""."""
        slot = self.host.table.get(name)
        if slot is None:
            return ("", "") if version is None else (name, version)
        return name, version if version is not None else (slot.version or "")
