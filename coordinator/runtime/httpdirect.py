"""REST requests read and answered in hypercorn's reader task, without h11 and ASGI events.

Through hypercorn, every request goes: the reader task, h11's parser, an HTTPStream, a new Trio task
for the application with a memory channel for its body, then the answer back through h11 in two
socket writes (head, body). That was ~60 % of the coordinator's CPU for a small request (~0.9 ms).
`install()` hooks every HTTP/1.1 connection's protocol (what the reader hands each segment it
receives): a complete, ordinary request — `HTTP/1.1`, an ASCII target, a Host, a Content-Length body
of at most MAX_BODY already received, no Transfer-Encoding, Expect, Upgrade or `Connection: close`,
not a dashboard path nor a file upload — is parsed here, answered by `Dispatcher.answer` in the same
task and written in one send. Requests on one connection are answered in order either way.

Anything else makes the hook step aside for the rest of the connection: from that request's first
byte on, hypercorn's own path takes over (h11 sees an idle connection, as if nothing had come
before), which answers malformed requests, streams uploads and the dashboard's feed, upgrades
websockets and closes. hypercorn's keep-alive timer is told when a request starts and ends, as
h11's path does.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import h11
import trio

from . import tcplean

MAX_HEAD = 16 * 1024  # h11's own limit for a request's head (hypercorn's default)
MAX_BODY = 1024 * 1024
_SPECIAL = frozenset({b"transfer-encoding", b"expect", b"upgrade"})
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
answered = 0  # requests answered here, in this process (for tests and curiosity)

Answer = Callable[[dict, Callable], Awaitable[tuple[int, list[tuple[bytes, bytes]], bytes]]]


class _Date:
    """The Date header, formatted once a second."""

    second = -1
    value = b""

    @classmethod
    def now(cls) -> bytes:
        t = int(time.time())
        if t != cls.second:
            cls.second, cls.value = t, formatdate(t, usegmt=True).encode()
        return cls.value


class DirectHttp:
    """The hook on one connection's H11Protocol (see the module's docstring)."""

    def __init__(self, protocol: Any, answer: Answer | None, events: Any) -> None:
        self.p = protocol
        self.answer = answer
        self.ev = events  # hypercorn.events: RawData, Closed, Updated
        self.buf = b""
        self.active = True
        self.scheme = "https" if protocol.ssl else "http"
        self.write: Callable[[bytes], Awaitable[None]] | None = None

    def _idle(self) -> bool:
        """Nothing of hypercorn's own is under way on the connection (h11 waits for a request)."""
        c = self.p.connection
        return (
            self.p.stream is None
            and c.our_state is h11.IDLE
            and c.their_state is h11.IDLE
            and not c.trailing_data[0]
        )

    async def feed(self, data: bytes) -> bytes | None:
        """Take a segment; None when all of it was used (or is kept for the rest of a request),
        else what hypercorn's path must be given now (the hook has stepped aside)."""
        self.buf += data
        while self.buf:
            if not self._idle():
                return self._step_aside()
            end = self.buf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
            if end < 0:
                return self._step_aside() if len(self.buf) > MAX_HEAD or not data else None
            parsed = _parse(self.buf[:end])
            if parsed is None:
                return self._step_aside()
            method, target, headers, length = parsed
            start = end + 4
            if length > MAX_BODY:
                return self._step_aside()
            if len(self.buf) < start + length:
                return self._step_aside() if not data else None  # the rest of the body to come
            body = self.buf[start : start + length]
            self.buf = self.buf[start + length :]
            if not await self._respond(method, target, headers, body):
                self.active = False
                return None
        return None if data else self._step_aside()

    def _step_aside(self) -> bytes:
        self.active = False
        rest, self.buf = self.buf, b""
        return rest

    async def _respond(
        self, method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> bool:
        """Answer one request; False when the connection was closed after it."""
        send = self.p.send
        path, _, query = target.partition(b"?")
        scope = {
            "type": "http",
            "http_version": "1.1",
            "asgi": {"spec_version": "2.1", "version": "3.0"},
            "method": method,
            "scheme": self.scheme,
            "path": unquote(path.decode("ascii")),
            "raw_path": path,
            "query_string": query,
            "root_path": self.p.config.root_path,
            "headers": headers,
            "client": self.p.client,
            "server": self.p.server,
            "extensions": {},
        }
        sent = False

        async def receive() -> dict:
            nonlocal sent
            if sent:  # the whole body went in the first message; what follows is the client leaving
                await self._until_eof()
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        global answered
        answered += 1
        await send(self.ev.Updated(idle=False))
        assert self.answer is not None
        status, out, payload = await self.answer(scope, receive)
        close = any(k == b"connection" and b"close" in v.lower() for k, v in out)
        reason = _REASONS.get(status, b"")
        head = [b"HTTP/1.1 %d %s" % (status, reason), b"date: " + _Date.now()]
        head += [k + b": " + v for k, v in out]
        data = b"\r\n".join(head) + b"\r\n\r\n" + payload
        if self.write is None:
            self.write = tcplean.raw_writer(send) or (lambda d: send(self.ev.RawData(data=d)))
        await self.write(data)
        if close:
            await send(self.ev.Closed())
            return False
        await send(self.ev.Updated(idle=True))
        return True

    async def _until_eof(self) -> None:
        """Until the client closes the connection (asked while its request is being answered: the
        connection's reader waits for the answer meanwhile, so nothing else reads the socket). A
        byte of a next request means it is still there; without a plain socket (TLS), never."""
        sock = tcplean.raw_socket(getattr(self.p.send, "__self__", None))
        if sock is None:
            await trio.sleep_forever()
        assert sock is not None
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                data = sock.recv(1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return  # reset
            if not data:
                return
            await trio.sleep_forever()  # a pipelined request, read once this one is answered


def _parse(head: bytes) -> tuple[str, bytes, list[tuple[bytes, bytes]], int] | None:
    """An ordinary request's method, target, headers (names lower-cased) and body length, or
    None for anything else (hypercorn's path then answers it, errors included)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1" or not parts[0].isalpha():
        return None
    method, target = parts[0], parts[1]
    if not parts[0].isupper() or not target.startswith(b"/") or not target.isascii():
        return None
    if any(c <= 0x20 or c == 0x7F for c in target):
        return None
    headers = []
    length = 0
    seen_length = host = False
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or not set(name) <= _TOKEN:
            return None  # also an obsolete line folding (a line starting with whitespace)
        name = name.lower()
        value = value.strip(b" \t")
        if name in _SPECIAL or b"\r" in value or b"\n" in value or b"\0" in value:
            return None
        if name == b"connection" and b"close" in value.lower():
            return None
        if name == b"content-length":
            if seen_length or not value.isdigit() or len(value) > 12:
                return None
            seen_length, length = True, int(value)
        elif name == b"host":
            host = True
        headers.append((name, value))
    if not host:
        return None
    path = target.split(b"?", 1)[0]
    if path == b"/ui" or path.startswith(b"/ui/") or (path == b"/files" and method == b"POST"):
        return None  # the dashboard (its feed streams) and uploads (streamed to disk)
    return method.decode("ascii"), target, headers, length


def install() -> None:
    """Hook hypercorn's HTTP/1.1 protocol (once per process). A connection is handled here when its
    application has an `answer` (the REST Dispatcher) and TVM_HTTP_DIRECT is not 0."""
    from hypercorn import events
    from hypercorn.protocol.h11 import H11Protocol

    if getattr(H11Protocol, "_tvm_direct", False):
        return
    original = H11Protocol.handle

    async def handle(self: Any, event: Any) -> None:
        hook = self.__dict__.get("_tvm_hook")
        if hook is None:
            answer = getattr(getattr(self.app, "app", None), "answer", None)
            hook = DirectHttp(self, answer, events)
            hook.active = answer is not None and os.environ.get("TVM_HTTP_DIRECT", "1") != "0"
            self._tvm_hook = hook
        if hook.active and isinstance(event, events.RawData):
            data = bytes(event.data)
            rest = await hook.feed(data)
            if rest is None:
                return
            if rest:  # the hook stepped aside: hypercorn takes over from this byte on
                await original(self, events.RawData(data=rest))
            if not data:  # the end of the stream, after what was kept
                await original(self, event)
            return
        await original(self, event)

    H11Protocol.handle = handle  # type: ignore[method-assign]
    H11Protocol._tvm_direct = True  # type: ignore[attr-defined]
