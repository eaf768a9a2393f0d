"""`tvm up --listen 0.0.0.0 --public-url URL` prints the exact command that joins another machine;
run with a single-use join token from `tvm token create`, that command brings an agent into a
pool, and the same token enrols no second agent."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

from coordinator.client import Client
from coordinator.daemon.joining import AGENT_TOKEN_PATH
from tests.harness import agent_env, free_port, remove_agent_cgroups
from tests.tvmup import tvm_up


def _wait(cond, what: str, timeout: float = 60):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def test_tvm_up_prints_the_join_command_and_a_single_use_token_joins_one_agent(tmp_path):
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    procs: list[tuple[subprocess.Popen[bytes], str, str]] = []
    with tvm_up(
        tmp_path,
        0,
        "--no-provision",
        "--port",
        str(port),
        "--listen",
        "0.0.0.0",
        "--public-url",
        public,
    ) as up:
        line = _wait(
            lambda: next(
                (
                    x.strip()
                    for x in up.log_tail(100000).splitlines()
                    if x.strip().startswith("tvm agent ")
                ),
                None,
            ),
            "the join command on stderr",
        )
        assert (
            line
            == f"tvm agent --coordinator ws://127.0.0.1:{port}/agent --token-file {AGENT_TOKEN_PATH}"
        )
        assert "tvm token create --single-use" in up.log_tail(100000)
        client = Client(public, up.account, up.key)
        token = client.agents.create_token(expires_in="PT1H", single_use=True).token
        token_file = tmp_path / "join-token"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        client.pools.add("p", target_dedicated=1)
        argv = shlex.split(line)
        argv[argv.index("--token-file") + 1] = str(token_file)
        for name in ("joined-1", "joined-2"):
            root = str(tmp_path / name)
            log = tmp_path / f"{name}.log"
            with open(log, "ab") as out:
                p = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "coordinator.cli",
                        *argv[1:],
                        "--root",
                        root,
                        "--name",
                        name,
                    ],
                    stdout=out,
                    stderr=out,
                    stdin=subprocess.DEVNULL,
                    env={k: v for k, v in agent_env().items() if k != "TVM_AGENT_TOKEN"},
                    start_new_session=True,
                )
            procs.append((p, name, root))
            if name == "joined-1":
                _wait(
                    lambda: [t for t in client.tvms.list("p") if t.state == "idle"],
                    "the joined TVM",
                )
        try:
            _wait(lambda: "JoinTokenUsed" in (tmp_path / "joined-2.log").read_text(), "a refusal")
            assert [t.agent_id for t in client.tvms.list("p")] == ["joined-1"]
        finally:
            for p, name, root in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
                remove_agent_cgroups(name, root)
            client.close()


def test_tvm_coordinator_refuses_a_bad_provisioner_section_before_starting(tmp_path):
    conf = tmp_path / "coord.toml"
    conf.write_text(
        'port = 0\n[provisioner.lab]\ntype = "ssh"\n'
        '[[provisioner.lab.hosts]]\naddress = "h"\ntvm = "/opt/tvm/bin/tvm"\nprot = 22\n'
    )
    state = tmp_path / "state"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "coordinator.cli",
            "coordinator",
            "--config",
            str(conf),
            "--state-dir",
            str(state),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in agent_env().items() if not k.startswith("TVM_")},
    )
    assert res.returncode != 0
    assert f"{conf}: [provisioner.lab]: unknown key `prot` in `hosts[0]`" in res.stderr
    assert not state.exists()  # nothing made
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "coordinator.cli",
            "up",
            "--public-url",
            "ftp://x",
            "--state-dir",
            str(state),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in agent_env().items() if not k.startswith("TVM_")},
    )
    assert res.returncode != 0
    assert "--public-url must be the http(s):// URL clients use, got 'ftp://x'" in res.stderr
    assert not state.exists()
