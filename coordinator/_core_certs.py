"""Certificates, intra-pool port blocks, pool membership and remote-login users (pure core; issue 8).

* Certificates live in the account (`certificates`, journal kind "cert", key "sha1-<thumbprint>").
  Pools reference them; JoinPool carries the referenced ones (raw bytes + password) so the agent
  installs them before the start task and tasks. A certificate a pool references cannot be deleted.
* Port blocks: a `communication` pool's TVM gets block `i` of the coordinator-wide
  `PortRangeConfig` (`port_range`). Blocks are allocated across ALL pools, not per pool, so TVMs of
  two pools backed by agents on the same host never share ports. The block is journaled on the TVM.
* Pool members: every time a communicating pool gains or loses a TVM, each of its TVMs gets
  `PoolMembers` (the member addresses) so its agent can refresh its nftables set / user-space gate.
* Remote-login users are kept on the TVM record and pushed to the agent (AddUser/RemoveUser).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from typing import Any

import msgspec

from protocol import messages as pm
from tvmagent.ports import PortRangeConfig, allocate_tvm_range

from . import models as m
from ._core_base import CoreBase
from .certificates import (
    CertificateError,
    normalize_thumbprint,
    normalize_thumbprint_algorithm,
    validate_certificate,
)
from .errors import ApiError, bad_request, conflict, not_found
from .records import PoolRec, Tvm, TvmUserRec
from .timeutil import parse_time

MAX_CERTIFICATES = 1000
MAX_TVM_USERS = 20
MAX_USER_LIFETIME_S = 30 * 86400.0
DEFAULT_USER_LIFETIME_S = 86400.0
DEFAULT_PORT_RANGE = (1100, 32767, 50)  # below the Linux default ephemeral range 32768-60999

_LINUX_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
# Names the agent must never touch: system accounts and our own task users.
_RESERVED_USERS = frozenset({"root", "daemon", "bin", "sys", "sync", "nobody", "sshd", "messagebus", "systemd-network"})
_SSH_KEY = re.compile(r"^(ssh-(rsa|ed25519|dss)|ecdsa-sha2-nistp(256|384|521)|sk-[a-z0-9@.-]+) [A-Za-z0-9+/=]{16,}( [^\r\n]*)?$")


class CertRec(msgspec.Struct, kw_only=True):
    thumbprint: str  # 40 lowercase hex digits
    thumbprint_algorithm: str
    certificate_format: str
    data: bytes = msgspec.field(default=b"")
    password: str = ""
    subject: str = ""
    not_after: float = 0.0
    has_private_key: bool = False
    public_der: bytes = b""
    created: float = 0.0
    state: str = "active"
    state_time: float = 0.0

    def __repr__(self) -> str:  # certificate data and passwords never reach logs
        return f"CertRec(sha1-{self.thumbprint}, {self.certificate_format})"


_enc = msgspec.msgpack.Encoder()
_cert_dec = msgspec.msgpack.Decoder(CertRec)


def cert_key(thumbprint: str) -> str:
    return f"sha1-{thumbprint}"


class CertsMixin(CoreBase):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.certificates: dict[str, CertRec] = {}
        low, high, per = DEFAULT_PORT_RANGE
        self.port_range = PortRangeConfig(low, high, per, ephemeral=(32768, 60999))

    # ------------------------------------------------------------------ restore

    def restore(self, rows: Iterable[tuple[str, str, bytes]]) -> None:
        rest: list[tuple[str, str, bytes]] = []
        for kind, key, body in rows:
            if kind == "cert":
                self.certificates[key] = _cert_dec.decode(body)
            else:
                rest.append((kind, key, body))
        super().restore(rest)  # type: ignore[safe-super]

    # ------------------------------------------------------------------ certificates

    def add_certificate(self, req: m.CertificateAdd) -> CertRec:
        try:
            info = validate_certificate(req.thumbprint, req.thumbprint_algorithm, req.data,
                                        req.certificate_format, req.password)
        except CertificateError as exc:
            raise bad_request(exc.code, exc.message, field=exc.field) from None
        key = cert_key(info.thumbprint)
        if key in self.certificates:
            raise conflict("certificate", key)
        if len(self.certificates) >= MAX_CERTIFICATES:
            raise ApiError(409, "TooManyCertificates", f"an account holds at most {MAX_CERTIFICATES} certificates")
        raw = base64.b64decode("".join(req.data.split()))
        now = self.clock()
        rec = CertRec(thumbprint=info.thumbprint, thumbprint_algorithm=info.thumbprint_algorithm,
                      certificate_format=info.format, data=raw, password=req.password or "",
                      subject=info.subject, not_after=info.not_after.timestamp(),
                      has_private_key=info.has_private_key, public_der=_public_der(raw, info.format, req.password),
                      created=now, state_time=now)
        self.certificates[key] = rec
        self._put("cert", key, rec)
        return rec

    def _cert_key_from_path(self, name: str) -> str:
        algo, sep, thumb = name.partition("-")
        if not sep:
            raise bad_request("InvalidCertificateName",
                              f"expected <thumbprintAlgorithm>-<thumbprint> (like sha1-0a1b...), got {name!r}")
        try:
            return cert_key(_norm_thumb(thumb, algo))
        except CertificateError as exc:
            raise bad_request(exc.code, exc.message, field=exc.field) from None

    def get_certificate(self, name: str) -> CertRec:
        key = self._cert_key_from_path(name)
        rec = self.certificates.get(key)
        if rec is None:
            raise not_found("certificate", key)
        return rec

    def certificate_users(self, thumbprint: str) -> list[str]:
        return sorted(p.spec.name for p in self.pools.values()
                      if any(_ref_thumb(r) == thumbprint for r in p.spec.certificate_references))

    def delete_certificate(self, name: str) -> None:
        rec = self.get_certificate(name)
        users = self.certificate_users(rec.thumbprint)
        if users:
            raise ApiError(409, "CertificateInUse",
                           f"certificate sha1-{rec.thumbprint} is referenced by pool(s) {', '.join(users)};"
                           " delete those pools or remove the reference first", pools=",".join(users))
        key = cert_key(rec.thumbprint)
        del self.certificates[key]
        self._delete("cert", key)

    def _check_certificate_references(self, refs: list[m.CertificateReference],
                                      prefix: str = "") -> list[m.CertificateReference]:
        """Called by add_pool before anything is stored: every reference must name a known certificate."""
        out: list[m.CertificateReference] = []
        seen: set[str] = set()
        for i, ref in enumerate(refs):
            field = f"{prefix}certificateReferences[{i}]"
            try:
                thumb = _norm_thumb(ref.thumbprint, ref.thumbprint_algorithm)
            except CertificateError as exc:
                raise bad_request(exc.code, f"{field}: {exc.message}", field=field) from None
            if cert_key(thumb) not in self.certificates:
                raise bad_request("CertificateNotFound",
                                  f"{field}: certificate sha1-{thumb} does not exist in the account", field=field)
            if thumb in seen:
                raise bad_request("DuplicateCertificateReference", f"{field}: sha1-{thumb} is listed twice",
                                  field=field)
            seen.add(thumb)
            out.append(m.CertificateReference(thumbprint=thumb, thumbprint_algorithm="sha1"))
        return out

    def _cert_files(self, pool: PoolRec) -> list[pm.CertFile]:
        files = []
        for ref in pool.spec.certificate_references:
            rec = self.certificates.get(cert_key(_ref_thumb(ref)))
            if rec is not None:
                files.append(pm.CertFile(thumbprint=rec.thumbprint, thumbprint_algorithm=rec.thumbprint_algorithm,
                                         certificate_format=rec.certificate_format, data=rec.data,
                                         password=rec.password))
        return files

    # ------------------------------------------------------------------ port blocks and membership

    def _assign_ports(self, pool: PoolRec, tvm: Tvm) -> None:
        """Give a new TVM of a communicating pool the lowest free block (global across pools)."""
        if not pool.spec.communication or tvm.rec.port_low:
            return
        cfg = self.port_range
        used = {(t.rec.port_low - cfg.low) // cfg.per_tvm for t in self.tvms.values() if t.rec.port_low}
        for index in range(cfg.capacity):
            if index not in used:
                tvm.rec.port_low, tvm.rec.port_high = allocate_tvm_range(cfg, index)
                return
        # No block left: the TVM still joins; its tasks see port range 0-0 and the reason on the TVM.
        tvm.rec.cert_errors = [*tvm.rec.cert_errors,
                               f"no free port block: {cfg.capacity} blocks of {cfg.per_tvm} ports in use"]

    def _members_changed(self, pool_name: str) -> None:
        """Tell every TVM of a communicating pool who its members are now."""
        pool = self.pools.get(pool_name)
        if pool is None or not pool.spec.communication:
            return
        members = [t for t in self.tvms.values() if t.rec.pool == pool_name]
        addresses = sorted({t.rec.ip for t in members if t.rec.ip})
        for t in members:
            self._send(t.rec.agent_id, pm.PoolMembers(addresses=addresses, pool=pool_name))

    def _tvm_ready(self, tvm: Tvm, msg: pm.TvmReady) -> None:
        """Record what the agent reported when the TVM became ready (certificate install errors)."""
        errors = [e for e in tvm.rec.cert_errors if e.startswith("no free port block")] + list(msg.cert_errors)
        if errors != tvm.rec.cert_errors:
            tvm.rec.cert_errors = errors
            self._put("tvm", tvm.rec.name, tvm.rec)

    # ------------------------------------------------------------------ revoked agents

    def forget_agent(self, agent_id: str) -> None:
        """A revoked agent: its TVM leaves the pool at once (running tasks requeued, the pool can
        allocate a replacement) and the agent is no longer in the inventory."""
        agent = self.agents.pop(agent_id, None)
        if agent is None:
            return
        tvm = self.tvms.get(agent.tvm) if agent.tvm else None
        if tvm is not None:
            self._forget_tvm(tvm)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ remote-login users

    def add_tvm_user(self, pool: str, tvm_name: str, req: m.TvmUserAdd) -> TvmUserRec:
        tvm = self.get_tvm(pool, tvm_name)  # type: ignore[attr-defined]
        if not isinstance(req.name, str) or not _LINUX_USER.fullmatch(req.name):
            raise bad_request("InvalidUserName",
                              f"{req.name!r} is not a valid Linux user name: 1-32 characters, lowercase letters,"
                              " digits, '_' or '-', starting with a letter or '_'", field="name")
        if req.name in _RESERVED_USERS or req.name.startswith("tvm"):
            raise bad_request("InvalidUserName", f"user name {req.name!r} is reserved", field="name")
        key = req.ssh_public_key.strip()
        if len(key) > 8192 or not _SSH_KEY.fullmatch(key):
            raise bad_request("InvalidSshPublicKey",
                              "sshPublicKey must be one OpenSSH public key line like 'ssh-ed25519 AAAA... comment'",
                              field="sshPublicKey")
        now = self.clock()
        expiry = parse_time(req.expiry_time, "expiryTime") if req.expiry_time else now + DEFAULT_USER_LIFETIME_S
        if expiry <= now:
            raise bad_request("InvalidPropertyValue", "expiryTime must be in the future", field="expiryTime")
        if expiry - now > MAX_USER_LIFETIME_S:
            raise bad_request("InvalidPropertyValue", "expiryTime may be at most 30 days ahead", field="expiryTime")
        if any(u.name == req.name for u in tvm.rec.users):
            raise ApiError(409, "UserExists", f"user {req.name!r} already exists on TVM {tvm_name!r}", name=req.name)
        if len(tvm.rec.users) >= MAX_TVM_USERS:
            raise ApiError(409, "TooManyUsers", f"a TVM holds at most {MAX_TVM_USERS} remote-login users")
        user = TvmUserRec(name=req.name, ssh_public_key=key, expiry=expiry, is_admin=req.is_admin)
        tvm.rec.users = [*tvm.rec.users, user]
        self._put("tvm", tvm.rec.name, tvm.rec)
        self._send(tvm.rec.agent_id, pm.AddUser(name=user.name, ssh_public_key=key, expiry=expiry,
                                                is_admin=user.is_admin))
        return user

    def delete_tvm_user(self, pool: str, tvm_name: str, user: str) -> None:
        tvm = self.get_tvm(pool, tvm_name)  # type: ignore[attr-defined]
        if not any(u.name == user for u in tvm.rec.users):
            raise ApiError(404, "UserNotFound", f"user {user!r} does not exist on TVM {tvm_name!r}", name=user)
        tvm.rec.users = [u for u in tvm.rec.users if u.name != user]
        self._put("tvm", tvm.rec.name, tvm.rec)
        self._send(tvm.rec.agent_id, pm.RemoveUser(name=user))

    def _expire_users(self) -> None:
        """Drop users whose expiry passed (the agent removes them on its own too)."""
        now = self.clock()
        for tvm in self.tvms.values():
            gone = [u for u in tvm.rec.users if u.expiry <= now]
            if gone:
                tvm.rec.users = [u for u in tvm.rec.users if u.expiry > now]
                self._put("tvm", tvm.rec.name, tvm.rec)
                for u in gone:
                    self._send(tvm.rec.agent_id, pm.RemoveUser(name=u.name))


def _norm_thumb(thumbprint: str, algorithm: str) -> str:
    normalize_thumbprint_algorithm(algorithm)
    return normalize_thumbprint(thumbprint)


def _ref_thumb(ref: m.CertificateReference) -> str:
    try:
        return normalize_thumbprint(ref.thumbprint)
    except CertificateError:
        return ref.thumbprint


def _public_der(raw: bytes, fmt: str, password: str | None) -> bytes:
    """The certificate alone (DER), safe to show in GET: never the pfx or its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, pkcs12

    if fmt == "cer":
        cert = (x509.load_pem_x509_certificate(raw) if raw.lstrip().startswith(b"-----BEGIN")
                else x509.load_der_x509_certificate(raw))
    else:
        _, cert, extra = pkcs12.load_key_and_certificates(raw, (password or "").encode())
        cert = cert or extra[0]
    return cert.public_bytes(Encoding.DER)
