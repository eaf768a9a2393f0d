"""Issue 8: certificates through REST, pools referencing them, installation on every TVM before
its start task, install failures shown on the TVM, journal persistence."""

from __future__ import annotations

import base64
import datetime as dt
import os

import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from coordinator.client import BatchError, task_spec
from tests.harness import cluster_ctx

PASSWORD = "pfx-Pa55word-never-logged"
PY = "/usr/bin/python3"


def _cert(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
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


def _thumb(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA1()).hex()


@pytest.fixture(scope="module")
def pfx_cert():
    key, cert = _cert("tvm-pfx")
    raw = pkcs12.serialize_key_and_certificates(
        b"k", key, cert, None, serialization.BestAvailableEncryption(PASSWORD.encode())
    )
    return _thumb(cert), base64.b64encode(raw).decode()


@pytest.fixture(scope="module")
def cer_cert():
    _, cert = _cert("tvm-cer")
    return _thumb(cert), base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


# The start task checks names and modes itself and fails the TVM if anything is off.
CHECK_CERTS = r"""
import os, stat, sys
d = os.environ['WATASK_CERTIFICATES_DIR']
assert d == os.environ['AZ_BATCH_CERTIFICATES_DIR'], 'two names for one dir'
pfx, cer = sys.argv[1], sys.argv[2]
want = {f'sha1-{pfx}.cer': 0o644, f'sha1-{pfx}.pfx': 0o600, f'sha1-{pfx}.pfx.pw': 0o600,
        f'sha1-{pfx}.pem': 0o600, f'sha1-{cer}.cer': 0o644}
got = {n: stat.S_IMODE(os.stat(os.path.join(d, n)).st_mode) for n in os.listdir(d)}
mode = stat.S_IMODE(os.stat(d).st_mode)
ok = got == want and mode == 0o700
print('certs', sorted(got.items()), oct(mode))
sys.exit(0 if ok else 3)
"""


async def test_certificates_crud_pool_references_and_install_before_start_task(
    nursery, tmp_path, pfx_cert, cer_cert
):
    pfx_thumb, pfx_data = pfx_cert
    cer_thumb, cer_data = cer_cert
    async with cluster_ctx(nursery, tmp_path, agents=1, heartbeat_timeout=3) as c:
        cl = c.client
        added = await cl.certificates.add(pfx_thumb.upper(), pfx_data, password=PASSWORD)
        assert (added.thumbprint, added.state, added.has_private_key) == (pfx_thumb, "active", True)
        await cl.certificates.add(cer_thumb, cer_data, certificate_format="cer")
        listed = await cl.certificates.list()
        assert sorted(x.thumbprint for x in listed) == sorted([pfx_thumb, cer_thumb])
        got = await cl.certificates.get(pfx_thumb.upper())
        assert got.subject == "CN=tvm-pfx"
        assert got.public_data
        assert PASSWORD not in msgspec.json.encode(listed).decode()
        assert base64.b64decode(got.public_data) != base64.b64decode(pfx_data)

        # An unknown reference is refused and nothing is stored.
        with pytest.raises(BatchError) as ei:
            await cl.pools.add(
                "bad",
                target_dedicated=1,
                certificate_references=[{"thumbprint": "ab" * 20, "thumbprintAlgorithm": "sha1"}],
            )
        assert (ei.value.status, ei.value.code) == (400, "CertificateNotFound")
        assert "certificateReferences[0]" in ei.value.message
        assert [p.name for p in await cl.pools.list()] == []

        refs = [
            {"thumbprint": pfx_thumb, "thumbprintAlgorithm": "sha1"},
            {"thumbprint": cer_thumb.upper(), "thumbprintAlgorithm": "SHA1"},
        ]
        start = {
            "commandLine": f'{PY} -c "{CHECK_CERTS}" {pfx_thumb} {cer_thumb}',
            "waitForSuccess": True,
        }
        await c.pool_with_tvms("p", 1, certificate_references=refs, start_task=start)
        tvm = (await cl.tvms.list("p"))[0]
        assert tvm.start_task_info.exit_code == 0
        assert tvm.cert_errors == []
        pool = await cl.pools.get("p")
        assert sorted(r.thumbprint for r in pool.certificate_references) == sorted(
            [pfx_thumb, cer_thumb]
        )
        assert (await cl.certificates.get(cer_thumb)).pools == ["p"]

        # Tasks see the directory too.
        await cl.workitems.add("wi", "p")
        await cl.tasks.add_many(
            "wi",
            "job-0000000001",
            [
                task_spec(
                    "t",
                    f"{PY} -c \"import os; print(os.listdir(os.environ['AZ_BATCH_CERTIFICATES_DIR']))\"",
                )
            ],
        )
        counts = await cl.tasks.wait("wi", "job-0000000001", timeout=30)
        assert counts.failed == 0

        # Delete refused while a pool references it; allowed once the pool is gone.
        with pytest.raises(BatchError) as ei:
            await cl.certificates.delete(pfx_thumb)
        assert (ei.value.status, ei.value.code) == (409, "CertificateInUse")
        assert "p" in ei.value.message
        await cl.pools.delete("p")
        await c.wait_for(lambda: _no_pool(cl, "p"), what="pool p gone")
        await cl.certificates.delete(pfx_thumb)
        with pytest.raises(BatchError) as ei:
            await cl.certificates.get(pfx_thumb)
        assert (ei.value.status, ei.value.code) == (404, "CertificateNotFound")
        agent_log = c.agents[0].log_text()
        assert PASSWORD not in agent_log
        assert pfx_data[:40] not in agent_log


async def _no_pool(cl, name: str) -> bool:
    return name not in [p.name for p in await cl.pools.list()]


async def test_bad_certificates_are_refused_and_nothing_is_stored(
    nursery, tmp_path, pfx_cert, cer_cert
):
    pfx_thumb, pfx_data = pfx_cert
    cer_thumb, cer_data = cer_cert
    async with cluster_ctx(nursery, tmp_path, agents=0) as c:
        cl = c.client
        cases = [
            (
                dict(thumbprint=pfx_thumb, data_b64=pfx_data, password="wrong"),
                "InvalidCertificatePassword",
            ),
            (
                dict(thumbprint=cer_thumb, data_b64=pfx_data, password=PASSWORD),
                "ThumbprintMismatch",
            ),
            (dict(thumbprint=pfx_thumb, data_b64=pfx_data), "MissingPassword"),
            (
                dict(
                    thumbprint=cer_thumb, data_b64=cer_data, certificate_format="cer", password="x"
                ),
                "PasswordNotAllowedForCer",
            ),
            (
                dict(thumbprint=cer_thumb, data_b64="!!not base64!!", certificate_format="cer"),
                "InvalidCertificateData",
            ),
            (
                dict(thumbprint="xyz", data_b64=cer_data, certificate_format="cer"),
                "InvalidThumbprint",
            ),
            (
                dict(thumbprint=cer_thumb, data_b64=cer_data, certificate_format="p7b"),
                "InvalidCertificateFormat",
            ),
            (
                dict(
                    thumbprint=cer_thumb,
                    data_b64=cer_data,
                    certificate_format="cer",
                    thumbprint_algorithm="md5",
                ),
                "InvalidThumbprintAlgorithm",
            ),
        ]
        for kwargs, code in cases:
            with pytest.raises(BatchError) as ei:
                await cl.certificates.add(**kwargs)
            assert (ei.value.status, ei.value.code) == (400, code), kwargs
            assert PASSWORD not in ei.value.message
        assert await cl.certificates.list() == []
        await cl.certificates.add(cer_thumb, cer_data, certificate_format="cer")
        with pytest.raises(BatchError) as ei:
            await cl.certificates.add(cer_thumb, cer_data, certificate_format="cer")
        assert (ei.value.status, ei.value.code) == (409, "CertificateExists")
        for name in ("nodash", "md5-" + cer_thumb, "sha1-zz"):
            with pytest.raises(BatchError) as ei:
                await cl.certificates.get(
                    name.split("-")[-1], name.split("-")[0] if "-" in name else ""
                )
            assert ei.value.status == 400, name
        with pytest.raises(BatchError) as ei:
            await cl.certificates.delete("ab" * 20)
        assert (ei.value.status, ei.value.code) == (404, "CertificateNotFound")


async def test_wrong_password_on_the_tvm_marks_its_install_failed_and_agent_keeps_running(
    nursery, tmp_path, pfx_cert, cer_cert
):
    """The coordinator validates passwords, so a pfx that fails on a TVM cannot come through REST;
    the test puts a wrong password straight into the coordinator's memory to get one there."""
    pfx_thumb, pfx_data = pfx_cert
    cer_thumb, cer_data = cer_cert
    async with cluster_ctx(nursery, tmp_path, agents=1, heartbeat_timeout=3) as c:
        cl = c.client
        await cl.certificates.add(pfx_thumb, pfx_data, password=PASSWORD)
        await cl.certificates.add(cer_thumb, cer_data, certificate_format="cer")
        rec = c.rc.service.core.certificates[f"sha1-{pfx_thumb}"]
        c.rc.service.core.certificates[f"sha1-{pfx_thumb}"] = msgspec.structs.replace(
            rec, password="not-it"
        )
        refs = [{"thumbprint": pfx_thumb}, {"thumbprint": cer_thumb}]
        await c.pool_with_tvms("p", 1, certificate_references=refs)
        tvm = (await cl.tvms.list("p"))[0]
        assert len(tvm.cert_errors) == 1
        assert tvm.cert_errors[0].startswith(f"sha1-{pfx_thumb}:")
        assert "password" in tvm.cert_errors[0]
        certs = os.path.join(c.agents[0].root, "certs")
        assert sorted(os.listdir(certs)) == [
            f"sha1-{cer_thumb}.cer"
        ]  # the good one still installed
        await cl.workitems.add("wi", "p")
        await cl.tasks.add_many("wi", "job-0000000001", [task_spec("t", f"{PY} -c pass")])
        assert (await cl.tasks.wait("wi", "job-0000000001", timeout=30)).failed == 0
        assert c.agents[0].proc.poll() is None
        assert "not-it" not in c.agents[0].log_text()


async def test_certificates_survive_a_coordinator_restart(nursery, tmp_path, cer_cert):
    cer_thumb, cer_data = cer_cert
    async with cluster_ctx(nursery, tmp_path, agents=0) as c:
        await c.client.certificates.add(cer_thumb, cer_data, certificate_format="cer")
    async with cluster_ctx(nursery, tmp_path, agents=0) as c:
        got = await c.client.certificates.get(cer_thumb)
        assert (got.thumbprint, got.certificate_format) == (cer_thumb, "cer")
