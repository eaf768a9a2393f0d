"""A TVM root whose file system went read-only (ext4's errors=remount-ro): the agent stays up, its
TVM is `unusable` with the reason (which used to blame "another TVM's files" for a fresh root's
empty directories), and it becomes usable once the root is writable again."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.harness import cluster_ctx


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


def _umount(path: str, *flags: str) -> None:
    subprocess.run(["umount", *flags, path], check=False, capture_output=True)


async def test_a_read_only_root_makes_the_tvm_unusable_not_the_agent_end(nursery, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root (bind mounts)")
    root = str(tmp_path / "agents" / "ro")
    async with cluster_ctx(nursery, tmp_path) as c:
        agent = c.start_agent("ro", root=root)
        await c.wait_for(
            lambda: any(a.connected for a in c.rc.service.core.agents.values()),
            what="the agent linked",
        )
        _mount("--bind", root, root)
        mounted = True
        try:
            _mount("-o", "remount,bind,ro", root)
            await c.client.pools.add("p", target_dedicated=1)

            async def state() -> tuple[str, str]:
                tvms = await c.client.tvms.list("p")
                return (tvms[0].state, tvms[0].state_reason) if tvms else ("", "")

            async def unusable() -> bool:
                return (await state())[0] == "unusable"

            await c.wait_for(unusable, what="the TVM unusable")
            _, reason = await state()
            assert reason.startswith("HostStateBroken: tvm-directories: "), reason
            assert "Read-only file system" in reason, reason
            assert "another TVM" not in reason, reason  # a fresh root: nothing of another TVM
            assert agent.proc.poll() is None  # it runs on
            _umount(root)
            mounted = False

            async def usable() -> bool:
                return (await state())[0] in ("idle", "running")

            await c.wait_for(usable, 60, "the TVM usable again once its root is writable")
        finally:
            if mounted:
                _umount(root, "-l")
