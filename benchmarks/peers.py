"""The peers people would pick instead of TVM Batch, on end_to_end's workload: N x `/bin/true` at
concurrency 4 (2 workers x 2 slots), timed from submit to the last completion, beside the raw spawn
rate of this machine measured in the same run.

- raw spawn: 4 threads each spawning `/bin/true` and waiting (`_common.raw_spawn_rate`).
- HyperQueue (PyPI wheel `hyperqueue`): the wheel ships no `hq` binary, only its Python API, whose
  `LocalCluster` runs the HyperQueue server and its workers inside one process. That process gets 2
  workers of 2 cores; the job is N program tasks of `/bin/true` with HyperQueue's default per-task
  stdout/stderr files (TVM Batch writes stdout.txt/stderr.txt per task too). The wheel's own wait
  polls once a second, so completion is probed every 2 ms with `forget_job`, which HyperQueue
  refuses until every task of the job has finished.
- Dask distributed: `LocalCluster(n_workers=2, threads_per_worker=2, processes=True)`, each task
  `subprocess.run(["/bin/true"])`, submitted with `client.map` and waited for with `wait`.

Each peer runs in a child process of its own (own process group, own temporary directory), killed by
its id and removed when done or timed out. A peer that is not installed is skipped with a note; the
peers come with `pip install -e '.[bench]'`. CPU per task of every process is printed too: for
HyperQueue the one process holding server, workers and client, for Dask the scheduler/nanny/client
process and the worker processes, and for both the task side (the `/bin/true` processes).

    python -m benchmarks.peers [--quick] [--tasks 3000] [--peers hyperqueue,dask]

`peer_results(n)` / `peer_rates(n)` are what end_to_end calls to measure the peers in its own run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from ._common import args, emit, raw_spawn_rate, say, spawn
from ._cpu import per_task_ms, self_cpu, tree_cpu

PEERS = ("hyperqueue", "dask")
WORKERS = 2
SLOTS = 2
INSTALL_HINT = "pip install -e '.[bench]'"


@dataclass
class PeerResult:
    name: str
    rate: float | None = None  # tasks/s; None: skipped (see note)
    note: str = ""
    cpu_ms: dict[str, float] = field(default_factory=dict)  # process kind -> CPU ms per task


def peer_results(n: int, peers: tuple[str, ...] = PEERS) -> dict[str, PeerResult]:
    return {name: run_peer(name, n) for name in peers}


def peer_rates(n: int, peers: tuple[str, ...] = PEERS) -> dict[str, float | None]:
    """tasks/s of every peer on `n` x /bin/true (None where not installed or failed)."""
    return {name: r.rate for name, r in peer_results(n, peers).items()}


def run_peer(name: str, n: int, timeout: float | None = None) -> PeerResult:
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}: one of {', '.join(PEERS)}")
    timeout = timeout if timeout is not None else 90 + n / 20
    work = tempfile.mkdtemp(prefix=f"tvm-bench-{name}-")
    log_path = os.path.join(work, "child.log")
    result_path = os.path.join(work, "result.json")
    try:
        with open(log_path, "wb") as log:
            # The wheel's errors carry a Rust backtrace unless told not to: costly in the probe.
            proc = spawn(
                "benchmarks.peers",
                ["--child", name, "--tasks", str(n), "--workdir", work],
                env={"RUST_BACKTRACE": "0", "RUST_LIB_BACKTRACE": "0"},
                stdout=log,
                stderr=log,  # the peers log freely (Dask's workers on shutdown): kept for failures
            )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return PeerResult(name, note=f"{name}: timed out after {timeout:.0f} s")
        finally:
            _kill_group(proc)
        try:
            with open(result_path) as f:
                res = json.load(f)
        except (OSError, ValueError):
            tail = _tail(log_path)
            return PeerResult(name, note=f"{name}: failed (exit {proc.returncode}): {tail}")
        if "skipped" in res:
            return PeerResult(name, note=f"{name}: {res['skipped']}: skipped ({INSTALL_HINT})")
        return PeerResult(name, rate=res["rate"], cpu_ms=res["cpu_ms"], note=res.get("note", ""))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """The child and everything it started (workers, tasks): its own process group."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _tail(path: str, size: int = 800) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-size:].strip()
    except OSError as exc:
        return str(exc)


# --------------------------------------------------------------------------- children


def _child_hyperqueue(n: int, work: str) -> dict[str, Any]:
    try:
        from hyperqueue import Job
        from hyperqueue.cluster import LocalCluster, WorkerConfig
    except ImportError as exc:
        return {"skipped": f"not installed ({exc})"}
    cluster = LocalCluster(server_dir=os.path.join(work, "server"))
    try:
        for _ in range(WORKERS):
            cluster.start_worker(WorkerConfig(cores=SLOTS))
        client = cluster.client()
        out = os.path.join(work, "out")
        os.makedirs(out)

        def job(k: int) -> Any:
            j = Job(default_workdir=out)
            for _ in range(k):
                j.program(["/bin/true"])
            return j

        def finished(job_id: int) -> None:
            while True:
                try:
                    client.connection.forget_job(job_id)
                    return
                except RuntimeError:  # "hasn't been completed yet"
                    time.sleep(0.01)

        finished(client.submit(job(2 * WORKERS * SLOTS)).id)  # the workers are connected and warm
        big = job(n)  # built before the clock starts, like TVM Batch's request bodies
        before = self_cpu()
        t0 = time.perf_counter()
        sub = client.submit(big)
        finished(sub.id)
        elapsed = time.perf_counter() - t0
        used = self_cpu() - before
    finally:
        cluster.stop()
    return {
        "rate": n / elapsed,
        "cpu_ms": {
            "server_workers_client": per_task_ms(used.own, n),
            "task_side": per_task_ms(used.children, n),
        },
        "note": "server and workers in one process (the wheel's LocalCluster)",
    }


def _dask_true(_: int) -> int:
    return subprocess.run(["/bin/true"], check=False).returncode


def _child_dask(n: int, work: str) -> dict[str, Any]:
    try:
        from dask.distributed import Client, LocalCluster, wait
    except ImportError as exc:
        return {"skipped": f"not installed ({exc})"}
    import logging

    with (
        LocalCluster(
            n_workers=WORKERS,
            threads_per_worker=SLOTS,
            processes=True,
            dashboard_address=None,
            local_directory=work,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.gather(client.map(_dask_true, range(2 * WORKERS * SLOTS), pure=False))
        pids = list(client.run(os.getpid).values())
        before_me = self_cpu()
        before = [tree_cpu(p) for p in pids]
        t0 = time.perf_counter()
        futures = client.map(_dask_true, range(n), pure=False)
        wait(futures)
        elapsed = time.perf_counter() - t0
        used_me = self_cpu() - before_me
        used = [tree_cpu(p) - b for p, b in zip(pids, before, strict=True)]
        codes = client.gather(futures)
    if any(codes):
        raise RuntimeError(f"{sum(1 for c in codes if c)} dask tasks failed")
    return {
        "rate": n / elapsed,
        "cpu_ms": {
            "scheduler_client": per_task_ms(used_me.own, n),
            "workers": per_task_ms(sum(u.own for u in used), n),
            "task_side": per_task_ms(sum(u.children for u in used), n),
        },
    }


def _child(name: str, n: int, work: str) -> None:
    res = _child_hyperqueue(n, work) if name == "hyperqueue" else _child_dask(n, work)
    with open(os.path.join(work, "result.json.tmp"), "w") as f:
        json.dump(res, f)
    os.rename(os.path.join(work, "result.json.tmp"), os.path.join(work, "result.json"))


# --------------------------------------------------------------------------- report


def report(results: dict[str, PeerResult], n: int, raw: float) -> None:
    """Result lines for every peer that ran, a note for every one that did not."""
    for name, r in results.items():
        if r.rate is None:
            say(f"peers: {r.note}")
            continue
        params = {"tasks": n, "workers": WORKERS, "slots_per_worker": SLOTS, "command": "/bin/true"}
        emit(f"peer_{name}", params, r.rate, "tasks/s")
        emit(f"peer_{name}_ratio", params, r.rate / raw, "ratio")
        for kind, ms in r.cpu_ms.items():
            emit(f"peer_{name}_cpu_per_task_{kind}", params, ms, "ms")
        cpu = ", ".join(f"{k} {v * 1000:.0f} µs" for k, v in r.cpu_ms.items())
        say(
            f"peers: {name} {r.rate:,.0f} tasks/s (ratio to raw spawn {r.rate / raw:.2f}); "
            f"CPU per task: {cpu}" + (f" [{r.note}]" if r.note else "")
        )


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", type=int, default=0)
    p.add_argument("--peers", default=",".join(PEERS), help="comma-separated: hyperqueue,dask")
    p.add_argument("--child", choices=PEERS, help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)


def main() -> None:
    a = args(__doc__ or "", _options)
    n = a.tasks or (200 if a.quick else 3000)
    if a.child:
        _child(a.child, n, a.workdir)
        return
    peers = tuple(p for p in a.peers.split(",") if p)
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        sys.exit(f"error: unknown peer(s) {', '.join(unknown)}: choose from {', '.join(PEERS)}")
    concurrency = WORKERS * SLOTS
    raw_before = raw_spawn_rate(n, concurrency)
    results = peer_results(n, peers)
    raw_after = raw_spawn_rate(n, concurrency)
    raw = (raw_before + raw_after) / 2
    emit(
        "raw_spawn",
        {"spawns": n, "concurrency": concurrency, "command": "/bin/true"},
        raw,
        "tasks/s",
    )
    say(f"peers: raw spawn {raw:,.0f}/s (before {raw_before:,.0f}, after {raw_after:,.0f})")
    report(results, n, raw)


if __name__ == "__main__":
    main()
