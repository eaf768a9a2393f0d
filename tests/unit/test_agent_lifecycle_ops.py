"""A TVM operation that fails unexpectedly (a bug, the host) leaves the agent running: its TVM is
reported broken with the reason, a failed join is kept for the retry, and a later successful join
clears the problem."""

from __future__ import annotations

import math
from typing import Any

import trio

from protocol import messages as pm
from tvmagent.lifecycle import TvmLifecycle


async def test_a_failing_join_is_reported_and_retried_not_fatal() -> None:
    told_send, told = trio.open_memory_channel[Any](math.inf)
    outcomes: list[Exception | None] = [RuntimeError("boom"), None]
    none: Any = None
    async with trio.open_nursery() as nursery:
        lc = TvmLifecycle(
            "/nonexistent",
            none,
            none,
            none,
            none,
            none,
            send=told_send.send_nowait,
            carry_out=lambda _: None,
            wait_idle=none,
            nursery=lambda: nursery,
        )

        async def join(msg: pm.JoinPool) -> None:
            outcome = outcomes.pop(0)
            if outcome is not None:
                raise outcome

        lc._join = join  # type: ignore[method-assign]
        msg = pm.JoinPool(account="a", pool="p", tvm_name="tvm-1")
        lc.queue(msg)
        with trio.fail_after(5):
            assert isinstance(await told.receive(), pm.Heartbeat)  # the coordinator is told
        assert lc.health.problems == {"tvm-operation": "JoinPool failed: RuntimeError: boom"}
        assert lc.failed_join is msg  # tried again by the host checks' loop
        lc.retry_join()
        with trio.fail_after(5):
            assert isinstance(await told.receive(), pm.Heartbeat)  # and told it is repaired
        assert lc.health.problems == {}
        assert lc.failed_join is None
        nursery.cancel_scope.cancel()
