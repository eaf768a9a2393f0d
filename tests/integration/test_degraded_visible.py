"""No silent degradation: `tvm up` run by an unprivileged user has agents that cannot switch users.
Each agent says so in its hello; the TVM's REST record (`degradedModes`), `tvm status` and `tvm up`'s
own stderr show it; `--accept-degraded` silences only the warning, never what runs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
import trio

from coordinator.client import Client
from tests.harness import REPO

SITE = os.path.dirname(os.path.dirname(os.path.abspath(trio.__file__)))
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def _python_for_nobody() -> str | None:
    """An interpreter `nobody` can run with this checkout and its dependencies."""
    env = {"PYTHONPATH": f"{REPO}:{SITE}", "PATH": os.environ.get("PATH", "")}
    minor = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    # tvm up starts its agents with its own sys.executable: that must work as nobody too.
    check = "import subprocess, sys, coordinator.cli, tvmagent.agent; subprocess.run([sys.executable, '-c', ''], check=True)"
    for exe in (f"/usr/bin/{minor}", f"/usr/local/bin/{minor}", os.path.realpath(sys.executable)):
        if not os.path.exists(exe):
            continue
        r = subprocess.run([*NOBODY, exe, "-c", check], env=env, capture_output=True, timeout=60)
        if r.returncode == 0:
            return exe
    return None


@pytest.fixture
def nobody_dir() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run tvm up as an unprivileged user")
    path = f"/tmp/tvm-degraded-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.mkdir(path, 0o755)
    os.chown(path, 65534, -1)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _up(
    python: str, state: str, err: str, *extra: str
) -> tuple[subprocess.Popen[str], dict[str, str]]:
    env = {"PYTHONPATH": f"{REPO}:{SITE}", "PATH": os.environ.get("PATH", ""), "HOME": "/tmp"}
    errf = open(err, "w")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [
            *NOBODY,
            python,
            "-m",
            "coordinator.cli",
            "up",
            "--port",
            "0",
            "--agents",
            "1",
            "--state-dir",
            state,
            "--heartbeat-timeout",
            "5",
            *extra,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=errf,
        text=True,
        env=env,
        start_new_session=True,
    )
    errf.close()
    assert proc.stdout is not None
    ex = {}
    for _ in range(3):
        line = proc.stdout.readline()
        if not line:
            proc.wait()
            with open(err) as f:
                raise AssertionError(f"tvm up ended early: {f.read()}")
        key, _, value = line.strip().removeprefix("export ").partition("=")
        ex[key] = value
    return proc, ex


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait(cond, timeout: float = 60.0, what: str = ""):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def test_an_unprivileged_tvm_up_says_its_tasks_are_not_isolated(nobody_dir: str) -> None:
    python = _python_for_nobody()
    if python is None:
        pytest.skip("no interpreter that nobody can run with this checkout's dependencies")
    state = os.path.join(nobody_dir, "state")
    err = os.path.join(nobody_dir, "up.err")
    proc, ex = _up(python, state, err)
    try:
        with Client(ex["TVM_ENDPOINT"], ex["TVM_ACCOUNT"], ex["TVM_KEY"], timeout=10) as c:
            c.pools.add("p", target_dedicated=1)
            tvm = _wait(
                lambda: [t for t in c.tvms.list("p") if t.state == "idle"], what="an idle TVM"
            )[0]
            modes = c.tvms.get("p", tvm.name).degraded_modes
            assert any(m.startswith("isolation-off: the agent is not root") for m in modes), modes
            c.workitems.add("wi", "p")
            c.tasks.add("wi", "job-0000000001", "who", "id -un")
            assert c.tasks.wait("wi", "job-0000000001", timeout=60).succeeded == 1
            assert c.files.get_from_task("wi", "job-0000000001", "who", "stdout.txt") == b"nobody\n"
        # tvm up's own output says it, per agent.
        _wait(
            lambda: "WARNING: agent local-0 is degraded: isolation-off" in _read(err),
            30,
            "the warning",
        )
        # tvm status says it per TVM.
        st = subprocess.run(
            [sys.executable, "-m", "coordinator.cli", "status"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **ex, "PYTHONPATH": REPO, "COLUMNS": "200"},
        )
        assert st.returncode == 0, st.stderr
        assert f"DEGRADED p/{tvm.name}: isolation-off: the agent is not root" in st.stdout, (
            st.stdout
        )
    finally:
        _stop(proc)

    # --accept-degraded: no warning, the same record, the same user for tasks.
    os.unlink(err)
    proc, ex = _up(python, state, err, "--accept-degraded")
    try:
        with Client(ex["TVM_ENDPOINT"], ex["TVM_ACCOUNT"], ex["TVM_KEY"], timeout=10) as c:
            tvm = _wait(
                lambda: [t for t in c.tvms.list("p") if t.state == "idle" and t.degraded_modes],
                what="the TVM back, with its degraded modes",
            )[0]
            assert any(m.startswith("isolation-off") for m in tvm.degraded_modes)
            c.tasks.add("wi", "job-0000000001", "who2", "id -un")
            _wait(
                lambda: c.tasks.get("wi", "job-0000000001", "who2").state == "completed",
                what="who2",
            )
            assert (
                c.files.get_from_task("wi", "job-0000000001", "who2", "stdout.txt") == b"nobody\n"
            )
        time.sleep(1.0)  # the warning loop runs every 0.5 s: give it the chance to (wrongly) speak
        assert "WARNING" not in _read(err), _read(err)
    finally:
        _stop(proc)
