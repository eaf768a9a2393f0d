"""The launcher thread: starts queued at one moment share a wake-up, results and errors reach their
callers, a cancelled caller still gets what it started, and a dead thread is replaced."""

from __future__ import annotations

import threading

import trio

from tvmagent.launch.batch import BatchThread


async def test_results_and_errors_reach_their_callers() -> None:
    bt = BatchThread()
    threads: list[int] = []

    def work(x: int) -> int:
        threads.append(threading.get_ident())
        if x < 0:
            raise ValueError(f"bad {x}")
        return x * 2

    results: dict[int, object] = {}

    async def one(x: int) -> None:
        try:
            results[x] = await bt.run(work, x)
        except ValueError as e:
            results[x] = str(e)

    async with trio.open_nursery() as n:
        for x in (1, 2, -3, 4):
            n.start_soon(one, x)
    assert results == {1: 2, 2: 4, -3: "bad -3", 4: 8}
    assert len(set(threads)) == 1  # one launcher thread, not one per call
    assert threading.get_ident() not in threads


async def test_a_cancelled_caller_still_receives_what_it_started() -> None:
    """Once queued, a start is not abandoned: a process must reach the task that owns it."""
    bt = BatchThread()
    gate = threading.Event()

    def slow() -> str:
        gate.wait(5)
        return "started"

    got: list[str] = []

    async def caller() -> None:
        got.append(await bt.run(slow))

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as n:
            n.start_soon(caller)
            await trio.sleep(0.05)
            scope.cancel()
            gate.set()
    assert got == ["started"]


async def test_a_dead_thread_is_replaced() -> None:
    bt = BatchThread()
    assert await bt.run(lambda: 1) == 1
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    bt._thread = dead  # as if the launcher thread had ended
    assert await bt.run(lambda: 2) == 2
    assert bt._thread is not dead
    assert bt._thread.is_alive()
