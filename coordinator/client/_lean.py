"""HTTP/1.1 over plain TCP for the async client, without httpx's layers.

A request to the coordinator is small and its answer is one buffered body, so most of what a
general HTTP client does per request (request and response models, auth and redirect flows,
connection-pool bookkeeping, stream wrappers) was most of the client's time: ~0.9 ms of CPU per
call against ~0.25 ms here. Used for `http://` endpoints when no proxy is configured; TLS and
proxies stay with httpx. Failures raise httpx's exception types, which the client already
classifies (a connection never made is `ConnectError`: the request was not sent).

Connections are kept alive and reused one request at a time. A kept connection the server closed
meanwhile (its idle timeout) is noticed before reuse (readable while idle), or in a race by the
send failing: the request is then sent once more on a new connection (the server never had it).
An end of stream before any byte of the answer is ambiguous (closed idle, or read and then died):
only a request that means the same when repeated (GET, HEAD, PUT, DELETE) is sent again then.
"""

from __future__ import annotations

import json
import select
import socket
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit
from urllib.request import getproxies

import anyio
import anyio.abc
import httpx2
import sniffio
import trio

_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
_MAX_HEAD = 64 * 1024  # status line and headers
_READ = 256 * 1024


@dataclass
class LeanResponse:
    """The part of an httpx response the client reads."""

    status_code: int
    headers: dict[str, str]  # names lower-cased; a repeated header keeps its last value
    content: bytes = b""

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


class _StaleConnection(Exception):
    """A kept connection turned out closed before the answer began: send the request again."""


@dataclass
class _Conn:
    stream: anyio.abc.SocketStream
    sock: socket.socket  # the stream's own socket (looked up once: anyio builds a dict per look)
    # Under Trio the stream is a thin layer on the non-blocking socket, which a request may be
    # written to directly (asyncio's transport has its own buffer: not there).
    direct: bool = False
    buf: bytearray = field(default_factory=bytearray)

    def idle_but_readable(self) -> bool:
        """An idle connection with something to read has been closed (or broken) by the server."""
        poll = select.poll()
        try:
            poll.register(self.sock, select.POLLIN)
            return bool(poll.poll(0))
        except (OSError, ValueError):
            return True

    async def send(self, data: bytes) -> None:
        """Send `data`: at once when the socket takes it (no scheduling round), else the rest
        through the stream."""
        if self.direct:
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        await self.stream.send(data)

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            await self.stream.aclose()


@contextmanager
def _trio_limit(seconds: float) -> Iterator[None]:
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise TimeoutError from None


def usable(endpoints: list[str]) -> bool:
    """Plain http everywhere and no proxy to honour (httpx would use one from the environment)."""
    proxies = getproxies()
    return (
        bool(endpoints)
        and all(e.startswith("http://") for e in endpoints)
        and "http" not in proxies
        and "all" not in proxies
    )


class LeanHttp:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._closed = False  # after aclose: a request still under way closes its connection

    async def request(
        self, method: str, url: str, headers: dict[str, str], content: bytes | None
    ) -> LeanResponse:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or 80
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        head = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        if any(c in line for line in head for c in "\r\n\0"):  # one header must stay one line
            raise httpx2.LocalProtocolError("a header or the URL holds a line break or NUL")
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (content or b"")
        origin = (host, port)
        conn = await self._take(origin)
        if conn is not None:
            try:
                return await self._exchange(origin, conn, data, method, reused=True)
            except _StaleConnection:
                pass  # the server closed it unread: once more on a new connection
        conn = await self._connect(host, port)
        try:
            return await self._exchange(origin, conn, data, method, reused=False)
        except _StaleConnection:
            raise httpx2.RemoteProtocolError("the server closed the connection") from None

    def _limit(self) -> AbstractContextManager[object]:
        """The request's time limit. Under Trio its own scope (anyio's wrapper costs ~30 µs a
        request here); either raises TimeoutError."""
        if not self.timeout:
            return nullcontext()
        if sniffio.current_async_library() == "trio":
            return _trio_limit(self.timeout)
        return anyio.fail_after(self.timeout)

    async def _take(self, origin: tuple[str, int]) -> _Conn | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if not conn.idle_but_readable():
                return conn
            await conn.close()
        return None

    async def _connect(self, host: str, port: int) -> _Conn:
        try:
            with self._limit():
                stream = await anyio.connect_tcp(host, port)
        except TimeoutError:
            raise httpx2.ConnectTimeout(f"no connection within {self.timeout:g} s") from None
        except OSError as exc:
            raise httpx2.ConnectError(str(exc)) from None
        sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        direct = sniffio.current_async_library() == "trio" and not sock.getblocking()
        return _Conn(stream, sock, direct)

    async def _exchange(
        self, origin: tuple[str, int], conn: _Conn, data: bytes, method: str, reused: bool
    ) -> LeanResponse:
        keep = False
        try:
            with self._limit():
                try:
                    await conn.send(data)
                except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                    if reused:
                        raise _StaleConnection from None
                    raise httpx2.WriteError(str(exc) or type(exc).__name__) from None
                resp, keep = await _read_response(conn, method, reused and method in _IDEMPOTENT)
            return resp
        except TimeoutError:
            raise httpx2.ReadTimeout(f"no answer within {self.timeout:g} s") from None
        finally:
            if keep and not self._closed:
                self._idle.setdefault(origin, []).append(conn)
            else:  # a connection in an unknown state (an error, a cancelled read) is not reused
                await conn.close()

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                await conn.close()


async def _read_response(conn: _Conn, method: str, may_resend: bool) -> tuple[LeanResponse, bool]:
    while True:  # 1xx answers (none expected) are skipped
        head = await _read_head(conn, may_resend)
        lines = head.decode("latin-1").split("\r\n")
        try:
            version, code, *_ = lines[0].split(" ", 2)
            status = int(code)
        except ValueError:
            raise httpx2.RemoteProtocolError(f"bad status line: {lines[0][:80]!r}") from None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise httpx2.RemoteProtocolError(f"bad header line: {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
        if not 100 <= status < 200:
            break
        may_resend = False
    keep = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
    if method == "HEAD" or status in (204, 304):
        return LeanResponse(status, headers), keep
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = await _read_chunked(conn)
    elif "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError:
            raise httpx2.RemoteProtocolError("bad Content-Length") from None
        body = await _read_exactly(conn, length)
    else:  # the body runs to the end of the connection
        while await _fill(conn):
            pass
        body = bytes(conn.buf)
        conn.buf.clear()
        keep = False
    return LeanResponse(status, headers, body), keep


async def _fill(conn: _Conn) -> bool:
    """Read more into the buffer; False at the end of the stream."""
    try:
        chunk = await conn.stream.receive(_READ)
    except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError):
        return False
    except OSError as exc:
        raise httpx2.ReadError(str(exc)) from None
    conn.buf += chunk
    return True


async def _read_head(conn: _Conn, may_resend: bool) -> bytes:
    """`may_resend`: an end of stream before any byte raises _StaleConnection (see the module)."""
    first = True
    while True:
        end = conn.buf.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(conn.buf[:end])
            del conn.buf[: end + 4]
            return head
        if len(conn.buf) > _MAX_HEAD:
            raise httpx2.RemoteProtocolError("the answer's headers are too large")
        if not await _fill(conn):
            if first and may_resend and not conn.buf:
                raise _StaleConnection
            raise httpx2.RemoteProtocolError("the server closed the connection mid-answer")
        first = False


async def _read_exactly(conn: _Conn, n: int) -> bytes:
    while len(conn.buf) < n:
        if not await _fill(conn):
            raise httpx2.RemoteProtocolError("the server closed the connection mid-body")
    body = bytes(conn.buf[:n])
    del conn.buf[:n]
    return body


async def _read_line(conn: _Conn) -> bytes:
    while True:
        end = conn.buf.find(b"\r\n")
        if end >= 0:
            line = bytes(conn.buf[:end])
            del conn.buf[: end + 2]
            return line
        if len(conn.buf) > _MAX_HEAD or not await _fill(conn):
            raise httpx2.RemoteProtocolError("bad chunked body")


async def _read_chunked(conn: _Conn) -> bytes:
    parts: list[bytes] = []
    while True:
        size_line = await _read_line(conn)
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise httpx2.RemoteProtocolError("bad chunk size") from None
        if size == 0:
            while await _read_line(conn):  # trailers, up to the empty line
                pass
            return b"".join(parts)
        parts.append(await _read_exactly(conn, size))
        if await _read_line(conn):
            raise httpx2.RemoteProtocolError("bad chunk end")
