"""Journal.barrier and Journal.put_meta: what the pipelined agent acks and agent credentials rely on.

An agent frame is acknowledged once `barrier()` (taken after the frame was applied) is done; a frame
without writes of its own must still wait for the writes of earlier frames.
"""

from __future__ import annotations

import contextlib

import trio
import trio.testing

from coordinator.core import Write
from coordinator.runtime.journal import Journal


async def test_barrier_covers_earlier_writes_even_for_a_frame_without_writes(open_store) -> None:
    store = open_store("c.db")
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


async def test_put_meta_is_committed_with_the_batch(open_store) -> None:
    store = open_store("c.db")
    journal = Journal(store)
    journal.put_meta("agentcred:a1", "pending:abc")
    assert store.get_meta("agentcred:a1") is None  # not written on the caller's thread
    async with trio.open_nursery() as nursery:
        nursery.start_soon(journal.run)
        with trio.fail_after(10):
            await journal.barrier().wait()
        nursery.cancel_scope.cancel()
    store.close()
    again = open_store("c.db")
    assert again.get_meta("agentcred:a1") == "pending:abc"
    assert again.all_meta()["agentcred:a1"] == "pending:abc"
    assert not list(again.load())  # a meta row is not an object
    again.close()


async def test_agent_frame_is_acked_only_after_earlier_writes_commit(tmp_path) -> None:
    """The link's reader does not wait for commits (pipelined acks), so the ack of a frame without
    writes of its own (a heartbeat) must still wait for the writes submitted before it."""
    from coordinator.runtime.service import CoordinatorService
    from protocol import messages as pm
    from protocol.session import Received

    svc = CoordinatorService(str(tmp_path / "state"))
    link, _ = svc.link_for(pm.Hello(agent_id="a1", token="x"))
    svc.journal.submit([Write("task", "wi/j/t1", b"x")])  # e.g. the previous frame's completion
    link.session.received = 1  # seq 1 arrived: a heartbeat
    await svc.agent_batch(link, [Received(1, pm.Heartbeat())])
    assert link.session.confirmed == 0  # applied, but not acknowledged before the commit
    async with trio.open_nursery() as nursery:
        nursery.start_soon(svc.ack_loop)
        await trio.sleep(0.05)
        assert link.session.confirmed == 0  # the journal has not run yet
        nursery.start_soon(svc.journal.run)
        with trio.fail_after(10):
            while link.session.confirmed < 1:  # the acker pokes the link's writer
                await link.wake.wait()
                link.wake = trio.Event()
        assert [r[1] for r in svc.store.load()] == ["wi/j/t1"]
        nursery.cancel_scope.cancel()
    svc.close()


async def test_writes_no_client_waits_for_share_a_commit_until_an_urgent_one(open_store) -> None:
    """Agent completions (`urgent=False`) wait for others to join their commit; a REST command's
    writes end the wait, and everything pending goes in one transaction."""
    store = open_store("c.db")
    journal = Journal(store, coalesce_s=60.0)
    lazy = [journal.submit([Write("taskdone", f"wi/j/t{i}", b"x")], urgent=False) for i in range(3)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(journal.run)
        await trio.testing.wait_all_tasks_blocked()
        assert not any(t.done for t in lazy)  # waiting for company, nothing committed
        assert journal.commits == 0
        assert not list(store.load())
        urgent = journal.submit([Write("task", "wi/j/u", b"y")])
        with trio.fail_after(10):
            await urgent.wait()
        assert all(t.done for t in lazy)
        assert journal.commits == 1  # one transaction for all four
        assert sorted(r[1] for r in store.load()) == ["wi/j/t0", "wi/j/t1", "wi/j/t2", "wi/j/u"]
        nursery.cancel_scope.cancel()
    store.close()


async def test_lazy_writes_alone_are_committed_after_the_wait(open_store) -> None:
    store = open_store("c.db")
    journal = Journal(store, coalesce_s=0.01)
    ticket = journal.submit([Write("taskdone", "wi/j/t", b"x")], urgent=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(journal.run)
        with trio.fail_after(10):
            await ticket.wait()
        assert [r[1] for r in store.load()] == ["wi/j/t"]
        nursery.cancel_scope.cancel()
    store.close()


def test_a_resumed_agent_is_told_what_is_durable_not_what_was_applied(tmp_path) -> None:
    """Resuming, the agent forgets every message up to the Welcome's `last_received`: that must be
    what is committed, or a coordinator that died before the commit would have lost them."""
    from coordinator.runtime.service import CoordinatorService
    from protocol import messages as pm

    svc = CoordinatorService(str(tmp_path / "state"))
    link, first = svc.link_for(pm.Hello(agent_id="a1", token="x"))
    link.session.received = 5  # applied
    link.session.confirmed = 3  # committed and acknowledged
    again, welcome = svc.link_for(
        pm.Hello(agent_id="a1", token="x", session_id=first.session_id, last_received=0)
    )
    assert again is link
    assert welcome.resumed
    assert welcome.last_received == 3
    svc.close()


async def test_a_failed_commit_makes_the_agents_next_hello_a_new_session(tmp_path) -> None:
    """The acknowledgement of a frame whose commit failed closes the link; resumed, the failed
    acknowledgement would fail every later connection. The next hello starts a new session, in
    which the agent sends again everything not acknowledged."""
    from coordinator.runtime.service import CoordinatorService
    from protocol import messages as pm
    from protocol.session import Received

    svc = CoordinatorService(str(tmp_path / "state"))
    link, first = svc.link_for(pm.Hello(agent_id="a1", token="x"))
    svc.store.close()  # every commit fails from now on
    svc.journal.submit([Write("task", "wi/j/t1", b"x")])
    link.session.received = 1
    await svc.agent_batch(link, [Received(1, pm.Heartbeat())])
    link.connected = True
    async with trio.open_nursery() as nursery:
        nursery.start_soon(svc.journal.run)
        nursery.start_soon(svc.ack_loop)
        with trio.fail_after(10):
            while not link.commit_failed:
                await link.wake.wait()
                link.wake = trio.Event()
        nursery.cancel_scope.cancel()
    assert link.close_request is not None  # the writer closes the link
    assert link.session.confirmed == 0  # never acknowledged
    link.connected = False
    _, welcome = svc.link_for(
        pm.Hello(agent_id="a1", token="x", session_id=first.session_id, last_received=0)
    )
    assert not welcome.resumed
    assert welcome.session_id != first.session_id
    assert not link.pending_acks
    assert not link.commit_failed


async def test_after_a_failed_commit_no_later_frame_is_acknowledged(tmp_path) -> None:
    """Between a failed commit and the close of the link, a frame without writes of its own must
    not acknowledge (its seq would cover the frame whose commit failed)."""
    from coordinator.runtime.service import CoordinatorService
    from protocol import messages as pm
    from protocol.session import Received

    svc = CoordinatorService(str(tmp_path / "state"))
    link, _ = svc.link_for(pm.Hello(agent_id="a1", token="x"))
    link.commit_failed = True  # as `ack_durable` leaves it
    link.session.received = 2
    await svc.agent_batch(link, [Received(2, pm.Heartbeat())])
    assert link.session.confirmed == 0
    assert not link.pending_acks
    svc.close()


async def test_a_new_connection_drops_the_old_connections_direct_writer(tmp_path) -> None:
    """Frames of the new connection must never go to the old one's socket, which may look open
    for a while after the agent came back on another."""
    from coordinator.runtime.service import CoordinatorService
    from protocol import messages as pm

    svc = CoordinatorService(str(tmp_path / "state"))
    link, first = svc.link_for(pm.Hello(agent_id="a1", token="x"))

    class Old:
        def open(self) -> bool:
            return True

        def now(self, frame: bytes) -> bytes:
            raise AssertionError("a frame written to the old connection")

    link.direct, link.tail = Old(), b"left"  # type: ignore[assignment]
    again, _ = svc.link_for(
        pm.Hello(agent_id="a1", token="x", session_id=first.session_id, last_received=0)
    )
    assert again is link
    assert link.direct is None
    assert link.tail == b""
    link.session.send(pm.Ping())
    assert not link.send_now()  # the writer's, until the new connection installs its own
    svc.close()


async def test_a_barrier_behind_a_failed_commit_fails_until_the_retry_lands(open_store) -> None:
    """What waits for a barrier (a revoked token's meta row, an agent's Welcome) must not be told
    "durable" while the writes of a failed commit only wait for their retry."""
    from coordinator.common.errors import ApiError

    store = open_store("c.db")
    real_apply = store.apply
    failing = [True]

    def apply(batch):  # noqa: ANN001, ANN202 - the disk is full for the first commit only
        if failing[0]:
            raise OSError(28, "No space left on device")
        return real_apply(batch)

    store.apply = apply
    journal = Journal(store)
    journal.RETRY_FIRST_S = 0.05
    first = journal.put_meta("revoked:x", "1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(journal.run)
        with trio.fail_after(10):
            await first.event.wait()
        assert first.error is not None
        barrier = journal.barrier()
        assert barrier.event.is_set()
        assert not barrier.done
        with trio.fail_after(10), contextlib.suppress(ApiError):
            await barrier.wait()
            raise AssertionError("a barrier behind a failed commit said durable")
        failing[0] = False  # space again: the retry lands
        settled = trio.Event()
        journal.on_settled = settled.set
        with trio.fail_after(10):
            while journal.unavailable is not None or journal.commits == 0:
                await settled.wait()  # each commit attempt, failed or not
                settled = trio.Event()
                journal.on_settled = settled.set
        assert journal.barrier().done
        nursery.cancel_scope.cancel()
    assert store.get_meta("revoked:x") == "1"
    store.close()
