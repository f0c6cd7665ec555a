"""A raw-socket MQTT broker for what mosquitto cannot be made to do (tests only)."""

from __future__ import annotations

import io
import socket
import threading
from collections.abc import Callable, Sequence


class FakeBroker:
    """Just enough of a broker for what mosquitto cannot be made to do: refuse MQTT 5 the
    3.1.1 way (``levels={4}``), answer an MQTT 5 PUBLISH with a chosen PUBACK reason
    (``puback(topic, payload)``), or send raw bytes once a connection has subscribed
    (``pushes``: the first to the first connection, and so on). Records the level of every
    CONNECT and every PUBLISH."""

    def __init__(
        self,
        levels: frozenset[int] = frozenset({4}),
        puback: Callable[[str, bytes], int] = lambda topic, payload: 0,
        pushes: Sequence[bytes] = (),
    ) -> None:
        self.host = "127.0.0.1"
        self.server = socket.create_server((self.host, 0))
        self.port = int(self.server.getsockname()[1])
        self.accepted_levels = levels
        self.puback = puback
        self.pushes = list(pushes)
        self.levels: list[int] = []
        self.published: list[tuple[str, bytes]] = []
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, name="fake-broker")
        self._accepting.start()

    def close(self) -> None:
        self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        for thread in [self._accepting, *self._threads]:
            thread.join(5)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), name="fake-broker-conn")
            self._threads.append(thread)
            thread.start()

    @staticmethod
    def _packet(conn: socket.socket) -> tuple[int, bytes] | None:
        head = conn.recv(1)
        if not head:
            return None
        length = read_varint(lambda: conn.recv(1)[0])
        body = b""
        while len(body) < length:
            chunk = conn.recv(length - len(body))
            if not chunk:
                return None
            body += chunk
        return head[0], body

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        with conn:
            try:
                first = self._packet(conn)
                if first is None:
                    return
                level = first[1][6]  # after the protocol name b"\0\4MQTT"
                self.levels.append(level)
                if level not in self.accepted_levels:
                    conn.sendall(b"\x20\x02\x00\x01")  # unacceptable protocol version
                    return
                v5 = level == 5
                conn.sendall(b"\x20\x03\x00\x00\x00" if v5 else b"\x20\x02\x00\x00")
                while (packet := self._packet(conn)) is not None:
                    self._answer(conn, v5, *packet)
            except OSError:
                return

    def _answer(self, conn: socket.socket, v5: bool, kind: int, body: bytes) -> None:
        if kind >> 4 == 3:  # PUBLISH
            topic_end = 2 + int.from_bytes(body[:2], "big")
            topic = body[2:topic_end].decode()
            qos = (kind >> 1) & 3
            at = topic_end + (2 if qos else 0)
            if v5:
                stream = io.BytesIO(body)
                stream.seek(at)
                length = read_varint(lambda: stream.read(1)[0])
                at = stream.tell() + length
            self.published.append((topic, body[at:]))
            if qos == 1:
                mid = body[topic_end : topic_end + 2]
                reason = self.puback(topic, body[at:]) if v5 else 0
                conn.sendall(b"\x40\x04" + mid + bytes([reason, 0]) if v5 else b"\x40\x02" + mid)
        elif kind >> 4 == 8 and v5:  # SUBSCRIBE (one topic each): granted QoS 1
            conn.sendall(b"\x90\x04" + body[:2] + b"\x00\x01")
            if self.pushes:
                conn.sendall(self.pushes.pop(0))
        elif kind >> 4 == 12:  # PINGREQ
            conn.sendall(b"\xd0\x00")
        elif kind >> 4 == 14:  # DISCONNECT
            raise OSError("disconnected")


def read_varint(next_byte: Callable[[], int]) -> int:
    """An MQTT variable byte integer, read a byte at a time."""
    value, shift = 0, 0
    while True:
        byte = next_byte()
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def publish_v5(topic: str, payload: bytes, *, announced: int | None = None) -> bytes:
    """An MQTT 5 QoS 0 PUBLISH; ``announced``: the body length its header claims."""
    body = len(topic).to_bytes(2, "big") + topic.encode() + b"\x00" + payload
    return b"\x30" + varint(len(body) if announced is None else announced) + body
