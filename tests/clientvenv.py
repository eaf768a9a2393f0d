"""Virtual environments for the third-party clients the tests drive unmodified (`azure-batch`
14.x, Apache Airflow), each in one of its own: one package cannot be pinned twice in one
environment, and the clients must not see this repo.

Each environment is created once with `python -m venv` and pip from the package index, in a cache
directory keyed by the pinned requirements and the Python version, and reused by later runs (and by
other clones on this machine: a file lock serialises the install). A run that cannot reach the index
skips with the reason; any other install failure fails the test.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

CACHE_ENV = "TVM_TEST_VENV_CACHE"
_DONE = ".tvm-test-venv-complete"
# What pip prints when the index cannot be reached (no network, no DNS, a proxy refusing).
_OFFLINE = (
    "NewConnectionError",
    "Name or service not known",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "No route to host",
    "ConnectTimeout",
    "ProxyError",
    "Max retries exceeded",
    "(from versions: none)",
)


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tvm-batch" / "test-venvs"


def venv_key(name: str, requirements: Sequence[str]) -> str:
    spec = "\n".join([sys.version.split()[0], *sorted(requirements)])
    return (
        f"{name}-py{sys.version_info[0]}{sys.version_info[1]}-"
        + (hashlib.sha256(spec.encode()).hexdigest()[:12])
    )


def client_venv(name: str, requirements: Sequence[str], *, timeout: float = 600.0) -> Path:
    """The Python of a cached virtual environment holding exactly `requirements` (pinned)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    path = root / venv_key(name, requirements)
    python = path / "bin" / "python"
    with open(root / (path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be installing the same one
        if (path / _DONE).exists() and python.exists():
            return python
        shutil.rmtree(path, ignore_errors=True)  # a half-made one from an interrupted run
        try:
            _install(path, requirements, timeout)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        (path / _DONE).write_text("\n".join(requirements) + "\n")
    return python


def _install(path: Path, requirements: Sequence[str], timeout: float) -> None:
    base = getattr(sys, "_base_executable", sys.executable)
    made = subprocess.run(
        [base, "-m", "venv", str(path)], capture_output=True, text=True, timeout=120
    )
    if made.returncode != 0:
        pytest.fail(f"python -m venv {path} failed:\n{made.stdout}{made.stderr}")
    cmd = [
        str(path / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
        # Offline, fail in seconds rather than after pip's default minutes of retries.
        "--retries",
        "1",
        "--timeout",
        "30",
        *requirements,
    ]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"installing {' '.join(requirements)} took over {timeout:.0f} s")
    if proc.returncode == 0:
        return
    out = proc.stdout + proc.stderr
    lines = [ln for ln in out.splitlines() if not ln.startswith("WARNING: Location")]
    tail = "\n".join(lines[-15:])
    if any(marker in out for marker in _OFFLINE):
        pytest.skip(f"cannot install {' '.join(requirements)} (package index unreachable):\n{tail}")
    pytest.fail(f"pip install {' '.join(requirements)} failed:\n{tail}")
