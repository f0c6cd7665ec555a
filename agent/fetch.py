"""Download one artifact into a partial file.

HTTP(S) through the standard library with ``Range`` resume, connect/read timeouts, a hard size
cap that stops reading (the body is streamed to disk, never buffered whole), retries with capped
exponential backoff that resume from what is on disk, an optional bearer token for the hub's
artifact store, and ``file://`` URLs for local use.

The fetcher only moves bytes. It checks sizes because it must stop early, but the sha256 and
the final size are verified by the cache (``agent.cache``) before anything may open the file.
"""

from __future__ import annotations

import errno
import http.client
import logging
import os
import random
import re
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import urlsplit

from agent.errors import (
    ArtifactTooLarge,
    FetchError,
    SizeMismatch,
    StorageError,
    StorageFull,
)

log = logging.getLogger(__name__)

CHUNK_SIZE = 64 * 1024
RETRYABLE_STATUSES = frozenset({408, 425, 429})
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*$", re.IGNORECASE)


class Fetcher(Protocol):
    """Moves the bytes of one URL into a partial file. Substitute it in tests and tools."""

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
        """Make ``dest`` hold the ``expected_size`` bytes of ``url``, or raise.

        The first ``offset`` bytes already in ``dest`` are kept and the transfer resumes after
        them; anything after them is discarded. ``timeout`` bounds the connect and every read
        in seconds. Refuses more than ``max_bytes``, and more or fewer than ``expected_size``.
        Raises FetchError, ArtifactTooLarge, SizeMismatch, StorageFull or StorageError; on any
        error ``dest`` keeps what was written so far, ready to resume.
        """
        ...


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff between attempts at one URL.

    ``attempts`` is how many consecutive attempts without progress are made before giving up;
    an attempt that wrote bytes resets that count (the download is bounded, so this ends).
    The delay before retry ``n`` (0-based) is ``min(max_backoff_s, backoff_s * 2**n)``, reduced
    by up to ``jitter`` of itself at random so that a fleet does not retry in step.
    """

    attempts: int = 4
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("backoff_s and max_backoff_s must not be negative")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be within [0, 1], got {self.jitter}")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (0-based)."""
        base = min(self.max_backoff_s, self.backoff_s * (2.0 ** min(retry, 62)))
        return base * (1.0 - self.jitter * random.random())


class _Sink:
    """The partial file, written at a tracked position; local errors become StorageError."""

    def __init__(self, out: IO[bytes], dest: Path, position: int) -> None:
        self._out = out
        self.dest = dest
        self.position = position

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                written = self._out.write(view)
                if written is None:  # pragma: no cover - only for non-blocking files
                    continue
                view = view[written:]
                self.position += written
        except OSError as err:
            raise _storage_error(self.dest, err) from err

    def rewind(self) -> None:
        """Discard everything: the next bytes are the file's first."""
        try:
            self._out.seek(0)
            self._out.truncate(0)
        except OSError as err:
            raise _storage_error(self.dest, err) from err
        self.position = 0


class _RangeNotSatisfiableError(Exception):
    """HTTP 416; ``total`` is the size the server announced in Content-Range, if any."""

    def __init__(self, total: int | None) -> None:
        super().__init__(total)
        self.total = total


class _NoForeignRedirect(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http(s); the Authorization header is never forwarded.

    (It is added as an unredirected header, which urllib drops on redirects.)
    """

    def redirect_request(  # noqa: PLR0917 - the signature urllib calls
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        if urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise urllib.error.HTTPError(
                req.full_url, code, f"redirect to a non-HTTP URL {newurl!r}", headers, fp
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class UrlFetcher:
    """The real Fetcher: ``http://``, ``https://`` and ``file://`` URLs.

    ``bearer_tokens`` maps URL prefixes (e.g. ``https://hub.example/artifacts``) to a token sent
    as ``Authorization: Bearer`` to URLs under that prefix only (longest prefix wins; never
    forwarded on redirects; the prefix ``""`` covers every URL). ``ssl_context`` replaces the
    default certificate checks, e.g. to trust a private CA. Proxies come from the
    environment, as everywhere in urllib.
    """

    def __init__(
        self,
        *,
        retry: RetryPolicy | None = None,
        bearer_tokens: Mapping[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        user_agent: str = "edgefleet-agent",
        chunk_size: int = CHUNK_SIZE,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.retry = retry if retry is not None else RetryPolicy()
        self._tokens = {
            prefix.rstrip("/"): token for prefix, token in (bearer_tokens or {}).items()
        }
        self._user_agent = user_agent
        self._chunk_size = chunk_size
        self._sleep = sleep
        handlers: list[urllib.request.BaseHandler] = [_NoForeignRedirect()]
        if ssl_context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=ssl_context))
        self._opener = urllib.request.build_opener(*handlers)

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
        """See ``Fetcher.fetch``. Retries transient failures per ``self.retry``."""
        if not 0 <= offset <= expected_size:
            raise ValueError(f"offset {offset} is outside [0, expected_size={expected_size}]")
        if expected_size > max_bytes:
            raise ArtifactTooLarge(url, expected_size, max_bytes)
        scheme = urlsplit(url).scheme.lower()
        if scheme not in ("http", "https", "file"):
            raise FetchError(url, f"unsupported URL scheme {scheme!r} (expected http, https, file)")
        try:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise _storage_error(dest, err) from err
        with os.fdopen(fd, "wb", buffering=0) as out:
            try:
                size = os.fstat(fd).st_size
                position = min(offset, size)
                if size > position:
                    out.truncate(position)
                out.seek(position)
            except OSError as err:
                raise _storage_error(dest, err) from err
            sink = _Sink(out, dest, position)
            if scheme == "file":
                self._copy_file(url, sink, expected_size, max_bytes)
            else:
                self._fetch_http(url, sink, expected_size, timeout, max_bytes)

    # --- HTTP ----------------------------------------------------------------------------

    def _fetch_http(
        self, url: str, sink: _Sink, expected_size: int, timeout: float, max_bytes: int
    ) -> None:
        attempts = 0
        without_progress = 0
        restarted = False
        while True:
            attempts += 1
            before = sink.position
            try:
                self._http_attempt(url, sink, expected_size, timeout, max_bytes)
                return
            except _RangeNotSatisfiableError as err:
                if err.total is not None and err.total != expected_size:
                    raise SizeMismatch(url, expected_size, err.total) from None
                if restarted:
                    raise FetchError(
                        url, f"HTTP 416 for bytes={before}- even after restarting", status=416
                    ) from None
                log.info("%s: HTTP 416 for bytes=%d-; restarting from zero", url, before)
                restarted = True
                sink.rewind()
                continue
            except FetchError as err:
                if not err.retryable:
                    raise
                without_progress = 0 if sink.position > before else without_progress + 1
                if without_progress >= self.retry.attempts:
                    raise FetchError(
                        url,
                        err.reason,
                        status=err.status,
                        retryable=True,
                        attempts=attempts,
                    ) from err
                delay = self.retry.delay(max(without_progress - 1, 0))
                log.info(
                    "%s: %s; retry %d in %.2f s from byte %d",
                    url,
                    err.reason,
                    attempts,
                    delay,
                    sink.position,
                )
                self._sleep(delay)

    def _http_attempt(
        self, url: str, sink: _Sink, expected_size: int, timeout: float, max_bytes: int
    ) -> None:
        start = sink.position
        if start >= expected_size:
            return
        request = urllib.request.Request(
            url, headers={"User-Agent": self._user_agent, "Accept-Encoding": "identity"}
        )
        if start > 0:
            request.add_header("Range", f"bytes={start}-")
        token = self._token_for(url)
        if token is not None:
            request.add_unredirected_header("Authorization", f"Bearer {token}")
        try:
            response: Any = self._opener.open(request, timeout=timeout)
        except urllib.error.HTTPError as err:
            with err:
                if err.code == 416:
                    raise _RangeNotSatisfiableError(_content_range(err.headers)[2]) from None
                raise FetchError(
                    url,
                    f"HTTP {err.code} {err.reason}".rstrip(),
                    status=err.code,
                    retryable=err.code >= 500 or err.code in RETRYABLE_STATUSES,
                ) from None
        except urllib.error.URLError as err:
            # A certificate that fails verification will fail the same way next time.
            transient = not isinstance(err.reason, ssl.SSLCertVerificationError)
            raise FetchError(url, _describe(err.reason, timeout), retryable=transient) from err
        except (OSError, http.client.HTTPException) as err:
            raise FetchError(url, _describe(err, timeout), retryable=True) from err
        with response:
            status: int = response.status
            length = _int_header(response.headers, "Content-Length")
            if status == 206:
                first, _last, total = _content_range(response.headers)
                if total is not None and total != expected_size:
                    raise SizeMismatch(url, expected_size, total)
                if first != start:
                    raise FetchError(
                        url, f"HTTP 206 starts at byte {first}, asked for bytes={start}-"
                    )
                announced = None if length is None else start + length
            elif status == 200:
                announced = length
            else:
                raise FetchError(
                    url, f"unexpected HTTP {status} (expected 200 or 206)", status=status
                )
            if announced is not None:
                if announced > max_bytes:
                    raise ArtifactTooLarge(url, announced, max_bytes)
                if announced != expected_size:
                    raise SizeMismatch(url, expected_size, announced)
            if status == 200 and start > 0:
                log.info("%s: server ignored Range; restarting from zero", url)
                sink.rewind()
            self._copy_body(url, response, sink, expected_size, timeout)

    def _copy_body(
        self, url: str, response: Any, sink: _Sink, expected_size: int, timeout: float
    ) -> None:
        while True:
            want = min(self._chunk_size, expected_size - sink.position + 1)
            try:
                chunk: bytes = response.read1(want)
            except TimeoutError:
                raise FetchError(
                    url,
                    f"read timed out after {timeout:g} s"
                    f" at byte {sink.position} of {expected_size}",
                    retryable=True,
                ) from None
            except (OSError, http.client.HTTPException) as err:
                raise FetchError(
                    url,
                    f"transfer broken at byte {sink.position} of {expected_size}: {err!r}",
                    retryable=True,
                ) from err
            if not chunk:
                break
            room = expected_size - sink.position
            if len(chunk) > room:
                sink.write(chunk[:room])
                raise SizeMismatch(url, expected_size, expected_size + 1, at_least=True)
            sink.write(chunk)
        if sink.position < expected_size:
            raise FetchError(
                url,
                f"connection closed at byte {sink.position} of {expected_size}",
                retryable=True,
            )

    def _token_for(self, url: str) -> str | None:
        best: tuple[int, str] | None = None
        for prefix, token in self._tokens.items():
            if (not prefix or url == prefix or url.startswith(prefix + "/")) and (
                best is None or len(prefix) > best[0]
            ):
                best = (len(prefix), token)
        return None if best is None else best[1]

    # --- file:// -------------------------------------------------------------------------

    def _copy_file(self, url: str, sink: _Sink, expected_size: int, max_bytes: int) -> None:
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise FetchError(url, f"file URL names a remote host {parts.netloc!r}")
        path = urllib.request.url2pathname(parts.path)
        try:
            source = open(path, "rb")  # noqa: SIM115 - closed below, errors mapped separately
        except OSError as err:
            raise FetchError(url, f"cannot open {path}: {err.strerror or err}") from err
        with source:
            try:
                size = os.fstat(source.fileno()).st_size
                if size > max_bytes:
                    raise ArtifactTooLarge(url, size, max_bytes)
                if size != expected_size:
                    raise SizeMismatch(url, expected_size, size)
                source.seek(sink.position)
                while sink.position < expected_size:
                    chunk = source.read(min(self._chunk_size, expected_size - sink.position))
                    if not chunk:
                        raise FetchError(
                            url, f"file ended at byte {sink.position} of {expected_size}"
                        )
                    sink.write(chunk)
            except OSError as err:
                raise FetchError(url, f"cannot read {path}: {err.strerror or err}") from err


def _storage_error(dest: Path, err: OSError) -> StorageError:
    if err.errno == errno.ENOSPC:
        return StorageFull(str(dest))
    return StorageError(str(dest), err.strerror or str(err), errno=err.errno)


def _describe(reason: object, timeout: float) -> str:
    if isinstance(reason, TimeoutError):
        return f"timed out after {timeout:g} s"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def _int_header(headers: Message, name: str) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        number = int(value.strip())
    except ValueError:
        return None
    return number if number >= 0 else None


def _content_range(headers: Message) -> tuple[int | None, int | None, int | None]:
    """(first, last, total) from ``Content-Range: bytes a-b/total``; None where absent."""
    match = _CONTENT_RANGE.match(headers.get("Content-Range") or "")
    if match is None:
        return None, None, None
    first, last, total = match.groups()
    return (
        None if first is None else int(first),
        None if last is None else int(last),
        None if total in (None, "*") else int(total),
    )
