"""Uploads to the coordinator's file store (a client's, or a task's output files sent by its agent)
cannot take the last of the disk the journal lives on: the store keeps a reserve free (10 % of its
file system, at most 256 MiB) and refuses an upload that would eat into it with 503
StoreUnavailable, so every other tenant's writes keep being acknowledged. A real coordinator with
its state on a small tmpfs (root)."""

from __future__ import annotations

import os

import pytest

from coordinator.client._http import _Call
from tests.harness import cluster_ctx
from tests.reliability._h5support import can_mount_tmpfs, raw, tmpfs

JOB = "job-0000000001"
pytestmark = pytest.mark.skipif(bool(can_mount_tmpfs()), reason=can_mount_tmpfs() or "-")


async def test_uploads_stop_short_of_the_journals_room(tmp_path, nursery) -> None:
    state = str(tmp_path / "state")
    with tmpfs(state, "64m"):
        async with cluster_ctx(nursery, tmp_path) as c:
            await c.client.workitems.add("wi", "p")
            refused = None
            stored = 0
            for _ in range(80):  # 80 MiB offered to a 64 MiB file system
                data = os.urandom(1 << 20)
                m, url, headers, _ = c.client._prepare(_Call("POST", "/files", raw=data))
                resp = await c.client._http.request(m, url, headers=headers, content=data)
                if resp.status_code != 201:
                    refused = resp
                    break
                stored += 1
            assert refused is not None, "the store took more than its file system holds"
            assert refused.status_code == 503, refused.text
            assert refused.json()["code"] == "StoreUnavailable"
            assert "kept free" in refused.json()["message"]["value"]
            assert stored >= 40  # the reserve is a tenth, not the whole disk
            assert os.listdir(os.path.join(state, "files", ".tmp")) == []
            # Everyone else's writes are still acknowledged: 300 tasks of 4 KB command lines.
            for i in range(300):
                body = {"name": f"t{i}", "commandLine": "/bin/true " + "x" * 4000}
                resp = await raw(c.client, "POST", f"/workitems/wi/jobs/{JOB}/tasks", body)
                assert resp.status_code == 201, (i, resp.text)
