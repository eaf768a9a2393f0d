"""Pure parts: the core's certificate / port-block / pool-membership bookkeeping (no sockets, no
Trio). Agent authentication decisions are in test_agent_auth.py."""

from __future__ import annotations

import base64
import datetime as dt

import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from msgspec.structs import astuple

from coordinator.common import models as m
from coordinator.common.errors import ApiError
from coordinator.core import CoordinatorState
from protocol import messages as pm


class _Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


# ------------------------------------------------------------------ certificates in the core


def _cer() -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "core")])
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
    der = cert.public_bytes(serialization.Encoding.DER)
    return cert.fingerprint(hashes.SHA1()).hex(), base64.b64encode(der).decode()


def _core() -> CoordinatorState:
    return CoordinatorState("acct", clock=_Clock())


def _hello(core: CoordinatorState, agent: str, ip: str) -> None:
    core.agent_hello(pm.Hello(agent_id=agent, token="", ip_address=ip))


def test_certificate_add_reference_join_delete_and_restore():
    core = _core()
    thumb, data = _cer()
    core.add_certificate(
        m.CertificateAdd(
            thumbprint=thumb.upper(),
            thumbprint_algorithm="sha1",
            data=data,
            certificate_format="cer",
        )
    )
    fx = core.take_effects()
    assert [(w.kind, w.key) for w in fx.writes] == [("cert", f"sha1-{thumb}")]
    with pytest.raises(ApiError) as ei:
        core.add_pool(
            m.PoolAdd(
                name="p", certificate_references=[m.CertificateReference(thumbprint="ab" * 20)]
            )
        )
    assert ei.value.code == "CertificateNotFound"
    assert "p" not in core.pools
    assert not core.take_effects().writes
    _hello(core, "a1", "10.0.0.1")
    core.add_pool(
        m.PoolAdd(
            name="p",
            target_dedicated=1,
            certificate_references=[m.CertificateReference(thumbprint=thumb.upper())],
        )
    )
    joins = [
        msg for _, msg in map(astuple, core.take_effects().sends) if isinstance(msg, pm.JoinPool)
    ]
    assert len(joins) == 1
    assert [c.thumbprint for c in joins[0].certificates] == [thumb]
    assert joins[0].port_range_low == 0  # not a communicating pool
    with pytest.raises(ApiError) as ei:
        core.delete_certificate(f"sha1-{thumb}")
    assert (ei.value.status, ei.value.code) == (409, "CertificateInUse")
    # Restore from the journal rows the effects described.
    rows = [("cert", f"sha1-{thumb}", msgspec.msgpack.encode(core.certificates[f"sha1-{thumb}"]))]
    again = _core()
    again.restore(rows)
    assert again.get_certificate(f"SHA1-{thumb.upper()}").thumbprint == thumb
    for bad in ("nodash", f"md5-{thumb}", "sha1-xyz"):
        with pytest.raises(ApiError) as ei:
            again.get_certificate(bad)
        assert ei.value.status == 400


def test_communicating_pools_get_disjoint_port_blocks_and_member_updates():
    core = _core()
    for i in range(3):
        _hello(core, f"a{i}", f"10.0.0.{i + 1}")
    core.take_effects()
    core.add_pool(m.PoolAdd(name="comm", target_dedicated=2, communication=True))
    core.add_pool(m.PoolAdd(name="other", target_dedicated=1, communication=True))
    fx = core.take_effects()
    joins = {msg.tvm_name: msg for _, msg in map(astuple, fx.sends) if isinstance(msg, pm.JoinPool)}
    blocks = sorted((j.port_range_low, j.port_range_high) for j in joins.values())
    assert len(blocks) == 3
    assert all(lo >= 1100 and hi < 32768 for lo, hi in blocks)
    assert all(blocks[i][1] < blocks[i + 1][0] for i in range(2))  # across pools too
    last_members: dict[str, list[str]] = {}
    for agent, msg in map(astuple, fx.sends):
        if isinstance(msg, pm.PoolMembers):
            last_members[agent] = msg.addresses
    comm = {t.rec.agent_id for t in core.tvms.values() if t.rec.pool == "comm"}
    comm_ips = sorted(core.agents[a].ip for a in comm)
    assert all(last_members[a] == comm_ips for a in comm)


@pytest.mark.parametrize(
    ("text", "per", "why"),
    [
        ("40000-40100", 50, "ephemeral"),
        ("80-2000", 50, "below the minimum 1100"),
        ("abc", 50, "LOW-HIGH"),
        ("2000-1000", 50, "greater than high"),
        ("2000-2010", 50, "between 1 and the range size"),
    ],
)
def test_coordinator_port_range_config_errors(text, per, why):
    from protocol.config import ConfigError, load_coordinator_config

    with pytest.raises(ConfigError) as ei:
        load_coordinator_config(None, {"port_range": text, "ports_per_tvm": per}, environ={})
    assert why in str(ei.value)
    assert "port-range" in str(ei.value)


def test_certificate_data_and_passwords_never_show_in_reprs():
    from coordinator.core import CertRec

    f = pm.CertFile(
        thumbprint="ab" * 20,
        thumbprint_algorithm="sha1",
        certificate_format="pfx",
        data=b"SECRET-BYTES",
        password="SECRET-PW",
    )
    join = pm.JoinPool(pool="p", tvm_name="t", account="a", certificates=[f])
    rec = CertRec(
        thumbprint="ab" * 20,
        thumbprint_algorithm="sha1",
        certificate_format="pfx",
        data=b"SECRET-BYTES",
        password="SECRET-PW",
    )
    for text in (repr(join), str(join), repr(rec), repr([rec])):
        assert "SECRET" not in text
        assert "sha1-abab" in text


def test_members_are_updated_when_a_tvm_leaves():
    core = _core()
    for i in range(2):
        _hello(core, f"a{i}", f"10.0.0.{i + 1}")
    core.add_pool(m.PoolAdd(name="comm", target_dedicated=2, communication=True))
    for t in list(core.tvms.values()):
        core.agent_message(t.rec.agent_id, pm.TvmReady(tvm_name=t.rec.name))
    core.take_effects()
    gone = sorted(core.tvms.values(), key=lambda t: t.rec.name)[0]
    stays = sorted(core.tvms.values(), key=lambda t: t.rec.name)[1]
    core.delete_tvm("comm", gone.rec.name)
    core.agent_message(gone.rec.agent_id, pm.TvmLeft(tvm_name=gone.rec.name))
    members = [
        msg.addresses
        for agent, msg in map(astuple, core.take_effects().sends)
        if isinstance(msg, pm.PoolMembers) and agent == stays.rec.agent_id
    ]
    assert members[-1] == [core.agents[stays.rec.agent_id].ip]
