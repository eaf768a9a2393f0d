"""The direct websocket frame writer (coordinator/runtime/wsdirect.py) against a real hypercorn
server on loopback and a real websocket client: every size of header, frames far larger than the
socket buffer (partial sends finish through hypercorn's path), frames sent through the ASGI path at
the same time (never interleaved, order kept), and the fallback to ASGI when the client negotiated
permessage-deflate."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest
import trio
import trio.lowlevel
from hypercorn.config import Config
from hypercorn.trio import serve
from trio_websocket import open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, Request
from wsproto.extensions import PerMessageDeflate

from coordinator.runtime.wsdirect import direct_writer, frame_header, frame_writer

SIZES = [1, 2, 125, 126, 127, 65535, 65536, 70000, 3 * 1024 * 1024]
DIRECT, ASGI = 1, 2  # first byte of every message: which path sent it


def _payload(tag: int, i: int, size: int) -> bytes:
    return (bytes([tag, i]) + bytes([(i * 7 + tag) % 251]) * size)[:size]


def test_frame_header_lengths():
    assert frame_header(0) == b"\x82\x00"
    assert frame_header(125) == b"\x82\x7d"
    assert frame_header(126) == b"\x82\x7e\x00\x7e"
    assert frame_header(65535) == b"\x82\x7e\xff\xff"
    assert frame_header(65536) == b"\x82\x7f" + (65536).to_bytes(8, "big")


def test_not_a_hypercorn_send_gives_none():
    async def send(message: Any) -> None:
        pass

    assert frame_writer(send) is None


async def _server(app: Any, nursery: trio.Nursery) -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{os.dup(sock.fileno())}"]
    config.websocket_max_message_size = 8 * 1024 * 1024
    config.accesslog = None
    await nursery.start(serve, app, config)
    sock.close()
    return port


def _app(used: list[bool], now: bool = False) -> Any:
    """`now`: frames written with `DirectWriter.now`, what the socket did not take then through
    `raw` before the next one (as the coordinator's flusher and a link's writer do)."""

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        write = frame_writer(send)
        used.append(write is not None)
        direct = direct_writer(send)
        if now and direct is not None:
            d = direct

            async def write(data: bytes) -> None:
                rest = d.now(data)
                if rest:
                    await d.raw(rest)

        async with trio.open_nursery() as nursery:

            async def via_asgi() -> None:
                for i in range(100, 140):
                    await send({"type": "websocket.send", "bytes": _payload(ASGI, i, 200_000)})

            if write is not None:
                nursery.start_soon(via_asgi)
            for i, size in enumerate(SIZES):
                data = _payload(DIRECT, i, size)
                if write is not None:
                    await write(data)
                else:
                    await send({"type": "websocket.send", "bytes": data})
        await receive()  # the client closes

    return app


async def _collect(port: int) -> list[bytes]:
    got: list[bytes] = []
    async with open_websocket_url(
        f"ws://127.0.0.1:{port}/", max_message_size=16 * 1024 * 1024
    ) as ws:
        while len(got) < len(SIZES) + 40:
            got.append(await ws.get_message())
            await trio.lowlevel.checkpoint()  # a slow reader: the server's buffer fills up
    return got


async def _collect_deflate(port: int) -> list[bytes]:
    """trio-websocket offers no extensions: a wsproto client that offers permessage-deflate."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(
        conn.send(Request(host="127.0.0.1", target="/", extensions=[PerMessageDeflate()]))
    )
    got: list[bytes] = []
    partial = b""
    accepted: list[AcceptConnection] = []
    while len(got) < len(SIZES):
        conn.receive_data(await stream.receive_some(1 << 16))
        for event in conn.events():
            if isinstance(event, AcceptConnection):
                accepted.append(event)
            elif isinstance(event, BytesMessage):
                partial += event.data
                if event.message_finished:
                    got.append(partial)
                    partial = b""
    await stream.aclose()
    assert accepted
    assert accepted[0].extensions  # deflate was negotiated
    return got


def _check(got: list[bytes], with_asgi: bool) -> None:
    direct = [g for g in got if g[0] == DIRECT]
    assert direct == [_payload(DIRECT, i, size) for i, size in enumerate(SIZES)]
    others = [g for g in got if g[0] != DIRECT]
    # Whole and in order: a frame cut into by another would not decode or would differ.
    assert others == ([_payload(ASGI, i, 200_000) for i in range(100, 140)] if with_asgi else [])


async def test_direct_frames_arrive_whole_and_in_order_beside_asgi_frames():
    used: list[bool] = []
    async with trio.open_nursery() as nursery:
        port = await _server(_app(used), nursery)
        with trio.fail_after(60):
            got = await _collect(port)
        nursery.cancel_scope.cancel()
    assert used == [True]
    _check(got, with_asgi=True)


async def test_frames_written_at_once_arrive_whole_and_in_order_beside_asgi_frames():
    """Partial non-blocking writes (3 MiB frames, a slow reader) and writes while an ASGI send
    holds the connection (nothing written: all of it goes through `raw`)."""
    used: list[bool] = []
    async with trio.open_nursery() as nursery:
        port = await _server(_app(used, now=True), nursery)
        with trio.fail_after(60):
            got = await _collect(port)
        nursery.cancel_scope.cancel()
    assert used == [True]
    _check(got, with_asgi=True)


async def test_deflate_connection_falls_back_to_asgi():
    used: list[bool] = []
    async with trio.open_nursery() as nursery:
        port = await _server(_app(used), nursery)
        with trio.fail_after(60):
            got = await _collect_deflate(port)
        nursery.cancel_scope.cancel()
    if used != [False]:
        pytest.fail(f"a deflate connection must not use the direct writer: {used}")
    _check(got, with_asgi=False)
