"""The PostgreSQL store beyond failover: `tvm store migrate` from SQLite, a paused active
coordinator fenced out once a standby took over, and the refusals of bad store settings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx2
import pytest

from coordinator.client import BatchError
from tests.harness import (
    agent_env,
    free_port,
    start_coordinator_process,
    stop_process_groups,
    sync_client,
    wait_sync,
)


def _tvm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coordinator", *args],
        capture_output=True,
        text=True,
        env=agent_env(env),
        timeout=120,
    )


def test_migrate_sqlite_state_into_postgres(tmp_path: Path, pg_cluster: Any):
    state = str(tmp_path / "state")
    port = free_port()
    coord, env = start_coordinator_process(state, port, str(tmp_path / "c.log"))
    try:
        client = sync_client(env["TVM_ENDPOINT"], env["TVM_ACCOUNT"], env["TVM_KEY"])
        client.pools.add("p", target_dedicated=0, vm_size="small")
        client.workitems.add("wi", "p")
        client.tasks.add("wi", "job-0000000001", "t1", "/bin/true")
        uploaded = client.files.upload(b"a resource file")
    finally:
        stop_process_groups([coord])
    url = pg_cluster.new_database()
    done = _tvm("store", "migrate", "--state-dir", state, "--to", url)
    assert done.returncode == 0, done.stderr
    assert "and 1 uploaded files" in done.stdout
    again = _tvm("store", "migrate", "--state-dir", state, "--to", url)
    assert again.returncode != 0
    assert "already holds a coordinator's state" in again.stderr
    coord, env2 = start_coordinator_process(
        str(tmp_path / "other"), port, str(tmp_path / "pg.log"), "--store", url
    )
    try:
        assert env2["TVM_KEY"] == env["TVM_KEY"]
        assert env2["TVM_JOIN_TOKEN"] == env["TVM_JOIN_TOKEN"]
        client = sync_client(env2["TVM_ENDPOINT"], env2["TVM_ACCOUNT"], env2["TVM_KEY"])
        assert [p.name for p in client.pools.list()] == ["p"]
        assert [t.name for t in client.tasks.list("wi", "job-0000000001")] == ["t1"]
        assert client.files.download(uploaded["sha256"]) == b"a resource file"
    finally:
        stop_process_groups([coord])


def test_migrate_refusals(tmp_path: Path):
    missing = _tvm(
        "store", "migrate", "--state-dir", str(tmp_path / "nope"), "--to", "postgresql:///x"
    )
    assert missing.returncode != 0
    assert "does not exist" in missing.stderr
    bad = _tvm("store", "migrate", "--state-dir", str(tmp_path), "--to", "mysql://x/y")
    assert bad.returncode == 2
    assert "postgresql://" in bad.stderr


def test_bad_store_settings_are_refused_before_anything_starts(tmp_path: Path):
    state = tmp_path / "state"
    cases = [
        (["--store", "sqlite:///x.db"], "`store` must be a postgresql://"),
        (["--store", "postgresql://tvm:secret@db/x"], "must not carry a password"),
        (["--lease-ttl", "0.5"], "`lease-ttl` must be at least 2 seconds"),
    ]
    for args, message in cases:
        done = _tvm("coordinator", "--state-dir", str(state), "--port", "0", *args)
        assert done.returncode != 0, args
        assert message in done.stderr, (args, done.stderr)
        assert "secret" not in done.stderr
    assert not state.exists()  # refused before the state directory was made
    unreachable = _tvm(
        "coordinator",
        "--state-dir",
        str(state),
        "--port",
        "0",
        env={"TVM_STORE": f"postgresql:///x?host={tmp_path}/no-such-socket-dir&user=tvm"},
    )
    assert unreachable.returncode == 3
    assert "cannot connect to postgresql://" in unreachable.stderr


def test_a_paused_active_coordinator_is_fenced_out(tmp_path: Path, pg_cluster: Any):
    """SIGSTOP the active one past its lease: the standby takes over; when the old one runs again
    it stops with a clear error instead of acting as a second active coordinator."""
    url = pg_cluster.new_database()
    a, env = start_coordinator_process(
        str(tmp_path / "a"),
        free_port(),
        str(tmp_path / "a.log"),
        "--store",
        url,
        "--lease-ttl",
        "2",
    )
    b = None
    try:
        b, env_b = start_coordinator_process(
            str(tmp_path / "b"),
            free_port(),
            str(tmp_path / "b.log"),
            "--store",
            url,
            "--lease-ttl",
            "2",
        )
        os.killpg(a.pid, signal.SIGSTOP)
        wait_sync(
            lambda: httpx2.get(f"{env_b['TVM_ENDPOINT']}/pools").status_code != 503,
            20,
            "the standby to take over",
        )
        client = sync_client(env_b["TVM_ENDPOINT"], env_b["TVM_ACCOUNT"], env_b["TVM_KEY"])
        client.pools.add("after", target_dedicated=0, vm_size="small")
        os.killpg(a.pid, signal.SIGCONT)
        assert a.wait(timeout=20) == 3
        log = (tmp_path / "a.log").read_text()
        assert "lease" in log
        time.sleep(0.5)
        assert [p.name for p in client.pools.list()] == ["after"]
    finally:
        stop_process_groups([a, b])


@pytest.mark.parametrize("endpoints", ["http://127.0.0.1:1,http://127.0.0.1:2"])
def test_a_client_with_several_urls_gives_up_with_a_clear_error(endpoints: str, monkeypatch):
    client = sync_client(endpoints, "acct", "a2V5")
    client.failover.timeout = 1.5
    started = time.monotonic()
    from coordinator.client import BatchError

    with pytest.raises(BatchError) as err:
        client.pools.list()
    assert err.value.code == "ConnectionFailed"
    assert "cannot reach any of http://127.0.0.1:1, http://127.0.0.1:2" in err.value.message
    assert time.monotonic() - started >= 1.0  # it kept trying, across both URLs


def test_uploaded_files_survive_the_active_coordinator(tmp_path: Path, pg_cluster: Any):
    """A file acknowledged by the active coordinator is served by the one that takes over after a
    SIGKILL (it was never on the successor's disk); a damaged copy in the store is refused."""
    url = pg_cluster.new_database()
    args = ("--store", url, "--lease-ttl", "2")
    a, env = start_coordinator_process(
        str(tmp_path / "a"), free_port(), str(tmp_path / "a.log"), *args
    )
    b = c = None
    try:
        b, env_b = start_coordinator_process(
            str(tmp_path / "b"), free_port(), str(tmp_path / "b.log"), *args
        )
        client = sync_client(env["TVM_ENDPOINT"], env["TVM_ACCOUNT"], env["TVM_KEY"])
        data = os.urandom(3 << 20) + b"tail"  # several of the store's 1 MiB rows
        good = client.files.upload(data)
        other = client.files.upload(b"second file")
        assert client.files.download(good["sha256"]) == data
        os.killpg(a.pid, signal.SIGKILL)
        a.wait()
        wait_sync(
            lambda: httpx2.get(f"{env_b['TVM_ENDPOINT']}/pools").status_code != 503,
            20,
            "the standby to take over",
        )
        client_b = sync_client(env_b["TVM_ENDPOINT"], env_b["TVM_ACCOUNT"], env_b["TVM_KEY"])
        assert not list((tmp_path / "b").rglob(good["sha256"]))  # never uploaded to b
        listed = {f["sha256"]: f["size"] for f in client_b.files.list_stored()}
        assert listed == {good["sha256"]: len(data), other["sha256"]: 11}
        assert client_b.files.download(good["sha256"]) == data
        assert list((tmp_path / "b").rglob(good["sha256"]))  # kept once fetched
        size = len(data)
        assert client_b.files.download(good["sha256"], byte_range=(size - 4, size - 1)) == b"tail"

        import psycopg

        with psycopg.connect(url, autocommit=True) as db:
            db.execute(
                "UPDATE tvm_blob_chunks SET data = %s WHERE sha256 = %s",
                (b"not it", other["sha256"]),
            )
        stop_process_groups([b])
        b = None
        c, env_c = start_coordinator_process(
            str(tmp_path / "c"), free_port(), str(tmp_path / "c.log"), *args
        )
        client_c = sync_client(env_c["TVM_ENDPOINT"], env_c["TVM_ACCOUNT"], env_c["TVM_KEY"])
        with pytest.raises(BatchError) as damaged:
            client_c.files.download(other["sha256"])
        assert damaged.value.status == 500
        assert damaged.value.code == "FileDamaged"
        assert "damaged" in damaged.value.message
        assert not list((tmp_path / "c").rglob(other["sha256"]))  # nothing kept of it
        assert not list((tmp_path / "c").rglob("*.part"))
    finally:
        stop_process_groups([p for p in (a, b, c) if p is not None])
