"""Output files uploaded into Azurite (Microsoft's Azure Storage emulator) over real agents: the
agent's PUTs are accepted by a real Blob service implementation and read back through it.

Marked `azurite` (installs Azurite from npm on first use: `pytest -m azurite`); skipped without npm.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import shutil
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import httpx2
import pytest

from coordinator.client import output_file
from tests.harness import cluster_ctx, free_port

pytestmark = pytest.mark.azurite
JOB = "job-0000000001"
ACCOUNT = "devstoreaccount1"  # Azurite's well-known development account and key
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
CACHE = os.path.expanduser("~/.cache/tvm-tests/azurite")


def _azurite_blob() -> str:
    found = shutil.which("azurite-blob")
    if found:
        return found
    exe = os.path.join(CACHE, "node_modules", ".bin", "azurite-blob")
    if not os.path.exists(exe):
        if shutil.which("npm") is None:
            pytest.skip("Azurite is not installed and npm is missing")
        os.makedirs(CACHE, exist_ok=True)
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--prefix", CACHE, "azurite"],
            check=True,
            capture_output=True,
            timeout=600,
        )
    return exe


def account_sas(permissions: str = "rwdlac") -> str:
    """An account SAS (version 2019-02-02) for the blob service, signed with the account key."""
    expiry = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    fields = [ACCOUNT, permissions, "b", "sco", "", expiry, "", "http", "2019-02-02", ""]
    sig = hmac.new(base64.b64decode(KEY), "\n".join(fields).encode(), hashlib.sha256).digest()
    q = {
        "sv": "2019-02-02",
        "ss": "b",
        "srt": "sco",
        "sp": permissions,
        "se": expiry,
        "spr": "http",
    }
    q["sig"] = base64.b64encode(sig).decode()
    return "&".join(f"{k}={quote(v, safe='')}" for k, v in q.items())


@pytest.fixture
def azurite(tmp_path):
    exe = _azurite_blob()
    port = free_port()
    proc = subprocess.Popen(
        [
            exe,
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(port),
            "--location",
            str(tmp_path / "az"),
        ]
        + ["--silent", "--skipApiVersionCheck", "--loose"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}/{ACCOUNT}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx2.get(f"{base}?comp=list&{account_sas()}", timeout=1)
                break
            except httpx2.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError("Azurite did not start") from None
                time.sleep(0.2)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


async def test_output_files_land_in_azurite(nursery, tmp_path, azurite):
    sas = account_sas()
    r = httpx2.put(f"{azurite}/results?restype=container&{sas}")
    assert r.status_code == 201, r.text
    url = f"{azurite}/results?{sas}"
    async with cluster_ctx(nursery, tmp_path, agents=1) as c:
        await c.pool_with_tvms("p", 1)
        await c.client.workitems.add("wi", "p")
        await c.client.tasks.add(
            "wi",
            JOB,
            "t",
            "sh -c 'mkdir -p o/s && echo one > o/1.txt && echo two > o/s/2.txt && echo hi'",
            output_files=[
                output_file("o/**/*.txt", container_url=url, path="run1"),
                output_file("../stdout.txt", container_url=url, path="logs/out.txt"),
            ],
        )
        await c.client.tasks.wait("wi", JOB, timeout=60)
        t = await c.client.tasks.get("wi", JOB, "t")
        assert t.execution_info.exit_code == 0
        assert t.execution_info.scheduling_error is None
    got = {
        name: httpx2.get(f"{azurite}/results/{name}?{sas}").content
        for name in ("run1/1.txt", "run1/s/2.txt", "logs/out.txt")
    }
    assert got == {"run1/1.txt": b"one\n", "run1/s/2.txt": b"two\n", "logs/out.txt": b"hi\n"}
    listing = httpx2.get(f"{azurite}/results?restype=container&comp=list&{sas}").text
    assert listing.count("<Blob>") == 3
