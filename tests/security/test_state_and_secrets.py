"""A hostile task (or any other local user) against the service's own state and secrets: the
coordinator's database, WAL and join token, the agent's credential, and tokens on command lines.
Real `tvm up` / `tvm coordinator` / `tvm agent` processes; the outsider is `nobody` via setpriv."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest

from coordinator.client import Client
from tests.harness import REPO, agent_env

TVM = [sys.executable, "-m", "coordinator.cli"]

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv (tasks as other users, reads as nobody)",
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in agent_env().items() if not k.startswith("TVM_")}
    env.update(extra)
    return env


def _as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture
def open_dir() -> Iterator[str]:
    """A directory other users can reach (pytest's tmp_path is under a 0700 directory, which would
    make every "nobody cannot read it" check pass for the wrong reason)."""
    path = f"/tmp/tvm-sec-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.mkdir(path, 0o755)
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _mode(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _read_exports(proc: subprocess.Popen[str], n: int, timeout: float = 60.0) -> dict[str, str]:
    assert proc.stdout is not None
    out: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while len(out) < n:
        assert time.monotonic() < deadline, "no export lines in time"
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(
                f"exited early: rc {proc.wait()} stderr {proc.stderr.read() if proc.stderr else ''}"
            )
        key, _, value = line.strip().removeprefix("export ").partition("=")
        out[key] = value
    return out


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _cmdlines() -> list[str]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                out.append(f.read().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return out


# ----------------------------------------------------------------------------- tvm up


@needs_root
def test_tvm_up_tasks_run_unprivileged_and_cannot_read_the_state(open_dir: str) -> None:
    state = os.path.join(open_dir, "state")  # does not exist yet: tvm up creates it private
    roots = os.path.join(open_dir, "tvms")
    proc = subprocess.Popen(
        [
            *TVM,
            "up",
            "--port",
            "0",
            "--agents",
            "1",
            "--state-dir",
            state,
            "--tvm-root-dir",
            roots,
            "--heartbeat-timeout",
            "5",
            "--accept-degraded",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        start_new_session=True,
    )
    try:
        ex = _read_exports(proc, 3)
        db, token_file = os.path.join(state, "coordinator.db"), os.path.join(state, "join-token")
        probe = (
            f"id -un; for f in {db} {db}-wal {token_file}; do cat $f >/dev/null 2>&1 && echo READ $f; done; "
            f"ls {state} >/dev/null 2>&1 && echo LISTED; true"
        )
        with Client(ex["TVM_ENDPOINT"], ex["TVM_ACCOUNT"], ex["TVM_KEY"], timeout=10) as c:
            c.pools.add("p", target_dedicated=1)
            c.workitems.add("wi", "p")
            c.tasks.add("wi", "job-0000000001", "probe", f"/bin/sh -c '{probe}'")
            counts = c.tasks.wait("wi", "job-0000000001", timeout=90)
            out = c.files.get_from_task("wi", "job-0000000001", "probe", "stdout.txt").decode()
        assert counts.succeeded == 1, out
        user, *rest = out.splitlines()
        assert user.startswith("tvmslot"), f"the task ran as {user!r}, not as a per-task user"
        assert rest == [], f"a task read the coordinator's state: {rest}"

        # The files themselves: 0700 directory, 0600 files, unreadable by any other uid.
        assert _mode(state) == 0o700
        for name in ("coordinator.db", "coordinator.db-wal", "coordinator.db-shm", "join-token"):
            path = os.path.join(state, name)
            if os.path.exists(path):
                assert _mode(path) & 0o077 == 0, f"{name} is {_mode(path):04o}"
        assert _mode(os.path.join(state, "files")) == 0o700
        for path in (db, db + "-wal", token_file):
            r = _as_nobody("cat", path)
            assert r.returncode != 0, path
            assert "Permission denied" in r.stderr, path
        # The TVM roots are reachable (0711) but not listable, and hold no agent secret.
        assert _mode(roots) == 0o711
        assert _mode(os.path.join(roots, "agent-0")) == 0o711
        assert _as_nobody("ls", roots).returncode != 0
        assert not os.path.exists(os.path.join(roots, "agent-0", "agent-credential"))
        assert _mode(os.path.join(state, "agents", "agent-0", "agent-credential")) == 0o600
        # The join token is on no command line.
        with open(token_file) as f:
            token = f.read().strip()
        assert not [cmd for cmd in _cmdlines() if token in cmd]
    finally:
        _stop(proc)


# ----------------------------------------------------------------------------- tvm coordinator


@needs_root
def test_coordinator_repairs_a_loose_state_dir_from_an_older_version(open_dir: str) -> None:
    state = os.path.join(open_dir, "state")
    os.mkdir(state, 0o755)
    os.chmod(state, 0o755)
    with sqlite3.connect(os.path.join(state, "coordinator.db")) as db:  # what an older version left
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO meta VALUES ('key1', 'old-secret-key')")
    os.chmod(os.path.join(state, "coordinator.db"), 0o644)
    with open(os.path.join(state, "join-token"), "w") as f:
        f.write("old-join-token")
    os.chmod(os.path.join(state, "join-token"), 0o644)
    os.mkdir(os.path.join(state, "files"), 0o755)
    os.chmod(os.path.join(state, "files"), 0o755)

    proc = subprocess.Popen(
        [*TVM, "coordinator", "--port", "0", "--state-dir", state, "--log-level", "error"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        start_new_session=True,
    )
    try:
        ex = _read_exports(proc, 4)
        assert ex["TVM_JOIN_TOKEN"] == "old-join-token"  # repaired, not replaced
        assert _mode(state) == 0o700
        assert _mode(os.path.join(state, "coordinator.db")) == 0o600
        assert _mode(os.path.join(state, "join-token")) == 0o600
        assert _mode(os.path.join(state, "files")) == 0o700
        for name in ("coordinator.db", "coordinator.db-wal", "join-token"):
            r = _as_nobody("cat", os.path.join(state, name))
            assert r.returncode != 0, f"nobody read {name}"
    finally:
        _stop(proc)


def test_coordinator_refuses_the_join_token_on_its_command_line(tmp_path) -> None:
    state = str(tmp_path / "s")
    r = subprocess.run(
        [*TVM, "coordinator", "--port", "0", "--state-dir", state, "--join-token", "sekrit"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert r.returncode != 0
    assert r.stdout == ""
    assert "TVM_JOIN_TOKEN" in r.stderr
    assert "--join-token-file" in r.stderr
    assert "Traceback" not in r.stderr
    assert not os.path.exists(state)  # refused before anything was created


# ----------------------------------------------------------------------------- tvm agent


def test_agent_refuses_the_token_on_its_command_line_and_loose_token_files(tmp_path) -> None:
    root = str(tmp_path / "root")
    base = [*TVM, "agent", "--coordinator", "http://127.0.0.1:9", "--root", root]
    r = subprocess.run(
        [*base, "--token", "sekrit"], capture_output=True, text=True, env=_env(), timeout=60
    )
    assert r.returncode != 0
    assert "TVM_AGENT_TOKEN" in r.stderr
    assert "--token-file" in r.stderr
    assert "Traceback" not in r.stderr
    assert not os.path.exists(root)

    loose = tmp_path / "token"
    loose.write_text("sekrit\n")
    loose.chmod(0o644)
    r = subprocess.run(
        [*base, "--token-file", str(loose)], capture_output=True, text=True, env=_env(), timeout=60
    )
    assert r.returncode != 0
    assert "chmod 600" in r.stderr
    assert "Traceback" not in r.stderr
    assert not os.path.exists(root)

    config = tmp_path / "agent.toml"
    config.write_text('coordinator = "http://127.0.0.1:9"\ntoken = "sekrit"\n')
    config.chmod(0o644)
    r = subprocess.run(
        [*TVM, "agent", "--config", str(config), "--root", root],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert r.returncode != 0
    assert "config file" in r.stderr
    assert "0644" in r.stderr
    assert not os.path.exists(root)

    # The private directory may not sit where tasks and file APIs reach (inside the TVM root).
    good = tmp_path / "good-token"
    good.write_text("sekrit\n")
    good.chmod(0o600)
    r = subprocess.run(
        [*base, "--token-file", str(good), "--private-dir", os.path.join(root, "private")],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert r.returncode != 0
    assert "must not be inside the TVM root" in r.stderr
    assert "Traceback" not in r.stderr
    assert not os.path.exists(root)


async def test_agent_token_file_works_and_private_files_leave_the_tvm_root(
    nursery, tmp_path
) -> None:
    from tests.harness import cluster_ctx

    async with cluster_ctx(nursery, tmp_path) as c:
        token_file = tmp_path / "token"
        token_file.write_text(c.rc.join_token + "\n")
        token_file.chmod(0o600)
        root = str(tmp_path / "agents" / "a")
        private = root + ".private"
        # An agent root as an older version left it: id and credential inside the TVM root.
        a = c.start_agent("a", token="", extra_args=["--token-file", str(token_file)])
        await c.wait_for(
            lambda: c.rc.service.core.agents.get("a") and c.rc.service.core.agents["a"].connected,
            what="agent a connected with its token file",
        )
        await c.wait_for(
            lambda: os.path.exists(os.path.join(private, "agent-credential")), what="credential"
        )
        c.stop_agents()
        os.replace(
            os.path.join(private, "agent-credential"), os.path.join(root, "agent-credential")
        )
        with open(os.path.join(root, "agent-id"), "w") as f:
            f.write("a")
        for name in ("agent-id", "agent-credential"):
            os.chmod(os.path.join(root, name), 0o644)
        shutil.rmtree(private)
        os.chmod(root, 0o755)
        with open(os.path.join(root, "agent-credential")) as f:
            credential = f.read()
        c.agents.clear()

        # Restarted with no token at all: only the migrated credential can get it back in.
        b = c.start_agent("a", token="x-not-the-token")
        await c.wait_for(
            lambda: b.proc.poll() is None and b.log_text().count("connected to") == 2,
            what="agent a back with its migrated credential",
        )  # one log for both runs
        assert not os.path.exists(os.path.join(root, "agent-credential"))
        assert not os.path.exists(os.path.join(root, "agent-id"))
        assert _mode(root) == 0o711
        assert _mode(private) == 0o700
        assert _mode(os.path.join(private, "agent-credential")) == 0o600
        with open(os.path.join(private, "agent-credential")) as f:
            assert f.read() == credential
        assert a.proc.poll() is not None
        assert not [cmd for cmd in _cmdlines() if c.rc.join_token in cmd]


def test_install_service_keeps_the_token_off_command_lines(tmp_path) -> None:
    base = [
        *TVM,
        "agent",
        "install-service",
        "--coordinator",
        "http://127.0.0.1:7070",
        "--unit-dir",
        str(tmp_path / "units"),
        "--config-dir",
        str(tmp_path / "etc"),
    ]
    r = subprocess.run(
        [*base, "--token", "sekrit"], capture_output=True, text=True, env=_env(), timeout=60
    )
    assert r.returncode != 0
    assert "TVM_AGENT_TOKEN" in r.stderr
    assert not (tmp_path / "etc").exists()

    fake_tvm = tmp_path / "bin" / "tvm"  # install-service looks `tvm` up on PATH
    fake_tvm.parent.mkdir()
    fake_tvm.write_text("#!/bin/sh\n")
    fake_tvm.chmod(0o755)
    env = _env(TVM_AGENT_TOKEN="sekrit-token", PATH=f"{fake_tvm.parent}:{os.environ['PATH']}")
    r = subprocess.run(base, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    unit = (tmp_path / "units" / "tvm-agent.service").read_text()
    assert "sekrit-token" not in unit
    config = tmp_path / "etc" / "agent.toml"
    assert _mode(str(config)) == 0o600
    assert "sekrit-token" in config.read_text()
    assert "StateDirectoryMode=0711" in unit


def test_shipped_units_keep_state_private() -> None:
    with open(os.path.join(REPO, "coordinator", "systemd", "tvm-coordinator.service")) as f:
        unit = f.read()
    assert "StateDirectoryMode=0700" in unit
    assert "UMask=0077" in unit
