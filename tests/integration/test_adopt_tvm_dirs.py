"""An agent checks the TVM directories it adopts: a `tasks` symlink left in its root is replaced by
a real directory (never followed), and a directory it cannot repair (here a read-only mount of
another user's directory) makes its TVM `unusable` with a reason that the TVM's REST record and
`tvm status` show — until the host is fixed, when the TVM becomes idle without an agent restart."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from tests.harness import Cluster, agent_env, cluster_ctx


async def _only_tvm(c: Cluster, pool: str) -> Any:
    tvms = await c.client.tvms.list(pool)
    return tvms[0] if len(tvms) == 1 else None


async def test_a_tasks_symlink_is_replaced_not_followed(
    nursery: trio.Nursery, tmp_path: Any
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("not the agent's")
    root = tmp_path / "agents" / "adopt0"
    root.mkdir(parents=True)
    os.symlink(elsewhere, root / "tasks")
    async with cluster_ctx(nursery, tmp_path, heartbeat_timeout=2.0) as c:
        c.start_agent("adopt0", root=str(root))
        await c.pool_with_tvms("p", 1)
        await c.client.workitems.add("wi", "p")
        await c.client.tasks.add("wi", "job-0000000001", "t", "/bin/true")
        counts = await c.client.tasks.wait("wi", "job-0000000001", timeout=60)
        assert counts.succeeded == 1
        assert not os.path.islink(root / "tasks")
        assert os.path.isdir(root / "tasks" / "wi")
        assert sorted(os.listdir(elsewhere)) == ["keep"]  # nothing went through the link
        assert "was not a directory: replaced" in c.agents[0].log_text()


@pytest.fixture
def ro_mount(tmp_path: Any) -> Iterator[tuple[str, str]]:
    """A read-only bind mount of a directory owned by `nobody`, over the agent's future tasks/."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount (a read-only bind mount the agent cannot repair)")
    src = tmp_path / "other-users-dir"
    src.mkdir()
    os.chown(src, 65534, -1)
    root = tmp_path / "agents" / "adopt1"
    target = root / "tasks"
    target.mkdir(parents=True)
    mounted = False
    try:
        subprocess.run(["mount", "--bind", str(src), str(target)], check=True)
        mounted = True
        subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)
        yield str(root), str(target)
    finally:
        if mounted:
            with contextlib.suppress(subprocess.CalledProcessError):
                subprocess.run(["umount", str(target)], check=True, capture_output=True)


async def test_a_directory_that_cannot_be_repaired_makes_the_tvm_unusable_until_fixed(
    nursery: trio.Nursery, tmp_path: Any, ro_mount: tuple[str, str]
) -> None:
    root, target = ro_mount
    async with cluster_ctx(nursery, tmp_path, heartbeat_timeout=2.0) as c:
        c.start_agent("adopt1", root=root)
        await c.client.pools.add("p", target_dedicated=1)

        async def unusable() -> Any:
            t = await _only_tvm(c, "p")
            return t if t is not None and t.state == "unusable" else None

        tvm = await c.wait_for(unusable, timeout=60, what="the TVM unusable")
        assert tvm.state_reason.startswith(
            f"HostStateBroken: tvm-directories: TVM directory {target} cannot be repaired: "
        )
        env = agent_env(
            {
                "TVM_ENDPOINT": c.rc.endpoint,
                "TVM_ACCOUNT": c.rc.account,
                "TVM_KEY": c.rc.key,
                "COLUMNS": "250",
            }
        )
        out = await trio.to_thread.run_sync(
            lambda: subprocess.run(
                [sys.executable, "-m", "coordinator.cli", "status"],
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
            )
        )
        assert out.returncode == 0, out.stderr
        assert f"UNUSABLE p/{tvm.name}: HostStateBroken: tvm-directories: " in out.stdout
        # The host is fixed: the agent's next look repairs the rest and the TVM serves.
        await trio.to_thread.run_sync(
            lambda: subprocess.run(["umount", target], check=True, timeout=60)
        )
        await c.wait_for(lambda: c._idle("p", 1), timeout=60, what="the TVM idle again")
        assert (await _only_tvm(c, "p")).state_reason == ""
