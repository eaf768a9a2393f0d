"""Shared pieces of the reliability tests: the coordinator (its own process, or in the test's trio
run), agent processes (optionally in a network namespace), tasks that record their real executions,
and the tally of an outcome. They live in `benchmarks/reliability/` so that the full-size runs
(`python -m benchmarks.reliability`) and these tests drive exactly the same code."""

from __future__ import annotations

import pytest

from benchmarks.reliability import Skipped
from benchmarks.reliability._cluster import (
    Agent,
    CoordinatorProcess,
    RunLog,
    child_env,
    inproc_coordinator,
    remove_agent_cgroups,
    start_agent,
    stop_agents,
    tally,
    wait_for,
    wait_sync,
)
from benchmarks.reliability._netns import Netns, unavailable

__all__ = [
    "Agent",
    "CoordinatorProcess",
    "Netns",
    "RunLog",
    "Skipped",
    "child_env",
    "inproc_coordinator",
    "needs_netns",
    "remove_agent_cgroups",
    "start_agent",
    "stop_agents",
    "tally",
    "wait_for",
    "wait_sync",
]


def needs_netns() -> None:
    """Skip the calling test, with the reason, where network namespaces or nftables cannot be used."""
    why = unavailable()
    if why:
        pytest.skip(why)
