"""Disk full: the coordinator's state on a small tmpfs filled up answers 503 StoreUnavailable with
Retry-After, acknowledges nothing it did not write, and resumes without a restart once space
returns; an agent whose TVM root fills up makes its TVM `unusable` (DiskFull) until space returns."""

from __future__ import annotations

import os

import pytest

from coordinator.client._http import _Call
from tests.harness import cluster_ctx
from tests.reliability._h5support import can_mount_tmpfs, fill, raw, tmpfs

JOB = "job-0000000001"
pytestmark = pytest.mark.skipif(bool(can_mount_tmpfs()), reason=can_mount_tmpfs() or "-")


async def _add(c, name: str) -> int:
    """POST one task; its status (201 or the error's), checking a refusal's shape."""
    body = {"name": name, "commandLine": "/bin/true " + "x" * 4000}
    resp = await raw(c.client, "POST", f"/workitems/wi/jobs/{JOB}/tasks", body)
    if resp.status_code != 201:
        assert resp.status_code == 503, resp.text
        assert resp.json()["code"] == "StoreUnavailable"
        assert resp.headers["x-tvm-error-code"] == "StoreUnavailable"
        assert int(resp.headers["retry-after"]) >= 1
    return resp.status_code


async def _exists(c, name: str) -> bool:
    resp = await raw(c.client, "GET", f"/workitems/wi/jobs/{JOB}/tasks/{name}")
    assert resp.status_code in (200, 404), resp.text
    return resp.status_code == 200


def _linked(c, agent_id: str) -> bool:
    agent = c.rc.service.core.agents.get(agent_id)
    return agent is not None and agent.connected


async def test_coordinator_store_full_refuses_then_resumes(tmp_path, nursery) -> None:
    state = str(tmp_path / "state")
    acked: list[str] = []
    first_refused = ""
    refused: list[str] = []
    with tmpfs(state, "3m"):
        async with cluster_ctx(nursery, tmp_path) as c:
            await c.client.workitems.add("wi", "p")
            filler = fill(state)
            # The WAL may still hold room from earlier commits: add until the store refuses.
            for i in range(2000):
                status = await _add(c, f"a{i}")
                if status == 201:
                    acked.append(f"a{i}")
                    continue
                first_refused = f"a{i}"
                break
            assert first_refused, "the full store never refused a write"
            assert c.rc.service.journal.unavailable
            # While the store fails, commands are refused before they change anything.
            for i in range(5):
                assert await _add(c, f"r{i}") == 503
                refused.append(f"r{i}")
            for name in refused:
                assert not await _exists(c, name)
            # Reads still work from memory.
            assert await _exists(c, acked[0]) if acked else True
            # An agent joining now is refused for the moment (its credential cannot be made
            # durable) and keeps trying; it is not told to give up, nor welcomed unrecorded.
            late = c.start_agent("late")
            await c.wait_for(
                lambda: "StoreUnavailable" in late.log_text(), 30, "the late agent refused"
            )
            assert late.proc.poll() is None, late.log_text()[-2000:]
            assert not _linked(c, "late")
            failures = c.rc.service.journal.failures
            os.unlink(filler)
            await c.wait_for(
                lambda: c.rc.service.journal.unavailable is None, 20, "the store writing again"
            )
            await c.wait_for(lambda: _linked(c, "late"), 60, "the late agent linked")
            assert c.rc.service.journal.failures >= failures
            assert await _add(c, "after") == 201
            acked.append("after")
        # A restart on the same state: every acknowledged task was written; refused ones never.
        async with cluster_ctx(nursery, tmp_path) as c:
            for name in acked:
                assert await _exists(c, name), name
            for name in refused:
                assert not await _exists(c, name), name


async def test_file_upload_to_full_store_is_503_and_keeps_nothing(tmp_path, nursery) -> None:
    state = str(tmp_path / "state")
    with tmpfs(state, "2m"):
        async with cluster_ctx(nursery, tmp_path) as c:
            filler = fill(state)
            data = os.urandom(256 * 1024)
            m, url, headers, _ = c.client._prepare(_Call("POST", "/files", raw=data))
            resp = await c.client._http.request(m, url, headers=headers, content=data)
            assert resp.status_code == 503, resp.text
            assert resp.json()["code"] == "StoreUnavailable"
            assert int(resp.headers["retry-after"]) >= 1
            parts = os.listdir(os.path.join(state, "files", ".tmp"))
            assert parts == []
            os.unlink(filler)
            resp = await c.client._http.request(m, url, headers=headers, content=data)
            assert resp.status_code == 201, resp.text


async def test_agent_root_full_makes_tvm_unusable_until_space_returns(tmp_path, nursery) -> None:
    root = str(tmp_path / "agents" / "a0")
    # 600 MiB: the TVM is unusable below 256 MiB free (core/healing.UNUSABLE_FREE_DISK_BYTES).
    with tmpfs(root, "600m"):
        async with cluster_ctx(nursery, tmp_path, heartbeat_timeout=2.0) as c:
            c.start_agent("a0", root=root)
            await c.pool_with_tvms("p", 1)
            tvm = (await c.client.tvms.list("p"))[0]
            filler = fill(root, keep_free=64 * 1024 * 1024)
            try:

                async def unusable() -> bool:
                    t = await c.client.tvms.get("p", tvm.name)
                    return t.state == "unusable" and t.state_reason.startswith("DiskFull")

                await c.wait_for(unusable, timeout=30, what="TVM unusable (DiskFull)")
            finally:
                os.unlink(filler)

            async def back() -> bool:
                t = await c.client.tvms.get("p", tvm.name)
                return t.state == "idle"

            await c.wait_for(back, timeout=30, what="TVM idle again once space returned")
