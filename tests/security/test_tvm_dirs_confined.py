"""A TVM's `shared/` and `tasks/` are its pool's: a task of another TVM on the same host (another
pool, another tenant) neither lists nor reads them, as if the TVMs were separate machines. Found by
a hostile task that listed a neighbour's `shared/` (1777) and read the files in it (umask 022).

Real coordinator, two real root agents running tasks as per-task slot users.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import secrets
import shutil
import stat
import subprocess

from tests.harness import cluster_ctx
from tests.security.test_task_isolation import (
    ISOLATED,
    JOB,
    PY,
    _group_exists,
    _run_one,
    open_root,
    pytestmark,
)

__all__ = ["open_root", "pytestmark"]

# Prints one word per path: listed / read / denied / absent.
PROBE = r"""
import os, sys
res = []
for p in sys.argv[1:]:
    try:
        if os.path.isdir(p):
            os.listdir(p); res.append('listed')
        else:
            open(p, 'rb').read(); res.append('read')
    except PermissionError:
        res.append('denied')
    except FileNotFoundError:
        res.append('absent')
print(' '.join(res))
"""

WRITE = (
    "import os; p = os.path.join(os.environ['AZ_BATCH_NODE_SHARED_DIR'], 'note.txt'); "
    "open(p, 'w').write('pool a only')"
)


async def test_another_pools_task_cannot_list_or_read_a_tvms_shared_and_tasks_dirs(
    nursery, tmp_path, open_root
):
    os.makedirs(tmp_path / "agents", exist_ok=True)
    async with cluster_ctx(nursery, tmp_path, heartbeat_timeout=3) as c:
        a = c.start_agent("a", extra_args=ISOLATED, root=os.path.join(open_root, "a"))
        await c.pool_with_tvms("pa", 1, max_tasks_per_vm=1)
        b = c.start_agent("b", extra_args=ISOLATED, root=os.path.join(open_root, "b"))
        await c.pool_with_tvms("pb", 1)
        await _run_one(c, "wa", "pa", "writer", f'{PY} -c "{WRITE}"')
        shared, tasks = os.path.join(a.root, "shared"), os.path.join(a.root, "tasks")
        note = os.path.join(shared, "note.txt")
        targets = [shared, note, tasks, os.path.join(tasks, "wa"), os.path.join(tasks, "wa", JOB)]
        cmd = f'{PY} -c "{PROBE}" {" ".join(targets)}'
        own = (await _run_one(c, "wa", "pa", "reader", cmd)).split()
        other = (await _run_one(c, "wb", "pb", "snoop", cmd)).split()
        assert other == ["denied"] * 5, other
        # The pool's own later task (another slot user) still shares them.
        assert own == ["listed", "read", "listed", "listed", "listed"], own

        with open(os.path.join(a.root, "pool-group")) as f:  # noqa: ASYNC230
            gid = grp.getgrnam(f.read().strip()).gr_gid
        for path, mode in ((shared, 0o3770), (tasks, 0o750)):
            st = os.stat(path)  # noqa: ASYNC240
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, gid, mode), path
        assert os.stat(note).st_gid == gid  # noqa: ASYNC240 - setgid: the pool's, not the user's

        # An agent that stops takes its group's gid off the directories before the group goes:
        # a group made later with the same number must not inherit them.
        c.stop_agents()
        for root in (a.root, b.root):
            for name in ("shared", "tasks", "certs", "start"):
                path = os.path.join(root, name)
                if os.path.exists(path):  # noqa: ASYNC240
                    assert os.stat(path).st_gid == 0, path  # noqa: ASYNC240


KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJbzYvN0c5dE1vZ0hB1n0Z2lF2a0b5eWl1v8jF2Kx3aQ tester@example"


def _pool_group(root: str) -> grp.struct_group | None:
    try:
        with open(os.path.join(root, "pool-group")) as f:
            return grp.getgrnam(f.read().strip())
    except (FileNotFoundError, KeyError):
        return None


async def test_a_tvms_node_user_is_in_its_pool_group_also_after_an_agent_restart(
    nursery, tmp_path, open_root
):
    """A remote-login user of the TVM reaches shared/ as its tasks do; the group an agent makes
    again after a restart (a new gid) has the user again."""
    name = f"nu{secrets.token_hex(3)}"
    os.makedirs(tmp_path / "agents", exist_ok=True)
    root = os.path.join(open_root, "a")
    async with cluster_ctx(nursery, tmp_path, heartbeat_timeout=3) as c:
        c.start_agent("a", extra_args=ISOLATED, root=root)
        await c.pool_with_tvms("pa", 1)
        tvm = (await c.client.tvms.list("pa"))[0]
        try:
            await c.client.tvm_users.add("pa", tvm.name, name, KEY)
            await c.wait_for(
                lambda: (g := _pool_group(root)) is not None and name in g.gr_mem,
                what="the node user in the pool group",
            )
            ls = subprocess.run(  # noqa: ASYNC221 - a short child as the node user
                ["runuser", "-u", name, "--", "ls", os.path.join(root, "shared")],
                capture_output=True,
                text=True,
            )
            assert ls.returncode == 0, ls.stderr
            before = _pool_group(root)
            c.stop_agents()
            assert before is not None
            assert _pool_group(root) is None  # the group went with the agent
            assert not _group_exists(before.gr_name)
            c.start_agent("a", extra_args=ISOLATED, root=root)
            await c.wait_for(
                lambda: (g := _pool_group(root)) is not None and name in g.gr_mem,
                timeout=60,
                what="the node user in the pool group made again",
            )
        finally:
            with contextlib.suppress(KeyError):
                pwd.getpwnam(name)
                os.system(f"userdel -r {name} >/dev/null 2>&1")  # noqa: S605, ASYNC221 - our own user


async def test_files_of_the_tvm_a_root_held_before_are_gone_when_it_backs_another(
    nursery, tmp_path, open_root
):
    """An agent restarted as itself rejoins its TVM, whose files stay; given a new identity (its
    private directory gone: another TVM, perhaps another pool or tenant) it finds the old TVM's
    shared/ and task directories and removes them before a task of the new TVM runs."""
    os.makedirs(tmp_path / "agents", exist_ok=True)
    root = os.path.join(open_root, "a")
    async with cluster_ctx(nursery, tmp_path, heartbeat_timeout=3) as c:
        c.start_agent("a", extra_args=ISOLATED, root=root)
        await c.pool_with_tvms("pa", 1)
        await _run_one(c, "wa", "pa", "writer", f'{PY} -c "{WRITE}"')
        note = os.path.join(root, "shared", "note.txt")
        task_dir = os.path.join(root, "tasks", "wa", JOB, "writer")
        assert os.path.exists(note)  # noqa: ASYNC240
        assert os.path.isdir(task_dir)  # noqa: ASYNC240
        first = (await c.client.tvms.list("pa"))[0].name

        c.stop_agents()
        c.start_agent("a", extra_args=ISOLATED, root=root)  # the same agent: the same TVM
        await c.wait_for(
            lambda: os.path.exists(os.path.join(root, "pool-group")), what="the rejoin"
        )
        await _run_one(c, "wa", "pa", "again", "/bin/true")
        assert [t.name for t in await c.client.tvms.list("pa")] == [first]
        assert os.path.exists(note)  # noqa: ASYNC240
        assert os.path.isdir(task_dir)  # noqa: ASYNC240

        c.stop_agents()
        shutil.rmtree(root + ".private")  # a new identity for the same root
        c.start_agent("b", extra_args=ISOLATED, root=root)

        async def new_tvm_idle() -> bool:
            return any(
                t.name != first and t.state == "idle" for t in await c.client.tvms.list("pa")
            )

        await c.client.pools.resize("pa", 2)  # the old TVM stays in it, offline
        await c.wait_for(new_tvm_idle, what="a new TVM in the pool")
        snoop = f'{PY} -c "{PROBE}" {note} {task_dir}'
        assert (await _run_one(c, "wa", "pa", "snoop", snoop)).split() == ["absent"] * 2
