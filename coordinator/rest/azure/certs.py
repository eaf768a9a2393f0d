"""Azure certificates (the 14.x SDK's and `az batch certificate`'s): add, list, get, delete,
`canceldelete`, over the account's certificates (`core/certs.py`).

`/certificates(thumbprintAlgorithm=sha1,thumbprint=X)` names one. A delete of a certificate no pool
references removes it at once (202); one that a pool still references stays, `deletefailed`, with
`deleteCertificateError` naming the pools, until `canceldelete` (back to `active`) or a delete after
the references are gone. Pools reference certificates with `certificateReferences` (pool routes);
every TVM of the pool gets them installed before its first task.
"""

from __future__ import annotations

import base64
from typing import Any

from coordinator.common import models as m
from coordinator.common.timeutil import rfc3339
from coordinator.core import CertRec
from coordinator.rest.dispatch import Dispatcher, Response

from .body import parse_json
from .conv import empty, etag_of, json_response, metadata_url, resource_headers
from .router import AzureApi, base, listing, select_one

C = r"/certificates\(thumbprintAlgorithm=(?P<algo>[^,()/]+),thumbprint=(?P<thumb>[^,()/]+)\)"


def cert_url(rec: CertRec) -> str:
    return (
        f"{base()}/certificates(thumbprintAlgorithm={rec.thumbprint_algorithm},"
        f"thumbprint={rec.thumbprint})"
    )


class CertificateApi:
    def __init__(self, app: Dispatcher) -> None:
        self.svc = app.svc
        self.core = app.core

    def register(self, r: AzureApi) -> None:
        r.route("POST", "/certificates", self.add)
        r.route("GET", "/certificates", self.list_certs)
        r.route("GET", C, self.get)
        r.route("DELETE", C, self.delete)
        r.route("POST", C + "/canceldelete", self.cancel_delete)

    def view(self, rec: CertRec) -> dict[str, Any]:
        out: dict[str, Any] = {
            "thumbprint": rec.thumbprint,
            "thumbprintAlgorithm": rec.thumbprint_algorithm,
            "url": cert_url(rec),
            "state": rec.state,
            "stateTransitionTime": rfc3339(rec.state_time or rec.created),
            "publicData": base64.b64encode(rec.public_der).decode(),
        }
        if rec.state == "deletefailed":
            pools = self.core.certificate_users(rec.thumbprint)
            out["previousState"] = "deleting"
            out["previousStateTransitionTime"] = out["stateTransitionTime"]
            out["deleteCertificateError"] = {
                "code": "CertificateInUse",
                "message": "the certificate is referenced by pools: remove the references "
                "(or delete the pools) and delete it again, or cancel the deletion",
                "values": [{"name": "Pools", "value": ",".join(pools)}],
            }
        return out

    async def add(self, body: bytes, headers: dict[str, str], **_: Any) -> Response:
        b = parse_json(body)
        req = m.CertificateAdd(
            thumbprint=b.req_text("thumbprint"),
            thumbprint_algorithm=b.req_text("thumbprintAlgorithm"),
            data=b.req_text("data"),
            certificate_format=b.text("certificateFormat") or "pfx",
            password=b.text("password"),
        )
        b.log_unknown("certificate")
        rec = await self.svc.execute(self.core.add_certificate, req)
        loc = cert_url(rec).encode()
        return empty(201, headers, [(b"location", loc), (b"dataserviceid", loc)])

    async def list_certs(
        self, query: dict[str, str], headers: dict[str, str], **_: Any
    ) -> Response:
        recs = sorted(self.core.certificates.values(), key=lambda c: c.thumbprint)
        return listing(
            recs,
            query,
            headers,
            kind="certificates",
            entity="certificates",
            key=lambda c: c.thumbprint,
            view=self.view,
            view_key="thumbprint",
        )

    async def get(
        self, algo: str, thumb: str, query: dict[str, str], headers: dict[str, str], **_: Any
    ) -> Response:
        rec = self.core.get_certificate(f"{algo}-{thumb}")
        view = self.view(rec)
        out = {"odata.metadata": metadata_url(base(), "certificates/@Element")}
        out.update(select_one(view, query))
        extra = resource_headers(etag_of(view), rec.state_time or rec.created)
        return json_response(200, out, headers, extra=extra)

    async def delete(self, algo: str, thumb: str, headers: dict[str, str], **_: Any) -> Response:
        await self.svc.execute(self.core.certs.request_delete, f"{algo}-{thumb}")
        return empty(202, headers)

    async def cancel_delete(
        self, algo: str, thumb: str, headers: dict[str, str], **_: Any
    ) -> Response:
        await self.svc.execute(self.core.certs.cancel_delete, f"{algo}-{thumb}")
        return empty(204, headers)
