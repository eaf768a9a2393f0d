"""Agent frames written to the connection's socket directly instead of as one ASGI event each.

Through ASGI, every frame the coordinator sends to an agent goes: the `websocket.send` event, two
patched wrappers, hypercorn's WSStream and wsproto (which builds the frame), the h11 protocol, then
the TCP server's send lock, a shielded cancel scope and trio's `send_all` with its checkpoints:
~65 µs per frame here, against ~24 µs for the `send()` syscall alone. With 1,000 agents most frames
carry one or two tasks, so that path was a large share of a task's coordinator CPU.

`frame_writer(send)` returns a writer that builds the (unmasked, final, binary) frame itself and,
when no other send holds the connection's lock, hands it to the kernel with one non-blocking
`send()`; whatever the kernel does not take, and every frame while another send is in progress, goes
through hypercorn's own path after it (so bytes are never interleaved and order is kept). It returns
None — use the ASGI `send` — whenever the connection is not what this was written against: another
server, TLS, HTTP/2, or a negotiated extension (permessage-deflate would need the frame compressed).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from . import tcplean

FrameWriter = Callable[[bytes], Awaitable[None]]


def frame_header(length: int) -> bytes:
    """Header of a final, unmasked binary frame of `length` bytes (RFC 6455 §5.2)."""
    if length < 126:
        return bytes((0x82, length))
    if length < 1 << 16:
        return bytes((0x82, 126)) + length.to_bytes(2, "big")
    return bytes((0x82, 127)) + length.to_bytes(8, "big")


def hypercorn_parts(send: Callable[..., Awaitable[None]]) -> tuple[Any, Any, Any, Any] | None:
    """(websocket stream, HTTP/1.1 protocol, TCP server, frame protocol) of the hypercorn
    connection behind a websocket's ASGI `send`, when it is plain TCP, HTTP/1.1 and has no
    extension; None otherwise (another server, TLS, HTTP/2, compression)."""
    try:
        from hypercorn.protocol.h11 import H11Protocol
        from hypercorn.protocol.ws_stream import WSStream
        from hypercorn.trio.tcp_server import TCPServer
    except ImportError:
        return None
    ws: Any = getattr(send, "__self__", None)
    if not isinstance(ws, WSStream):
        return None
    proto = getattr(ws.send, "__self__", None)
    if not isinstance(proto, H11Protocol):
        return None
    server = getattr(proto.send, "__self__", None)
    if not isinstance(server, TCPServer) or not isinstance(server.stream, trio.SocketStream):
        return None
    frames = getattr(getattr(ws, "connection", None), "_proto", None)
    if frames is None or getattr(frames, "extensions", None):
        return None
    return ws, proto, server, frames


class DirectWriter:
    """Frames to one agent's connection: `frame` (waits until all is written), `now` (writes
    what the socket takes at once, without waiting) and `raw` (bytes already framed: what `now`
    left over, which must go before anything else)."""

    __slots__ = ("_ws", "_connected", "raw", "_now")

    def __init__(
        self,
        ws: Any,
        connected: Any,
        raw: Callable[[bytes], Awaitable[None]],
        now: Callable[[bytes], bytes],
    ) -> None:
        self._ws = ws
        self._connected = connected
        self.raw = raw
        self._now = now

    def open(self) -> bool:
        return not self._ws.closed and self._ws.state == self._connected

    async def frame(self, payload: bytes) -> None:
        if self.open():  # else dropped, like hypercorn's app_send once the connection closed
            await self.raw(frame_header(len(payload)) + payload)

    def now(self, payload: bytes) -> bytes:
        """The framed bytes the socket did not take at once (b"": all went; all of them while
        another sender is mid-write). Only while `open()`."""
        return self._now(frame_header(len(payload)) + payload)


def direct_writer(send: Callable[..., Awaitable[None]]) -> DirectWriter | None:
    """The direct writer for the ASGI websocket `send` of a hypercorn connection over plain TCP
    and HTTP/1.1 without extensions, or None."""
    try:
        from hypercorn.protocol.ws_stream import ASGIWebsocketState
    except ImportError:
        return None
    parts = hypercorn_parts(send)
    if parts is None:
        return None
    ws, proto, _server, _frames = parts
    raw = tcplean.raw_writer(proto.send)  # the TCP server's: takes the lock, sends everything
    now = tcplean.raw_now(proto.send)
    if raw is None or now is None:
        return None
    return DirectWriter(ws, ASGIWebsocketState.CONNECTED, raw, now)


def frame_writer(send: Callable[..., Awaitable[None]]) -> FrameWriter | None:
    """`direct_writer(send).frame`, or None."""
    w = direct_writer(send)
    return None if w is None else w.frame
