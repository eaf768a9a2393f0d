"""What a root agent with task users must manage wherever it runs (the unit tests' common part): its
TVM joins a pool, a task runs as a task user in the pool's group, and a node user is made with its
home and ~/.ssh, then deleted."""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coordinator.client import task_spec
from tvmagent.pool_isolation import POOL_GROUP_FILE

JOB = "job-0000000001"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJbzYvN0c5dE1vZ0hB1n0Z2lF2a0b5eWl1v8jF2Kx3aQ tester@example"


def user(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def remove_user(name: str) -> None:
    if user(name) is not None:
        os.system(f"userdel -r {name} >/dev/null 2>&1")  # noqa: S605 - our own test user


async def does_its_work(c: Any, root: str, node_user: str, said: Callable[[], str]) -> str:
    """Drive the agent of `root` through `c` (tests.harness.Cluster); returns its pool group.
    `said()`: what the agent's supervisor says, for failure messages."""
    try:
        await c.pool_with_tvms("p", 1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{said()}") from None
    await c.client.workitems.add("wi", "p")
    await c.client.tasks.add_many("wi", JOB, [task_spec("t", "/bin/sh -c 'id -u; id -G'")])
    await c.client.tasks.wait("wi", JOB, timeout=60)
    task = await c.client.tasks.get("wi", JOB, "t")
    out = (await c.client.files.get_from_task("wi", JOB, "t", "stdout.txt")).decode()
    assert task.execution_info.exit_code == 0, (task.execution_info, out, said())
    uid, groups = out.split("\n", 1)
    group = Path(root, POOL_GROUP_FILE).read_text().strip()
    assert int(uid) != 0
    assert str(grp.getgrnam(group).gr_gid) in groups.split()
    tvm = (await c.client.tvms.list("p"))[0]
    await c.client.tvm_users.add("p", tvm.name, node_user, KEY)

    def made() -> bool:
        pw = user(node_user)
        return pw is not None and os.path.exists(os.path.join(pw.pw_dir, ".ssh", "authorized_keys"))

    await c.wait_for(made, what="the node user and its authorized_keys")
    await c.client.tvm_users.delete("p", tvm.name, node_user)
    await c.wait_for(lambda: user(node_user) is None, what="the node user removed")
    return group
