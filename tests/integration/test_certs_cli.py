"""Issue 8: `tvm cert add|list|show|delete` and `tvm keys regenerate` against a real coordinator."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from tests.harness import agent_env, cluster_ctx

TVM = os.path.join(os.path.dirname(sys.executable), "tvm")


def _files(tmp) -> tuple[str, str, str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cli-test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=3))
        .sign(key, hashes.SHA256())
    )
    pfx, cer = os.path.join(tmp, "a.pfx"), os.path.join(tmp, "a.cer")
    with open(pfx, "wb") as f:
        f.write(
            pkcs12.serialize_key_and_certificates(
                b"k", key, cert, None, serialization.BestAvailableEncryption(b"cli-pw")
            )
        )
    with open(cer, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.DER))
    return pfx, cer, cert.fingerprint(hashes.SHA1()).hex(), "cli-pw"


def _tvm(c, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = agent_env(
        {
            "TVM_ENDPOINT": c.rc.endpoint,
            "TVM_ACCOUNT": c.rc.account,
            "TVM_KEY": c.rc.key,
            **(env or {}),
        }
    )
    return subprocess.run(
        [TVM, *args], capture_output=True, text=True, timeout=60, env=e, stdin=subprocess.DEVNULL
    )


async def test_cert_cli_add_list_show_delete(nursery, tmp_path):
    pfx, cer, thumb, pw = _files(str(tmp_path))
    async with cluster_ctx(nursery, tmp_path) as c:

        def work() -> None:
            bad = _tvm(c, "cert", "add", pfx, env={"TVM_CERT_PASSWORD": "wrong"})
            assert bad.returncode != 0
            assert "wrong password" in bad.stderr
            done = _tvm(c, "cert", "add", pfx, "-o", "json", env={"TVM_CERT_PASSWORD": pw})
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["thumbprint"] == thumb
            assert pw not in done.stdout
            dup = _tvm(c, "cert", "add", cer)
            assert dup.returncode == 1
            assert "CertificateExists" in dup.stderr
            listed = _tvm(c, "cert", "list", "-o", "json")
            assert [x["thumbprint"] for x in json.loads(listed.stdout)] == [thumb]
            shown = _tvm(c, "cert", "show", f"sha1-{thumb}", "-o", "json")
            assert json.loads(shown.stdout)["hasPrivateKey"] is True
            assert _tvm(c, "cert", "delete", thumb).returncode == 0
            missing = _tvm(c, "cert", "show", thumb)
            assert missing.returncode == 1
            assert "CertificateNotFound" in missing.stderr
            keys = _tvm(c, "keys", "regenerate", "secondary", "-o", "json")
            assert json.loads(keys.stdout)["primary"] == c.rc.key
            unknown = _tvm(c, "agent", "revoke", "no-such-agent")
            assert unknown.returncode == 1
            assert "AgentNotFound" in unknown.stderr
            nopool = _tvm(c, "tvm", "user", "list", "nopool", "tvm-x")
            assert nopool.returncode == 1
            assert "PoolNotFound" in nopool.stderr

        await trio.to_thread.run_sync(work)
