"""The slurm provisioner's sbatch job and its queue rules, fast: stand-in `sbatch`/`squeue`/
`scancel` scripts (real processes) record what they were asked and report the job states the
test sets. The job script itself runs with a stand-in `tvm` to show it passes SIGTERM on and
removes the token, private dir and TVM root."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path

from coordinator.runtime.provisioners.config import parse_provisioners
from coordinator.runtime.provisioners.slurm import SlurmProvisioner, job_script, sbatch_args

FAKE_SBATCH = """#!/bin/sh
d=$(dirname "$0")
echo "$@" >> "$d/sbatch.calls"
if [ -e "$d/sbatch.fail" ]; then echo "sbatch: error: invalid partition specified: nope" >&2; exit 1; fi
n=$(( $(cat "$d/next" 2>/dev/null || echo 100) + 1 )); echo $n > "$d/next"
echo "$n|PENDING|Priority" >> "$d/queue"
echo "$n;cluster"
"""
FAKE_SQUEUE = """#!/bin/sh
cat "$(dirname "$0")/queue" 2>/dev/null
"""
FAKE_SCANCEL = """#!/bin/sh
echo "$@" >> "$(dirname "$0")/scancel.calls"
"""


def _bin(tmp: Path) -> Path:
    b = tmp / "bin"
    b.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("squeue", FAKE_SQUEUE), ("scancel", FAKE_SCANCEL)):
        (b / name).write_text(text)
        (b / name).chmod(0o755)
    return b


def _prov(tmp: Path, **kw: object) -> tuple[SlurmProvisioner, Path]:
    b = _bin(tmp)
    section = {
        "hpc": {
            "type": "slurm",
            "work-dir": str(tmp / "work"),
            "bin-dir": str(b),
            "partition": "batch",
            "account": "proj",
            "time-limit": "PT2H",
            "extra-args": ["--qos=high"],
            **kw,
        }
    }
    spec = parse_provisioners(section).named["hpc"]
    prov = SlurmProvisioner("hpc", spec, "ws://10.0.0.1:7070/agent", "secret-token")  # type: ignore[arg-type]
    prov.size_cores = {"small": 1, "large": 4}
    return prov, b


def _set_states(b: Path, states: dict[str, str]) -> None:
    (b / "queue").write_text("".join(f"{j}|{s}|None\n" for j, s in states.items()))


def test_sbatch_gets_time_partition_account_and_cores_and_the_token_stays_in_a_file(tmp_path):
    prov, b = _prov(tmp_path)
    names = prov.start(1, "large")
    assert len(names) == 1
    call = (b / "sbatch.calls").read_text().split()
    d = tmp_path / "work" / names[0]
    assert call == [
        "--parsable",
        "--job-name=tvm-hpc",
        "--time=120",
        "--nodes=1",
        "--ntasks=1",
        "--cpus-per-task=4",
        f"--output={d}/slurm.out",
        f"--chdir={d}",
        "--signal=B:TERM@60",
        f"--comment={names[0]}",
        "--partition=batch",
        "--account=proj",
        "--qos=high",
        f"{d}/job.sh",
    ]
    assert "secret-token" not in (b / "sbatch.calls").read_text()
    token = d / "token"
    assert token.read_text().strip() == "secret-token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    script = (d / "job.sh").read_text()
    assert "secret-token" not in script
    assert '--token-file "$D/token"' in script
    assert "--name hpc-" in script


def test_queue_limits_and_pending_allocations(tmp_path):
    prov, b = _prov(tmp_path, **{"max-pending": 2, "max-jobs": 3})
    assert len(prov.start(5, "small")) == 2  # at most two waiting in the queue
    assert prov.start(5, "small") == []
    assert prov.poll() == []
    assert prov.pending() == 2
    _set_states(b, {"101": "RUNNING", "102": "PENDING"})
    prov.poll()
    assert prov.pending() == 1
    assert len(prov.start(5, "small")) == 1  # max-jobs: 3 queued or running at once
    assert len(prov.jobs) == 3
    # the running one's allocation ends after its agent joined: reported, and no failure
    first = next(n for n, j in prov.jobs.items() if j == "101")
    prov.joined.add(first)
    _set_states(b, {"101": "TIMEOUT", "102": "RUNNING", "103": "PENDING"})
    ended = prov.poll()
    assert ended == [(first, "its Slurm job 101 ended (TIMEOUT)")]
    assert prov.failures == 0
    assert not (tmp_path / "work" / first).exists()
    # stop: scancel, and the end of a job stopped on purpose is neither reported nor a failure
    second = next(n for n, j in prov.jobs.items() if j == "102")
    prov.stop(second)
    assert (b / "scancel.calls").read_text().split() == ["102"]
    _set_states(b, {"102": "CANCELLED", "103": "PENDING"})
    assert prov.poll() == []
    assert prov.failures == 0


def test_allocations_failing_in_a_row_pause_until_resumed(tmp_path):
    prov, b = _prov(tmp_path, **{"max-failures": 2, "max-pending": 5})
    names = prov.start(2, "small")
    _set_states(b, {"101": "FAILED", "102": "NODE_FAIL"})
    assert len(prov.poll()) == 2
    assert prov.paused.startswith("provisioner hpc paused: 2 Slurm allocations in a row failed")
    assert "job 102 NODE_FAIL" in prov.paused
    assert prov.start(3, "small") == []  # paused: nothing submitted
    for name in names:  # a failed allocation keeps its output for the operator, not its secrets
        assert sorted(os.listdir(tmp_path / "work" / name)) == ["job.sh"]
    prov.resume()
    (b / "sbatch.fail").write_text("")
    assert prov.start(2, "small") == []
    problems = prov.take_problems()
    assert problems[0][0] == "SlurmSubmitFailed"
    assert "invalid partition specified" in problems[0][1]
    assert prov.paused  # two submissions refused in a row
    assert prov.take_problems() == []
    assert sorted(os.listdir(tmp_path / "work")) == sorted(names)  # nothing half-made


def test_the_job_script_passes_sigterm_on_and_cleans_up(tmp_path):
    fake_tvm = tmp_path / "tvm"
    fake_tvm.write_text(
        '#!/bin/sh\necho "$@" > "$(dirname "$0")/agent.args"\n'
        'trap \'echo stopped > "$(dirname "$0")/agent.stopped"; exit 0\' TERM\n'
        "while :; do sleep 0.05; done\n"
    )
    fake_tvm.chmod(0o755)
    d = tmp_path / "job"
    (d / "private").mkdir(parents=True)
    (d / "root").mkdir()
    (d / "token").write_text("t\n")
    spec = parse_provisioners(
        {"hpc": {"type": "slurm", "work-dir": str(tmp_path), "tvm": str(fake_tvm)}}
    ).named["hpc"]
    (d / "job.sh").write_text(job_script(spec, "ws://c:1/agent", "hpc-1", str(d)))  # type: ignore[arg-type]
    proc = subprocess.Popen(["/bin/sh", str(d / "job.sh")], start_new_session=True)
    deadline = time.monotonic() + 10
    while not (tmp_path / "agent.args").exists():
        assert time.monotonic() < deadline, "the agent did not start"
        time.sleep(0.05)
    args = (tmp_path / "agent.args").read_text().split()
    assert args[:3] == ["agent", "--coordinator", "ws://c:1/agent"]
    assert args[args.index("--token-file") + 1] == f"{d}/token"
    proc.send_signal(signal.SIGTERM)  # what Slurm sends a minute before the time limit
    assert proc.wait(timeout=10) == 0
    assert (tmp_path / "agent.stopped").read_text().strip() == "stopped"
    assert sorted(os.listdir(d)) == ["job.sh"]
    assert sbatch_args(spec, "hpc", str(d), 2)[-1] == f"{d}/job.sh"  # type: ignore[arg-type]


def test_a_restarted_coordinator_takes_back_the_jobs_it_had_submitted(tmp_path):
    prov, b = _prov(tmp_path)
    (b / "queue").write_text(
        "201|RUNNING|None|hpc-0badcafe\n202|COMPLETED|None|hpc-00000001\n203|RUNNING|None|other-1\n"
    )
    assert prov.poll() == []  # the first look finds the previous run's jobs
    assert not prov.adopt("hpc-00000001")  # ended
    assert not prov.adopt("other-1")
    assert prov.adopt("hpc-0badcafe")
    assert prov.jobs == {"hpc-0badcafe": "201"}
    prov.stop("hpc-0badcafe")
    assert (b / "scancel.calls").read_text().split() == ["201"]
