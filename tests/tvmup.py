"""`tvm up` as a separate process for tests that drive it with outside clients: the endpoint,
account and key it exports, its agents, and a clean stop (by PID) with its TVM roots removed."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from coordinator.runtime.provisioner import default_tvm_root_dir
from tests.harness import agent_env


@dataclass
class TvmUp:
    endpoint: str
    account: str
    key: str
    state: str
    log: Path
    proc: subprocess.Popen[bytes]

    def env(self) -> dict[str, str]:
        """What a client script gets: the three exports and nothing of this repo's environment."""
        return {"TVM_ENDPOINT": self.endpoint, "TVM_ACCOUNT": self.account, "TVM_KEY": self.key}

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _read_line(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> str:
    assert proc.stdout is not None
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"tvm up printed no line within {timeout} s (got {buf!r})")
        ch = os.read(proc.stdout.fileno(), 1)  # byte by byte: never read past the line
        if not ch:
            raise AssertionError(
                f"tvm up ended early (rc {proc.wait()}):\n{log.read_text(errors='replace')}"
            )
        buf += ch
    return buf.decode().rstrip("\n")


@contextmanager
def tvm_up(tmp: Path, agents: int = 2, *extra: str) -> Iterator[TvmUp]:
    """Run `tvm up --agents N` on a free loopback port until the block ends."""
    state = str(tmp / "state")
    log = tmp / "tvm-up.log"
    env = {k: v for k, v in agent_env().items() if not k.startswith("TVM_")}
    with open(log, "ab") as err:
        proc = subprocess.Popen(
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
                *extra,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
            start_new_session=True,
        )
    try:
        exports: dict[str, str] = {}
        while len(exports) < 3:
            k, _, v = _read_line(proc, log, 60.0).removeprefix("export ").partition("=")
            exports[k] = v
        yield TvmUp(
            exports["TVM_ENDPOINT"], exports["TVM_ACCOUNT"], exports["TVM_KEY"], state, log, proc
        )
    finally:
        _stop(proc)
        shutil.rmtree(default_tvm_root_dir(state), ignore_errors=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
