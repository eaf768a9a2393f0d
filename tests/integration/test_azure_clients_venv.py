"""Microsoft's and Apache's Azure Batch clients, unmodified, against a real `tvm up`, each from a
virtual environment of its own (tests/clientvenv.py): `azure-batch==14.2.0` (`BatchServiceClient`)
runs the quickstart by default; Apache Airflow's `AzureBatchOperator` is marked `airflow` (its
install takes minutes) and runs with `pytest -m airflow`.

Each client script reports every step it passed or failed (tests/azure_clients/report.py), so a
failure here lists all the parts of the API a client found missing or wrong at once.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.clientvenv import CACHE_ENV, client_venv, venv_key
from tests.tvmup import TvmUp, tvm_up

SCRIPTS = Path(__file__).resolve().parent.parent / "azure_clients"
AZURE_BATCH_14 = ["azure-batch==14.2.0", "msrest==0.7.1"]
AIRFLOW = [
    "apache-airflow==3.3.2",
    "apache-airflow-providers-microsoft-azure==15.2.1",
    "azure-batch==15.1.0",
]


def run_client(python: Path, script: str, up: TvmUp, tmp: Path, timeout: float) -> dict[str, Any]:
    """Run a client script in its venv against `up`; its report, or a failure with its output."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(tmp),
        "PYTHONPATH": str(SCRIPTS),  # report.py only: the clients never see this repo
        "PYTHONDONTWRITEBYTECODE": "1",
        **up.env(),
    }
    if script.startswith("airflow"):
        env["AIRFLOW_HOME"] = str(tmp / "airflow")
    proc = subprocess.run(
        [str(python), str(SCRIPTS / script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=tmp,
        stdin=subprocess.DEVNULL,
    )
    lines = proc.stdout.strip().splitlines()
    try:
        report: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, ValueError):
        pytest.fail(
            f"{script} exited {proc.returncode} without a report\nstdout:\n{proc.stdout[-3000:]}"
            f"\nstderr:\n{proc.stderr[-6000:]}\ntvm up log:\n{up.log_tail()}",
            pytrace=False,
        )
    if report["failed"] or proc.returncode != 0:
        failed = "\n".join(f"  {k}: {v}" for k, v in report["failed"].items())
        pytest.fail(
            f"{script}: {len(report['failed'])} step(s) failed; "
            f"stopped at: {report['facts'].get('aborted_at', '-')}\n"
            f"{failed}\npassed: {report['passed']}\n"
            f"stderr:\n{proc.stderr[-6000:]}\ntvm up log:\n{up.log_tail()}",
            pytrace=False,
        )
    return report


def test_client_venv_skips_cleanly_when_the_index_is_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no extra index, no local wheels
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    reqs = ["azure-batch==14.2.0"]
    with pytest.raises(pytest.skip.Exception, match="package index unreachable"):
        client_venv("offline", reqs, timeout=120)
    # nothing half-made is left to be mistaken for a ready environment next time
    assert not (tmp_path / "cache" / venv_key("offline", reqs)).exists()
    assert venv_key("offline", reqs) != venv_key("offline", ["azure-batch==14.1.0"])


def test_azure_batch_14_quickstart(tmp_path: Path) -> None:
    python = client_venv("azure-batch-14", AZURE_BATCH_14, timeout=300)
    with tvm_up(tmp_path, agents=2) as up:
        report = run_client(python, "sdk14_quickstart.py", up, tmp_path, timeout=600)
    assert "each stdout.txt says hello taskN" in report["passed"]
    assert "delete pool and wait until it is gone" in report["passed"]
    assert "aborted_at" not in report["facts"]


def test_azure_batch_14_operations(tmp_path: Path) -> None:
    python = client_venv("azure-batch-14", AZURE_BATCH_14, timeout=300)
    with tvm_up(tmp_path, agents=2) as up:
        report = run_client(python, "sdk14_operations.py", up, tmp_path, timeout=900)
    assert "resize to 2 reaches 2 idle nodes" in report["passed"]
    assert "aborted_at" not in report["facts"]


@pytest.mark.airflow
def test_airflow_azure_batch_operator(tmp_path: Path) -> None:
    python = client_venv("airflow-azure", AIRFLOW, timeout=1500)
    with tvm_up(tmp_path, agents=1) as up:
        report = run_client(python, "airflow_operator.py", up, tmp_path, timeout=900)
    assert "operator ran: pool, nodes idle, job, task succeeded, cleanup" in report["passed"]
    assert "aborted_at" not in report["facts"]
