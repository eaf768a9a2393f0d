"""Validation of account certificates (``POST /certificates``) on the coordinator.

Azure Batch's retired certificate API (reference §1.8): ``thumbprintAlgorithm`` must be
``sha1``, ``thumbprint`` is up to 40 hex digits, ``certificateFormat`` is ``pfx`` or ``cer``,
``data`` is base64 of at most 10 KB, a ``pfx`` needs its password and a ``cer`` takes none.
We also check that the thumbprint is the SHA-1 of the certificate actually in ``data``, so
nodes never receive a blob that does not match its name.

Pure: no I/O, no logging. Error messages never contain certificate data or passwords.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import pkcs12

MAX_DATA_BYTES = 10 * 1024
# Base64 of MAX_DATA_BYTES is 13656 chars; allow generous line wrapping before we even decode.
_MAX_B64_CHARS = 16 * 1024
_HEX = re.compile(r"[0-9a-fA-F]{1,40}")
FORMATS = ("pfx", "cer")


class CertificateError(Exception):
    """A certificate request is invalid. ``code`` is the REST error code, ``field`` the
    request property at fault (camelCase, as in the REST body)."""

    def __init__(self, code: str, message: str, field: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.field = field


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    thumbprint: str  # 40 lowercase hex digits
    thumbprint_algorithm: str  # always "sha1"
    format: str  # "pfx" | "cer"
    subject: str  # RFC 4514
    not_after: dt.datetime  # UTC, timezone-aware
    has_private_key: bool


def normalize_thumbprint(thumbprint: str) -> str:
    """Lowercase, zero-padded 40-digit form. Azure allows "up to 40 hex digits" and shows
    both cases; use this for lookups (get/delete) as well as for add."""
    if not isinstance(thumbprint, str) or not _HEX.fullmatch(thumbprint):
        raise CertificateError(
            "InvalidThumbprint",
            "The thumbprint must be 1 to 40 hexadecimal digits (no spaces or separators).",
            "thumbprint",
        )
    return thumbprint.lower().rjust(40, "0")


def normalize_thumbprint_algorithm(algorithm: str) -> str:
    if not isinstance(algorithm, str) or algorithm.lower() != "sha1":
        raise CertificateError(
            "InvalidThumbprintAlgorithm",
            "The thumbprint algorithm must be 'sha1'.",
            "thumbprintAlgorithm",
        )
    return "sha1"


def validate_certificate(
    thumbprint: str,
    thumbprint_algorithm: str,
    data_b64: str,
    certificate_format: str,
    password: str | None,
) -> CertificateInfo:
    """Check a certificate add request; return what it holds or raise CertificateError.

    Password rules (Azure): a ``pfx`` must come with a password (``""`` is allowed, for a
    pfx exported without one); a ``cer`` must not have one (``""`` counts as absent).
    """
    algorithm = normalize_thumbprint_algorithm(thumbprint_algorithm)
    thumb = normalize_thumbprint(thumbprint)
    fmt = _normalize_format(certificate_format)
    if password is not None and not isinstance(password, str):
        raise CertificateError("InvalidPropertyValue", "The password must be a string.", "password")
    if fmt == "cer" and password:
        raise CertificateError(
            "PasswordNotAllowedForCer",
            "A password must not be given for a certificate in 'cer' format.",
            "password",
        )
    if fmt == "pfx" and password is None:
        raise CertificateError(
            "MissingPassword",
            "A certificate in 'pfx' format needs its password (use an empty string if it has none).",
            "password",
        )
    raw = _decode_data(data_b64)
    if fmt == "cer":
        cert = _load_cer(raw)
        has_key = False
    else:
        assert password is not None
        cert, has_key = _load_pfx(raw, password)
    actual = cert.fingerprint(hashes.SHA1()).hex()
    if actual != thumb:
        raise CertificateError(
            "ThumbprintMismatch",
            f"The thumbprint {thumb} does not match the certificate in data (its sha1 thumbprint is {actual}).",
            "thumbprint",
        )
    return CertificateInfo(
        thumbprint=actual,
        thumbprint_algorithm=algorithm,
        format=fmt,
        subject=cert.subject.rfc4514_string(),
        not_after=cert.not_valid_after_utc,
        has_private_key=has_key,
    )


def _normalize_format(certificate_format: str) -> str:
    fmt = certificate_format.lower() if isinstance(certificate_format, str) else None
    if fmt not in FORMATS:
        raise CertificateError(
            "InvalidCertificateFormat",
            "The certificate format must be 'pfx' or 'cer'.",
            "certificateFormat",
        )
    return fmt


def _decode_data(data_b64: str) -> bytes:
    if not isinstance(data_b64, str) or not data_b64.strip():
        raise CertificateError(
            "InvalidCertificateData", "The certificate data is missing or empty.", "data"
        )
    if len(data_b64) > _MAX_B64_CHARS:
        raise CertificateError(
            "InvalidCertificateData",
            f"The certificate data is larger than the limit of {MAX_DATA_BYTES} bytes.",
            "data",
        )
    compact = "".join(data_b64.split())  # clients may wrap base64 lines
    try:
        raw = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise CertificateError(
            "InvalidCertificateData", "The certificate data is not valid base64.", "data"
        ) from None
    if len(raw) > MAX_DATA_BYTES:
        raise CertificateError(
            "InvalidCertificateData",
            f"The certificate data is {len(raw)} bytes; the limit is {MAX_DATA_BYTES} bytes.",
            "data",
        )
    if not raw:
        raise CertificateError("InvalidCertificateData", "The certificate data is empty.", "data")
    return raw


def _load_cer(raw: bytes) -> x509.Certificate:
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(raw)
        return x509.load_der_x509_certificate(raw)
    except ValueError:
        raise CertificateError(
            "InvalidCertificateData",
            "The data is not an X.509 certificate in DER or PEM form ('cer' format).",
            "data",
        ) from None


def _load_pfx(raw: bytes, password: str) -> tuple[x509.Certificate, bool]:
    try:
        key, cert, extra = pkcs12.load_key_and_certificates(raw, password.encode("utf-8"))
    except ValueError:
        # cryptography reports a wrong password and a damaged file alike; a well-formed
        # PFX outer structure tells us the password is the likelier culprit.
        if looks_like_pfx(raw):
            raise CertificateError(
                "InvalidCertificatePassword",
                "The password does not open the pfx (or its contents are damaged).",
                "password",
            ) from None
        raise CertificateError(
            "InvalidCertificateData", "The data is not a PKCS#12 ('pfx') file.", "data"
        ) from None
    if cert is None:
        if not extra:
            raise CertificateError(
                "InvalidCertificateData", "The pfx contains no certificate.", "data"
            )
        cert = extra[0]
    return cert, key is not None


def looks_like_pfx(raw: bytes) -> bool:
    """True when ``raw`` is one DER SEQUENCE spanning all bytes that starts with
    ``INTEGER 3`` (the PFX version), i.e. the outer shape of RFC 7292 ``PFX``."""
    if len(raw) < 5 or raw[0] != 0x30:
        return False
    first = raw[1]
    if first < 0x80:
        length, header = first, 2
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or len(raw) < 2 + n:
            return False
        length, header = int.from_bytes(raw[2 : 2 + n], "big"), 2 + n
    return header + length == len(raw) and raw[header : header + 3] == b"\x02\x01\x03"
