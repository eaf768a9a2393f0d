"""A private systemd for tests: PID 1 of its own PID, mount, UTS and cgroup namespaces, so that
`systemd-run`/`systemctl` on an ssh "host" talk to a real system manager on a machine (or
container) whose own PID 1 is not systemd.

Its namespace gets a private /run (a tmpfs: units, the manager's sockets), a cgroup2 mount rooted
at a cgroup made for it (removed at the end), a read-only /proc/sys, and `container=` in its
environment. It boots into an empty target, and every unit the stock targets would pull in
(tmpfiles, sysusers, journald, udev, timers ...) is masked in its /run: they would act on the
host's shared files. Stopping it is a SIGKILL of its PID 1, which ends the whole PID namespace.
Root only; each step that the host may refuse is a skip saying which.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass

import pytest

SYSTEMD = "/lib/systemd/systemd"

_INNER = r"""
set -e
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t tmpfs -o mode=755 tmpfs /run
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
mkdir -p /run/systemd/system /run/sshd
# its own (empty) state, where a test may mark a user as lingering
if [ -d /var/lib/systemd ]; then
  mount -t tmpfs -o mode=755 tmpfs /var/lib/systemd && mkdir /var/lib/systemd/linger
fi
printf '[Unit]\nDescription=tvm test\nDefaultDependencies=no\n' > /run/systemd/system/tvm-test.target
for w in /lib/systemd/system/*.wants/* /usr/lib/systemd/system/*.wants/* /etc/systemd/system/*.wants/*; do
  [ -e "$w" ] || [ -L "$w" ] || continue
  n=${w##*/}
  [ -e "/run/systemd/system/$n" ] || [ -L "/run/systemd/system/$n" ] || ln -s /dev/null "/run/systemd/system/$n"
done
for n in tmp.mount local-fs.target swap.target remote-fs.target; do
  ln -sf /dev/null "/run/systemd/system/$n"
done
echo ready-to-exec
export container=tvm-test
exec "$1" --unit=tvm-test.target --log-target=console --log-level=warning
"""


@dataclass
class SystemdNs:
    pid: int  # the namespace's PID 1 (systemd), as this namespace sees it
    cgroup: str  # the cgroup2 directory made for it
    proc: subprocess.Popen[bytes]
    log: str

    def enter(self) -> list[str]:
        """A command prefix that runs inside its namespaces."""
        return ["nsenter", "-t", str(self.pid), "-p", "-m", "-u", "-C"]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.enter(), *args], capture_output=True, text=True, timeout=30, check=False
        )

    def start_user_manager(self, user: str, uid: int, gid: int) -> None:
        """`systemd --user` for `user`, lingering, as user@.service would run it (that unit's
        runtime-dir helper asks logind over D-Bus, neither of which runs here)."""
        runtime = f"/run/user/{uid}"
        for step in (
            [
                "sh",
                "-c",
                f"mkdir -p {runtime} && chown {uid}:{gid} {runtime} && chmod 700 {runtime}",
            ],
            ["touch", f"/var/lib/systemd/linger/{user}"],
            [
                "systemd-run",
                f"--unit=tvm-test-user-{uid}",
                f"--uid={uid}",
                "-p",
                "Type=notify",
                "-p",
                "Delegate=yes",
                "-p",
                f"Environment=XDG_RUNTIME_DIR={runtime}",
                SYSTEMD,
                "--user",
            ],
        ):
            out = self.run(*step)
            assert out.returncode == 0, f"{step}: {out.stderr}"

    def user_systemctl(self, user: str, uid: int, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(
            "runuser",
            "-u",
            user,
            "--",
            "env",
            f"XDG_RUNTIME_DIR=/run/user/{uid}",
            "systemctl",
            "--user",
            *args,
        )


def _cgroup2_root() -> str | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[:1] == ["cgroup2"]:
                return left.split()[4]
    return None


def _remove_cgroup(path: str) -> None:
    for _ in range(50):
        if not os.path.isdir(path):
            return
        for root, dirs, _files in os.walk(path, topdown=False):
            for d in dirs:
                try:
                    os.rmdir(os.path.join(root, d))
                except OSError:
                    pass
        try:
            os.rmdir(path)
            return
        except OSError:
            time.sleep(0.1)  # its processes are still being reaped


def boot_systemd(base: str) -> SystemdNs:
    if os.geteuid() != 0:
        pytest.skip("a private systemd needs root (namespaces, cgroup and tmpfs mounts)")
    for tool in ("unshare", "nsenter", "systemctl", "systemd-run"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if not os.access(SYSTEMD, os.X_OK):
        pytest.skip(f"systemd is not installed ({SYSTEMD})")
    root = _cgroup2_root()
    if root is None:
        pytest.skip("no cgroup2 hierarchy is mounted (systemd needs one to track its units)")
    cgroup = os.path.join(root, f"tvm-test-systemd-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.mkdir(cgroup)
    except OSError as exc:
        pytest.skip(f"cannot make a cgroup for the private systemd under {root}: {exc}")
    os.makedirs(base, exist_ok=True)
    script = os.path.join(base, "boot.sh")
    with open(script, "w") as f:
        f.write(_INNER)
    log = os.path.join(base, "systemd.log")
    out = open(log, "ab")  # noqa: SIM115
    # The wrapper joins the new cgroup first: the cgroup namespace is rooted where it stands.
    proc = subprocess.Popen(
        [
            "sh",
            "-c",
            'echo $$ > "$1/cgroup.procs" && exec unshare --pid --fork --mount --uts --cgroup'
            ' --mount-proc --propagation private sh "$2" "$3"',
            "sh",
            cgroup,
            script,
            SYSTEMD,
        ],
        stdout=out,
        stderr=out,
        start_new_session=True,
    )
    out.close()
    ns = SystemdNs(0, cgroup, proc, log)
    deadline = time.monotonic() + 30
    state = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        ns.pid = _ns_init(proc.pid)
        if ns.pid:
            state = ns.run("systemctl", "is-system-running").stdout.strip()
            if state in ("running", "degraded"):
                return ns
        time.sleep(0.1)
    stop_systemd(ns)
    with open(log, errors="replace") as f:
        said = f.read()[-1500:]
    if "ready-to-exec" not in said:
        pytest.skip(f"this host refuses the private systemd's namespaces or mounts: {said}")
    raise AssertionError(f"the private systemd did not come up (state {state!r}): {said}")


def _ns_init(unshare_pid: int) -> int:
    """The PID (here) of the namespace's PID 1: the child of `unshare --fork`, once it is systemd."""
    try:
        with open(f"/proc/{unshare_pid}/task/{unshare_pid}/children") as f:
            children = f.read().split()
        for child in children:
            with open(f"/proc/{child}/comm") as f:
                if f.read().strip() == "systemd":
                    return int(child)
    except OSError:
        pass
    return 0


def stop_systemd(ns: SystemdNs) -> None:
    pid = ns.pid or _ns_init(ns.proc.pid)
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)  # a PID namespace's init gone: the kernel kills the rest
        except ProcessLookupError:
            pass
    if ns.proc.poll() is None:
        try:
            ns.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(ns.proc.pid, signal.SIGKILL)
            ns.proc.wait()
    _remove_cgroup(ns.cgroup)
