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


def run_client(
    python: Path,
    script: str,
    up: TvmUp,
    tmp: Path,
    timeout: float,
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run a client script in its venv against `up`; its report, or a failure with its output."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(tmp),
        "PYTHONPATH": str(SCRIPTS),  # report.py only: the clients never see this repo
        "PYTHONDONTWRITEBYTECODE": "1",
        **up.env(),
        **(extra_env or {}),
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


def _test_certificates() -> dict[str, str]:
    """A pfx (with a key and a password) and a cer, base64, with their SHA-1 thumbprints."""
    import base64
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import pkcs12
    from cryptography.x509.oid import NameOID

    def make(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .sign(key, hashes.SHA256())
        )
        return key, cert

    key, pfx_cert = make("sdk14-pfx")
    _, cer_cert = make("sdk14-cer")
    password = "pfx-" + os.urandom(6).hex()
    pfx = pkcs12.serialize_key_and_certificates(
        b"sdk14", key, pfx_cert, None, serialization.BestAvailableEncryption(password.encode())
    )
    return {
        "CERT_PFX": base64.b64encode(pfx).decode(),
        "CERT_PFX_PASSWORD": password,
        "CERT_PFX_THUMB": pfx_cert.fingerprint(hashes.SHA1()).hex(),
        "CERT_CER": base64.b64encode(cer_cert.public_bytes(serialization.Encoding.DER)).decode(),
        "CERT_CER_THUMB": cer_cert.fingerprint(hashes.SHA1()).hex(),
    }


def test_azure_batch_14_certificates(tmp_path: Path) -> None:
    python = client_venv("azure-batch-14", AZURE_BATCH_14, timeout=300)
    certs = _test_certificates()
    with tvm_up(tmp_path, agents=1) as up:
        report = run_client(python, "sdk14_certificates.py", up, tmp_path, 600, certs)
    assert "a task on the node sees the certificate files" in report["passed"]
    assert "cancel deletion makes it active again" in report["passed"]
    assert "aborted_at" not in report["facts"]


@pytest.mark.airflow
def test_airflow_azure_batch_operator(tmp_path: Path) -> None:
    python = client_venv("airflow-azure", AIRFLOW, timeout=1500)
    with tvm_up(tmp_path, agents=1) as up:
        report = run_client(python, "airflow_operator.py", up, tmp_path, timeout=900)
    assert "operator ran: pool, nodes idle, job, task succeeded, cleanup" in report["passed"]
    assert "aborted_at" not in report["facts"]
