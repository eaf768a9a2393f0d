"""The agent's websocket client against real servers on loopback: trio-websocket's server (a
conforming peer) for messages of every length class, pings, closes and rejections, and a raw TCP
server for what a conforming server never sends (fragments, masked frames, oversized messages)."""

from __future__ import annotations

import base64
import functools
import hashlib
import struct
from collections.abc import Awaitable, Callable

import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketRequest,
    serve_websocket,
)

from tvmagent.wsclient import client_frame, open_websocket

SUB = "tvm-test"


async def _serve(
    nursery: trio.Nursery, handler: Callable[[WebSocketRequest], Awaitable[None]]
) -> str:
    server = await nursery.start(
        functools.partial(serve_websocket, max_message_size=4 << 20), handler, "127.0.0.1", 0, None
    )
    return f"ws://127.0.0.1:{server.port}/agent"


async def test_messages_of_every_length_class_go_both_ways() -> None:
    sizes = [0, 1, 125, 126, 65535, 65536, 3 << 20]

    async def echo(req: WebSocketRequest) -> None:
        ws = await req.accept(subprotocol=SUB)
        for _ in sizes:
            await ws.send_message(await ws.get_message())
        await ws.send_message("text")

    async with trio.open_nursery() as n:
        url = await _serve(n, echo)
        async with open_websocket(url, SUB) as ws:
            for size in sizes:
                data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
                await ws.send_message(data)
                assert await ws.get_message() == data
            assert await ws.get_message() == "text"
        n.cancel_scope.cancel()


async def test_a_ping_is_answered_and_a_close_ends_the_connection_with_its_code() -> None:
    pinged = trio.Event()

    async def handler(req: WebSocketRequest) -> None:
        ws = await req.accept(subprotocol=SUB)
        await ws.ping(b"are you there")  # returns once the pong came
        pinged.set()
        await ws.send_message(b"after the ping")
        await ws.aclose(4001, "go away")

    async with trio.open_nursery() as n:
        url = await _serve(n, handler)
        async with open_websocket(url, SUB) as ws:
            assert await ws.get_message() == b"after the ping"
            assert pinged.is_set()
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason.code == 4001
            assert closed.value.reason.reason == "go away"
            with pytest.raises(ConnectionClosed):
                await ws.send_message(b"too late")
        n.cancel_scope.cancel()


async def test_a_rejection_carries_the_status_and_body() -> None:
    async def handler(req: WebSocketRequest) -> None:
        await req.reject(503, body=b'{"code": "CoordinatorStandby"}')

    async with trio.open_nursery() as n:
        url = await _serve(n, handler)
        with pytest.raises(ConnectionRejected) as rejected:
            async with open_websocket(url, SUB):
                pass
        assert rejected.value.status_code == 503
        assert rejected.value.body == b'{"code": "CoordinatorStandby"}'
        n.cancel_scope.cancel()


async def test_a_refused_connection_is_an_os_error() -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()
    with pytest.raises(OSError):
        async with open_websocket(f"ws://127.0.0.1:{port}/agent", SUB):
            pass


def test_bad_urls_are_refused() -> None:
    async def main() -> None:
        for url in ("http://127.0.0.1/agent", "ws:///agent", "127.0.0.1:80"):
            with pytest.raises(ValueError, match="not a websocket URL"):
                async with open_websocket(url, SUB):
                    pass

    trio.run(main)


# ---------------------------------------------------------------------------- a raw server


async def _raw_server(
    nursery: trio.Nursery, frames: bytes, answer: bytes | None = None
) -> tuple[str, list[bytes]]:
    """Accepts one connection, answers the handshake (or sends `answer`), writes `frames`,
    records what the client sent."""
    got: list[bytes] = []

    async def serve(stream: trio.SocketStream) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += await stream.receive_some(4096)
        key = next(
            ln.split(b":", 1)[1].strip()
            for ln in buf.split(b"\r\n")
            if ln.lower().startswith(b"sec-websocket-key:")
        )
        accept = base64.b64encode(
            hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()  # noqa: S324
        )
        await stream.send_all(
            answer
            or b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
            + accept
            + b"\r\n\r\n"
            + frames
        )
        with trio.move_on_after(2):
            while data := await stream.receive_some(4096):
                got.append(data)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, host="127.0.0.1"), serve, 0)
    port = listeners[0].socket.getsockname()[1]
    return f"ws://127.0.0.1:{port}/agent", got


def _server_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        return head + bytes([n]) + payload
    return head + bytes([126]) + struct.pack("!H", n) + payload


async def test_fragments_with_a_ping_between_them_make_one_message() -> None:
    frames = (
        _server_frame(2, b"one ", fin=False)
        + _server_frame(9, b"p")
        + _server_frame(0, b"two ", fin=False)
        + _server_frame(0, b"three")
    )
    async with trio.open_nursery() as n:
        url, got = await _raw_server(n, frames)
        async with open_websocket(url, SUB) as ws:
            assert await ws.get_message() == b"one two three"
            await trio.sleep(0.1)
        n.cancel_scope.cancel()
    sent = b"".join(got)
    assert sent[:1] == b"\x8a"  # the pong, first: FIN + opcode 10
    assert sent[1] & 0x80  # masked, as every client frame must be


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        (b"\x82\x81abcdX", 1002),  # a masked frame from the server
        (b"\xc2\x01x", 1002),  # a reserved bit: no extension was agreed
        (_server_frame(0, b"x"), 1002),  # a continuation of nothing
        (_server_frame(2, b"x" * 200), 1009),  # larger than the client takes
        (b"\x89\x7e\x00\xc8" + b"p" * 200, 1002),  # a control frame over 125 bytes
        (_server_frame(1, b"\xff\xfe"), 1007),  # text that is not UTF-8
    ],
    ids=["masked", "rsv", "orphan-continuation", "too-big", "long-control", "bad-utf8"],
)
async def test_protocol_violations_close_the_connection(frames: bytes, code: int) -> None:
    async with trio.open_nursery() as n:
        url, _ = await _raw_server(n, frames)
        async with open_websocket(url, SUB, max_message_size=100) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason.code == code
        n.cancel_scope.cancel()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Accept: wrong\r\n\r\n",
        b"garbage\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
    ],
    ids=["wrong-accept", "not-http", "not-websocket"],
)
async def test_a_bad_handshake_answer_is_a_handshake_error(answer: bytes) -> None:
    async with trio.open_nursery() as n:
        url, _ = await _raw_server(n, b"", answer=answer)
        with pytest.raises(HandshakeError):
            async with open_websocket(url, SUB):
                pass
        n.cancel_scope.cancel()


def test_client_frames_are_masked_and_sized() -> None:
    for n, head in ((5, 2), (200, 4), (70000, 10)):
        frame = client_frame(2, b"a" * n)
        assert frame[0] == 0x82
        assert frame[1] & 0x80
        key = frame[head : head + 4]
        body = frame[head + 4 :]
        assert len(body) == n
        assert bytes(b ^ key[i % 4] for i, b in enumerate(body)) == b"a" * n


async def test_a_message_sent_at_once_keeps_its_place_when_the_socket_takes_only_part() -> None:
    """`send_now` writes without waiting; what the socket does not take (a message far larger than
    its buffer, the peer not reading yet) goes out whole before the next message, and `flush`
    writes it when no next message comes."""
    big = bytes(range(256)) * (3 << 12)  # 3 MiB: more than the peer's unread buffers hold
    got: list[bytes | str] = []
    reading = trio.Event()
    done = trio.Event()

    async def handler(req: WebSocketRequest) -> None:
        ws = await req.accept(subprotocol=SUB)
        await reading.wait()
        for _ in range(3):
            got.append(await ws.get_message())
        done.set()

    async with trio.open_nursery() as n:
        url = await _serve(n, handler)
        async with open_websocket(url, SUB) as ws:
            assert ws.can_send_now()
            assert not ws.send_now(big)  # only part of it went
            assert not ws.can_send_now()  # the rest comes first
            reading.set()
            await ws.send_message(b"after")
            assert ws.can_send_now()
            assert ws.send_now(b"small")
            await ws.flush()  # nothing left: returns at once
            with trio.fail_after(10):
                await done.wait()
        n.cancel_scope.cancel()
    assert got == [big, b"after", b"small"]
