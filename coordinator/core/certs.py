"""Certificates of the account (journal kind "cert", key "sha1-<thumbprint>").

Pools reference them; JoinPool carries the referenced ones (see membership.cert_files). A certificate
a pool references cannot be deleted.
"""

from __future__ import annotations

import base64

from coordinator.common import models as m
from coordinator.common.certificates import (
    CertificateError,
    normalize_thumbprint,
    normalize_thumbprint_algorithm,
    validate_certificate,
)
from coordinator.common.errors import ApiError, bad_request, conflict, not_found

from .instructions import Outbox
from .records import CertRec
from .specs import cert_key, ref_thumb
from .store import Store

MAX_CERTIFICATES = 1000


def _norm_thumb(thumbprint: str, algorithm: str) -> str:
    normalize_thumbprint_algorithm(algorithm)
    return normalize_thumbprint(thumbprint)


class Certs:
    def __init__(self, store: Store, out: Outbox) -> None:
        self.s = store
        self.out = out

    def add_certificate(self, req: m.CertificateAdd) -> CertRec:
        try:
            info = validate_certificate(
                req.thumbprint,
                req.thumbprint_algorithm,
                req.data,
                req.certificate_format,
                req.password,
            )
        except CertificateError as exc:
            raise bad_request(exc.code, exc.message, field=exc.field) from None
        key = cert_key(info.thumbprint)
        certificates = self.s.certificates
        if key in certificates:
            raise conflict("certificate", key)
        if len(certificates) >= MAX_CERTIFICATES:
            raise ApiError(
                409,
                "TooManyCertificates",
                f"an account holds at most {MAX_CERTIFICATES} certificates",
            )
        raw = base64.b64decode("".join(req.data.split()))
        now = self.s.clock()
        rec = CertRec(
            thumbprint=info.thumbprint,
            thumbprint_algorithm=info.thumbprint_algorithm,
            certificate_format=info.format,
            data=raw,
            password=req.password or "",
            subject=info.subject,
            not_after=info.not_after.timestamp(),
            has_private_key=info.has_private_key,
            public_der=_public_der(raw, info.format, req.password),
            created=now,
            state_time=now,
        )
        certificates[key] = rec
        self.out.put("cert", key, rec)
        return rec

    def _key_from_path(self, name: str) -> str:
        algo, sep, thumb = name.partition("-")
        if not sep:
            raise bad_request(
                "InvalidCertificateName",
                f"expected <thumbprintAlgorithm>-<thumbprint> (like sha1-0a1b...), got {name!r}",
            )
        try:
            return cert_key(_norm_thumb(thumb, algo))
        except CertificateError as exc:
            raise bad_request(exc.code, exc.message, field=exc.field) from None

    def get_certificate(self, name: str) -> CertRec:
        key = self._key_from_path(name)
        rec = self.s.certificates.get(key)
        if rec is None:
            raise not_found("certificate", key)
        return rec

    def certificate_users(self, thumbprint: str) -> list[str]:
        return sorted(
            p.spec.name
            for p in self.s.pools.values()
            if any(ref_thumb(r) == thumbprint for r in p.spec.certificate_references)
        )

    def delete_certificate(self, name: str) -> None:
        rec = self.get_certificate(name)
        users = self.certificate_users(rec.thumbprint)
        if users:
            raise ApiError(
                409,
                "CertificateInUse",
                f"certificate sha1-{rec.thumbprint} is referenced by pool(s) {', '.join(users)};"
                " delete those pools or remove the reference first",
                pools=",".join(users),
            )
        key = cert_key(rec.thumbprint)
        del self.s.certificates[key]
        self.out.delete("cert", key)

    def request_delete(self, name: str) -> None:
        """Azure's delete: a certificate no pool references is gone at once; one still
        referenced stays, in state `deletefailed` (until `cancel_delete`, or a delete once the
        references are gone)."""
        rec = self.get_certificate(name)
        if self.certificate_users(rec.thumbprint):
            rec.state = "deletefailed"
            rec.state_time = self.s.clock()
            self.out.put("cert", cert_key(rec.thumbprint), rec)
            return
        key = cert_key(rec.thumbprint)
        del self.s.certificates[key]
        self.out.delete("cert", key)

    def cancel_delete(self, name: str) -> None:
        """Back to `active` after a delete that failed; refused in any other state."""
        rec = self.get_certificate(name)
        if rec.state != "deletefailed":
            raise ApiError(
                409,
                "CertificateStateActive",
                f"certificate sha1-{rec.thumbprint} is {rec.state}: only a certificate whose "
                "deletion failed (deletefailed) can have its deletion cancelled",
            )
        rec.state = "active"
        rec.state_time = self.s.clock()
        self.out.put("cert", cert_key(rec.thumbprint), rec)

    def check_references(
        self, refs: list[m.CertificateReference], prefix: str = ""
    ) -> list[m.CertificateReference]:
        """Called by the pool spec check before anything is stored: every reference must name a
        known certificate."""
        out: list[m.CertificateReference] = []
        seen: set[str] = set()
        for i, ref in enumerate(refs):
            field = f"{prefix}certificateReferences[{i}]"
            try:
                thumb = _norm_thumb(ref.thumbprint, ref.thumbprint_algorithm)
            except CertificateError as exc:
                raise bad_request(exc.code, f"{field}: {exc.message}", field=field) from None
            if cert_key(thumb) not in self.s.certificates:
                raise bad_request(
                    "CertificateNotFound",
                    f"{field}: certificate sha1-{thumb} does not exist in the account",
                    field=field,
                )
            if thumb in seen:
                raise bad_request(
                    "DuplicateCertificateReference",
                    f"{field}: sha1-{thumb} is listed twice",
                    field=field,
                )
            seen.add(thumb)
            out.append(m.CertificateReference(thumbprint=thumb, thumbprint_algorithm="sha1"))
        return out


def _public_der(raw: bytes, fmt: str, password: str | None) -> bytes:
    """The certificate alone (DER), safe to show in GET: never the pfx or its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, pkcs12

    if fmt == "cer":
        cert = (
            x509.load_pem_x509_certificate(raw)
            if raw.lstrip().startswith(b"-----BEGIN")
            else x509.load_der_x509_certificate(raw)
        )
    else:
        _, main, extra = pkcs12.load_key_and_certificates(raw, (password or "").encode())
        cert = main or extra[0]
    return cert.public_bytes(Encoding.DER)
