"""The agent's websocket client: the handshake and the frames of RFC 6455, written for the one
connection an agent keeps (binary messages both ways, no extensions).

trio-websocket ran a reader task and a memory channel per connection and two scheduler rounds per
frame sent: about a fifth of an agent's CPU with many short tasks. Here one call reads a message
where the caller waits for it, and a frame goes out in one non-blocking `send` when the socket
takes it (the usual case), waiting for writability otherwise. Failures are trio-websocket's
exception types (`HandshakeError`, `ConnectionRejected`, `ConnectionClosed`), which the link
classifies.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator
from urllib.parse import SplitResult, urlsplit

import trio
from trio_websocket import CloseReason, ConnectionClosed, ConnectionRejected, HandshakeError

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_HEAD = 64 * 1024  # handshake answer headers (and a rejection's body) at most
_RECV = 256 * 1024
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
# Messages handed over without the socket having to wait in a row before one scheduler round:
# a peer that sends without pause cannot keep the caller from ever yielding.
_CHECKPOINT_EVERY = 32


def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if not n:
        return b""
    keys = (key * ((n >> 2) + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(keys, "little")).to_bytes(
        n, "little"
    )


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One final frame from a client: masked with a fresh random key, as RFC 6455 requires."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0xFE, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0xFF, n)
    key = os.urandom(4)
    return head + key + _mask(payload, key)


class WsClient:
    """An open client connection: `get_message()` (bytes, or str for a text message) and
    `send_message(bytes)`; neither may be called by two tasks at once (a reader and a writer may)."""

    def __init__(
        self, stream: trio.abc.Stream, sock: socket.socket | None, max_message_size: int
    ) -> None:
        self._stream = stream
        self._sock = sock  # the plain TCP socket (a duplicate descriptor) for non-blocking I/O
        self._max = max_message_size
        self._buf = bytearray()
        self._pos = 0
        self._sending = False
        self._backlog: list[bytes] = []  # control frames queued behind a send in progress
        self._tail = b""  # what `send_now` could not send at once: goes out before anything else
        self._idle = trio.Event()
        self._idle.set()
        self._close_sent = False
        self.closed: CloseReason | None = None
        self._unyielded = 0

    # -- receiving

    async def get_message(self) -> bytes | str:
        parts: list[bytes] = []
        opcode = -1
        size = 0
        while True:
            frame = self._next_frame(size)
            if frame is None:
                await self._fill()
                continue
            fin, op, payload = frame
            if op >= OP_CLOSE:
                await self._control(op, payload)
                continue
            if op == OP_CONT:
                if opcode < 0:
                    await self._fail(1002, "continuation without a message")
            elif opcode >= 0:
                await self._fail(1002, "new message inside a fragmented one")
            elif op in (OP_TEXT, OP_BINARY):
                opcode = op
            else:
                await self._fail(1002, f"unknown opcode {op}")
            parts.append(payload)
            size += len(payload)
            if not fin:
                continue
            data = payload if len(parts) == 1 else b"".join(parts)
            self._unyielded += 1
            if self._unyielded >= _CHECKPOINT_EVERY:
                self._unyielded = 0
                await trio.lowlevel.checkpoint()
            if opcode == OP_TEXT:
                try:
                    return data.decode()
                except UnicodeDecodeError:
                    await self._fail(1007, "text message is not UTF-8")
            return data

    def _next_frame(self, so_far: int) -> tuple[bool, int, bytes] | None:
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if avail < 2:
            return None
        b0, b1 = buf[pos], buf[pos + 1]
        if b0 & 0x70:
            raise self._protocol_error("reserved bits set (no extension was agreed)")
        if b1 & 0x80:
            raise self._protocol_error("masked frame from the server")
        n = b1 & 0x7F
        head = 2
        if n == 126:
            if avail < 4:
                return None
            n = int.from_bytes(buf[pos + 2 : pos + 4], "big")
            head = 4
        elif n == 127:
            if avail < 10:
                return None
            n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            head = 10
        op = b0 & 0x0F
        if op >= OP_CLOSE and (n > 125 or not b0 & 0x80):
            raise self._protocol_error("bad control frame")
        if op < OP_CLOSE and so_far + n > self._max:
            raise self._too_big()
        if avail < head + n:
            return None
        payload = bytes(buf[pos + head : pos + head + n])
        pos += head + n
        if pos == len(buf):
            buf.clear()
            pos = 0
        elif pos > 65536 and pos * 2 > len(buf):
            del buf[:pos]
            pos = 0
        self._pos = pos
        return bool(b0 & 0x80), op, payload

    async def _fill(self) -> None:
        if self.closed is not None:
            raise ConnectionClosed(self.closed)
        try:
            data = await self._recv_some()
        except (OSError, trio.BrokenResourceError) as exc:
            self.closed = CloseReason(1006, f"connection lost: {exc}")
            raise ConnectionClosed(self.closed) from exc
        if not data:
            self.closed = CloseReason(1006, "connection closed without a close frame")
            raise ConnectionClosed(self.closed)
        self._buf += data

    async def _recv_some(self) -> bytes:
        sock = self._sock
        if sock is None:
            return bytes(await self._stream.receive_some(_RECV))
        while True:
            try:
                return sock.recv(_RECV)
            except BlockingIOError:
                self._unyielded = 0
                await trio.lowlevel.wait_readable(sock)

    async def _control(self, op: int, payload: bytes) -> None:
        if op == OP_PING:
            await self._send_frame(client_frame(OP_PONG, payload), control=True)
        elif op == OP_CLOSE:
            code, reason = 1005, ""
            if len(payload) >= 2:
                code = int.from_bytes(payload[:2], "big")
                reason = payload[2:].decode(errors="replace")
            self.closed = CloseReason(code, reason)
            if not self._close_sent:
                self._close_sent = True
                echo = payload[:2] if len(payload) >= 2 else b""
                with contextlib.suppress(
                    OSError, trio.BrokenResourceError, trio.ClosedResourceError
                ):
                    await self._send_frame(client_frame(OP_CLOSE, echo), control=True)
            raise ConnectionClosed(self.closed)
        elif op != OP_PONG:
            await self._fail(1002, f"unknown control opcode {op}")

    def _protocol_error(self, why: str) -> ConnectionClosed:
        self.closed = CloseReason(1002, why)
        return ConnectionClosed(self.closed)

    def _too_big(self) -> ConnectionClosed:
        self.closed = CloseReason(1009, f"message larger than {self._max} bytes")
        return ConnectionClosed(self.closed)

    async def _fail(self, code: int, why: str) -> None:
        self.closed = CloseReason(code, why)
        raise ConnectionClosed(self.closed)

    # -- sending

    async def send_message(self, data: bytes | str) -> None:
        if self.closed is not None:
            raise ConnectionClosed(self.closed)
        if isinstance(data, str):
            frame = client_frame(OP_TEXT, data.encode())
        else:
            frame = client_frame(OP_BINARY, bytes(data))
        await self._send_frame(frame)

    def can_send_now(self) -> bool:
        """`send_now` would write at once: no send under way, nothing left over, a plain socket."""
        return (
            self.closed is None and not self._sending and not self._tail and self._sock is not None
        )

    def send_now(self, data: bytes) -> bool:
        """Write a binary message without waiting (only when `can_send_now()`). What the socket
        does not take at once, or a socket error, is left for `flush` (the writer's next send or
        flush writes it first, or finds the error). False when it did not all go out now."""
        assert self.can_send_now()
        assert self._sock is not None
        frame = client_frame(OP_BINARY, data)
        try:
            sent = self._sock.send(frame)
        except OSError:  # BlockingIOError too: all of it waits for the writer
            sent = 0
        self._tail = frame[sent:]
        return not self._tail

    async def flush(self) -> None:
        """Write what `send_now` left over (if anything)."""
        if self._tail:
            await self._send_frame(b"")

    async def _send_frame(self, frame: bytes, control: bool = False) -> None:
        """A control frame while another send is under way waits in the backlog, which that send
        writes after its own frame; a message waits for the send under way to end."""
        if self._sending:
            if control:
                self._backlog.append(frame)
                return
            while self._sending:
                await self._idle.wait()
        self._sending = True
        self._idle = trio.Event()
        try:
            if self._tail:  # the rest of a message `send_now` began: before anything else
                tail, self._tail = self._tail, b""
                await self._send_all(tail)
            await self._send_all(frame)
            while self._backlog:
                more = b"".join(self._backlog)
                self._backlog.clear()
                await self._send_all(more)
        except (OSError, trio.BrokenResourceError) as exc:
            self.closed = self.closed or CloseReason(1006, f"connection lost: {exc}")
            raise ConnectionClosed(self.closed) from exc
        finally:
            self._sending = False
            self._idle.set()

    async def _send_all(self, data: bytes) -> None:
        sock = self._sock
        if sock is None:
            await self._stream.send_all(data)
            return
        view = memoryview(data)
        while view:
            try:
                view = view[sock.send(view) :]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)

    async def aclose(self, grace: float) -> None:
        """Say goodbye (a close frame, for up to `grace` seconds) and close the connection."""
        with trio.move_on_after(grace, shield=True):
            if not self._close_sent and self.closed is None:
                self._close_sent = True
                with contextlib.suppress(
                    OSError, ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError
                ):
                    await self._send_frame(client_frame(OP_CLOSE, (1000).to_bytes(2, "big")))
        if self._sock is not None:
            self._sock.close()
        await trio.aclose_forcefully(self._stream)


@contextlib.asynccontextmanager
async def open_websocket(
    url: str,
    subprotocol: str,
    ssl_context: ssl.SSLContext | None = None,
    connect_timeout: float = 10,
    disconnect_timeout: float = 5,
    max_message_size: int = 64 * 1024 * 1024,
) -> AsyncIterator[WsClient]:
    """Connect to a ws:// or wss:// URL offering `subprotocol`; the connection is closed when the
    block ends. Connection failures raise OSError or `HandshakeError` (`ConnectionRejected` for an
    HTTP answer other than 101, with its status, headers and body)."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a websocket URL: {url!r}")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    with trio.fail_after(connect_timeout):
        stream: trio.abc.Stream
        tcp = await trio.open_tcp_stream(parts.hostname, port)
        stream = tcp
        try:
            if secure:
                stream = trio.SSLStream(
                    tcp,
                    ssl_context or ssl.create_default_context(),
                    server_hostname=parts.hostname,
                    https_compatible=True,
                )
                await stream.do_handshake()
            rest = await _handshake(stream, parts, port, secure, subprotocol)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    sock = None
    if not secure:
        fd = os.dup(tcp.socket.fileno())
        sock = socket.socket(tcp.socket.family, tcp.socket.type, tcp.socket.proto, fileno=fd)
        sock.setblocking(False)
    ws = WsClient(stream, sock, max_message_size)
    ws._buf += rest
    try:
        yield ws
    finally:
        await ws.aclose(disconnect_timeout)


async def _handshake(
    stream: trio.abc.Stream, parts: SplitResult, port: int, secure: bool, subprotocol: str
) -> bytes:
    """Send the upgrade request, read the answer; returns what came after its headers."""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if port != (443 if secure else 80):
        host = f"{host}:{port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    key = base64.b64encode(os.urandom(16))
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: {subprotocol}\r\n\r\n"
    ).encode()
    await stream.send_all(request)
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        if len(buf) > _MAX_HEAD:
            raise HandshakeError("handshake answer headers too long")
        data = await stream.receive_some(_RECV)
        if not data:
            raise HandshakeError("connection closed during the handshake")
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status_line = lines[0].split(None, 2)
    if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/"):
        raise HandshakeError(f"not an HTTP answer: {lines[0][:80]!r}")
    try:
        status = int(status_line[1])
    except ValueError:
        raise HandshakeError(f"bad HTTP status line: {lines[0][:80]!r}") from None
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            headers.append((name.strip().lower(), value.strip()))
    found = dict(headers)
    if status != 101:
        body = rest
        length = int(found.get(b"content-length", b"0") or 0)
        with trio.move_on_after(5):
            while len(body) < min(length, _MAX_HEAD):
                data = await stream.receive_some(_RECV)
                if not data:
                    break
                body += data
        raise ConnectionRejected(status, tuple(headers), body[:_MAX_HEAD] or None)
    expected = base64.b64encode(hashlib.sha1(key + _GUID).digest())  # noqa: S324 - RFC 6455
    if found.get(b"upgrade", b"").lower() != b"websocket":
        raise HandshakeError("the answer does not upgrade to websocket")
    if found.get(b"sec-websocket-accept") != expected:
        raise HandshakeError("wrong Sec-WebSocket-Accept")
    chosen = found.get(b"sec-websocket-protocol")
    if chosen is not None and chosen.decode(errors="replace") != subprotocol:
        raise HandshakeError(f"the server chose subprotocol {chosen!r}, not {subprotocol!r}")
    if found.get(b"sec-websocket-extensions"):
        raise HandshakeError("the server chose an extension that was not offered")
    return rest
