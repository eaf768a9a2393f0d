"""The coordinator SIGKILLed at chosen moments — while a task collection is being added, the
instant the journal commits, at random — and restarted on the same state each time, with tasks
running on real agents: no acknowledged task is lost, no completion is recorded twice, and a task
runs more than once only when it was requeued. Every task records its real executions in a file."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from benchmarks.reliability import crash
from tests.reliability.harness import child_env


def _check(f: dict[str, Any], tasks: int, kills: int) -> None:
    assert f["acknowledged"] == tasks, f
    assert f["lost"] == 0, f
    assert f["completions_recorded_twice"] == 0, f
    assert f["unexplained_reruns"] == 0, f
    assert f["failed"] == 0, f
    assert f["never_ran"] == 0, f
    assert f["stray"] == 0, f
    assert f["submit_errors"] == 0, f
    assert f["kills"] == kills, f


def test_sigkill_mid_collection_and_at_commits_loses_nothing(tmp_path: Any) -> None:
    f = crash.scenario(
        str(tmp_path), tasks=200, kills=5, batch=10, pause=0.05, task_seconds=0.2, seed=1
    )
    _check(f, 200, 5)
    # The moments were hit, not just aimed at: a collection in flight when the signal went, and a
    # journal write seen as it happened.
    assert f["kills_mid_addtaskcollection"] >= 1, f
    assert f["kills_at_group_commit"] >= 1, f


@pytest.mark.slow
def test_sigkill_full_size_run(tmp_path: Any) -> None:
    f = crash.scenario(str(tmp_path), tasks=10_000, kills=7, pause=0.05, task_seconds=0.05)
    _check(f, 10_000, 7)
    assert f["kills_mid_addtaskcollection"] >= 1, f
    assert f["kills_at_group_commit"] >= 1, f


def test_an_unknown_suite_is_refused_with_the_known_ones() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.reliability", "--only", "crash,nosuch"],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
    )
    assert r.returncode == 2
    assert "unknown suites ['nosuch']" in r.stderr
    assert "crash, agentcrash, partition" in r.stderr
    assert r.stdout == ""
