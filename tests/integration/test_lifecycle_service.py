"""Issue 9 §1, §2 and bad input, with real processes: config errors from the real CLI, sd_notify
datagrams on a real NOTIFY_SOCKET from `tvm coordinator` and `tvm agent`, and an agent whose
coordinator does not answer (clear retries with backoff in JSON logs)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from tests.harness import agent_env, close_pipes

TVM = os.path.join(os.path.dirname(sys.executable), "tvm")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NotifyListener:
    """A NOTIFY_SOCKET like systemd's: a datagram socket read continuously (the kernel queue holds
    only ~10 datagrams; a sender's notify() drops what does not fit rather than block)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.datagrams: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return  # closed
            with self._lock:
                self.datagrams.append(
                    dict(line.split("=", 1) for line in data.decode().splitlines())
                )

    def snapshot(self) -> list[dict[str, str]]:
        with self._lock:
            return list(self.datagrams)


@contextmanager
def notify_socket() -> Iterator[tuple[str, NotifyListener]]:
    # A short directory: AF_UNIX paths are limited to 107 bytes, pytest's tmp_path can be longer.
    d = tempfile.mkdtemp(prefix="tvm-notify-")
    path = os.path.join(d, "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        yield path, NotifyListener(sock)
    finally:
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        os.unlink(path)
        os.rmdir(d)


def receive_until(
    listener: NotifyListener,
    got: list[dict[str, str]],
    cond: Callable[[list[dict[str, str]]], bool],
    what: str,
    timeout: float = 20.0,
) -> None:
    """Wait until cond(datagrams so far); `got` is updated to all datagrams (KEY=VALUE dicts)."""
    deadline = time.monotonic() + timeout
    while True:
        got[:] = listener.snapshot()
        if cond(got):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; got {got}")
        time.sleep(0.02)


def _count(got: list[dict[str, str]], key: str) -> int:
    return sum(1 for d in got if key in d)


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def _start_coordinator(
    tmp: str, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    log = open(os.path.join(tmp, "coord.log"), "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            TVM,
            "coordinator",
            "--state-dir",
            os.path.join(tmp, "state"),
            "--port",
            "0",
            "--heartbeat-timeout",
            "2",
            "--log-format",
            "json",
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        stdin=subprocess.DEVNULL,
        env=agent_env(env),
        start_new_session=True,
    )
    log.close()
    exports: dict[str, str] = {}
    assert proc.stdout is not None
    while len(exports) < 4:
        line = proc.stdout.readline().decode()
        if not line:
            _stop(proc, signal.SIGKILL)
            raise AssertionError(
                "coordinator exited early:\n" + open(os.path.join(tmp, "coord.log")).read()
            )
        k, _, v = line.strip().removeprefix("export ").partition("=")
        exports[k] = v
    return proc, exports


# --------------------------------------------------------------------------- config


BAD_CONFIGS = [
    ("unknown key", "colour = 'blue'\n", ["colour"]),
    ("wrong type", "heartbeat-interval = 'soon'\n", ["heartbeat-interval"]),
    ("not TOML", "this is [not toml\n", ["TOML"]),
]


@pytest.mark.parametrize("command", ["coordinator", "agent"])
@pytest.mark.parametrize(("case", "text", "words"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_broken_config_file_exits_non_zero_naming_the_problem(tmp_path, command, case, text, words):
    if command == "coordinator" and case == "wrong type":
        text = "heartbeat-timeout = 'soon'\n"
        words = ["heartbeat-timeout"]
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    proc = subprocess.run(
        [TVM, command, "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        env=agent_env(),
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode != 0
    assert str(cfg) in proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""  # nothing started: no export lines


@pytest.mark.parametrize("command", ["coordinator", "agent"])
def test_missing_config_file_and_bad_log_format(tmp_path, command):
    proc = subprocess.run(
        [TVM, command, "--config", str(tmp_path / "nope.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        env=agent_env(),
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode != 0
    assert "nope.toml" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run(
        [
            TVM,
            command,
            "--log-format",
            "xml",
            "--coordinator" if command == "agent" else "--port",
            "ws://127.0.0.1:1/agent" if command == "agent" else "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=agent_env({"TVM_AGENT_TOKEN": "x"}),
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode != 0
    assert "log-format" in proc.stderr
    assert "xml" in proc.stderr


# --------------------------------------------------------------------------- sd_notify


def test_sd_notify_ready_status_watchdog_stopping_from_coordinator_and_agent(tmp_path):
    tmp = str(tmp_path)
    with notify_socket() as (cpath, csock), notify_socket() as (apath, asock):
        # WATCHDOG_USEC = 0.2 s: both must pet every 0.1 s
        coord, exports = _start_coordinator(
            tmp, {"NOTIFY_SOCKET": cpath, "WATCHDOG_USEC": "200000"}
        )
        agent = None
        try:
            cgot: list[dict[str, str]] = []
            receive_until(
                csock,
                cgot,
                lambda g: _count(g, "READY") and _count(g, "WATCHDOG") >= 3,
                "coordinator READY and WATCHDOG",
            )
            ready = next(d for d in cgot if "READY" in d)
            assert ready["READY"] == "1"
            assert exports["TVM_ENDPOINT"] in ready["STATUS"]
            assert {d["WATCHDOG"] for d in cgot if "WATCHDOG" in d} == {"1"}

            url = exports["TVM_ENDPOINT"]
            log = open(os.path.join(tmp, "agent.log"), "ab")  # noqa: SIM115
            agent = subprocess.Popen(
                [
                    TVM,
                    "agent",
                    "--coordinator",
                    url,
                    "--root",
                    os.path.join(tmp, "root"),
                    "--name",
                    "svc-agent",
                    "--log-format",
                    "json",
                ],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=agent_env(
                    {
                        "TVM_AGENT_TOKEN": exports["TVM_JOIN_TOKEN"],
                        "NOTIFY_SOCKET": apath,
                        "WATCHDOG_USEC": "200000",
                    }
                ),
            )
            log.close()
            agot: list[dict[str, str]] = []
            receive_until(
                asock,
                agot,
                lambda g: _count(g, "READY") and _count(g, "WATCHDOG") >= 3,
                "agent READY and WATCHDOG",
            )
            ready = next(d for d in agot if "READY" in d)
            assert "connected to" in ready["STATUS"]
            assert "svc-agent" in ready["STATUS"]
            # The coordinator's STATUS follows the cluster: one agent connected now.
            receive_until(
                csock,
                cgot,
                lambda g: any("1 agent(s) connected" in d.get("STATUS", "") for d in g),
                "coordinator STATUS with the agent",
            )

            assert _stop(agent) == 0
            receive_until(asock, agot, lambda g: _count(g, "STOPPING"), "agent STOPPING")
            assert next(d for d in agot if "STOPPING" in d)["STOPPING"] == "1"
            assert _stop(coord) == 0
            receive_until(csock, cgot, lambda g: _count(g, "STOPPING"), "coordinator STOPPING")
        finally:
            if agent is not None and agent.poll() is None:
                _stop(agent, signal.SIGKILL)
            if coord.poll() is None:
                _stop(coord, signal.SIGKILL)
            close_pipes(coord)


def test_watchdog_meant_for_another_pid_is_not_petted(tmp_path):
    """systemd sets WATCHDOG_PID when the watchdog belongs to another process (we are its child)."""
    with notify_socket() as (apath, asock):
        log = open(tmp_path / "agent.log", "ab")  # noqa: SIM115
        agent = subprocess.Popen(
            [
                TVM,
                "agent",
                "--coordinator",
                f"ws://127.0.0.1:{_free_port()}/agent",
                "--root",
                str(tmp_path / "r"),
                "--name",
                "wd",
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=agent_env(
                {
                    "TVM_AGENT_TOKEN": "t",
                    "NOTIFY_SOCKET": apath,
                    "WATCHDOG_USEC": "200000",
                    "WATCHDOG_PID": "1",
                }
            ),
        )
        log.close()
        try:
            got: list[dict[str, str]] = []
            # The first STATUS proves the agent is up and talking to the socket...
            receive_until(asock, got, lambda g: _count(g, "STATUS") >= 1, "agent STATUS")
            # ...and it stops on SIGTERM; by then (> 0.5 s of pet intervals) no WATCHDOG=1 was sent.
            time.sleep(0.5)
            assert _stop(agent) == 0
            receive_until(asock, got, lambda g: _count(g, "STOPPING"), "agent STOPPING")
            assert _count(got, "WATCHDOG") == 0
        finally:
            if agent.poll() is None:
                _stop(agent, signal.SIGKILL)


# --------------------------------------------------------------------------- unreachable coordinator


def test_unanswered_coordinator_url_logs_clear_retries_with_backoff(tmp_path):
    port = _free_port()  # nothing listens here
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "agent.log"
    with notify_socket() as (apath, asock):
        log = open(log_path, "ab")  # noqa: SIM115
        agent = subprocess.Popen(
            [
                TVM,
                "agent",
                "--coordinator",
                url,
                "--root",
                str(tmp_path / "r"),
                "--name",
                "lonely",
                "--log-format",
                "json",
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=agent_env({"TVM_AGENT_TOKEN": "t", "NOTIFY_SOCKET": apath}),
        )
        log.close()
        try:
            got: list[dict[str, str]] = []
            receive_until(
                asock,
                got,
                lambda g: any("connecting to" in d.get("STATUS", "") for d in g),
                "STATUS connecting",
            )
            assert not _count(got, "READY")  # not ready: never connected (READY comes after 30 s)

            def retries() -> list[dict]:
                out = []
                for line in log_path.read_text().splitlines():
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        raise AssertionError(f"not a JSON log line: {line!r}") from None
                    if "retrying in" in rec.get("event", ""):
                        out.append(rec)
                return out

            deadline = time.monotonic() + 20
            while len(retries()) < 4 and time.monotonic() < deadline:
                time.sleep(0.1)
            recs = retries()
            assert len(recs) >= 4, log_path.read_text()
            for rec in recs:
                assert rec["level"] == "warning"
                assert f"ws://127.0.0.1:{port}/agent" in rec["event"]
                assert "cannot reach the coordinator" in rec["event"]
                assert "Connection refused" in rec["event"]
            delays = [
                float(re.search(r"retrying in ([0-9.]+) s", r["event"]).group(1)) for r in recs
            ]
            assert delays == sorted(delays)
            assert delays[-1] > delays[0]
            assert _stop(agent) == 0  # SIGTERM while still retrying: drains (nothing) and exits 0
        finally:
            if agent.poll() is None:
                _stop(agent, signal.SIGKILL)


@pytest.mark.parametrize("command", ["coordinator", "agent"])
def test_garbage_watchdog_env_is_a_clear_error(tmp_path, command):
    args = (
        ["--port", "0", "--state-dir", str(tmp_path / "s")]
        if command == "coordinator"
        else [
            "--coordinator",
            f"ws://127.0.0.1:{_free_port()}/agent",
            "--root",
            str(tmp_path / "r"),
        ]
    )
    proc = subprocess.run(
        [TVM, command, *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env=agent_env({"TVM_AGENT_TOKEN": "t", "WATCHDOG_USEC": "soon"}),
    )
    assert proc.returncode == 2
    assert "WATCHDOG_USEC must be a whole number of microseconds, got 'soon'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
