"""Issue 3, `tvm up` as a subprocess: the three export lines come first on stdout, only once the
endpoint accepts requests; SIGTERM stops the coordinator and its agents cleanly (exit 0); a restart on
the same state dir keeps the account, the key and every resource."""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time

from coordinator.client import Client
from coordinator.runtime.provisioner import default_tvm_root_dir
from tests.harness import agent_env

LINES = [
    re.compile(r"export TVM_ENDPOINT=http://127\.0\.0\.1:(\d+)"),
    re.compile(r"export TVM_ACCOUNT=([\w-]+)"),
    re.compile(r"export TVM_KEY=([A-Za-z0-9+/]+={0,2})"),
]


def _start(state: str, agents: int = 1) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in agent_env().items() if not k.startswith("TVM_")}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "coordinator.cli",
            "up",
            "--port",
            "0",
            "--agents",
            str(agents),
            "--state-dir",
            state,
            "--heartbeat-timeout",
            "5",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )


def _read_line(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> str:
    assert proc.stdout is not None
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, left))
        if not ready:
            raise AssertionError(f"no stdout line within {timeout} s (got {buf!r})")
        ch = os.read(proc.stdout.fileno(), 1)  # one byte at a time: never read past the line
        if not ch:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(
                f"tvm up ended early (rc {proc.wait()}); stdout {buf!r}; stderr:\n{err}"
            )
        buf += ch
    return buf.decode().rstrip("\n")


def _exports(proc: subprocess.Popen[bytes]) -> tuple[str, str, str]:
    lines = [_read_line(proc) for _ in range(3)]
    values = []
    for pattern, line in zip(LINES, lines, strict=True):
        m = pattern.fullmatch(line)
        assert m, lines
        values.append(line.split("=", 1)[1])
    return values[0], values[1], values[2]


def _processes_under(path: str) -> list[int]:
    """PIDs whose command line mentions `path` (the agents get --root inside the state dir)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if path in cmd and not zombie:
            pids.append(int(entry))
    return pids


def _stop(proc: subprocess.Popen[bytes], state: str, sig: int = signal.SIGTERM) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        rc = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in _processes_under(state):
            os.kill(pid, signal.SIGKILL)
        raise
    rest = proc.stdout.read().decode() if proc.stdout else ""
    proc.stderr.close() if proc.stderr else None
    proc.stdout.close() if proc.stdout else None
    return rc, rest


def _wait(cond, timeout: float = 30.0, what: str = "condition"):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _idle_tvms(client: Client, pool: str) -> int:
    return sum(1 for t in client.tvms.list(pool) if t.state in ("idle", "running"))


def test_tvm_up_exports_first_sigterm_stops_all_and_restart_keeps_everything(tmp_path):
    state = str(tmp_path / "state")
    try:
        _run_up_twice(state)
    finally:  # the agents' TVM roots live outside the (private) state directory
        shutil.rmtree(default_tvm_root_dir(state), ignore_errors=True)


def _run_up_twice(state: str) -> None:
    proc = _start(state)
    try:
        endpoint, account, key = _exports(proc)
        with Client(endpoint, account, key, timeout=10) as client:
            # Printed only once the endpoint accepts requests: a signed request works right away.
            assert client.pools.list() == []
            client.pools.add("p", target_dedicated=1)
            client.workitems.add("wi", "p")
            # /bin/sh: tasks run as unprivileged task users, who may not reach this interpreter.
            client.tasks.add("wi", "job-0000000001", "t", "/bin/sh -c 'echo 42'")
            counts = client.tasks.wait("wi", "job-0000000001", timeout=60)
            assert (counts.completed, counts.succeeded) == (1, 1)
            assert client.files.get_from_task("wi", "job-0000000001", "t", "stdout.txt") == b"42\n"
        assert _processes_under(os.path.join(state, "agents")), "the local agent should be running"
    finally:
        rc, rest = _stop(proc, state)
    assert rc == 0
    assert "TVM_" not in rest  # the export lines were printed once, at the start
    _wait(lambda: not _processes_under(os.path.join(state, "agents")), 15, "agents to be gone")

    # Restart on the same state dir: same account and key, every resource still there.
    proc = _start(state)
    try:
        endpoint2, account2, key2 = _exports(proc)
        assert (account2, key2) == (account, key)
        with Client(endpoint2, account2, key2, timeout=10) as client:
            assert [p.name for p in client.pools.list()] == ["p"]
            assert [w.name for w in client.workitems.list()] == ["wi"]
            task = client.tasks.get("wi", "job-0000000001", "t")
            assert (task.state, task.execution_info.exit_code) == ("completed", 0)
            _wait(lambda: _idle_tvms(client, "p") == 1, 30, "the pool's TVM back after the restart")
    finally:
        rc, _ = _stop(proc, state, signal.SIGINT)  # Ctrl-C stops it as cleanly as SIGTERM
    assert rc == 0
    _wait(lambda: not _processes_under(os.path.join(state, "agents")), 15, "agents to be gone")


def test_tvm_up_refuses_a_busy_port_clearly(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        env = {k: v for k, v in agent_env().items() if not k.startswith("TVM_")}
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "coordinator.cli",
                "up",
                "--port",
                str(port),
                "--agents",
                "0",
                "--state-dir",
                str(tmp_path / "s"),
            ],
            capture_output=True,
            env=env,
            timeout=60,
        )
    assert r.returncode != 0
    assert r.stdout == b""  # no export lines for an endpoint that does not exist
    assert str(port) in r.stderr.decode()
    assert "Traceback" not in r.stderr.decode()


def test_a_sigterm_while_agents_start_stops_every_one_of_them(tmp_path):
    """SIGTERM as soon as the export lines are out, while the agents are being started: once they
    are, every one of them is stopped and `tvm up` exits 0 (the signal once ended `tvm up` at once
    and left the agents started so far running)."""
    state = str(tmp_path / "state")
    proc = _start(state, agents=8)
    try:
        _exports(proc)
        rc, _ = _stop(proc, state)
        assert rc == 0
        _wait(lambda: not _processes_under(state), 30, "no agent left")
    finally:
        for pid in _processes_under(state):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(default_tvm_root_dir(state), ignore_errors=True)


def test_more_agents_than_the_memory_holds_are_refused_before_anything_starts(tmp_path):
    from coordinator.runtime.provisioner import room_for_agents

    room = room_for_agents()
    assert room is not None  # Linux has /proc/meminfo
    state = tmp_path / "state"
    env = {k: v for k, v in agent_env().items() if not k.startswith("TVM_")}
    r = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "up", "--agents", str(room + 1)]
        + ["--state-dir", str(state), "--port", "0"],
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert r.stdout == b""
    err = r.stderr.decode()
    assert f"--agents {room + 1}" in err
    assert "MiB" in err
    assert "Traceback" not in err
    assert not state.exists()


def _quickstart(*args: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in agent_env().items() if not k.startswith("TVM_")}
    return subprocess.Popen(
        [sys.executable, "-m", "coordinator.cli", "quickstart", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )


def _state_of(proc: subprocess.Popen[bytes]) -> str:
    """The state directory quickstart names on its first line (stderr)."""
    assert proc.stderr is not None
    line = proc.stderr.readline().decode()
    m = re.search(r"\(state in (\S+)\)", line)
    assert m, line
    return m.group(1)


def test_quickstart_runs_its_sample_and_leaves_nothing(tmp_path):
    """The README's first command, small: every task succeeds, and its throw-away state directory
    and its agents' TVM roots are gone afterwards."""
    proc = _quickstart("--tasks", "20", "--agents", "2")
    state = _state_of(proc)
    try:
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = err.decode()
    assert proc.returncode == 0, text
    assert "20 succeeded" in text
    assert "0 failed" in text
    assert not os.path.exists(state)
    assert not os.path.exists(default_tvm_root_dir(state))
    assert not _processes_under(state)


def test_quickstart_stopped_by_sigterm_stops_its_agents_and_cleans_up(tmp_path):
    """SIGTERM in the middle of the sample run: exit 143 after stopping the agents and removing
    the throw-away state (the signal once ended quickstart at once and left its agents running)."""
    proc = _quickstart("--tasks", "100000", "--agents", "2")
    state = _state_of(proc)
    try:
        _wait(lambda: len(_processes_under(state)) >= 2, 60, "the agents to run")
        time.sleep(1.0)  # the tasks are being added and run
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 143, err.decode()
        assert "stopped by SIGTERM" in err.decode()
        _wait(lambda: not _processes_under(state), 30, "no agent left")
        assert not os.path.exists(state)
        assert not os.path.exists(default_tvm_root_dir(state))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in _processes_under(state):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(default_tvm_root_dir(state), ignore_errors=True)
