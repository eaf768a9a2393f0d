"""Every benchmark runs in --quick mode and prints well-formed result lines (not a speed check)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNITS = {"tasks/s", "ms", "bytes", "s", "ratio"}

_E2E_CPU = {
    f"end_to_end_cpu_per_task_{k}"
    for k in ("coordinator", "agent0", "agent1", "agents", "task_side", "submitter")
}
EXPECTED = {
    "placement": {"placement", "placement_bound_free_coordinator", "placement_bound_all_cpu"},
    "dependencies": {
        "deps_dag_elapsed",
        "deps_flat_elapsed",
        "deps_dag_overhead_ratio",
        "deps_dag_cpu_per_task",
        "deps_flat_cpu_per_task",
        "deps_core_flat",
        "deps_core_chain",
        "deps_core_fanin",
    },
    "end_to_end": {
        "end_to_end",
        "raw_spawn",
        "end_to_end_ratio",
        "end_to_end_frames_per_task",
        "end_to_end_commits_per_task",
        *_E2E_CPU,
    },
    "latency": {
        "latency_submit_to_start_p50",
        "latency_submit_to_start_p99",
        "latency_submit_to_complete_p50",
        "latency_submit_to_complete_p99",
        "latency_cpu_per_task_coordinator",
        "latency_cpu_per_task_agents",
        "latency_post_p50",
        "latency_start_to_end_p50",
        "latency_end_to_seen_p50",
    },
    "peers": {"raw_spawn"},
    "memory": {"coordinator_rss_per_queued_task", "idle_agent_rss"},
    "recovery": {"coordinator_restart", "coordinator_restore_in_process"},
    "trace_replay": {
        "trace_makespan",
        "trace_wait_mean",
        "trace_wait_p50",
        "trace_wait_p90",
        "trace_slot_utilisation",
    },
}


# Rows a peer adds when it is installed (`pip install -e '.[bench]'`); without it, a note instead.
PEER_ROWS = {
    "hyperqueue": {
        "peer_hyperqueue",
        "peer_hyperqueue_ratio",
        "peer_hyperqueue_cpu_per_task_server_workers_client",
        "peer_hyperqueue_cpu_per_task_task_side",
    },
    "dask": {
        "peer_dask",
        "peer_dask_ratio",
        "peer_dask_cpu_per_task_scheduler_client",
        "peer_dask_cpu_per_task_workers",
        "peer_dask_cpu_per_task_task_side",
    },
}
WITH_PEERS = {"end_to_end", "peers"}


def _run(name: str, argv: list[str], pythonpath: str = "") -> tuple[list[dict], str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (pythonpath, REPO, env.get("PYTHONPATH", "")) if p
    )
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--quick", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert rows, f"no result lines; stderr: {proc.stderr[-2000:]}"
    for row in rows:
        assert set(row) == {"name", "parameters", "value", "unit"}, row
        assert isinstance(row["parameters"], dict), row
        assert row["parameters"], row
        assert isinstance(row["value"], (int, float)), row
        assert row["value"] == row["value"], row  # not NaN
        assert row["value"] >= 0, row
        assert row["unit"] in UNITS, row
    assert proc.stderr.strip(), "no human summary"
    return rows, proc.stderr


def _peer_rows(name: str, stderr: str) -> set[str]:
    """What the peers that ran add to `name`'s rows; a peer that did not run must say why."""
    out: set[str] = set()
    for peer, rows in PEER_ROWS.items():
        if f"peers: {peer}: " in stderr:
            assert "skipped" in stderr or "failed" in stderr or "timed out" in stderr, stderr
            continue
        out |= rows
        if name == "end_to_end":
            out.add(f"end_to_end_vs_{peer}")
    return out


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_benchmark_quick(name: str) -> None:
    rows, stderr = _run(name, [])
    expected = EXPECTED[name] | (_peer_rows(name, stderr) if name in WITH_PEERS else set())
    assert {r["name"] for r in rows} == expected


def test_end_to_end_on_tvm_up() -> None:
    """The same workload against a default `tvm up` subprocess, over signed REST."""
    rows, _ = _run("end_to_end", ["--coordinator", "up", "--peers", "none"])
    assert {r["name"] for r in rows} == EXPECTED["end_to_end"] | {
        "end_to_end_cpu_per_task_rest_poller"
    }
    assert all(r["parameters"].get("coordinator", "up") == "up" for r in rows)


def test_peers_not_installed_are_skipped_with_a_note(tmp_path: pathlib.Path) -> None:
    """With both peers unimportable, only the raw spawn rate is measured and each peer says why."""
    for mod in ("hyperqueue", "dask"):
        pkg = tmp_path / mod
        pkg.mkdir()
        (pkg / "__init__.py").write_text(f"raise ImportError('{mod} hidden by the test')\n")
    rows, stderr = _run("peers", ["--tasks", "20"], pythonpath=str(tmp_path))
    assert {r["name"] for r in rows} == {"raw_spawn"}
    for mod in ("hyperqueue", "dask"):
        assert f"peers: {mod}: not installed ({mod} hidden by the test): skipped" in stderr, stderr
    assert "pip install -e '.[bench]'" in stderr


def _refused(name: str, *argv: str) -> str:
    """A benchmark run that must refuse its arguments: its stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--quick", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert proc.stdout == ""
    return proc.stderr


def test_peers_refuse_an_unknown_peer() -> None:
    assert "unknown peer(s) slurm" in _refused("peers", "--peers", "slurm")


def test_a_benchmark_agent_that_ended_is_named_with_its_log(tmp_path: pathlib.Path) -> None:
    """A benchmark waiting on its tasks fails at once, saying which agent ended and why, instead
    of waiting out its time limit."""
    from benchmarks._common import agents_running

    (tmp_path / "agents").mkdir()
    log = tmp_path / "agents" / "agent1.log"
    log.write_text("cannot reach the coordinator\n")
    running = subprocess.Popen(["sleep", "30"])
    ended = subprocess.Popen(["sh", "-c", "exit 3"])
    try:
        ended.wait()
        with pytest.raises(RuntimeError, match="agent1 ended \\(exit status 3\\)") as err:
            agents_running([running, ended], str(tmp_path))
        assert "cannot reach the coordinator" in str(err.value)
        assert agents_running([running], str(tmp_path))
    finally:
        running.kill()
        running.wait()


def test_floor_measures_the_sandboxed_launch_and_leaves_nothing_behind() -> None:
    """benchmarks/floor.py: root, the clone3 launcher and cgroup v2 (as CI has them), else skipped
    with its reason; it removes its cgroups and directories."""
    from tvmagent import _cgroups
    from tvmagent.launch import spawn as fast

    layout = _cgroups.detect_layout([])
    if os.geteuid() != 0 or not fast.fast_available() or layout.v2_base is None:
        pytest.skip("needs root, the clone3 launcher and a writable cgroup v2 hierarchy")
    rows, stderr = _run("floor", ["--tasks", "200"])
    names = {r["name"]: r["value"] for r in rows}
    assert set(names) == {
        "floor_raw_spawn",
        "floor_sandboxed",
        "floor_sandboxed_ratio",
        "floor_sandboxed_ahead",
        "floor_cpu_per_task",
        "floor_share_of_target_cpu",
        "floor_launching_cpu_per_task",
        "floor_launching_cpu_per_task_ahead",
    }
    assert names["floor_sandboxed"] > 0
    assert names["floor_cpu_per_task"] > 0
    assert names["floor_launching_cpu_per_task"] > 0
    assert "leaves" in stderr
    assert "cannot be under this floor's launching side" in stderr
    bases = [layout.v2_base, *layout.v1_bases.values()]
    left = [d for b in bases for d in os.listdir(b) if d.startswith("tvm-floor-")]
    assert not left, left


def test_end_to_end_with_agents_that_made_their_directories_ahead() -> None:
    rows, _ = _run("end_to_end", ["--stock", "--peers", "none"])
    assert {r["name"] for r in rows} == EXPECTED["end_to_end"]
    assert all(r["parameters"].get("stock", True) is True for r in rows)


def test_end_to_end_refuses_stock_over_rest() -> None:
    stderr = _refused("end_to_end", "--stock", "--coordinator", "up")
    assert "--stock is for --coordinator inproc" in stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="launching as another user in a namespace needs root")
def test_task_mounts_quick() -> None:
    """Root-only, so not in EXPECTED: the launch with and without the tasks' mount namespace."""
    from tvmagent.launch import spawn as fast

    if not fast.fast_available():
        pytest.skip("the clone3 launcher is not built here")
    rows, _ = _run("task_mounts", [])
    assert {(r["name"], r["parameters"]["variant"]) for r in rows} == {
        (f"task_mounts_launch_{what}", variant)
        for what in ("wall", "cpu_parent", "cpu_child")
        for variant in ("host", "namespace")
    }
