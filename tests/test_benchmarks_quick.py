"""Every benchmark runs in --quick mode and prints well-formed result lines (not a speed check)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNITS = {"tasks/s", "ms", "bytes", "s", "ratio"}

EXPECTED = {
    "placement": {"placement"},
    "end_to_end": {"end_to_end", "raw_spawn", "end_to_end_ratio"},
    "latency": {
        "latency_submit_to_start_p50",
        "latency_submit_to_start_p99",
        "latency_submit_to_complete_p50",
        "latency_submit_to_complete_p99",
    },
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


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_benchmark_quick(name: str) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--quick"],
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
    assert {r["name"] for r in rows} == EXPECTED[name]
    assert proc.stderr.strip(), "no human summary"
