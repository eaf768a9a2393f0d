"""One long-lived thread for the launcher's blocking call, shared by every task start, which also
watches the started processes for their end.

clone3 with CLONE_VFORK holds its caller until the child has exec'ed; on a busy host the new child
may wait several milliseconds for a CPU, and an event loop held that long delays every other task's
start and end. A worker-thread hop per start costs more than the start itself, so the loop queues
its starts here instead: the thread takes all of them at each wake-up, runs them back to back, and
hands the results to the loop in one callback per batch.

The same thread keeps the pidfd of every child it started in its own epoll set: an ended child is
reported to the loop in that same batched callback, so the loop registers no descriptor per task
and wakes once for all the ends of a moment. The thread never reaps: the loop does (`Child.poll`),
so a pid cannot be reused while the loop may still signal it. Should the thread die, its children
fall back to the loop's own wait on their pidfd and the next start makes a new thread.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable
from typing import Any

import trio

from .spawn import Child

log = logging.getLogger("tvm.agent")


class _Call:
    __slots__ = ("args", "fn", "ok", "task", "token", "value")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.task = trio.lowlevel.current_task()
        self.token = trio.lowlevel.current_trio_token()
        self.ok = False
        self.value: Any = None


class BatchThread:
    def __init__(self, name: str = "tvm-launcher") -> None:
        self._name = name
        self._queue: collections.deque[_Call] = collections.deque()
        self._forget: list[Child] = []  # reaped by the loop before the thread saw them end
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._idle = False  # the thread sleeps in epoll: a new call must write the eventfd
        self._efd = -1

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in the thread; its result, or its exception raised here. Not cancellable
        once queued: what it starts (a process) must reach its owner. A `Child` it returns is
        watched by the thread (see the module's doc)."""
        call = _Call(fn, args)
        with self._lock:
            self._queue.append(call)
            if self._thread is None or not self._thread.is_alive():
                if self._efd >= 0:  # a dead thread's: closed here, where nobody can write to it
                    os.close(self._efd)
                self._efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                self._idle = False
                self._thread = threading.Thread(
                    target=self._main, args=(self._efd,), name=self._name, daemon=True
                )
                self._thread.start()
                wake = False
            else:
                wake, self._idle = self._idle, False
        if wake:
            os.eventfd_write(self._efd, 1)
        await trio.lowlevel.wait_task_rescheduled(_uncancellable)
        if call.ok:
            return call.value
        raise call.value

    def busy(self) -> bool:
        """Starts are queued here or under way in the thread."""
        with self._lock:
            alive = self._thread is not None and self._thread.is_alive()
            return bool(self._queue) or (alive and not self._idle)

    def forget(self, child: Child) -> None:
        """(loop) `child` was reaped: the thread drops its pidfd, unless it saw the end already."""
        with self._lock:
            self._forget.append(child)
            wake, self._idle = self._idle, False
        if wake:
            os.eventfd_write(self._efd, 1)

    def _poll(self, ep: select.epoll, timeout: float) -> list[tuple[int, int]]:
        return ep.poll(timeout)

    def _main(self, efd: int) -> None:
        ep = select.epoll()
        ep.register(efd, select.EPOLLIN)
        children: dict[int, Child] = {}  # pidfd -> child, while its end is not seen
        batch: list[_Call] = []  # taken from the queue, not handed over yet
        ended: list[Child] = []  # seen to end (or forgotten), not handed over yet
        try:
            while True:
                with self._lock:
                    self._idle = not self._queue and not self._forget
                    timeout = -1.0 if self._idle else 0.0
                events = self._poll(ep, timeout)
                for fd, _ in events:
                    if fd == efd:
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(efd)
                        continue
                    child = children.pop(fd, None)
                    if child is not None:
                        ep.unregister(fd)
                        child._watch_over()
                        ended.append(child)
                with self._lock:
                    self._idle = False
                    batch = list(self._queue)
                    self._queue.clear()
                    forget, self._forget = self._forget, []
                for child in forget:  # the loop closes their pidfd once it hears of it
                    if children.pop(child._pidfd, None) is child:
                        ep.unregister(child._pidfd)
                        child._watch_over()
                        ended.append(child)
                for call in batch:
                    try:
                        call.value = call.fn(*call.args)
                        call.ok = True
                    except BaseException as exc:  # handed to the caller, which raises it
                        call.value = exc
                    if call.ok and isinstance(call.value, Child):
                        child = call.value
                        try:
                            ep.register(child._pidfd, select.EPOLLIN)
                        except OSError:  # the loop waits on its pidfd itself
                            continue
                        child._watched_by(self, call.token)
                        children[child._pidfd] = child
                _hand_over(batch, ended)
                batch, ended = [], []
        except BaseException:
            log.exception("the launcher thread ended: a new one takes the next start")
            for child in children.values():
                with contextlib.suppress(OSError):
                    ep.unregister(child._pidfd)
                child._watch_over()  # its owner waits on the pidfd itself from now on
            with self._lock:
                lost = list(self._queue)
                self._queue.clear()
                self._thread = None  # the next start makes a new one
            lost += batch  # those run already get what they got
            for call in lost:
                if not call.ok and call.value is None:
                    call.value = RuntimeError("the launcher thread ended")
            _hand_over(lost, ended + list(children.values()))
        finally:
            ep.close()


def _hand_over(calls: list[_Call], ended: list[Child]) -> None:
    """(thread) One loop callback per event loop for the finished calls and the ended children."""
    tokens: dict[trio.lowlevel.TrioToken, tuple[list[_Call], list[Child]]] = {}
    for call in calls:
        tokens.setdefault(call.token, ([], []))[0].append(call)
    for child in ended:
        if child._token is not None:
            tokens.setdefault(child._token, ([], []))[1].append(child)
    for token, (cs, es) in tokens.items():
        try:
            token.run_sync_soon(_deliver, cs, es)
        except trio.RunFinishedError:
            pass  # that event loop is gone, and its waiters with it


def _uncancellable(_: Any) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED


def _deliver(calls: list[_Call], ended: list[Child]) -> None:
    for call in calls:
        trio.lowlevel.reschedule(call.task)
    for child in ended:
        child._ended()
