"""The coordinator keeps serving if hypercorn's server task dies after it started."""

import socket

import pytest
import trio

from coordinator.daemon import server


async def test_server_failure_after_start_serves_again(monkeypatch):
    calls = []
    second = trio.Event()

    async def fake_serve(app, config, task_status=trio.TASK_STATUS_IGNORED):
        calls.append(config.bind[0])
        task_status.started([])
        if len(calls) == 1:
            raise trio.BusyResourceError("simulated hypercorn send race")
        second.set()
        await trio.sleep_forever()

    monkeypatch.setattr(server, "serve", fake_serve)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    with sock, trio.move_on_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(server._serve, object(), server.Config(), sock)
            await second.wait()
            nursery.cancel_scope.cancel()
    assert len(calls) == 2
    assert calls[0] != calls[1]  # a fresh duplicate of the listening fd each time


async def test_failure_before_start_is_raised(monkeypatch):
    async def fake_serve(app, config, task_status=trio.TASK_STATUS_IGNORED):
        raise OSError("bad certificate")

    monkeypatch.setattr(server, "serve", fake_serve)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    with sock, pytest.raises(OSError, match="bad certificate"):
        await server._serve(object(), server.Config(), sock)
