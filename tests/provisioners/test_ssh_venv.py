"""The ssh provisioner's `venv` host entries against a real sshd: the provisioner makes the venv
on the "host" (`python3 -m venv` + `pip install PIP-SPEC`, this checkout's source here) and runs
the pool's agent from its `tvm`, while an install pip refuses is reported with pip's error, naming
the host, and leaves no venv, agent directory or process behind (slow: real installs, `-m slow`).
In the default run: a venv already there is reused, not reinstalled, and one `python3 -m venv`
cannot make is reported the same way."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from coordinator.client import task_spec
from coordinator.common import models as m
from coordinator.runtime.provisioners.config import parse_provisioners
from tests.harness import REPO, cluster_ctx
from tests.provisioners.hostprocs import CmdlineWatch, agent_pids, ready_made_venv, running
from tests.provisioners.sshd import Sshd

JOB = "job-0000000001"


@pytest.fixture
def host_dir() -> Iterator[str]:
    # Outside tmp_path: task users must traverse to their directories (pytest's tmp is 0700).
    path = f"/var/tmp/tvm-ssh-venv-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.makedirs(path, mode=0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _host(server: Sshd, address: str, venv: str, pip_spec: str, agent_dir: str) -> dict:
    return {
        "address": address,
        "port": server.port,
        "key-file": server.key_file,
        "venv": venv,
        "pip-spec": pip_spec,
        "agent-dir": agent_dir,
        "mode": "process",
    }


def _pool(name: str, provisioner: str) -> dict:
    return {
        "target_dedicated": 1,
        "metadata": [m.MetadataItem(name="provisioner", value=provisioner)],
    }


async def _with_error(c, pool: str):  # noqa: ANN001, ANN202
    p = await c.client.pools.get(pool)
    return p if p.resize_error is not None else None


async def _failed_install(c, pool: str, server: Sshd, venv: str, timeout: float):  # noqa: ANN001, ANN202
    """The pool's resize error for a venv that could not be made: named host and venv, the pool
    left at 0."""
    q = await c.wait_for(lambda: _with_error(c, pool), timeout=timeout, what="the install's error")
    assert q.resize_error.code == "VenvInstallFailed"
    assert f"root@{server.addresses[1]}:{server.port}" in q.resize_error.message
    assert venv in q.resize_error.message
    assert (q.allocation_state, q.current_dedicated) == ("steady", 0)
    return q.resize_error.message


async def test_a_venv_already_there_is_reused_and_one_that_cannot_be_made_is_reported(
    nursery, tmp_path, sshd, host_dir
):
    ready = os.path.join(host_dir, "ready-venv")
    tvm = ready_made_venv(ready, sys.executable)
    before = os.stat(tvm).st_mtime_ns
    # what a reinstall of `ready` would fail on: a directory pip cannot install
    not_a_project = os.path.join(host_dir, "not-a-project")
    os.mkdir(not_a_project)
    # a venv whose parent is a file: `python3 -m venv` fails at once (pip's own failure, which
    # needs a whole venv made first, is in the slow test below)
    blocker = os.path.join(host_dir, "a-file")
    open(blocker, "w").close()  # noqa: SIM115, ASYNC230
    broken = os.path.join(blocker, "venv")
    agents_ok, agents_bad = (
        os.path.join(host_dir, "agents-ok"),
        os.path.join(host_dir, "agents-bad"),
    )
    section = {
        "ready": {
            "type": "ssh",
            "idle-stop-after": 0.5,
            "hosts": [_host(sshd, sshd.addresses[0], ready, not_a_project, agents_ok)],
        },
        "broken": {
            "type": "ssh",
            "hosts": [_host(sshd, sshd.addresses[1], broken, "tvm-batch", agents_bad)],
        },
    }
    async with cluster_ctx(
        nursery, tmp_path, heartbeat_timeout=5.0, provisioners=parse_provisioners(section)
    ) as c:
        with CmdlineWatch(c.rc.join_token) as watch:
            await c.client.pools.add("p", **_pool("p", "ready"))
            await c.client.pools.add("q", **_pool("q", "broken"))
            message = await _failed_install(c, "q", sshd, broken, timeout=60)
            assert "Not a directory" in message  # what python3 -m venv said
            assert not os.path.exists(agents_bad)  # no agent was started there

            await c.wait_for(lambda: c._idle("p", 1), timeout=60, what="1 idle TVM from the venv")
            (t,) = await c.client.tvms.list("p")
            (pid,) = agent_pids(os.path.join(agents_ok, t.agent_id))
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert f"{ready}/bin/tvm".encode() in f.read()
            assert os.stat(tvm).st_mtime_ns == before  # reused as it was:
            assert not os.path.exists(os.path.join(ready, "bin", "pip"))  # pip never ran there
            assert (await c.client.pools.get("p")).resize_error is None

            # (two provisioners in one coordinator: each one's free agents still shrink)
            await c.client.pools.resize("p", 0)
            await c.wait_for(
                lambda: not agent_pids(agents_ok) and not os.listdir(agents_ok),
                timeout=60,
                what="the agent stopped and wiped",
            )
        assert watch.hits == []
    assert os.path.exists(tvm)  # shrinking stops agents; the host's venv stays for the next


def _source_copy(dest: str) -> str:
    """This checkout's installable source (not its .venv or build leftovers), as pip-spec."""
    os.makedirs(dest)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), dest)
    for package in ("protocol", "coordinator", "tvmagent", "benchmarks"):
        shutil.copytree(
            os.path.join(REPO, package),
            os.path.join(dest, package),
            ignore=shutil.ignore_patterns("__pycache__", "*.so"),
        )
    return dest


@pytest.mark.slow
async def test_the_provisioner_makes_the_venv_installs_tvm_and_runs_the_pools_agent_from_it(
    nursery, tmp_path, sshd, host_dir
):
    venv = os.path.join(host_dir, "venv")
    source = _source_copy(os.path.join(host_dir, "src"))
    agents = os.path.join(host_dir, "agents")
    # beside it, in parallel: an install pip refuses (a directory that is no project)
    not_a_project = os.path.join(host_dir, "not-a-project")
    os.mkdir(not_a_project)
    broken = os.path.join(host_dir, "broken-venv")
    agents_bad = os.path.join(host_dir, "agents-bad")
    section = {
        "lab": {
            "type": "ssh",
            "idle-stop-after": 0.5,
            "hosts": [_host(sshd, sshd.addresses[0], venv, source, agents)],
        },
        "broken": {
            "type": "ssh",
            "hosts": [_host(sshd, sshd.addresses[1], broken, not_a_project, agents_bad)],
        },
    }
    async with cluster_ctx(
        nursery, tmp_path, heartbeat_timeout=5.0, provisioners=parse_provisioners(section)
    ) as c:
        with CmdlineWatch(c.rc.join_token) as watch:
            await c.client.pools.add("p", **_pool("p", "lab"))
            await c.client.pools.add("q", **_pool("q", "broken"))
            message = await _failed_install(c, "q", sshd, broken, timeout=300)
            # pip's own verdict, not the last line of its noise
            assert "ERROR: Directory" in message
            assert "is not installable" in message
            assert not os.path.exists(broken)  # the venv it made is gone again
            assert not os.path.exists(agents_bad)  # no agent was started there

            await c.wait_for(
                lambda: c._idle("p", 1), timeout=600, what="1 idle TVM from the new venv"
            )
            (t,) = await c.client.tvms.list("p")
            (pid,) = agent_pids(os.path.join(agents, t.agent_id))
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert f"{venv}/bin/tvm".encode() in f.read()
            # the host's own python3 made it, and this checkout is installed there (not linked)
            show = subprocess.run(  # noqa: ASYNC221 - a second, once
                [f"{venv}/bin/python", "-m", "pip", "show", "-f", "tvm-batch"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            assert "Editable project location" not in show

            await c.client.workitems.add("wi", "p")
            await c.client.tasks.add_many("wi", JOB, [task_spec("t0", "/bin/echo from-venv")])

            async def done():  # noqa: ANN202
                (task,) = await c.client.tasks.list("wi", JOB)
                return task if task.state == "completed" else None

            task = await c.wait_for(done, timeout=60, what="the task completed")
            assert task.execution_info.exit_code == 0

            await c.client.pools.resize("p", 0)
            await c.wait_for(
                lambda: not agent_pids(agents) and not os.listdir(agents),
                timeout=60,
                what="the agent stopped and wiped",
            )
        assert watch.hits == []
    assert not agent_pids(venv)


HANGING_BACKEND = """
import os, time

def _hang(*args, **kwargs):
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pids"), "a") as f:
        f.write(f"{os.getpid()} {os.getppid()}\\n")
    time.sleep(3600)

get_requires_for_build_wheel = build_wheel = build_sdist = _hang
"""


async def test_an_install_past_install_timeout_is_ended_on_the_host_and_reported(
    nursery, tmp_path, sshd, host_dir
):
    """pip stuck in a project's build (a backend that never returns): the host ends the install at
    install-timeout (neither pip nor its build hook left running there), removes the venv it made,
    and the pool's resize error says so."""
    project = os.path.join(host_dir, "hangs")
    os.mkdir(project)
    with open(os.path.join(project, "pyproject.toml"), "w") as f:  # noqa: ASYNC230
        f.write(
            "[build-system]\nrequires = []\nbuild-backend = 'hang'\nbackend-path = ['.']\n"
            "[project]\nname = 'hangs'\nversion = '0'\n"
        )
    with open(os.path.join(project, "hang.py"), "w") as f:  # noqa: ASYNC230
        f.write(HANGING_BACKEND)
    venv = os.path.join(host_dir, "venv")
    section = {
        "slow": {
            "type": "ssh",
            "install-timeout": 8,
            "hosts": [
                _host(sshd, sshd.addresses[1], venv, project, os.path.join(host_dir, "agents"))
            ],
        }
    }
    async with cluster_ctx(nursery, tmp_path, provisioners=parse_provisioners(section)) as c:
        await c.client.pools.add("q", **_pool("q", "slow"))
        message = await _failed_install(c, "q", sshd, venv, timeout=90)
    assert "did not finish within install-timeout (8 s)" in message, message
    assert not os.path.exists(venv)
    with open(os.path.join(project, "pids")) as f:  # noqa: ASYNC230
        pids = [int(p) for p in f.read().split()]
    assert pids  # the build hook ran, and pip above it
    assert not [p for p in pids if running(p)], pids
