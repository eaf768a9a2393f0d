"""One long-lived thread for the launcher's blocking call, shared by every task start.

clone3 with CLONE_VFORK holds its caller until the child has exec'ed; on a busy host the new child
may wait several milliseconds for a CPU, and an event loop held that long delays every other task's
start and end. A worker-thread hop per start costs more than the start itself, so the loop queues
its starts here instead: the thread takes all of them at each wake-up, runs them back to back, and
hands the results to the loop in one callback per batch.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Any

import trio


class _Call:
    __slots__ = ("args", "done", "fn", "ok", "token", "value")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.done = trio.Event()
        self.token = trio.lowlevel.current_trio_token()
        self.ok = False
        self.value: Any = None


class BatchThread:
    def __init__(self, name: str = "tvm-launcher") -> None:
        self._name = name
        self._queue: collections.deque[_Call] = collections.deque()
        self._cv = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in the thread; its result, or its exception raised here. Not cancellable
        once queued: what it starts (a process) must reach its owner."""
        call = _Call(fn, args)
        with self._cv:
            self._queue.append(call)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
                self._thread.start()
            self._cv.notify()
        with trio.CancelScope(shield=True):
            await call.done.wait()
        if call.ok:
            return call.value
        raise call.value

    def _main(self) -> None:
        while True:
            with self._cv:
                while not self._queue:
                    self._cv.wait()
                batch = list(self._queue)
                self._queue.clear()
            for call in batch:
                try:
                    call.value = call.fn(*call.args)
                    call.ok = True
                except BaseException as exc:  # handed to the caller, which raises it
                    call.value = exc
            by_token: dict[trio.lowlevel.TrioToken, list[_Call]] = {}
            for call in batch:
                by_token.setdefault(call.token, []).append(call)
            for token, calls in by_token.items():
                try:
                    token.run_sync_soon(_deliver, calls)
                except trio.RunFinishedError:
                    pass  # that event loop is gone, and its waiters with it


def _deliver(calls: list[_Call]) -> None:
    for call in calls:
        call.done.set()
