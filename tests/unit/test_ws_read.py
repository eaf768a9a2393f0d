"""The direct websocket frame reader (coordinator/runtime/wsread.py) against a real hypercorn server
on loopback and a raw wsproto client: frames of every header size cut at random byte boundaries and
several per segment all arrive whole and in order; a ping (answered with a pong), a text frame or a
fragmented message hands the rest of the stream to hypercorn's own path with the order kept; a
frame over the message limit is refused by hypercorn (1009); what the handler raises reaches the
application's task; frames read before the application starts are not lost."""

from __future__ import annotations

import os
import random
import socket
from typing import Any

import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    Request,
    TextMessage,
)

from coordinator.runtime import wsread

SIZES = [0, 1, 2, 125, 126, 127, 65535, 65536, 70000, 300_000]
LIMIT = 1024 * 1024


def _payload(i: int, size: int) -> bytes:
    return (i.to_bytes(2, "big") + bytes([(i * 7) % 251]) * size)[: max(size, 2)]


def test_unmask_is_its_own_inverse_and_matches_the_rfc():
    mask = bytes([0x37, 0xFA, 0x21, 0x3D])
    # RFC 6455 §5.7: "Hello" masked with this key.
    assert wsread.unmask(mask, bytes([0x7F, 0x9F, 0x4D, 0x51, 0x58])) == b"Hello"
    data = os.urandom(1001)
    assert wsread.unmask(mask, wsread.unmask(mask, data)) == data
    assert wsread.unmask(mask, b"") == b""


def test_not_a_hypercorn_connection_gives_none():
    async def send(message: Any) -> None:
        pass

    async def receive() -> Any:
        return {}

    assert wsread.install(send, receive) is None


class Seen:
    def __init__(self) -> None:
        self.direct: list[bytes] = []
        self.asgi: list[bytes | str] = []
        self.installed: list[bool] = []
        self.errors: list[str] = []
        self.fail_on: bytes | None = None
        self.done = trio.Event()
        self.changed = trio.Event()

    def note(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


async def _server(app: Any, nursery: trio.Nursery) -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{os.dup(sock.fileno())}"]
    config.websocket_max_message_size = LIMIT
    config.accesslog = None
    await nursery.start(serve, app, config)
    sock.close()
    return port


def _app(seen: Seen, delay_start: float = 0.0) -> Any:
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
        reader = wsread.install(send, receive)
        seen.installed.append(reader is not None)
        assert reader is not None

        async def on_frame(data: bytes) -> None:
            if seen.fail_on is not None and data == seen.fail_on:
                raise ValueError("bad frame")
            seen.direct.append(data)
            seen.note()

        try:
            await trio.sleep(delay_start)  # frames arrive meanwhile: kept until start
            await reader.start(on_frame)
            while True:
                msg = await receive()
                if msg["type"] == "websocket.disconnect":
                    return
                try:
                    reader.check(msg)
                except ValueError as exc:
                    seen.errors.append(str(exc))
                    await send({"type": "websocket.close", "code": 1011})
                    return
                seen.asgi.append(msg.get("bytes") or msg.get("text") or b"")
                seen.note()
        finally:
            reader.stop()
            seen.done.set()

    return app


class Client:
    """A raw websocket client: its bytes go out in randomly cut pieces."""

    def __init__(self, stream: trio.SocketStream, rng: random.Random) -> None:
        self.stream = stream
        self.conn = WSConnection(ConnectionType.CLIENT)
        self.rng = rng
        self.out = bytearray()
        self.events: list[Any] = []

    @classmethod
    async def open(cls, port: int, seed: int) -> Client:
        c = cls(await trio.open_tcp_stream("127.0.0.1", port), random.Random(seed))
        await c.stream.send_all(c.conn.send(Request(host="127.0.0.1", target="/agent")))
        while not any(isinstance(e, AcceptConnection) for e in c.events):
            await c.read()
        return c

    def queue(self, event: Any) -> None:
        self.out += self.conn.send(event)

    async def flush(self) -> None:
        data = bytes(self.out)
        self.out.clear()
        i = 0
        while i < len(data):
            n = self.rng.choice([1, 2, 3, 7, 100, 5000, 70000])
            await self.stream.send_all(data[i : i + n])
            i += n
            if self.rng.random() < 0.3:
                await trio.sleep(0.001)  # a separate segment

    async def read(self) -> None:
        self.conn.receive_data(await self.stream.receive_some(1 << 16) or None)
        self.events.extend(self.conn.events())


async def _until(seen: Seen, count: int) -> None:
    while len(seen.direct) + len(seen.asgi) < count:
        await seen.changed.wait()


@pytest.mark.parametrize("seed", range(3))
async def test_frames_cut_anywhere_arrive_whole_and_in_order(seed: int):
    seen = Seen()
    async with trio.open_nursery() as nursery:
        port = await _server(_app(seen), nursery)
        with trio.fail_after(30):
            c = await Client.open(port, seed)
            sent = [_payload(i, size) for i, size in enumerate(SIZES * 3)]
            for p in sent:
                c.queue(BytesMessage(data=p))
            await c.flush()
            await _until(seen, len(sent))
            await c.stream.aclose()
            await seen.done.wait()
        nursery.cancel_scope.cancel()
    assert seen.installed == [True]
    assert seen.direct == sent  # every one through the hook
    assert seen.asgi == []


async def test_a_ping_hands_the_rest_to_hypercorn_in_order_and_is_answered():
    seen = Seen()
    async with trio.open_nursery() as nursery:
        port = await _server(_app(seen), nursery)
        with trio.fail_after(30):
            c = await Client.open(port, 7)
            before = [_payload(i, 10 + i) for i in range(5)]
            after = [_payload(100 + i, 200 + i) for i in range(5)]
            for p in before:
                c.queue(BytesMessage(data=p))
            c.queue(Ping(payload=b"hi"))
            for p in after:
                c.queue(BytesMessage(data=p))
            c.queue(TextMessage(data="text"))
            await c.flush()
            await _until(seen, len(before) + len(after) + 1)
            while not any(isinstance(e, Pong) for e in c.events):
                await c.read()
            await c.stream.aclose()
            await seen.done.wait()
        nursery.cancel_scope.cancel()
    assert seen.direct == before
    assert seen.asgi == [*after, "text"]


async def test_fragmented_message_goes_through_hypercorn_whole():
    seen = Seen()
    async with trio.open_nursery() as nursery:
        port = await _server(_app(seen), nursery)
        with trio.fail_after(30):
            c = await Client.open(port, 3)
            c.queue(BytesMessage(data=b"one"))
            c.queue(BytesMessage(data=b"two-", message_finished=False))
            c.queue(BytesMessage(data=b"parts"))
            c.queue(BytesMessage(data=b"three"))
            await c.flush()
            await _until(seen, 3)
            await c.stream.aclose()
            await seen.done.wait()
        nursery.cancel_scope.cancel()
    assert seen.direct == [b"one"]
    assert seen.asgi == [b"two-parts", b"three"]


async def test_a_frame_over_the_limit_is_refused_by_hypercorn():
    seen = Seen()
    async with trio.open_nursery() as nursery:
        port = await _server(_app(seen), nursery)
        with trio.fail_after(30):
            c = await Client.open(port, 5)
            c.queue(BytesMessage(data=b"fine"))
            c.queue(BytesMessage(data=b"x" * (LIMIT + 1)))
            await c.flush()
            while not any(isinstance(e, CloseConnection) for e in c.events):
                await c.read()
            await c.stream.aclose()
            await seen.done.wait()
        nursery.cancel_scope.cancel()
    assert seen.direct == [b"fine"]
    closes = [e for e in c.events if isinstance(e, CloseConnection)]
    assert closes[0].code == 1009


async def test_what_the_handler_raises_reaches_the_application():
    seen = Seen()
    seen.fail_on = b"bad"
    async with trio.open_nursery() as nursery:
        port = await _server(_app(seen), nursery)
        with trio.fail_after(30):
            c = await Client.open(port, 9)
            for p in (b"ok", b"bad", b"never"):
                c.queue(BytesMessage(data=p))
            await c.flush()
            await seen.done.wait()
            while not any(isinstance(e, CloseConnection) for e in c.events):
                await c.read()
            await c.stream.aclose()
        nursery.cancel_scope.cancel()
    assert seen.direct == [b"ok"]  # nothing after the failed frame was handled
    assert seen.errors == ["bad frame"]
    assert [e.code for e in c.events if isinstance(e, CloseConnection)] == [1011]


async def test_frames_read_before_start_are_handed_over_first():
    seen = Seen()
    async with trio.open_nursery() as nursery:
        port = await _server(_app(seen, delay_start=0.3), nursery)
        with trio.fail_after(30):
            c = await Client.open(port, 11)
            sent = [_payload(i, 50) for i in range(20)]
            for p in sent:
                c.queue(BytesMessage(data=p))
            await c.flush()
            await _until(seen, len(sent))
            await c.stream.aclose()
            await seen.done.wait()
        nursery.cancel_scope.cancel()
    assert seen.direct == sent
