"""An agent in a network namespace this test creates, its link to the coordinator cut by nftables
(drop or reject; host-to-agent, agent-to-host or both) for shorter and longer than the heartbeat
timeout while tasks run: reconciled without loss or duplicate completions. Skipped with the reason
where namespaces or nftables are unavailable; everything created is removed."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from benchmarks.reliability import partition
from tests.reliability.harness import Netns, needs_netns


def _check(results: list[dict[str, Any]], n: int) -> None:
    assert len(results) == n
    for r in results:
        assert r["acknowledged"] == 8, r
        assert r["lost"] == 0, r
        assert r["completions_recorded_twice"] == 0, r
        assert r["unexplained_reruns"] == 0, r
        assert r["failed"] == 0, r
        assert r["stray"] == 0, r
    # Cut for longer than the heartbeat timeout: the TVM was lost and its tasks requeued.
    (long,) = [r for r in results if r["length"] == "long" and r["action"] == "drop"][:1]
    assert long["went_unknown"] == 1, long
    assert long["requeues"] >= 1, long


async def test_cut_links_reconcile_without_loss_or_duplicates(tmp_path: Any) -> None:
    needs_netns()
    results = await partition.scenario(str(tmp_path), full=False)
    _check(results, len(partition.cases(False)))


@pytest.mark.slow
async def test_every_cut_kind_and_length(tmp_path: Any) -> None:
    needs_netns()
    results = await partition.scenario(str(tmp_path), full=True)
    _check(results, 12)


def _host_has(name: str, *cmd: str) -> bool:
    return name in subprocess.run(cmd, capture_output=True, text=True).stdout


def test_a_bad_cut_is_refused_and_the_namespace_leaves_nothing_behind() -> None:
    needs_netns()
    ns = Netns()
    try:
        assert _host_has(ns.name, "ip", "netns", "list")
        assert _host_has(ns.host_if, "ip", "link")
        with pytest.raises(ValueError, match="action 'explode': drop or reject"):
            ns.cut("explode", "in")
        with pytest.raises(ValueError, match="direction 'sideways'"):
            ns.cut("drop", "sideways")
        tables = subprocess.run(
            [*ns.prefix, "nft", "list", "tables"], capture_output=True, text=True
        ).stdout
        assert ns.table not in tables  # nothing half-made
        ns.cut("reject", "both")
        tables = subprocess.run(
            [*ns.prefix, "nft", "list", "tables"], capture_output=True, text=True
        ).stdout
        assert ns.table in tables
    finally:
        ns.close()
    assert not _host_has(ns.name, "ip", "netns", "list")
    assert not _host_has(ns.host_if, "ip", "link")
