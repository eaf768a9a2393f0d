"""Under systemd (the shipped unit), `tvm coordinator`'s stdout is the system journal, which the
`adm` and `systemd-journal` groups read: the account key and join token go to a 0600 file in the
state directory instead, and stdout names the file. systemd tells a process so in
`$JOURNAL_STREAM` (device:inode of its stdout); journald itself cannot run here, so stdout is a
plain file whose device and inode the test puts there, as systemd would."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

from tests.harness import agent_env, stop_process_groups, sync_client


def _run_under_journal(state: Path, out: Path, cmd: list[str]) -> tuple[str, str]:
    """(stdout, exports.env) of `tvm ...` whose stdout stands in for the journal."""
    with open(out, "wb") as f:
        st = os.fstat(f.fileno())
        proc = subprocess.Popen(
            [sys.executable, "-m", "coordinator", *cmd],
            stdout=f,
            stderr=subprocess.DEVNULL,
            env=agent_env({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}),
            start_new_session=True,
        )
    try:
        exports = state / "exports.env"
        deadline = time.monotonic() + 60
        while not (exports.exists() and out.read_text()) and time.monotonic() < deadline:
            assert proc.poll() is None, out.read_text()
            time.sleep(0.1)
        assert exports.exists(), "no exports.env was written"
        assert stat.S_IMODE(exports.stat().st_mode) == 0o600
        lines = exports.read_text()
        env = dict(
            line.removeprefix("export ").split("=", 1) for line in lines.splitlines() if line
        )
        # The lines work: the client signs with that key.
        client = sync_client(env["TVM_ENDPOINT"], env["TVM_ACCOUNT"], env["TVM_KEY"])
        assert client.pools.list() == []
        return out.read_text(), lines
    finally:
        stop_process_groups([proc])


def test_tvm_coordinator_keeps_its_key_and_join_token_out_of_the_journal(tmp_path: Path) -> None:
    state = tmp_path / "state"
    stdout, lines = _run_under_journal(
        state, tmp_path / "journal", ["coordinator", "--state-dir", str(state), "--port", "0"]
    )
    key = next(x for x in lines.splitlines() if x.startswith("export TVM_KEY="))
    token = next(x for x in lines.splitlines() if x.startswith("export TVM_JOIN_TOKEN="))
    assert key.split("=", 1)[1] not in stdout
    assert token.split("=", 1)[1] not in stdout
    assert str(state / "exports.env") in stdout


def test_tvm_up_keeps_its_key_out_of_the_journal(tmp_path: Path) -> None:
    state = tmp_path / "state"
    stdout, lines = _run_under_journal(
        state,
        tmp_path / "journal",
        ["up", "--state-dir", str(state), "--port", "0", "--agents", "0", "--no-provision"],
    )
    key = next(x for x in lines.splitlines() if x.startswith("export TVM_KEY="))
    assert key.split("=", 1)[1] not in stdout
    assert "exports.env" in stdout
