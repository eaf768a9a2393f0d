"""The `ssh` provisioner: agents on other hosts, started over SSH with the system `ssh` client.

Each agent gets a directory on its host (AGENT_DIR/NAME: the join token in a 0600 file written
from ssh's stdin, never on a command line; its private dir; its TVM root; its log). It runs as a
transient systemd unit where systemd runs (`mode = "auto"`), otherwise as a plain process in its
own session (pid in NAME/pid). A non-root login gets a unit of its own user manager
(`systemd-run --user`), which outlives the login only for a lingering user. `stop` ends it
(SIGTERM, then SIGKILL of its process group after a grace) and deletes its directory. A host ssh cannot reach (exit status 255) is reported as a
problem naming it (the pool's resize error) and left alone for `retry-after` seconds.

A host entry with `venv` gets that venv made and `pip-spec` installed into it before its first
agent starts (reused while its `tvm` is there); a failed install is reported with pip's error and
removes the venv it made. `mode = "auto"` falls back to a plain process where the system manager
does not take the unit.

Blocking code: the hub calls it in worker threads, one call at a time.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import shlex
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .config import SshHost, SshSpec

log = logging.getLogger("tvm.coordinator")

STOP_GRACE_S = 10
# How much longer than install-timeout an install's ssh call waits: the host ends the install at
# the limit (10 s more to kill it), cleans up and says so.
INSTALL_MARGIN_S = 30


class SshProvisioner:
    register_timeout: float | None = 120.0

    def __init__(
        self, name: str, spec: SshSpec, state_dir: str, agent_url: str, token: str
    ) -> None:
        self.name = name
        self.spec = spec
        self.idle_stop_after = spec.idle_stop_after
        self.agent_url = spec.coordinator_url or agent_url
        self.token = token
        self.state_dir = os.path.join(state_dir, "provisioners", name)
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        self.known_hosts = os.path.join(self.state_dir, "known_hosts")
        self.agents: dict[str, int] = {}  # agent name -> host index
        self.joined: set[str] = set()
        self.size_cores: dict[str, int] = {}
        self._bad_until: dict[int, float] = {}
        self._problems: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ plugin interface

    @property
    def paused(self) -> str:
        return ""

    def resume(self) -> None:
        pass

    def poll(self) -> list[tuple[str, str]]:
        return []

    def adopt(self, name: str) -> bool:
        """An agent `<provisioner>-<host index>-<hex>` started before a coordinator restart."""
        parts = name[len(self.name) + 1 :].split("-")
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) >= len(self.spec.hosts):
            return False
        self.agents[name] = int(parts[0])
        return True

    def take_problems(self) -> list[tuple[str, str]]:
        with self._lock:
            out, self._problems = self._problems, []
        return out

    def start(self, n: int, size: str = "small") -> list[str]:
        started: list[str] = []
        for _ in range(n):
            index = self._pick_host()
            if index is None:
                self._problem(
                    "NoHostAvailable",
                    f"provisioner {self.name}: every host is full (max-agents) or unreachable;"
                    f" {n - len(started)} agent(s) could not be started",
                )
                break
            name = f"{self.name}-{index}-{secrets.token_hex(4)}"
            if self._start_one(index, name):
                self.agents[name] = index
                started.append(name)
        return started

    def stop(self, name: str) -> None:
        index = self.agents.pop(name, None)
        self.joined.discard(name)
        if index is None:
            return
        host = self.spec.hosts[index]
        result = self._ssh(host, self._stop_script(host, name), timeout=STOP_GRACE_S + 30)
        if result.returncode != 0:
            log.warning(
                "provisioner %s: stopping %s on %s failed: %s",
                self.name,
                name,
                _where(host),
                _last_line(result.stderr),
            )

    def stop_all(self) -> None:
        names = list(self.agents)
        if names:
            with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
                list(pool.map(self.stop, names))

    # ------------------------------------------------------------------ helpers

    def _problem(self, code: str, message: str) -> None:
        with self._lock:
            self._problems.append((code, message))

    def _pick_host(self) -> int | None:
        now = time.monotonic()
        counts = [0] * len(self.spec.hosts)
        for index in self.agents.values():
            counts[index] += 1
        choices = [
            i
            for i, h in enumerate(self.spec.hosts)
            if counts[i] < h.max_agents and self._bad_until.get(i, 0.0) <= now
        ]
        return min(choices, key=lambda i: (counts[i], i)) if choices else None

    def _ssh_args(self, host: SshHost) -> list[str]:
        args = [
            "ssh",
            "-p",
            str(host.port),
            "-o",
            "BatchMode=yes",
            "-o",
            f"ConnectTimeout={self.spec.connect_timeout}",
            "-o",
            "LogLevel=ERROR",
            "-o",
            f"UserKnownHostsFile={host.known_hosts or self.known_hosts}",
            "-o",
            # a new host's key is learnt on first contact; a changed one is refused
            "StrictHostKeyChecking=" + ("yes" if host.known_hosts else "accept-new"),
        ]
        if host.key_file:
            args += ["-i", host.key_file, "-o", "IdentitiesOnly=yes"]
        return [*args, f"{host.user}@{host.address}"]

    def _ssh(
        self, host: SshHost, script: str, stdin: str = "", timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        # The remote command is one `sh -c` word; secrets only ever travel on stdin.
        cmd = [*self._ssh_args(host), "sh -c " + shlex.quote(script)]
        try:
            return subprocess.run(
                cmd, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(cmd, 255, "", f"no answer within {timeout:g} s")

    def _start_one(self, index: int, name: str) -> bool:
        host = self.spec.hosts[index]
        if host.venv and not self._ensure_venv(index):
            return False
        result = self._ssh(host, self._start_script(host, name), stdin=self.token + "\n")
        if result.returncode == 0:
            for line in result.stdout.splitlines():
                if line.startswith(_FALLBACK):
                    said = _last_line(result.stderr)  # systemd-run's refusal, if it said one
                    log.info(
                        "provisioner %s: agent %s on %s runs as a plain process, not a systemd"
                        " unit: %s%s",
                        self.name,
                        name,
                        _where(host),
                        line.removeprefix(_FALLBACK),
                        f" ({said})" if said else "",
                    )
            return True
        why = _last_line(result.stderr) or f"exit status {result.returncode}"
        if result.returncode == 255:
            self._unreachable(index, why)
        else:
            self._problem(
                "AgentStartFailed",
                f"provisioner {self.name}: starting an agent on {_where(host)} failed: {why}",
            )
            # best effort: leave nothing half-made on the host
            self._ssh(host, f"rm -rf {shlex.quote(_agent_dir(host, name))}", timeout=30)
        return False

    def _unreachable(self, index: int, why: str) -> None:
        self._bad_until[index] = time.monotonic() + self.spec.retry_after
        self._problem(
            "HostUnreachable",
            f"provisioner {self.name}: host {_where(self.spec.hosts[index])} cannot be reached"
            f" over SSH: {why}",
        )

    def _ensure_venv(self, index: int) -> bool:
        """The host's venv with `tvm` in it: reused when its `tvm` is there, else made now.

        Its own ssh call (an install takes minutes where an agent's start takes a second), and a
        venv this call created is removed again when the install fails, so the next attempt
        starts clean and a failure leaves nothing behind.
        """
        host = self.spec.hosts[index]
        limit = self.spec.install_timeout
        # The host ends the install itself at the limit (and removes what it made); the ssh call
        # waits a little longer for that answer.
        result = self._ssh(host, _venv_script(host, limit), timeout=limit + INSTALL_MARGIN_S)
        if result.returncode == 0:
            return True
        if result.returncode == 255 and not result.stderr.startswith("no answer within"):
            self._unreachable(index, _last_line(result.stderr) or "exit status 255")
            return False
        self._bad_until[index] = time.monotonic() + self.spec.retry_after
        self._problem(
            "VenvInstallFailed",
            f"provisioner {self.name}: installing {host.pip_spec} into {host.venv} on"
            f" {_where(host)} failed: {_pip_error(result.stderr, result.returncode)}",
        )
        return False

    def _start_script(self, host: SshHost, name: str) -> str:
        q = shlex.quote
        d = _agent_dir(host, name)
        tvm = f"{host.venv}/bin/tvm" if host.venv else host.tvm
        agent = (
            f"{q(tvm)} agent --coordinator {q(self.agent_url)} --token-file {q(d)}/token"
            f" --root {q(d)}/root --private-dir {q(d)}/private --name {q(name)}"
            " --log-level warning"
        )
        unit = f"tvm-agent-{name}"
        # root: a unit of the system manager; another user: one of that user's own manager
        # (systemd-run --user), which outlives the login only where the user lingers
        manager = (
            'if [ "$(id -u)" = 0 ]; then sd=; kind=systemd; else sd=--user; kind=systemd-user\n'
            '  XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/run/user/$(id -u)}"; export XDG_RUNTIME_DIR\nfi\n'
            'lingers() { [ -z "$sd" ] || [ -e "/var/lib/systemd/linger/$(id -un)" ]; }\n'
        )
        systemd = (
            f"systemd-run $sd --quiet --unit={q(unit)} --collect --property=KillMode=mixed"
            f" --property=TimeoutStopSec={STOP_GRACE_S} {agent}"
        )
        plain = (
            f'nohup setsid sh -c \'echo $$ > "$0/pid"; exec "$@"\' {q(d)} {agent}'
            f" > {q(d)}/agent.log 2>&1 < /dev/null &\necho process > {q(d)}/mode"
        )
        check = ""
        if host.mode == "systemd":
            check = (
                'lingers || { echo "the units of $(id -un) end with its last login: enable'
                ' lingering (loginctl enable-linger $(id -un)) or use mode = process" >&2; exit 3; }\n'
            )
            launch = f'{systemd}\necho "$kind" > {q(d)}/mode'
        elif host.mode == "process":
            launch = plain
        else:
            # where no manager runs, the user does not linger, or the manager will not take the
            # unit (a user it asks for a password), the agent runs as a plain process instead
            launch = (
                "if [ -d /run/systemd/system ] && command -v systemd-run >/dev/null && lingers &&"
                f' {systemd} </dev/null; then\necho "$kind" > {q(d)}/mode\nelse\n{_WHY_PLAIN}'
                f"{plain}\nfi"
            )
        return (
            "set -e\n"
            f"{manager}{check}"
            f"[ -x {q(tvm)} ] || {{ echo 'no tvm command at {tvm}' >&2; exit 3; }}\n"
            # (an agent-dir an admin made for a non-root user is left as it is)
            f"mkdir -p {q(host.agent_dir)}\n"
            f"if [ -O {q(host.agent_dir)} ]; then chmod 711 {q(host.agent_dir)}; fi\n"
            # Anyone else who may rename entries in it could swap the agent's directory for their
            # own between its mkdir and the token's write: refused, saying why.
            f"o=$(stat -c %u {q(host.agent_dir)}); m=$(stat -c %a {q(host.agent_dir)})\n"
            'if [ "$o" != 0 ] && [ "$o" != "$(id -u)" ]; then printf \'%s\\n\''
            f' {q(_LOOSE_OWNER.format(host.agent_dir))}"$o" >&2; exit 3; fi\n'
            "if [ $((0$m & 022)) -ne 0 ] && [ $((0$m & 01000)) -eq 0 ]; then printf '%s\\n'"
            f' {q(_LOOSE_MODE.format(host.agent_dir))}"$m" >&2; exit 3; fi\n'
            f"umask 077\nmkdir {q(d)} {q(d)}/private\nchmod 711 {q(d)}\n"
            f"cat > {q(d)}/token\n"
            # task users traverse to their directories under the TVM root
            "umask 022\n"
            f"{launch}\n"
        )

    def _stop_script(self, host: SshHost, name: str) -> str:
        q = shlex.quote
        d = _agent_dir(host, name)
        return (
            f"D={q(d)}\n"
            'mode=$(cat "$D/mode" 2>/dev/null || true)\n'
            'if [ "$mode" = systemd ]; then\n'
            f"  systemctl stop {q('tvm-agent-' + name)} || true\n"
            'elif [ "$mode" = systemd-user ]; then\n'
            '  XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/run/user/$(id -u)}" \\\n'
            f"    systemctl --user stop {q('tvm-agent-' + name)} || true\n"
            'elif [ -f "$D/pid" ]; then\n'
            '  p=$(cat "$D/pid")\n'
            '  if kill -TERM "$p" 2>/dev/null; then\n'
            "    i=0\n"
            f'    while [ $i -lt {STOP_GRACE_S * 10} ] && kill -0 "$p" 2>/dev/null &&'
            ' [ "$(cut -d" " -f3 /proc/$p/stat 2>/dev/null)" != Z ]; do sleep 0.1; i=$((i+1)); done\n'
            # `kill -KILL -- -PID` is refused by dash ("Illegal number"): the group as -PID.
            '    kill -KILL -"$p" 2>/dev/null || true\n'
            "  fi\n"
            "fi\n"
            # A killed agent could not delete its pool group (a stopped one did, and its note
            # with it); the files the group may own are all under $D, which goes next. (The
            # agent's names: tvmagent/pool_isolation.POOL_GROUP_FILE, isolation.POOL_GROUP_PREFIX.)
            'g=$(cat "$D/root/pool-group" 2>/dev/null || true)\n'
            'case "$g" in tvmp-*) groupdel "$g" 2>/dev/null || true ;; esac\n'
            'rm -rf "$D"\n'
        )


# `mode = "auto"` started a plain process: the start script says why on a line of its own.
_FALLBACK = "tvm-fallback: "
_WHY_PLAIN = (
    'if [ ! -d /run/systemd/system ]; then why="no systemd runs on the host"\n'
    'elif ! command -v systemd-run >/dev/null; then why="systemd-run is not installed"\n'
    'elif ! lingers; then why="$(id -un) does not linger (loginctl enable-linger $(id -un))"\n'
    'else why="systemd-run did not start the unit"; fi\n'
    f'echo "{_FALLBACK}$why"\n'
)

_LOOSE_OWNER = (
    "agent-dir {} belongs to another user, who could swap an agent's directory before its join"
    " token is written: make it root's or this login's. Its owner's uid: "
)
_LOOSE_MODE = (
    "agent-dir {} is writable by other users and has no sticky bit, so they could swap an agent's"
    " directory before its join token is written: chmod go-w (or +t). Its mode: "
)


def _agent_dir(host: SshHost, name: str) -> str:
    return f"{host.agent_dir.rstrip('/')}/{name}"


def _venv_script(host: SshHost, limit: float) -> str:
    q = shlex.quote
    v = host.venv
    secs = max(1, math.ceil(limit))
    # stdin is /dev/null for every step: nothing may read what the start step sends (the token).
    # `timeout` (coreutils) signals the whole install's process group, pip's children included: an
    # install past the limit leaves nothing running on the host.
    return (
        f"[ -x {q(v)}/bin/tvm ] && exit 0\n"
        f"if [ -e {q(v)} ]; then new=0; else new=1; fi\n"
        f"if command -v timeout >/dev/null; then limit='timeout -k 10 {secs}'; else limit=; fi\n"
        f"if $limit {q(host.python)} -m venv {q(v)} </dev/null >&2 &&"
        f" $limit {q(v)}/bin/python -m pip install -q --disable-pip-version-check --no-input"
        f" {q(host.pip_spec)} </dev/null >&2; then\n"
        f"  [ -x {q(v)}/bin/tvm ] && exit 0\n"
        f"  echo 'ERROR: {host.pip_spec} installed no tvm command' >&2\n"
        "else\n"
        "  s=$?\n"
        '  if [ "$s" = 124 ] || [ "$s" = 137 ]; then'
        f" echo 'ERROR: the install did not finish within install-timeout ({secs} s)' >&2; fi\n"
        "fi\n"
        f'[ "$new" = 1 ] && rm -rf {q(v)}\n'
        "exit 4\n"
    )


def _pip_error(stderr: str, status: int) -> str:
    """pip's own verdict (its last `ERROR:` line), else the last thing said."""
    lines = [line.strip() for line in (stderr or "").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    return (errors or lines or [f"exit status {status}"])[-1]


def _where(host: SshHost) -> str:
    return f"{host.user}@{host.address}:{host.port}"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""
