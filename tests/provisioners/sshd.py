"""A private sshd for tests: its own host key, config, authorized key and loopback port, started
and stopped by PID (root only: it must switch to the logged-in user)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass

import pytest

SSHD = "/usr/sbin/sshd"
# sshd in a mount namespace of its own whose /run is empty: its logins see no running systemd
# (no /run/systemd/system), whatever this machine's PID 1 is
NO_SYSTEMD = [
    "unshare",
    "--mount",
    "--propagation",
    "private",
    "sh",
    "-c",
    'mount -t tmpfs tmpfs /run && mkdir /run/sshd && exec "$0" "$@"',
]


@dataclass
class Sshd:
    port: int
    key_file: str
    addresses: tuple[str, ...]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_sshd(
    base: str, wrap: list[str] | None = None, keys_dir: str = ""
) -> tuple[Sshd, subprocess.Popen[bytes]]:
    """`wrap`: a command prefix for sshd (e.g. nsenter into a namespace where its logins run).
    `keys_dir`: where the authorized key goes, readable by all (sshd reads it as the user who
    logs in; `base` may be root's alone)."""
    if os.geteuid() != 0:
        pytest.skip("sshd must run as root to log users in")
    if (
        not os.path.exists(SSHD)
        or shutil.which("ssh") is None
        or shutil.which("ssh-keygen") is None
    ):
        pytest.skip("openssh-server/openssh-client are not installed")
    os.makedirs(base, mode=0o700, exist_ok=True)
    host_key = os.path.join(base, "host_ed25519")
    key = os.path.join(base, "client_ed25519")
    for path in (host_key, key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path], check=True)
    auth = os.path.join(keys_dir or base, "authorized_keys")
    shutil.copy(key + ".pub", auth)
    os.chmod(auth, 0o644 if keys_dir else 0o600)
    # sshd insists on its privilege separation directory (a fixed path; created if missing, kept)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    addresses = ("127.0.0.1", "127.0.0.2")
    port = _free_port()
    conf = os.path.join(base, "sshd_config")
    with open(conf, "w") as f:
        f.write(
            f"Port {port}\n"
            + "".join(f"ListenAddress {a}\n" for a in addresses)
            + f"HostKey {host_key}\nPidFile {base}/sshd.pid\nAuthorizedKeysFile {auth}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "PrintMotd no\nLogLevel ERROR\nMaxStartups 50\nMaxSessions 50\n"
        )
    log = open(os.path.join(base, "sshd.log"), "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [*(wrap or []), SSHD, "-D", "-e", "-f", conf],
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    log.close()
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection((addresses[-1], port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                with open(os.path.join(base, "sshd.log")) as f:
                    raise RuntimeError(f"sshd did not start: {f.read()[-2000:]}") from None
            time.sleep(0.05)
    return Sshd(port, key, addresses), proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
