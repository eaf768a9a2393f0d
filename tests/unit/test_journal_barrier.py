"""Journal.barrier and Journal.put_meta: what the pipelined agent acks and agent credentials rely on.

An agent frame is acknowledged once `barrier()` (taken after the frame was applied) is done; a frame
without writes of its own must still wait for the writes of earlier frames.
"""

from __future__ import annotations

import trio

from coordinator.state import Write
from coordinator.store import Journal, SqliteStore


async def test_barrier_covers_earlier_writes_even_for_a_frame_without_writes(tmp_path) -> None:
    store = SqliteStore(str(tmp_path / "c.db"))
    journal = Journal(store)
    assert journal.barrier().done  # nothing submitted: nothing to wait for
    first = journal.submit([Write("task", "wi/j/t1", b"x")])
    empty = journal.submit([])  # e.g. a heartbeat frame: its own ticket is done at once
    assert empty.done
    barrier = journal.barrier()
    assert not barrier.done  # ...but its ack must wait for t1's commit
    assert barrier is first
    async with trio.open_nursery() as nursery:
        nursery.start_soon(journal.run)
        with trio.fail_after(10):
            await barrier.wait()
        assert [r[1] for r in store.load()] == ["wi/j/t1"]
        assert journal.barrier().done
        nursery.cancel_scope.cancel()
    store.close()


async def test_put_meta_is_committed_with_the_batch(tmp_path) -> None:
    path = str(tmp_path / "c.db")
    store = SqliteStore(path)
    journal = Journal(store)
    journal.put_meta("agentcred:a1", "pending:abc")
    assert store.get_meta("agentcred:a1") is None  # not written on the caller's thread
    async with trio.open_nursery() as nursery:
        nursery.start_soon(journal.run)
        with trio.fail_after(10):
            await journal.barrier().wait()
        nursery.cancel_scope.cancel()
    store.close()
    again = SqliteStore(path)
    assert again.get_meta("agentcred:a1") == "pending:abc"
    assert again.all_meta()["agentcred:a1"] == "pending:abc"
    assert not list(again.load())  # a meta row is not an object
    again.close()
