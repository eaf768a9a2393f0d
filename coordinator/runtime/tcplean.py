"""hypercorn's per-connection machinery (trio), made to cost per connection instead of per request.

- The keep-alive timer: hypercorn stops it when a request starts and restarts it when the answer
  is out, and each restart takes a lock, cancels the old timer task and starts a new one (a task
  spawned and a scheduler round per request). Here one watcher task per connection waits in a
  cancel scope whose deadline is moved instead: idle sets it to now + keep-alive, busy to never.
  Same behaviour: an idle connection is closed after `keep_alive_timeout`, and at once when the
  server shuts down.
- The read loop: hypercorn enters `fail_after(read_timeout or inf)` around every read, a cancel
  scope per segment even when no read timeout is set (our default), and trio's socket read yields
  to the scheduler after every segment it got. Without a read timeout, a plain TCP connection is
  read from its socket directly: reads until it would block, then a wait until readable (and a
  scheduler pass between segments that arrive back to back, so one busy peer cannot starve the
  others).
- Writes: `raw_writer` sends straight on the socket when no other sender is mid-write, and gives
  what the socket did not take to hypercorn's locked path (trio's path yields twice per send).

`install()` patches hypercorn's trio TCPServer once per process; TVM_HTTP_LEAN=0 leaves it alone.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio


class IdleTimer:
    """hypercorn's TrioSingleTask interface (`restart`, `stop`) for the keep-alive timer only."""

    def __init__(self, server: Any) -> None:
        self._server = server
        self._scope: trio.CancelScope | None = None
        self._deadline = math.inf  # never while a request is under way
        self._started = self._ended = False

    async def restart(self, task_group: Any, action: Any) -> None:
        # `action` is the server's keep-alive action; the watcher below does what it does.
        now = trio.current_time()
        draining = self._server.context.terminated.is_set()
        self._set(now if draining else now + self._server.config.keep_alive_timeout)
        if not self._started:
            self._started = True
            task_group._nursery.start_soon(self._watch)

    async def stop(self) -> None:
        self._set(math.inf)

    def reading_ended(self) -> None:
        """The peer is gone: an idle connection closes now, a busy one when its request ends."""
        self._ended = True
        if self._scope is not None:
            self._scope.cancel()

    def _set(self, deadline: float) -> None:
        self._deadline = deadline
        if self._scope is not None:
            self._scope.deadline = deadline

    async def _watch(self) -> None:
        terminated = self._server.context.terminated
        while not self._ended:
            with trio.CancelScope(deadline=self._deadline) as scope:
                self._scope = scope
                if terminated.is_set():
                    await trio.sleep_forever()  # busy while shutting down: until it is idle
                else:
                    await terminated.wait()
            self._scope = None
            if self._deadline != math.inf:
                break  # idle past keep-alive, or idle when the server shuts down
        if self._ended and self._deadline == math.inf:
            return  # the request under way ends the connection's tasks
        with trio.CancelScope(shield=True):
            await self._server._initiate_server_close()


def raw_socket(server: Any) -> socket.socket | None:
    """The plain TCP socket under a hypercorn TCPServer, or None (TLS, another server)."""
    stream = getattr(server, "stream", None)
    if not isinstance(stream, trio.SocketStream):
        return None
    sock = getattr(stream.socket, "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


def raw_writer(
    protocol_send: Callable[[Any], Awaitable[None]],
) -> Callable[[bytes], Awaitable[None]] | None:
    """A writer of bytes on the connection behind hypercorn's `protocol_send` (a TCPServer's bound
    method) that sends on the socket at once when it can; None where there is no plain socket."""
    from hypercorn.events import RawData

    server = getattr(protocol_send, "__self__", None)
    sock = raw_socket(server)
    if sock is None:
        return None
    lock = server.send_lock  # type: ignore[union-attr]

    async def write(data: bytes) -> None:
        if not lock.locked():
            # Nobody is mid-send (a sender holds the lock until all its bytes are out), so these
            # bytes cannot land inside another sender's.
            try:
                sent = sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = 0  # broken or closed: hypercorn's path below finds out and closes the stream
            if sent == len(data):
                return
            data = data[sent:]
        await protocol_send(RawData(data=data))

    return write


def raw_now(protocol_send: Callable[[Any], Awaitable[None]]) -> Callable[[bytes], bytes] | None:
    """Like `raw_writer`, without waiting: the returned function sends what the socket takes at
    once and returns the rest (b"" when all went; all of it while another sender is mid-write).
    The caller must have the rest written (through `raw_writer`) before anything else. None where
    there is no plain socket."""
    server = getattr(protocol_send, "__self__", None)
    sock = raw_socket(server)
    if sock is None:
        return None
    lock = server.send_lock  # type: ignore[union-attr]

    def write(data: bytes) -> bytes:
        if lock.locked():
            return data
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = 0  # broken or closed: the rest goes hypercorn's way, which finds out
        return data[sent:]

    return write


async def _read_data(self: Any) -> None:
    """hypercorn's read loop, without a cancel scope per read when there is no read timeout."""
    try:
        sock = None if self.config.read_timeout else raw_socket(self)
        if sock is None:
            await _original_read(self)
            return
        await _read_socket(self, sock)
    finally:
        if isinstance(self.idle_task, IdleTimer):
            self.idle_task.reading_ended()


async def _read_socket(self: Any, sock: socket.socket) -> None:
    from hypercorn.events import Closed, RawData

    handle = self.protocol.handle
    waited = True
    while True:
        try:
            data = sock.recv(MAX_RECV)
        except (BlockingIOError, InterruptedError):
            try:
                await trio.lowlevel.wait_readable(sock)
            except trio.ClosedResourceError:
                break  # closed by the server meanwhile
            waited = True
            continue
        except OSError:
            break  # reset by the peer, or closed by the server
        if not waited:
            await trio.lowlevel.checkpoint()  # back-to-back segments: let other connections in
        waited = False
        await handle(RawData(data))
        if not data:
            break
    await handle(Closed())


MAX_RECV = 2**16
_original_read: Any = None


def install() -> None:
    global _original_read
    if _original_read is not None or os.environ.get("TVM_HTTP_LEAN", "1") == "0":
        return
    try:
        from hypercorn.trio.tcp_server import MAX_RECV as theirs
        from hypercorn.trio.tcp_server import TCPServer
    except ImportError:
        return
    globals()["MAX_RECV"] = theirs
    _original_read = TCPServer._read_data
    original_init = TCPServer.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.idle_task = IdleTimer(self)

    TCPServer.__init__ = __init__  # type: ignore[method-assign]
    TCPServer._read_data = _read_data  # type: ignore[method-assign]
