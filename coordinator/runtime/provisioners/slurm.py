"""The `slurm` provisioner: each agent is one Slurm job (`sbatch` of a script that runs
`tvm agent` for the allocation's time limit), the way HyperQueue's automatic allocation works:

* queue limits: at most `max-pending` allocations wait in the queue and `max-jobs` exist at once;
  what the pools lack beyond that is submitted later, as allocations start or end (the hub asks
  again every second);
* pending allocations count as agents on their way, so a slow queue is not flooded;
* `max-failures` allocations in a row that end (or cannot be submitted) before their agent joined
  pause the provisioner; the pause and its reason show as the pool's resize error until the pool
  is resized again;
* the agent gets SIGTERM a minute before the time limit (`--signal=B:TERM@60`) so its tasks are
  requeued by a clean exit rather than a kill; `stop` is `scancel`.

Job names are `tvm-<provisioner>`; the job's directory WORK_DIR/<agent name> holds the script,
the join token (0600, written here, never on a command line), the agent's private dir and TVM root
and Slurm's output. WORK_DIR must be visible at the same path on the compute nodes.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shlex
import shutil
import subprocess
import threading

from .config import SlurmSpec, slurm_time

log = logging.getLogger("tvm.coordinator")

ENDED = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "TIMEOUT",
}
SIGNAL_BEFORE_END_S = 60
# Environment variables that are not passed to sbatch: the service's own (account key, join token,
# store URL), libpq's password settings, and anything named like a credential.
_SECRET_ENV = re.compile(
    r"^(TVM_KEY|TVM_STORE|PGPASSWORD|PGPASSFILE)$|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|_KEY$",
    re.IGNORECASE,
)


def job_script(spec: SlurmSpec, agent_url: str, name: str, directory: str) -> str:
    """The batch script: the agent in the background so the shell can pass Slurm's SIGTERM on and
    clean up the token, private dir and TVM root after the agent's exit."""
    q = shlex.quote
    agent = (
        f'{q(spec.tvm)} agent --coordinator {q(agent_url)} --token-file "$D/token"'
        f' --root "$D/root" --private-dir "$D/private" --name {q(name)} --log-level warning'
    )
    return (
        "#!/bin/sh\n"
        f"# TVM Batch agent {name} (provisioner {spec.type})\n"
        f"D={q(directory)}\n"
        "umask 022\n"
        f"{agent} &\n"
        "pid=$!\n"
        "stopping=0\n"
        "trap 'stopping=1; kill -TERM $pid 2>/dev/null' TERM INT\n"
        "while :; do\n"
        "  wait $pid; rc=$?\n"
        "  if [ $stopping = 1 ] && kill -0 $pid 2>/dev/null; then continue; fi\n"
        "  break\n"
        "done\n"
        # A killed agent (as root, with task users) leaves its pool group, named in its root.
        'g=$(cat "$D/root/pool-group" 2>/dev/null || true)\n'
        'case "$g" in tvmp-*) groupdel "$g" 2>/dev/null || true ;; esac\n'
        'rm -rf "$D/root" "$D/private" "$D/token"\n'
        "[ $stopping = 1 ] && exit 0\n"
        "exit $rc\n"
    )


def sbatch_args(spec: SlurmSpec, provisioner: str, directory: str, cores: int) -> list[str]:
    minutes = slurm_time(spec.time_limit)
    args = [
        "--parsable",
        f"--job-name=tvm-{provisioner}",
        f"--time={minutes}",
        "--nodes=1",
        "--ntasks=1",
        f"--cpus-per-task={max(1, cores)}",
        f"--output={directory}/slurm.out",
        f"--chdir={directory}",
        f"--signal=B:TERM@{SIGNAL_BEFORE_END_S}",
        # the agent's name, so a restarted coordinator finds its jobs again (squeue %k)
        f"--comment={os.path.basename(directory)}",
    ]
    if spec.partition:
        args.append(f"--partition={spec.partition}")
    if spec.account:
        args.append(f"--account={spec.account}")
    return [*args, *spec.extra_args, f"{directory}/job.sh"]


class SlurmProvisioner:
    register_timeout: float | None = None  # a pending allocation may wait in the queue for hours

    def __init__(self, name: str, spec: SlurmSpec, agent_url: str, token: str) -> None:
        self.name = name
        self.spec = spec
        self.idle_stop_after = spec.idle_stop_after
        self.agent_url = spec.coordinator_url or agent_url
        self.token = token
        self.jobs: dict[str, str] = {}  # agent name -> Slurm job id
        self.states: dict[str, str] = {}  # agent name -> last state seen
        self.joined: set[str] = set()
        self.size_cores: dict[str, int] = {}
        self.failures = 0
        self._paused = ""
        self._stopped: set[str] = set()
        self._problems: list[tuple[str, str]] = []
        self._comments: dict[str, str] = {}  # agent name -> job id, from the last squeue
        self._looked = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ plugin interface

    @property
    def paused(self) -> str:
        return self._paused

    def resume(self) -> None:
        if self._paused:
            log.info("provisioner %s resumed", self.name)
        self._paused = ""
        self.failures = 0

    def take_problems(self) -> list[tuple[str, str]]:
        with self._lock:
            out, self._problems = self._problems, []
        return out

    def adopt(self, name: str) -> bool:
        """An agent whose job (squeue's comment names it) a previous coordinator run submitted."""
        job = self._comments.get(name)
        if job is None or name in self.jobs:
            return False
        self.jobs[name] = job
        self.states[name] = "RUNNING"
        return True

    def pending(self) -> int:
        return sum(1 for n in self.jobs if self.states.get(n, "PENDING") == "PENDING")

    def start(self, n: int, size: str = "small") -> list[str]:
        if self._paused:
            return []
        room = min(self.spec.max_pending - self.pending(), self.spec.max_jobs - len(self.jobs))
        started: list[str] = []
        for _ in range(max(0, min(n, room))):
            name = f"{self.name}-{secrets.token_hex(4)}"
            job = self._submit(name, self.size_cores.get(size, 1))
            if job is None:
                if self._paused:
                    break
                continue
            self.jobs[name] = job
            self.states[name] = "PENDING"
            started.append(name)
        return started

    def stop(self, name: str) -> None:
        job = self.jobs.get(name)
        if job is None:
            return
        self._stopped.add(name)
        result = self._run(["scancel", job])
        if result.returncode != 0:
            log.warning("provisioner %s: scancel %s: %s", self.name, job, result.stderr.strip())

    def stop_all(self) -> None:
        ids = [j for n, j in self.jobs.items() if n not in self._stopped]
        self._stopped.update(self.jobs)
        if ids:
            self._run(["scancel", *ids])

    def poll(self) -> list[tuple[str, str]]:
        """Refresh job states; return agents whose allocation ended (not by `stop`)."""
        if not self.jobs and self._looked:
            return []
        self._looked = True  # the first look also finds jobs of a previous coordinator run
        result = self._run(
            [
                "squeue",
                "--noheader",
                "--states=all",
                f"--name=tvm-{self.name}",
                "--format=%i|%T|%r|%k",
            ]
        )
        if result.returncode != 0:
            log.warning("provisioner %s: squeue failed: %s", self.name, result.stderr.strip())
            return []
        seen: dict[str, tuple[str, str]] = {}
        self._comments = {}
        for line in result.stdout.splitlines():
            job, state, reason, comment = [*line.strip().split("|"), "", "", ""][:4]
            state = state.split()[0] if state.strip() else ""
            seen[job] = (state, reason)
            if state and state not in ENDED and comment.startswith(f"{self.name}-"):
                self._comments[comment] = job
        ended: list[tuple[str, str]] = []
        for name, job in list(self.jobs.items()):
            state, reason = seen.get(job, ("GONE", ""))
            self.states[name] = state
            if state not in ENDED and state != "GONE":
                continue
            del self.jobs[name]
            self.states.pop(name, None)
            stopped = name in self._stopped
            self._stopped.discard(name)
            joined = name in self.joined
            self.joined.discard(name)
            # a failed allocation's output stays for the operator (see _cleanup)
            self._cleanup(name, keep_output=not stopped and not joined and state != "COMPLETED")
            if stopped:
                continue
            why = f"its Slurm job {job} ended ({state}{', ' + reason if reason not in ('', 'None') else ''})"
            ended.append((name, why))
            if joined:
                self.failures = 0
            else:
                self._failed(
                    f"job {job} {state}{' (' + reason + ')' if reason not in ('', 'None') else ''}"
                )
        return ended

    # ------------------------------------------------------------------ helpers

    def _failed(self, what: str) -> None:
        self.failures += 1
        log.warning("provisioner %s: allocation failed: %s", self.name, what)
        if self.failures >= self.spec.max_failures and not self._paused:
            self._paused = (
                f"provisioner {self.name} paused: {self.failures} Slurm allocations in a row"
                f" failed before their agent joined (last: {what}); resize the pool to retry"
            )
            log.error("%s", self._paused)

    def _env(self) -> dict[str, str]:
        # sbatch exports its environment into the job (slurmctld's spool, the compute node):
        # the coordinator's secrets stay here; the agent's token travels in its 0600 file.
        env = {k: v for k, v in os.environ.items() if not _SECRET_ENV.search(k)}
        if self.spec.slurm_conf:
            env["SLURM_CONF"] = self.spec.slurm_conf
        return env

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        exe = os.path.join(self.spec.bin_dir, argv[0]) if self.spec.bin_dir else argv[0]
        try:
            return subprocess.run(
                [exe, *argv[1:]],
                capture_output=True,
                text=True,
                timeout=60,
                env=self._env(),
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return subprocess.CompletedProcess(argv, 127, "", str(exc))

    def _submit(self, name: str, cores: int) -> str | None:
        directory = os.path.join(self.spec.work_dir, name)
        os.makedirs(self.spec.work_dir, mode=0o711, exist_ok=True)
        os.mkdir(directory, 0o700)
        os.chmod(directory, 0o711)  # task users traverse to their directories under root/
        fd = os.open(os.path.join(directory, "token"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.token + "\n")
        os.mkdir(os.path.join(directory, "private"), 0o700)
        script = os.path.join(directory, "job.sh")
        with open(script, "w") as f:
            f.write(job_script(self.spec, self.agent_url, name, directory))
        os.chmod(script, 0o700)
        result = self._run(["sbatch", *sbatch_args(self.spec, self.name, directory, cores)])
        job = result.stdout.strip().split(";")[0]
        if result.returncode == 0 and job.isdigit():
            return job
        why = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        with self._lock:
            self._problems.append(
                ("SlurmSubmitFailed", f"provisioner {self.name}: sbatch failed: {why}")
            )
        shutil.rmtree(directory, ignore_errors=True)
        self._failed(f"sbatch: {why}")
        return None

    def _cleanup(self, name: str, keep_output: bool) -> None:
        directory = os.path.join(self.spec.work_dir, name)
        if not keep_output:
            shutil.rmtree(directory, ignore_errors=True)
            return
        # a failed allocation's slurm.out stays for the operator; its secrets do not
        for part in ("token", "private", "root"):
            path = os.path.join(directory, part)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                os.unlink(path)
