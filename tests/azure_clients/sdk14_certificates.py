"""Certificates with `azure-batch==14.2.0`, unmodified, against the endpoint in TVM_ENDPOINT /
TVM_ACCOUNT / TVM_KEY: add (pfx with password, and cer), list, get, a duplicate refused, a pool
referencing one (installed on its node, seen by a task), a delete refused while referenced
(`deletefailed`) and cancelled, then deleted for good. The certificates come from the test
(CERT_PFX / CERT_PFX_PASSWORD / CERT_PFX_THUMB, CERT_CER / CERT_CER_THUMB: base64). Prints one
JSON report line (see report.py)."""

from __future__ import annotations

import os
import sys

import azure.batch.models as bm
from azure.batch import BatchServiceClient
from azure.batch.batch_auth import SharedKeyCredentials
from report import Abort, Report, wait_until

POOL = "cert-pool"
JOB = "cert-job"
UBUNTU = bm.ImageReference(
    publisher="Canonical", offer="0001-com-ubuntu-server-jammy", sku="22_04-lts", version="latest"
)


def expect_error(call, status: int, code: str) -> None:  # noqa: ANN001
    try:
        call()
    except bm.BatchErrorException as exc:
        got = exc.error.code if exc.error else None
        if exc.response.status_code != status or got != code:
            raise AssertionError(
                f"expected {status} {code}, got {exc.response.status_code} {got}"
            ) from exc
        return
    raise AssertionError(f"expected {status} {code}, but the call succeeded")


def main() -> int:
    client = BatchServiceClient(
        SharedKeyCredentials(os.environ["TVM_ACCOUNT"], os.environ["TVM_KEY"]),
        batch_url=os.environ["TVM_ENDPOINT"],
    )
    pfx_thumb = os.environ["CERT_PFX_THUMB"]
    cer_thumb = os.environ["CERT_CER_THUMB"]
    r = Report()
    try:
        with r.step("add a pfx certificate with its password", fatal=True):
            client.certificate.add(
                bm.CertificateAddParameter(
                    thumbprint=pfx_thumb.upper(),
                    thumbprint_algorithm="sha1",
                    data=os.environ["CERT_PFX"],
                    certificate_format=bm.CertificateFormat.pfx,
                    password=os.environ["CERT_PFX_PASSWORD"],
                )
            )
        with r.step("add a cer certificate", fatal=True):
            client.certificate.add(
                bm.CertificateAddParameter(
                    thumbprint=cer_thumb,
                    thumbprint_algorithm="sha1",
                    data=os.environ["CERT_CER"],
                    certificate_format=bm.CertificateFormat.cer,
                )
            )
        with r.step("list shows both, active"):
            listed = {c.thumbprint.lower(): c for c in client.certificate.list()}
            assert {pfx_thumb, cer_thumb} <= set(listed), listed
            assert all(
                listed[t].state == bm.CertificateState.active for t in (pfx_thumb, cer_thumb)
            )
        with r.step("get returns the public data, never the pfx"):
            got = client.certificate.get("sha1", pfx_thumb.upper())
            assert got.thumbprint.lower() == pfx_thumb
            assert got.thumbprint_algorithm == "sha1"
            assert got.public_data
            assert got.public_data != os.environ["CERT_PFX"]
            assert got.url.endswith(
                f"/certificates(thumbprintAlgorithm=sha1,thumbprint={pfx_thumb})"
            )
        with r.step("a duplicate add is 409 CertificateExists"):
            expect_error(
                lambda: client.certificate.add(
                    bm.CertificateAddParameter(
                        thumbprint=cer_thumb,
                        thumbprint_algorithm="sha1",
                        data=os.environ["CERT_CER"],
                        certificate_format=bm.CertificateFormat.cer,
                    )
                ),
                409,
                "CertificateExists",
            )
        with r.step("an unknown certificate is 404 CertificateNotFound"):
            expect_error(
                lambda: client.certificate.get("sha1", "ab" * 20), 404, "CertificateNotFound"
            )
        with r.step("create a pool referencing the pfx", fatal=True):
            client.pool.add(
                bm.PoolAddParameter(
                    id=POOL,
                    vm_size="standard_d2_v2",
                    target_dedicated_nodes=1,
                    virtual_machine_configuration=bm.VirtualMachineConfiguration(
                        image_reference=UBUNTU, node_agent_sku_id="batch.node.ubuntu 22.04"
                    ),
                    certificate_references=[
                        bm.CertificateReference(
                            thumbprint=pfx_thumb,
                            thumbprint_algorithm="sha1",
                            store_location=bm.CertificateStoreLocation.current_user,
                            visibility=[bm.CertificateVisibility.task],
                        )
                    ],
                )
            )
        with r.step("the pool shows the reference"):
            refs = client.pool.get(POOL).certificate_references
            assert [(c.thumbprint.lower(), c.thumbprint_algorithm) for c in refs] == [
                (pfx_thumb, "sha1")
            ], refs
        with r.step("the node is idle", fatal=True):
            wait_until(
                lambda: [n for n in client.compute_node.list(POOL) if n.state == "idle"],
                120,
                "an idle node",
            )
        with r.step("a task on the node sees the certificate files"):
            client.job.add(bm.JobAddParameter(id=JOB, pool_info=bm.PoolInformation(pool_id=POOL)))
            client.task.add(
                JOB,
                bm.TaskAddParameter(
                    id="ls", command_line="/bin/sh -c 'ls \"$AZ_BATCH_CERTIFICATES_DIR\"'"
                ),
            )
            wait_until(
                lambda: client.task.get(JOB, "ls").state == bm.TaskState.completed, 60, "the task"
            )
            out = b"".join(client.file.get_from_task(JOB, "ls", "stdout.txt")).decode()
            assert f"sha1-{pfx_thumb}.cer" in out, out
            assert f"sha1-{pfx_thumb}.pfx" in out, out
        with r.step("deleting a referenced certificate leaves it deletefailed"):
            client.certificate.delete("sha1", pfx_thumb)
            cert = client.certificate.get("sha1", pfx_thumb)
            assert cert.state == bm.CertificateState.delete_failed, cert.state
            assert cert.previous_state == bm.CertificateState.deleting
            assert cert.delete_certificate_error.code == "CertificateInUse"
            pools = {v.name: v.value for v in cert.delete_certificate_error.values or []}
            assert pools.get("Pools") == POOL, pools
        with r.step("cancel deletion makes it active again"):
            client.certificate.cancel_deletion("sha1", pfx_thumb)
            assert client.certificate.get("sha1", pfx_thumb).state == bm.CertificateState.active
        with r.step("cancel deletion of an active certificate is 409"):
            expect_error(
                lambda: client.certificate.cancel_deletion("sha1", cer_thumb),
                409,
                "CertificateStateActive",
            )
        with r.step("with the pool gone the certificate deletes for good"):
            client.job.delete(JOB)
            client.pool.delete(POOL)
            wait_until(lambda: not client.pool.exists(POOL), 120, "the pool gone")
            client.certificate.delete("sha1", pfx_thumb)
            client.certificate.delete("sha1", cer_thumb)
            expect_error(
                lambda: client.certificate.get("sha1", pfx_thumb), 404, "CertificateNotFound"
            )
            left = {c.thumbprint.lower() for c in client.certificate.list()}
            assert not ({pfx_thumb, cer_thumb} & left), left
    except Abort:
        pass
    finally:
        for cleanup in (
            lambda: client.job.delete(JOB),
            lambda: client.pool.delete(POOL),
        ):
            try:
                cleanup()
            except Exception:  # noqa: BLE001 - already gone
                pass
    return r.dump()


if __name__ == "__main__":
    sys.exit(main())
