"""hypercorn's per-connection loop as coordinator/runtime/tcplean.py changes it, over real sockets to
a real hypercorn: an idle connection is closed after the keep-alive timeout, a request longer than
it is not cut, a shutdown closes idle connections at once and busy ones after their answer, and a
connection whose peer left frees its tasks without waiting for the keep-alive timeout."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from coordinator.runtime import tcplean


async def app(scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            kind = (await receive())["type"].rpartition(".")[2]  # startup, shutdown
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    await receive()
    if scope["path"] == "/slow":
        await trio.sleep(1.0)
    body = scope["path"].encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Server:
    def __init__(self, port: int, stop: trio.Event) -> None:
        self.port, self.stop = port, stop
        self.streams: list[trio.SocketStream] = []

    async def connect(self) -> trio.SocketStream:
        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        self.streams.append(stream)  # closed when the test's server ends
        return stream


@asynccontextmanager
async def server(keep_alive: float) -> AsyncIterator[Server]:
    tcplean.install()
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.keep_alive_timeout = keep_alive
    config.graceful_timeout = 5.0
    config.accesslog = None
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            lambda task_status: serve(
                app, config, shutdown_trigger=stop.wait, task_status=task_status
            )
        )  # type: ignore[arg-type]
        port = int(binds[0].rsplit(":", 1)[1])
        s = Server(port, stop)
        try:
            yield s
        finally:
            stop.set()
            for stream in s.streams:
                await stream.aclose()


async def ask(stream: trio.SocketStream, path: str) -> bytes:
    await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    got = b""
    with trio.fail_after(10):
        while not got.endswith(path.encode()):
            chunk = await stream.receive_some(4096)
            assert chunk, f"closed before the answer to {path}: {got!r}"
            got += chunk
    assert got.startswith(b"HTTP/1.1 200"), got
    return got


async def closed_within(stream: trio.SocketStream, seconds: float) -> float:
    """Seconds until the server closed the connection (it sends nothing else)."""
    t0 = trio.current_time()
    with trio.fail_after(seconds):
        assert await stream.receive_some(4096) == b""
    return trio.current_time() - t0


def connection_tasks() -> int:
    """hypercorn's per-connection tasks alive in this run."""
    n = 0
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        n += "_run_handler" in task.name
        stack.extend(t for nursery in task.child_nurseries for t in nursery.child_tasks)
    return n


def test_install_patches_hypercorn_once() -> None:
    from hypercorn.trio.tcp_server import TCPServer

    tcplean.install()
    init = TCPServer.__init__
    tcplean.install()
    assert TCPServer.__init__ is init
    assert TCPServer._read_data is tcplean._read_data


async def test_idle_connection_is_closed_after_keep_alive() -> None:
    async with server(keep_alive=0.5) as s:
        stream = await s.connect()
        await ask(stream, "/a")
        await ask(stream, "/b")  # the timer restarts after every answer
        assert await closed_within(stream, 10) >= 0.4


async def test_a_request_longer_than_keep_alive_is_not_cut() -> None:
    async with server(keep_alive=0.3) as s:
        stream = await s.connect()
        await ask(stream, "/slow")  # 1 s busy: the idle timer must not fire meanwhile
        await ask(stream, "/again")  # and the connection is still open
        await closed_within(stream, 10)


async def test_shutdown_closes_idle_connections_and_finishes_busy_ones() -> None:
    async with server(keep_alive=60) as s:
        idle, busy = await s.connect(), await s.connect()
        await ask(idle, "/x")
        async with trio.open_nursery() as nursery:
            answer: list[bytes] = []

            async def slow() -> None:
                answer.append(await ask(busy, "/slow"))

            nursery.start_soon(slow)
            await trio.sleep(0.2)  # the slow request is under way
            s.stop.set()
            assert await closed_within(idle, 10) < 10  # long before the 60 s keep-alive
        assert answer
        assert answer[0].endswith(b"/slow")
        await closed_within(busy, 10)


async def test_a_connection_the_peer_left_frees_its_tasks() -> None:
    async with server(keep_alive=60) as s:
        before = connection_tasks()
        streams = [await s.connect() for _ in range(3)]
        for i, stream in enumerate(streams):
            await ask(stream, f"/{i}")
        assert connection_tasks() == before + 3
        for stream in streams:
            await stream.aclose()
        for _ in range(500):  # 10 s, far below the 60 s keep-alive
            if connection_tasks() == before:
                break
            await trio.sleep(0.02)
        assert connection_tasks() == before
