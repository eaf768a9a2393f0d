"""Install a pool's certificates into a TVM's ``certs/`` directory (``AZ_BATCH_CERTIFICATES_DIR``).

Layout, following Azure Batch on Linux (reference §1.8/§4.3), names in lowercase hex:

* ``sha1-<thumbprint>.cer``    the (leaf) certificate, DER, 0644 (public)
* ``sha1-<thumbprint>.pfx``    pfx only: the file as uploaded, 0600
* ``sha1-<thumbprint>.pfx.pw`` pfx only: its password, 0600 (Azure writes it; scripts read it)
* ``sha1-<thumbprint>.pem``    pfx with a key: unencrypted PKCS#8 key + leaf + chain, 0600

The directory is 0700; directory and files are chowned to ``owner`` (the task user) because
the agent runs as root. Every file is written atomically (O_EXCL temp file created with its
final mode, fsync, rename), so a reader never sees a partial or briefly-wider file.

A certificate that cannot be installed (wrong password, thumbprint mismatch, damaged data)
fails on its own with a clear error; the others still install. Errors never contain
certificate data or passwords. Blocking file I/O: call from ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from protocol.hostio import fsync_dir

_HEX = re.compile(r"[0-9a-fA-F]{1,40}")


@dataclass(frozen=True, slots=True)
class CertSpec:
    thumbprint: str
    thumbprint_algorithm: str
    certificate_format: str  # "pfx" | "cer"
    data: bytes = field(repr=False)  # raw (already base64-decoded) file
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class CertInstallResult:
    thumbprint: str
    ok: bool
    error: str | None
    files: list[str]  # absolute paths written (empty on failure)


class _CertProblem(Exception):
    """One certificate cannot be installed; the message is safe to show and log."""


@dataclass(frozen=True, slots=True)
class _Parsed:
    thumbprint: str
    files: dict[str, tuple[bytes, int]]  # suffix -> (content, mode)


def install_certificates(
    certs_dir: str, certs: list[CertSpec], owner: str | None
) -> list[CertInstallResult]:
    """Install ``certs`` into ``certs_dir``; one result per spec, in order.

    Raises ValueError for an unknown ``owner`` and OSError when the directory itself cannot
    be prepared (nothing is written then); per-certificate problems land in the results.
    """
    ids = _owner_ids(owner)
    os.makedirs(certs_dir, mode=0o700, exist_ok=True)
    os.chmod(certs_dir, 0o700)  # makedirs leaves an existing dir's mode (and umask applies)
    if ids is not None:
        os.chown(certs_dir, *ids)
    results = [_install_one(certs_dir, spec, ids) for spec in certs]
    fsync_dir(certs_dir)
    return results


def _install_one(certs_dir: str, spec: CertSpec, ids: tuple[int, int] | None) -> CertInstallResult:
    label = spec.thumbprint.lower() if isinstance(spec.thumbprint, str) else repr(spec.thumbprint)
    try:
        parsed = _parse(spec)
    except _CertProblem as e:
        return CertInstallResult(label, False, str(e), [])
    written: list[str] = []
    try:
        for suffix, (content, mode) in parsed.files.items():
            path = os.path.join(certs_dir, f"sha1-{parsed.thumbprint}{suffix}")
            write_file_atomic(path, content, mode, ids)
            written.append(path)
    except OSError as e:
        for path in written:  # do not leave half a certificate behind
            with contextlib.suppress(OSError):
                os.unlink(path)
        return CertInstallResult(
            parsed.thumbprint, False, f"cannot write certificate files: {e.strerror or e}", []
        )
    return CertInstallResult(parsed.thumbprint, True, None, written)


def _parse(spec: CertSpec) -> _Parsed:
    if (
        not isinstance(spec.thumbprint_algorithm, str)
        or spec.thumbprint_algorithm.lower() != "sha1"
    ):
        raise _CertProblem("thumbprint algorithm must be 'sha1'")
    if not isinstance(spec.thumbprint, str) or not _HEX.fullmatch(spec.thumbprint):
        raise _CertProblem("thumbprint must be 1 to 40 hexadecimal digits")
    expected = spec.thumbprint.lower().rjust(40, "0")
    fmt = spec.certificate_format.lower() if isinstance(spec.certificate_format, str) else None
    if fmt == "cer":
        cert = _load_cer(spec.data)
        files: dict[str, tuple[bytes, int]] = {}
    elif fmt == "pfx":
        cert, files = _load_pfx(spec.data, spec.password)
    else:
        raise _CertProblem("certificate format must be 'pfx' or 'cer'")
    actual = cert.fingerprint(hashes.SHA1()).hex()
    if actual != expected:
        raise _CertProblem(
            f"thumbprint mismatch: expected {expected}, the certificate's sha1 is {actual}"
        )
    files = {".cer": (cert.public_bytes(serialization.Encoding.DER), 0o644), **files}
    return _Parsed(actual, files)


def _load_cer(data: bytes) -> x509.Certificate:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except (ValueError, TypeError):
        raise _CertProblem("data is not an X.509 certificate (DER or PEM)") from None


def _load_pfx(
    data: bytes, password: str | None
) -> tuple[x509.Certificate, dict[str, tuple[bytes, int]]]:
    pw = password.encode("utf-8") if password is not None else None
    try:
        key, cert, chain = pkcs12.load_key_and_certificates(data, pw)
    except (ValueError, TypeError):
        raise _CertProblem("cannot open the pfx: wrong password or damaged PKCS#12 data") from None
    if cert is None:
        if not chain:
            raise _CertProblem("the pfx contains no certificate")
        cert, chain = chain[0], chain[1:]
    files: dict[str, tuple[bytes, int]] = {".pfx": (data, 0o600)}
    if password is not None:
        files[".pfx.pw"] = (password.encode("utf-8"), 0o600)
    if key is not None:
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        pem += cert.public_bytes(serialization.Encoding.PEM)
        for extra in chain or []:
            pem += extra.public_bytes(serialization.Encoding.PEM)
        files[".pem"] = (pem, 0o600)
    return cert, files


def write_file_atomic(path: str, content: bytes, mode: int, ids: tuple[int, int] | None) -> None:
    """Create a temp file with its final mode (no chmod window), fsync, chown, rename."""
    tmp = f"{path}.tmp-{secrets.token_hex(6)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed the create mode
            if ids is not None:
                os.fchown(fd, *ids)
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _owner_ids(owner: str | None) -> tuple[int, int] | None:
    if owner is None:
        return None
    try:
        entry = pwd.getpwnam(owner)
    except (KeyError, TypeError):
        raise ValueError(f"certificate owner {owner!r} is not a user on this node") from None
    return entry.pw_uid, entry.pw_gid
