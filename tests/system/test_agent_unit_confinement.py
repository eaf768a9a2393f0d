"""A root agent confined the way its shipped systemd unit confines it still does its work.

No systemd runs here, so the unit's file-system protections are reproduced as its documentation
defines them (`ProtectSystem=`, `ProtectHome=`, `ReadOnlyPaths=`: read-only bind mounts in the
service's own mount namespace) around a real agent, which must then make its pool group, run a task
as a task user in that group and add a node user with its home: they write /etc and /home.
(`ProtectSystem=full`, shipped before, made /etc read-only: every join failed at groupadd.)"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import pytest

import tvmagent
from benchmarks import _procs
from tests.harness import agent_env, cluster_ctx
from tests.security.pool_groups import open_agent_base
from tests.system.agent_work import does_its_work, remove_user

UNIT = Path(tvmagent.__file__).parent / "systemd" / "tvm-agent.service"


def read_only_paths(unit_text: str) -> list[str]:
    """The existing directories the unit makes read-only for its service (systemd.exec(5))."""
    d: dict[str, list[str]] = {}
    for line in unit_text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            d.setdefault(key, []).append(value.strip())
    system = (d.get("ProtectSystem") or ["no"])[-1]
    home = (d.get("ProtectHome") or ["no"])[-1]
    ro: list[str] = []
    if system in ("yes", "true", "full"):
        ro += ["/usr", "/boot", "/efi"]
    if system == "full":
        ro.append("/etc")
    elif system not in ("no", "false", "yes", "true"):
        pytest.fail(f"ProtectSystem={system}: reproduce it here before shipping it")
    if home == "read-only":
        ro += ["/home", "/root", "/run/user"]
    elif home not in ("no", "false"):
        pytest.fail(f"ProtectHome={home}: reproduce it here before shipping it")
    for entry in d.get("ReadOnlyPaths", []):
        ro += [p.lstrip("-") for p in entry.split()]
    return [p for p in ro if os.path.isdir(p)]


def test_the_reproduction_reads_what_the_old_unit_said() -> None:
    old = "[Service]\nProtectSystem=full\nProtectHome=read-only\nReadOnlyPaths=/srv -/nonexistent\n"
    ro = read_only_paths(old)
    assert "/etc" in ro
    assert "/usr" in ro
    assert "/root" in ro
    assert "/nonexistent" not in ro
    assert "/etc" not in read_only_paths(UNIT.read_text())


def _confined_agent(c, root: str, read_only: list[str], log: str) -> _procs.AgentProcess:
    """A root agent with task users, started with `read_only` made read-only in a mount namespace
    of its own."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) (a mount namespace of its own)")
    confine = (
        'for p in "$@"; do [ "$p" = -- ] && break; '
        'mount --bind "$p" "$p" && mount -o remount,bind,ro "$p" || exit 97; shift; done; '
        'shift; exec "$@"'
    )
    agent = _procs.start_agent(
        c.rc.agent_url,
        "confined",
        root,
        log,
        agent_env({"TVM_AGENT_TOKEN": c.rc.join_token, "TVM_AGENT_DRAIN_GRACE": "2"}),
        args=["--log-level", "info", "--task-isolation", "users"],
        prefix=["unshare", "--mount", "--propagation", "private", "sh", "-c", confine, "sh"]
        + [*read_only, "--"],
    )
    c.agents.append(agent)
    return agent


async def test_a_root_agent_confined_as_its_unit_says_isolates_tasks_and_adds_node_users(
    nursery, tmp_path
) -> None:
    ro = read_only_paths(UNIT.read_text())
    name = f"uc{secrets.token_hex(3)}"
    os.makedirs(tmp_path / "agents", exist_ok=True)
    with open_agent_base("tvm-unit-") as base:
        root = os.path.join(base, "a0")
        async with cluster_ctx(nursery, tmp_path) as c:
            _confined_agent(c, root, ro, str(tmp_path / "agents" / "confined.log"))
            try:
                await does_its_work(c, root, name, lambda: "")
            finally:
                remove_user(name)


async def test_an_agent_that_cannot_write_etc_says_so_and_its_tvm_is_unusable(
    nursery, tmp_path
) -> None:
    """Confined by a unit that makes /etc read-only (the old one), the agent cannot make a pool
    group: its TVM is unusable and says why, instead of failing every join at groupadd."""
    ro = read_only_paths("[Service]\nProtectSystem=full\n")
    os.makedirs(tmp_path / "agents", exist_ok=True)
    with open_agent_base("tvm-unit-") as base:
        async with cluster_ctx(nursery, tmp_path) as c:
            agent = _confined_agent(
                c, os.path.join(base, "a0"), ro, str(tmp_path / "agents" / "ro.log")
            )
            await c.client.pools.add("p", target_dedicated=1)

            async def unusable() -> str:
                tvms = await c.client.tvms.list("p")
                return tvms[0].state_reason if tvms and tvms[0].state == "unusable" else ""

            reason = await c.wait_for(unusable, what="the TVM unusable")
            assert reason.startswith("HostStateBroken: "), reason
            assert "user-database: /etc is read-only to the agent" in reason, reason
            assert agent.proc.poll() is None  # it runs on, and says so in its heartbeats
