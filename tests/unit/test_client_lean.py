"""The async client's lean HTTP/1.1 path (coordinator/client/_lean.py) against scripted servers on
loopback: chunked and to-the-end bodies, HEAD, a kept connection the server closed (reused or not,
by method), a server that never answers (timeout), one nobody listens on, a cancelled request,
concurrent requests, a request larger than the socket takes at once (Trio and asyncio), and when
httpx is used instead (https, a proxy)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import httpx2
import pytest
import trio

from coordinator.client import AsyncClient, BatchError
from coordinator.client._lean import LeanHttp, usable

Handler = Callable[[trio.SocketStream, bytes], Awaitable[bool]]  # False: close the connection


class Server:
    """Reads requests (head + Content-Length body) and lets `handler` answer each one."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[bytes] = []
        self.connections = 0
        self.port = 0

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._conn, listeners)

    async def _conn(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buf = b""
        async with stream:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buf) < length:
                    buf += await stream.receive_some(65536)
                self.requests.append(head + b"\r\n\r\n" + buf[:length])
                buf = buf[length:]
                if not await self.handler(stream, head):
                    return


def _answer(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def _start(nursery: trio.Nursery, handler: Handler) -> Server:
    server = Server(handler)
    await nursery.start(server.serve)
    return server


async def test_bodies_chunked_to_the_end_and_head(nursery):
    async def handler(stream: trio.SocketStream, head: bytes) -> bool:
        path = head.split(b" ")[1]
        if path == b"/chunked":
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
                b"5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nTrailer: x\r\n\r\n"
            )
            return True
        if path == b"/close":
            await stream.send_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
            return False
        if path == b"/json":
            await stream.send_all(_answer(b'"plain"'))
            return True
        if head.startswith(b"HEAD"):
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n")
            return True
        await stream.send_all(_answer(b"plain", b"Set-Thing: 2\r\n"))
        return True

    server = await _start(nursery, handler)
    http = LeanHttp(timeout=10)
    base = f"http://127.0.0.1:{server.port}"
    r = await http.request("GET", f"{base}/chunked", {}, None)
    assert (r.status_code, r.content, r.headers["x-a"]) == (200, b"hello world", "1")
    r = await http.request("GET", f"{base}/json", {}, None)
    assert (r.json(), r.text) == ("plain", '"plain"')
    r = await http.request("HEAD", f"{base}/x", {}, None)
    assert (r.status_code, r.content) == (200, b"")
    r = await http.request("POST", f"{base}/p?q=1", {"Content-Length": "3"}, b"abc")
    assert (r.content, r.headers["set-thing"]) == (b"plain", "2")
    assert server.requests[-1].startswith(b"POST /p?q=1 HTTP/1.1\r\nHost: 127.0.0.1:")
    assert server.requests[-1].endswith(b"\r\n\r\nabc")
    assert server.connections == 1  # all on one kept connection
    with pytest.raises(httpx2.LocalProtocolError):
        await http.request("GET", f"{base}/x", {"If-Match": "a\r\nX-Injected: 1"}, None)
    r = await http.request("GET", f"{base}/close", {}, None)
    assert r.content == b"until the end"
    r = await http.request("GET", f"{base}/x", {}, None)
    assert r.content == b"plain"
    assert server.connections == 2  # the closed one was not reused
    await http.aclose()


async def test_a_kept_connection_the_server_closed_is_replaced(nursery):
    async def answer_once(stream: trio.SocketStream, head: bytes) -> bool:
        await stream.send_all(_answer(b"ok"))
        return False  # closes after every answer without saying so (an idle timeout)

    server = await _start(nursery, answer_once)
    http = LeanHttp(timeout=10)
    url = f"http://127.0.0.1:{server.port}/x"
    for method in ("GET", "POST", "GET"):
        await trio.sleep(0.05)  # the close has arrived: seen before reuse
        r = await http.request(method, url, {"Content-Length": "0"}, None)
        assert r.content == b"ok"
    assert server.connections == 3
    await http.aclose()


async def test_a_connection_closed_after_reading_the_request_is_resent_only_if_repeatable(
    nursery,
):
    """The ambiguous case: the request went out on a kept connection and the server closed it
    without a byte of answer. A GET is sent again on a new connection; a POST is not (it may have
    been acted on) and fails as the server's doing."""
    seen: list[bytes] = []

    async def handler(stream: trio.SocketStream, head: bytes) -> bool:
        seen.append(head.split(b" ")[0])
        if len(seen) in (2, 4):  # the second request on each connection: read, then hang up
            return False
        await stream.send_all(_answer(b"ok"))
        return True

    server = await _start(nursery, handler)
    http = LeanHttp(timeout=10)
    url = f"http://127.0.0.1:{server.port}/x"
    assert (await http.request("GET", url, {}, None)).content == b"ok"
    assert (await http.request("GET", url, {}, None)).content == b"ok"  # resent on a new one
    assert seen == [b"GET", b"GET", b"GET"]
    with pytest.raises(httpx2.RemoteProtocolError):
        await http.request("POST", url, {"Content-Length": "0"}, None)
    assert seen == [b"GET", b"GET", b"GET", b"POST"]  # not sent twice
    await http.aclose()


async def test_no_answer_and_no_listener_are_connection_failures(nursery):
    async def never(stream: trio.SocketStream, head: bytes) -> bool:
        await trio.sleep_forever()
        return False

    server = await _start(nursery, never)
    async with AsyncClient(f"http://127.0.0.1:{server.port}", "acct", "a2V5", timeout=0.5) as c:
        assert c._lean is not None
        with trio.fail_after(10), pytest.raises(BatchError) as exc:
            await c.pools.list()
        assert exc.value.code == "ConnectionFailed"
        assert "no answer within 0.5 s" in exc.value.message
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nobody listens there now
    async with AsyncClient(f"http://127.0.0.1:{port}", "acct", "a2V5") as c:
        with pytest.raises(BatchError) as exc:
            await c.pools.list()
        assert exc.value.code == "ConnectionFailed"
        assert f"127.0.0.1:{port}" in exc.value.message


async def test_a_cancelled_request_leaves_no_connection_half_read_and_requests_run_at_once(
    nursery,
):
    gate = trio.Event()

    async def handler(stream: trio.SocketStream, head: bytes) -> bool:
        if b"/slow" in head:
            await gate.wait()
        await stream.send_all(_answer(head.split(b" ")[1]))
        return True

    server = await _start(nursery, handler)
    http = LeanHttp(timeout=10)
    base = f"http://127.0.0.1:{server.port}"
    with trio.move_on_after(0.2):
        await http.request("GET", f"{base}/slow", {}, None)
    gate.set()  # its late answer must not be taken for the next request's
    assert (await http.request("GET", f"{base}/next", {}, None)).content == b"/next"
    results: dict[int, bytes] = {}

    async def one(i: int) -> None:
        results[i] = (await http.request("GET", f"{base}/{i}", {}, None)).content

    async with trio.open_nursery() as n:
        for i in range(8):
            n.start_soon(one, i)
    assert results == {i: f"/{i}".encode() for i in range(8)}
    # closed while a request is under way: that request's connection is not kept afterwards
    gate2 = trio.Event()

    async def late(stream: trio.SocketStream, head: bytes) -> bool:
        await gate2.wait()
        await stream.send_all(_answer(b"late"))
        return True

    server.handler = late
    async with trio.open_nursery() as n:
        n.start_soon(one, 99)
        await trio.sleep(0.1)
        await http.aclose()
        gate2.set()
    assert results[99] == b"late"
    assert http._idle == {}


def test_httpx_stays_for_tls_and_proxies(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    assert usable(["http://127.0.0.1:1"])
    assert usable(["http://a:1", "http://b:1"])
    assert not usable(["https://127.0.0.1:1"])
    assert not usable(["http://a:1", "https://b:1"])
    monkeypatch.setenv("HTTP_PROXY", "http://proxy:3128")
    assert not usable(["http://127.0.0.1:1"])


async def test_a_request_larger_than_the_socket_takes_at_once_arrives_whole_under_both_loops(
    nursery,
):
    """Under Trio a request is written straight to the socket; what it does not take at once (a
    body far larger than its buffers, the server not reading yet) follows through the stream.
    Under asyncio the stream writes it all. The server gets every byte, in order, either way."""
    reading = trio.Event()

    async def echo_length(stream: trio.SocketStream, head: bytes) -> bool:
        await stream.send_all(_answer(str(len(server.requests[-1])).encode()))
        return True

    server = Server(echo_length)
    real_conn = server._conn

    async def slow_start(stream: trio.SocketStream) -> None:
        await reading.wait()  # the client's first send fills the buffers and stops part-way
        await real_conn(stream)

    server._conn = slow_start  # type: ignore[method-assign]
    await nursery.start(server.serve)
    url = f"http://127.0.0.1:{server.port}/big"
    body = bytes(range(256)) * (32 << 10)  # 8 MiB
    sized = {"Content-Length": str(len(body))}
    http = LeanHttp(timeout=30)
    async with trio.open_nursery() as n:
        n.start_soon(trio.sleep, 0.3)
        got: list[bytes] = []

        async def put() -> None:
            got.append((await http.request("PUT", url, sized, body)).content)

        n.start_soon(put)
        await trio.sleep(0.2)
        reading.set()
    (conn,) = http._idle[("127.0.0.1", server.port)]
    assert conn.direct  # the direct write was used under Trio
    assert server.requests[-1].endswith(body)
    assert int(got[0]) == len(server.requests[-1])
    await http.aclose()

    async def under_asyncio() -> tuple[bool, bytes]:
        other = LeanHttp(timeout=30)
        try:
            resp = await other.request("PUT", url, sized, body)
            (c,) = other._idle[("127.0.0.1", server.port)]
            return c.direct, resp.content
        finally:
            await other.aclose()

    direct, content = await trio.to_thread.run_sync(asyncio.run, under_asyncio())
    assert not direct
    assert server.requests[-1].endswith(body)
    assert int(content) == len(server.requests[-1])
