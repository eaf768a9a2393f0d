"""The coordinator's young-generation size: set while a coordinator runs, put back after."""

from __future__ import annotations

import gc

import trio

from coordinator.daemon.gcpolicy import YOUNG, server_gc
from tests.harness import cluster_ctx


def test_nested_blocks_restore_the_thresholds_once_the_last_one_leaves() -> None:
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        with server_gc():
            assert gc.get_threshold() == (YOUNG, 10, 10)
            with server_gc():
                assert gc.get_threshold() == (YOUNG, 10, 10)
            assert gc.get_threshold() == (YOUNG, 10, 10)  # the outer one still runs
        assert gc.get_threshold() == (700, 10, 10)
    finally:
        gc.set_threshold(*before)


def test_a_larger_young_generation_already_chosen_is_kept() -> None:
    before = gc.get_threshold()
    try:
        gc.set_threshold(YOUNG * 2, 5, 7)
        with server_gc():
            assert gc.get_threshold() == (YOUNG * 2, 5, 7)
        assert gc.get_threshold() == (YOUNG * 2, 5, 7)
    finally:
        gc.set_threshold(*before)


def test_a_running_coordinator_uses_the_server_thresholds(tmp_path: object) -> None:
    before = gc.get_threshold()

    async def main() -> tuple[int, ...]:
        async with trio.open_nursery() as nursery:
            async with cluster_ctx(nursery, tmp_path) as c:
                await c.client.pools.list()
                return gc.get_threshold()
        raise AssertionError("unreachable")

    during = trio.run(main)
    assert during[0] == max(YOUNG, before[0])
    assert gc.get_threshold() == before
