"""Agent frames read off the connection and handled in hypercorn's reader task, not as ASGI events.

Through ASGI, every frame an agent sends goes: hypercorn's reader task, the h11 pass-through,
WSStream and wsproto (which parses and unmasks it), a `websocket.receive` event dict into the
application's memory channel (a scheduling round for the reader), then the application's task wakes
to take it (another round) and hands it to the link session. With one or two tasks per frame that
was a large share of a task's coordinator CPU. `install(...)` hooks the connection so that
complete, final, masked binary frames, the only ones agents send, are parsed here and given to
`on_frame` right in the reader task, in order. The hook sits on the connection's H11Protocol (what
the reader hands every segment it receives), so the h11 pass-through and wsproto are both skipped.

Anything else (a control frame, a fragment, a text frame, a frame over the message limit, bytes
after the application closed) makes the hook step aside for good: from that frame's first byte on,
everything goes through hypercorn's own path as before, which answers pings, closes and limits.
An exception from `on_frame` is not raised into hypercorn: it is kept, and the application's task
gets it from its next `receive` (`check`), so the link closes with its reason as before.

`install` returns None — frames keep coming as ASGI events — whenever the connection is not what
this was written against (another server, TLS, HTTP/2, an extension), or when bytes or events are
already queued that would then arrive out of order.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from .wsdirect import hypercorn_parts

# The event the hook puts into the application's channel when `on_frame` failed.
FAILED = "tvm.wsread.failed"


def unmask(mask: bytes, data: bytes) -> bytes:
    n = len(data)
    if not n:
        return b""
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "little")
    return (int.from_bytes(data, "little") ^ key).to_bytes(n, "little")


class DirectReader:
    """The hook on one connection's WSStream (see the module's docstring)."""

    def __init__(
        self, ws: Any, original: Callable[[Any], Awaitable[None]], data_type: type[Any], state: Any
    ) -> None:
        self.ws = ws
        self.original = original  # the H11Protocol's handle: every segment the reader receives
        self.data_type = data_type  # hypercorn's RawData
        self.connected = state
        self.on_frame: Callable[[bytes], Awaitable[None]] | None = None
        self.pending: list[bytes] = []  # frames read before `start`
        self.active = True
        self.buf = bytearray()  # the start of a frame not complete yet
        self.error: Exception | None = None
        self.frames = 0
        # Called once in the reader task before its first frame (log context of the connection).
        self.enter: Callable[[], object] | None = None

    async def start(self, on_frame: Callable[[bytes], Awaitable[None]]) -> None:
        """From the application's task, before its first `receive`: hand over the frames read so
        far, then have the reader task call `on_frame` for every later one."""
        while self.pending:
            await on_frame(self.pending.pop(0))
        self.on_frame = on_frame

    def stop(self) -> None:
        """Hand everything back to hypercorn (the connection's application is ending)."""
        self.active = False
        self.on_frame = None

    def check(self, msg: dict) -> None:
        """Raise what `on_frame` raised, if `msg` is the event that says so."""
        if msg.get("type") == FAILED and self.error is not None:
            error, self.error = self.error, None
            raise error

    def _usable(self) -> bool:
        ws = self.ws
        return self.active and not ws.closed and ws.state == self.connected

    async def handle(self, event: Any) -> None:
        if type(event) is not self.data_type:
            self.buf.clear()  # the stream ended: a partial frame has no rest coming
            await self.original(event)
            return
        buf = self.buf
        buf += event.data
        if not self.active:
            await self._hand_back(event, 0)
            return
        limit = self.ws.buffer.max_length
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            if b0 != 0x82 or not b1 & 0x80:
                # Not a final, masked binary frame (or an extension bit): hypercorn's.
                return await self._hand_back(event, pos)
            n = b1 & 0x7F
            head = pos + 2
            if n == 126:
                n = int.from_bytes(buf[head : head + 2], "big")
                head += 2
            elif n == 127:
                n = int.from_bytes(buf[head : head + 8], "big")
                head += 8
            stop = head + 4 + n
            if head > end:
                break  # its length is not complete yet
            if n > limit:
                return await self._hand_back(event, pos)  # hypercorn closes with 1009 and why
            if stop > end:
                break  # wait for the rest of this frame
            if not self._usable():
                return await self._hand_back(event, pos)
            payload = unmask(bytes(buf[head : head + 4]), bytes(buf[head + 4 : stop]))
            pos = stop
            if not await self._deliver(payload):
                return await self._hand_back(event, pos)
        del buf[:pos]  # what is left is the start of a frame: its rest comes later

    async def _hand_back(self, event: Any, pos: int) -> None:
        """From `pos` (a frame's first byte) on, everything goes through hypercorn's path."""
        self.active = False
        rest = bytes(self.buf[pos:])
        self.buf.clear()
        if rest:
            await self.original(self.data_type(data=rest))

    async def _deliver(self, payload: bytes) -> bool:
        if self.enter is not None:
            self.enter()
            self.enter = None
        self.frames += 1
        on_frame = self.on_frame
        if on_frame is None:
            self.pending.append(payload)
            return True
        try:
            await on_frame(payload)
        except Exception as exc:  # noqa: BLE001 - given to the application's task (check)
            self.error = exc
            self.stop()
            await self.ws.app_put({"type": FAILED})
            return False
        return True


def install(
    send: Callable[..., Awaitable[None]], receive: Callable[..., Awaitable[Any]]
) -> DirectReader | None:
    """Hook the hypercorn connection behind the ASGI `send`/`receive` of a websocket (plain TCP,
    HTTP/1.1, no extension) so that its binary frames are read by the hook (`DirectReader.start`
    says where they go); None if not."""
    try:
        from hypercorn.events import RawData
        from hypercorn.protocol.h11 import H11WSConnection
        from hypercorn.protocol.ws_stream import ASGIWebsocketState
        from trio import MemoryReceiveChannel
    except ImportError:
        return None
    parts = hypercorn_parts(send)
    if parts is None:
        return None
    ws, proto, _server, frames = parts
    if proto.stream is not ws or "handle" in vars(proto):
        return None
    # Nothing may be waiting anywhere on the way: it would reach the application after frames
    # the hook hands over.
    channel = getattr(receive, "__self__", None)
    conn = proto.connection
    if (
        not isinstance(channel, MemoryReceiveChannel)
        or channel.statistics().current_buffer_used
        or not isinstance(conn, H11WSConnection)
        or conn.buffer
        or len(getattr(frames, "_buffer", b"")) != 0
        or getattr(ws.buffer, "length", 1) != 0  # a fragmented message begun
        or ws.state != ASGIWebsocketState.CONNECTED
    ):
        return None
    reader = DirectReader(ws, proto.handle, RawData, ASGIWebsocketState.CONNECTED)
    proto.handle = reader.handle
    return reader
