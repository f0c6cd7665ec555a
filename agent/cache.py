"""The content-addressed artifact cache under the agent's state directory.

    root/sha256/<hash>        verified files only; read-only; what the rest of the agent opens
    root/partial/<hash>.part  downloads in progress; never opened by anyone but the cache

A file enters ``sha256/`` only by ``os.replace`` after its size and sha256 were checked and its
data fsynced; the directory is fsynced after the rename. A crash or power cut at any moment
therefore leaves at worst a ``.part`` file, which the next ``ensure`` resumes (or verifies, when
it is already complete). Files in ``sha256/`` are trusted without re-hashing.

One process owns a cache directory (the agent daemon); threads within it may call ``ensure``
concurrently: each hash is downloaded by one thread at a time.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from agent.errors import (
    ArtifactError,
    ArtifactTooLarge,
    ArtifactUnavailable,
    FetchError,
    HashMismatch,
    NotCached,
    SizeMismatch,
    StorageError,
    StorageFull,
    VerificationError,
)
from agent.fetch import Fetcher, UrlFetcher
from contract.manifests import Artifact

log = logging.getLogger(__name__)

FINAL_DIR = "sha256"
PARTIAL_DIR = "partial"
PARTIAL_SUFFIX = ".part"
DEFAULT_MAX_BYTES = 4 * 1024**3
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HASH_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class GcResult:
    """What ``ArtifactCache.gc`` removed: verified hashes, partial hashes, bytes freed."""

    removed: list[str] = field(default_factory=list)
    removed_partials: list[str] = field(default_factory=list)
    freed_bytes: int = 0


class ArtifactCache:
    """Downloads, verifies and keeps artifacts by sha256.

    ``timeout`` (seconds, per connect and read) and ``max_bytes`` (the largest artifact
    accepted) are passed to the fetcher. Before a download, at least the missing bytes plus
    ``min_free_bytes`` must be free on the cache's file system, or StorageFull is raised
    without touching the network.
    """

    def __init__(
        self,
        root: Path,
        fetcher: Fetcher | None = None,
        *,
        timeout: float = 30.0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        min_free_bytes: int = 0,
    ) -> None:
        self.root = Path(root)
        self.fetcher: Fetcher = fetcher if fetcher is not None else UrlFetcher()
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self._final = self.root / FINAL_DIR
        self._partial = self.root / PARTIAL_DIR
        try:
            self._final.mkdir(parents=True, exist_ok=True)
            self._partial.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise _storage_error(self.root, err) from err
        self._locks_guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    # --- queries -------------------------------------------------------------------------

    def has(self, sha256: str) -> bool:
        """Whether a verified copy is in the cache."""
        return self._final_path(sha256).is_file()

    def path(self, sha256: str) -> Path:
        """The verified file for ``sha256``; NotCached when there is none."""
        final = self._final_path(sha256)
        if not final.is_file():
            raise NotCached(sha256)
        return final

    def usage_bytes(self) -> int:
        """Bytes used by verified and partial files together."""
        total = 0
        for directory in (self._final, self._partial):
            for entry in _scan(directory):
                with contextlib.suppress(OSError):
                    total += entry.stat(follow_symlinks=False).st_size
        return total

    def hashes(self) -> set[str]:
        """The hashes of every verified file."""
        return {entry.name for entry in _scan(self._final) if _SHA256.match(entry.name)}

    # --- download ------------------------------------------------------------------------

    def candidate_urls(self, artifact: Artifact, base_urls: Sequence[str]) -> list[str]:
        """The artifact's own URL if it has one, else ``<base>/<sha256>`` for each base URL."""
        if artifact.url:
            return [artifact.url]
        urls: list[str] = []
        for base in base_urls:
            url = f"{base.rstrip('/')}/{artifact.sha256}"
            if url not in urls:
                urls.append(url)
        return urls

    def ensure(self, artifact: Artifact, base_urls: Sequence[str] = ()) -> Path:
        """Return the verified file for ``artifact``, downloading and verifying it if needed.

        Candidate URLs (see ``candidate_urls``) are tried in order, resuming the partial file;
        a URL that fails is skipped for the next. Raises ArtifactTooLarge (over ``max_bytes``),
        StorageFull (too little space, or ENOSPC: the partial is removed), StorageError (other
        local I/O failures), ArtifactUnavailable (every candidate failed; ``failures`` says
        why), or SizeMismatch when an intact cached copy has another size than ``artifact``
        claims. A size or hash mismatch of a download removes the partial file.
        """
        sha = artifact.sha256
        final = self._final_path(sha)
        if _size_of(final) == artifact.size:
            return final
        with self._lock(sha):
            if self._usable(final, artifact):
                return final
            if artifact.size > self.max_bytes:
                raise ArtifactTooLarge(f"artifact {sha}", artifact.size, self.max_bytes)
            part = self._partial_path(sha)
            try:
                if self._resume_from(part, artifact) == artifact.size:
                    # Complete before a crash or restart: verify it, no network needed.
                    return self._install(part, final, artifact, source=f"partial file {part}")
            except VerificationError as err:
                log.warning("discarding complete partial file: %s", err)
            except StorageFull:
                _remove(part)
                raise
            self._check_space(part, artifact)  # early: keeps the partial for later
            try:
                return self._download(artifact, base_urls, part, final)
            except StorageFull:
                _remove(part)
                raise

    def _download(
        self, artifact: Artifact, base_urls: Sequence[str], part: Path, final: Path
    ) -> Path:
        failures: list[tuple[str, ArtifactError]] = []
        for url in self.candidate_urls(artifact, base_urls):
            try:
                return self._from_url(url, part, final, artifact)
            except (FetchError, ArtifactTooLarge, VerificationError) as err:
                log.warning("artifact %s: %s", artifact.sha256, err)
                failures.append((url, err))
        raise ArtifactUnavailable(artifact.sha256, failures)

    def _from_url(self, url: str, part: Path, final: Path, artifact: Artifact) -> Path:
        """Fetch from ``url`` and install. A resumed download that fails verification is
        retried once from zero, as the earlier bytes may have come from a bad source."""
        while True:
            offset = self._resume_from(part, artifact)
            try:
                self.fetcher.fetch(
                    url,
                    part,
                    expected_size=artifact.size,
                    offset=offset,
                    timeout=self.timeout,
                    max_bytes=self.max_bytes,
                )
                return self._install(part, final, artifact, source=url)
            except (ArtifactTooLarge, VerificationError) as err:
                _remove(part)
                if offset == 0 or not isinstance(err, VerificationError):
                    raise
                log.warning("%s; retrying %s from zero", err, url)
            except OSError as err:
                raise _storage_error(part, err) from err

    def _resume_from(self, part: Path, artifact: Artifact) -> int:
        """Bytes of the partial file worth keeping: 0 if absent or longer than the artifact."""
        try:
            size = part.stat().st_size
        except FileNotFoundError:
            return 0
        except OSError as err:
            raise _storage_error(part, err) from err
        if size > artifact.size:
            _remove(part)
            return 0
        return size

    def _check_space(self, part: Path, artifact: Artifact) -> None:
        needed = artifact.size - self._resume_from(part, artifact) + self.min_free_bytes
        try:
            free = shutil.disk_usage(self._partial).free
        except OSError as err:
            raise _storage_error(self._partial, err) from err
        if free < needed:
            raise StorageFull(str(self._partial), needed=needed, free=free)

    def _install(self, part: Path, final: Path, artifact: Artifact, *, source: str) -> Path:
        """Verify size and sha256 of ``part``, fsync it, rename it into place, fsync the dirs.

        On a mismatch the partial file is removed and the error raised.
        """
        try:
            with open(part, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size != artifact.size:
                    _remove(part)
                    raise SizeMismatch(source, artifact.size, size)
                actual = _sha256_of_handle(handle)
                if actual != artifact.sha256:
                    _remove(part)
                    raise HashMismatch(source, artifact.sha256, actual)
                os.fchmod(handle.fileno(), 0o444)
                os.fsync(handle.fileno())
            os.replace(part, final)
            _fsync_dir(self._final)
            _fsync_dir(self._partial)
        except OSError as err:
            raise _storage_error(part, err) from err
        log.info("artifact %s verified (%d bytes) from %s", artifact.sha256, size, source)
        return final

    # --- garbage collection --------------------------------------------------------------

    def gc(self, keep: set[str]) -> GcResult:
        """Remove verified files whose hash is not in ``keep``, and every partial file except
        those of hashes in ``keep`` (still to be resumed) and downloads in progress."""
        removed: list[str] = []
        removed_partials: list[str] = []
        freed = 0
        with self._locks_guard:
            busy = set(self._locks)
        for entry in _scan(self._final):
            if entry.name in keep:
                continue
            freed += _unlink_entry(entry)
            removed.append(entry.name)
        for entry in _scan(self._partial):
            sha = entry.name.removesuffix(PARTIAL_SUFFIX)
            if entry.name.endswith(PARTIAL_SUFFIX) and (sha in keep or sha in busy):
                continue
            freed += _unlink_entry(entry)
            removed_partials.append(sha)
        if removed or removed_partials:
            with contextlib.suppress(OSError):
                _fsync_dir(self._final)
                _fsync_dir(self._partial)
            log.info("cache gc: removed %d files, %d partials, freed %d bytes",
                     len(removed), len(removed_partials), freed)  # fmt: skip
        return GcResult(sorted(removed), sorted(removed_partials), freed)

    # --- helpers -------------------------------------------------------------------------

    def _final_path(self, sha256: str) -> Path:
        return self._final / _checked(sha256)

    def _partial_path(self, sha256: str) -> Path:
        return self._partial / f"{_checked(sha256)}{PARTIAL_SUFFIX}"

    def _usable(self, final: Path, artifact: Artifact) -> bool:
        """Whether the verified file can be returned as it is.

        A verified file of another size than the artifact's is hashed: if it is intact, the
        artifact's size is wrong (SizeMismatch, the file is kept); if not, the disk damaged it
        and it is removed for a fresh download.
        """
        actual = _size_of(final)
        if actual is None:
            return False
        if actual == artifact.size:
            return True
        if _sha256_of(final) == artifact.sha256:
            raise SizeMismatch(f"artifact {artifact.sha256} (cached)", artifact.size, actual)
        log.warning(
            "%s is damaged (%d bytes, expected %d): removing it", final, actual, artifact.size
        )
        _remove(final)
        return False

    @contextlib.contextmanager
    def _lock(self, sha256: str) -> Iterator[None]:
        with self._locks_guard:
            lock, users = self._locks.get(sha256, (threading.Lock(), 0))
            self._locks[sha256] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._locks_guard:
                lock, users = self._locks[sha256]
                if users == 1:
                    del self._locks[sha256]
                else:
                    self._locks[sha256] = (lock, users - 1)


def _checked(sha256: str) -> str:
    if not _SHA256.match(sha256):
        raise ValueError(f"not a sha256 hex digest (64 lowercase hex digits): {sha256!r}")
    return sha256


def _size_of(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None
    except OSError as err:
        raise _storage_error(path, err) from err


def _sha256_of(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            return _sha256_of_handle(handle)
    except OSError as err:
        raise _storage_error(path, err) from err


def _sha256_of_handle(handle: BinaryIO) -> str:
    digest = hashlib.sha256()
    while chunk := handle.read(_HASH_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _scan(directory: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except FileNotFoundError:
        return []


def _unlink_entry(entry: os.DirEntry[str]) -> int:
    try:
        size = entry.stat(follow_symlinks=False).st_size
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
    except FileNotFoundError:
        return 0
    except OSError as err:
        raise _storage_error(Path(entry.path), err) from err
    return size


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _storage_error(path: Path, err: OSError) -> StorageError:
    if err.errno == errno.ENOSPC:
        return StorageFull(str(path))
    return StorageError(str(path), err.strerror or str(err), errno=err.errno)
