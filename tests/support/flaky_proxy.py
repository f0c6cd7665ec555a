"""A TCP proxy on 127.0.0.1 that hangs up every connection after N bytes: a flaky link.

    with FlakyProxy(("127.0.0.1", server_port)) as proxy:
        url = f"http://127.0.0.1:{proxy.port}/..."    # clients connect here
        proxy.cut_after = 100_000                      # from now on: cut at 100 kB, each
        ...
        proxy.cut_after = None                         # a healthy link again
        proxy.cuts                                     # connections cut so far

Every accepted connection gets its own upstream connection. ``cut_after`` bounds the bytes
forwarded on each connection, both directions together, counted from its start: the proxy
forwards exactly that many, then closes both sides at once, which is how a link that drops
mid-transfer looks to each end. It is read continuously, so setting it also cuts the
connections already open (at once, for those already past it). An upstream that refuses
the connection is a connection closed before its first byte.

One thread runs everything (a selector over non-blocking sockets), started by ``start``
and joined by ``stop``, which also closes every socket: connections that outlive a test
leave no thread behind.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import traceback
from dataclasses import dataclass, field
from types import TracebackType

_CHUNK = 64 * 1024


@dataclass(eq=False)
class _Pair:
    """One proxied connection: the client's socket and ours to the target."""

    client: socket.socket
    upstream: socket.socket
    read: int = 0
    """Bytes read so far, both directions (each is forwarded)."""
    pending: dict[socket.socket, bytes] = field(default_factory=dict)
    """Bytes read from one side, still to be written to the socket they are keyed by."""
    eof: set[socket.socket] = field(default_factory=set)
    """Sides that finished sending."""
    shut: set[socket.socket] = field(default_factory=set)
    """Sides told that their peer finished sending."""

    def peer(self, sock: socket.socket) -> socket.socket:
        return self.upstream if sock is self.client else self.client

    @property
    def sockets(self) -> tuple[socket.socket, socket.socket]:
        return self.client, self.upstream


class FlakyProxy:
    """Forwards 127.0.0.1:``port`` to ``target``; see the module docstring."""

    def __init__(
        self, target: tuple[str, int], *, cut_after: int | None = None, name: str = "proxy"
    ) -> None:
        self.target = target
        self.cut_after = cut_after
        """Bytes forwarded per connection before it is cut; None: never cut."""
        self.name = name
        self.connections = 0
        """Connections accepted so far."""
        self.cuts = 0
        """Connections the proxy cut after ``cut_after`` bytes."""
        self.forwarded = 0
        """Bytes forwarded so far, both directions."""
        self.errors: list[str] = []
        """Unexpected exceptions of the proxy's thread (a bug of the proxy, not the link)."""
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._selector = selectors.DefaultSelector()
        self._pairs: set[_Pair] = set()

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> FlakyProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        listener.setblocking(False)
        self._listener = listener
        self._selector.register(listener, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name=self.name)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every connection; join the thread."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for pair in list(self._pairs):
            self._close(pair)
        if self._listener is not None:
            self._selector.unregister(self._listener)
            self._listener.close()
            self._listener = None
        self._selector.close()

    def __enter__(self) -> FlakyProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._listener is not None, "proxy not started"
        return int(self._listener.getsockname()[1])

    # --- the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._turn()
            except Exception:  # a bug here must not freeze every connection
                self.errors.append(traceback.format_exc())

    def _turn(self) -> None:
        for key, mask in self._selector.select(0.05):
            if key.data is None:
                self._accept()
            else:
                self._service(key.data, key.fileobj, mask)  # type: ignore[arg-type]
        for pair in list(self._pairs):  # cut_after may have changed
            self._update(pair)

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            client, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        self.connections += 1
        try:
            upstream = socket.create_connection(self.target, timeout=2)
        except OSError:
            client.close()  # refused: the client sees its connection closed at once
            return
        client.setblocking(False)
        upstream.setblocking(False)
        pair = _Pair(client, upstream)
        self._pairs.add(pair)
        self._update(pair)

    def _service(self, pair: _Pair, sock: socket.socket, mask: int) -> None:
        if pair not in self._pairs:
            return
        try:
            if mask & selectors.EVENT_WRITE:
                data = pair.pending.get(sock, b"")
                written = sock.send(data)
                pair.pending[sock] = data[written:]
                self.forwarded += written
            if mask & selectors.EVENT_READ:
                limit = self.cut_after
                want = _CHUNK if limit is None else min(_CHUNK, limit - pair.read)
                if want > 0:
                    data = sock.recv(want)
                    if data:
                        pair.read += len(data)
                        peer = pair.peer(sock)
                        pair.pending[peer] = pair.pending.get(peer, b"") + data
                    else:
                        pair.eof.add(sock)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._close(pair)
            return
        self._update(pair)

    def _update(self, pair: _Pair) -> None:
        """Close the pair when it is done or cut; else register what each socket awaits."""
        flushed = not any(pair.pending.values())
        limit = self.cut_after
        if flushed and limit is not None and pair.read >= limit:
            self.cuts += 1
            self._close(pair)
            return
        if flushed and len(pair.eof) == 2:
            self._close(pair)
            return
        room = limit is None or pair.read < limit
        for sock in pair.sockets:
            peer = pair.peer(sock)
            if sock in pair.eof and not pair.pending.get(peer) and peer not in pair.shut:
                pair.shut.add(peer)
                with contextlib.suppress(OSError):
                    peer.shutdown(socket.SHUT_WR)  # pass the half-close on
            events = 0
            if room and sock not in pair.eof and not pair.pending.get(peer):
                events |= selectors.EVENT_READ
            if pair.pending.get(sock):
                events |= selectors.EVENT_WRITE
            self._interest(sock, events, pair)

    def _interest(self, sock: socket.socket, events: int, pair: _Pair) -> None:
        try:
            key = self._selector.get_key(sock)
        except KeyError:
            if events:
                self._selector.register(sock, events, pair)
            return
        if not events:
            self._selector.unregister(sock)
        elif key.events != events:
            self._selector.modify(sock, events, pair)

    def _close(self, pair: _Pair) -> None:
        self._pairs.discard(pair)
        for sock in pair.sockets:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
