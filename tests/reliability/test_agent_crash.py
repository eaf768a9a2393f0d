"""Agents of a provisioned pool lost mid-run: one SIGKILLed, one SIGSTOPped past the heartbeat
timeout and SIGCONTed after its tasks' processes ran to their end. Every task that was running on
them is requeued and completed on another TVM, once; the stopped agent's late results are ignored;
both TVMs leave the pool and the local provisioner brings new ones to keep its target; the stopped
agent is killed once its TVM left, so no process beyond the target lingers."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.reliability import agentcrash


def _check(f: dict[str, Any], tasks: int) -> None:
    assert f["acknowledged"] == tasks, f
    assert f["lost"] == 0, f
    assert f["completions_recorded_twice"] == 0, f
    assert f["victim_tasks"] >= 2, f
    assert f["victim_tasks_not_requeued"] == 0, f
    assert f["victim_tasks_not_completed_elsewhere"] == 0, f
    assert f["unexplained_reruns"] == 0, f
    assert f["failed"] == 0, f
    assert f["stray"] == 0, f
    # The stopped agent's tasks really finished there, and none of those results was recorded.
    assert f["late_results"] >= 1, f
    assert f["tvms_in_pool"] == f["target"], f
    assert f["victim_tvms_left_in_pool"] == 0, f
    # The stopped agent was killed once its TVM left the pool: no extra process lingers.
    assert f["stopped_agents_left_running"] == 0, f
    assert f["agents_beyond_target"] == 0, f
    assert f["kill"]["reasons"] == ["AgentExited"], f
    assert f["stop"]["reasons"] == ["HeartbeatTimeout"], f


async def test_killed_and_stopped_agents_tasks_complete_elsewhere_once(
    tmp_path: Any, monkeypatch: Any
) -> None:
    # The provisioned agents inherit it: recorded tasks write beside the test's files.
    monkeypatch.setenv("TVM_AGENT_TASK_ISOLATION", "none")
    f = await agentcrash.scenario(str(tmp_path), tasks=24)
    _check(f, 24)


@pytest.mark.slow
async def test_agent_crash_full_size(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("TVM_AGENT_TASK_ISOLATION", "none")
    f = await agentcrash.scenario(str(tmp_path), tasks=200, rounds=3)
    _check(f, 200)
