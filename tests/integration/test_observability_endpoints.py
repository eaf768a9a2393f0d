"""Issue 9 §4 with a real coordinator and agent processes: `GET /metrics` (Prometheus text, no
SharedKey, aggregates only), `GET /ops/status` and `tvm status` (agent health per TVM), and the
agents' JSON log lines carrying task/job/TVM ids."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import trio

from coordinator.client import task_spec
from tests.harness import Cluster, agent_env, cluster_ctx

JOB = "job-0000000001"
TVM = os.path.join(os.path.dirname(sys.executable), "tvm")


def _get(url: str) -> tuple[int, dict[str, str], str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read().decode()


async def _metrics(c: Cluster) -> dict[str, float]:
    status, headers, text = await trio.to_thread.run_sync(_get, c.rc.endpoint + "/metrics")
    assert status == 200, text
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def test_metrics_status_and_json_logs(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, heartbeat_timeout=2) as c:
        agents = [
            c.start_agent(f"obs{i}", extra_args=["--log-format", "json", "--log-level", "debug"])
            for i in range(2)
        ]
        await c.pool_with_tvms("p", 2)
        await c.client.workitems.add("wi", "p")
        await c.client.tasks.add_many(
            "wi", JOB, [task_spec(f"t{i}", f"sh -c 'exit {i % 3}'") for i in range(6)]
        )
        await c.client.tasks.wait("wi", JOB, timeout=60)

        # /metrics: unsigned, Prometheus text, the numbers of this cluster.
        m = await c.wait_for(lambda: _with_rtt(c), what="metrics with link round trips")
        assert m['tvm_tasks{state="completed"}'] == 6
        assert m['tvm_tasks_completed{result="succeeded"}'] == 2
        assert m['tvm_tasks_completed{result="failed"}'] == 4
        assert m["tvm_queue_depth"] == 0
        assert m["tvm_placements_total"] >= 6
        assert m['tvm_tvms{state="idle"}'] == 2
        assert m['tvm_agents{status="connected"}'] == 2
        assert m["tvm_link_rtt_seconds_count"] >= 2
        # Each task's RunTask and completion crossed the agents' links; nothing waited too long.
        assert m['tvm_agent_frames_total{direction="in"}'] >= 2
        assert m['tvm_agent_frames_total{direction="out"}'] >= 2
        assert m["tvm_queue_handbacks_total"] == 0
        # Six tasks' adds and completions were committed, in fewer transactions than rows.
        assert 1 <= m["tvm_journal_commits_total"] < m["tvm_journal_rows_total"]
        # Everything else still needs the key, /ops/status included.
        for path in ("/pools", "/ops/status"):
            status, _, body = await trio.to_thread.run_sync(_get, c.rc.endpoint + path)
            assert status in (401, 403)
            assert json.loads(body)["code"] == "AuthenticationFailed"

        # /ops/status and `tvm status`: agent health per TVM.
        st = await c.client.ops.status()
        assert st["tasks"]["succeeded"] == 2
        assert {t["agentId"] for t in st["tvms"]} == {"obs0", "obs1"}
        for t in st["tvms"]:
            assert t["agentConnected"]
            assert t["lastHeartbeatAgeSeconds"] is not None
            assert t["lastHeartbeatAgeSeconds"] < 2
        agents[1].kill(signal.SIGKILL)
        await c.wait_for(lambda: _tvm_state_of(c, "obs1", "unknown"), what="obs1's TVM lost")
        env = agent_env(
            {
                "TVM_ENDPOINT": c.rc.endpoint,
                "TVM_ACCOUNT": c.rc.account,
                "TVM_KEY": c.rc.key,
                "COLUMNS": "200",
            }
        )
        out = await trio.to_thread.run_sync(
            lambda: subprocess.run(
                [TVM, "status"], capture_output=True, text=True, env=env, timeout=60
            )
        )
        assert out.returncode == 0, out.stderr
        assert "pool p: 2/2 TVMs (steady): idle 1, unknown 1" in out.stdout
        assert "2 succeeded, 4 failed" in out.stdout
        lines = {
            line.split("│")[4].strip(): line for line in out.stdout.splitlines() if "obs" in line
        }
        assert "disconnected" in lines["obs1"]
        assert " ok " in lines["obs0"]
        out = await trio.to_thread.run_sync(
            lambda: subprocess.run(
                [TVM, "status", "-o", "json"], capture_output=True, text=True, env=env, timeout=60
            )
        )
        js = json.loads(out.stdout)
        assert {t["agentId"]: t["agentConnected"] for t in js["tvms"]} == {
            "obs0": True,
            "obs1": False,
        }
        m = await _metrics(c)
        assert m['tvm_tvms{state="unknown"}'] == 1
        assert m['tvm_agents{status="disconnected"}'] == 1

        # Agent logs: one JSON object per line; task lines carry task, job, TVM and attempt.
        tasks = {t.name: t for t in await c.client.tasks.list("wi", JOB)}
        seen = {}
        for a in agents:
            for line in a.log_text().splitlines():
                rec = json.loads(line)
                if rec.get("event", "").startswith("task finished"):
                    seen[rec["task"]] = rec
        assert set(seen) == {f"wi/{JOB}/t{i}" for i in range(6)}
        for i in range(6):
            rec = seen[f"wi/{JOB}/t{i}"]
            assert rec["job"] == f"wi/{JOB}"
            assert rec["tvm"] == tasks[f"t{i}"].tvm_info.tvm_name
            assert isinstance(rec["attempt"], int)
            assert rec["level"] == ("debug" if i % 3 == 0 else "info")
            assert f"exit code {i % 3}" in rec["event"]


async def _with_rtt(c: Cluster) -> dict[str, float] | None:
    m = await _metrics(c)
    return m if m["tvm_link_rtt_seconds_count"] >= 2 else None


async def _tvm_state_of(c: Cluster, agent: str, state: str) -> bool:
    st = await c.client.ops.status()
    return any(t["agentId"] == agent and t["state"] == state for t in st["tvms"])
