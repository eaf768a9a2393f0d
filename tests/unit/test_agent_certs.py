"""tvmagent.certs: certificates land in a real directory with the right names, modes, owner
and content; a bad certificate fails alone."""

from __future__ import annotations

import datetime as dt
import os
import pwd
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from tvmagent.certs import CertInstallResult, CertSpec, install_certificates

PASSWORD = "pfx-pass-Ä1"


def make_cert(
    cn: str, issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None = None
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    signer_key, issuer_name = (key, name) if issuer is None else (issuer[0], issuer[1].subject)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(signer_key, hashes.SHA256())
    )
    return key, cert


def thumb(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA1()).hex()


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def ca():
    return make_cert("test-ca")


@pytest.fixture(scope="module")
def leaf(ca):
    return make_cert("task-signing", issuer=ca)


@pytest.fixture(scope="module")
def pfx_spec(leaf, ca) -> CertSpec:
    key, cert = leaf
    data = pkcs12.serialize_key_and_certificates(
        b"task", key, cert, [ca[1]], serialization.BestAvailableEncryption(PASSWORD.encode())
    )
    return CertSpec(thumb(cert).upper(), "SHA1", "pfx", data, PASSWORD)


@pytest.fixture(scope="module")
def cer_spec(ca) -> CertSpec:
    return CertSpec(thumb(ca[1]), "sha1", "cer", ca[1].public_bytes(serialization.Encoding.PEM))


def test_pfx_and_cer_install_with_names_modes_and_content(tmp_path, leaf, ca, pfx_spec, cer_spec):
    certs = tmp_path / "tvm" / "certs"
    results = install_certificates(str(certs), [pfx_spec, cer_spec], owner=None)
    t_leaf, t_ca = thumb(leaf[1]), thumb(ca[1])
    assert [r.thumbprint for r in results] == [t_leaf, t_ca]
    assert all(r.ok and r.error is None for r in results)

    assert mode_of(certs) == 0o700
    expected = {
        f"sha1-{t_leaf}.cer": 0o644,
        f"sha1-{t_leaf}.pfx": 0o600,
        f"sha1-{t_leaf}.pfx.pw": 0o600,
        f"sha1-{t_leaf}.pem": 0o600,
        f"sha1-{t_ca}.cer": 0o644,
    }
    assert {p.name: mode_of(p) for p in certs.iterdir()} == expected
    assert sorted(results[0].files + results[1].files) == sorted(str(certs / n) for n in expected)

    # .pfx is byte-for-byte the upload; .pw opens it
    assert (certs / f"sha1-{t_leaf}.pfx").read_bytes() == pfx_spec.data
    assert (certs / f"sha1-{t_leaf}.pfx.pw").read_text() == PASSWORD
    # .cer is DER of the leaf (the cer input was PEM: it is converted)
    assert x509.load_der_x509_certificate((certs / f"sha1-{t_leaf}.cer").read_bytes()) == leaf[1]
    assert x509.load_der_x509_certificate((certs / f"sha1-{t_ca}.cer").read_bytes()) == ca[1]
    # .pem: unencrypted key that matches the leaf, then leaf, then chain
    pem = (certs / f"sha1-{t_leaf}.pem").read_bytes()
    key = serialization.load_pem_private_key(pem, password=None)
    assert b"BEGIN PRIVATE KEY" in pem  # PKCS#8, not the EC-specific format
    assert key.public_key() == leaf[1].public_key()
    assert x509.load_pem_x509_certificates(pem) == [leaf[1], ca[1]]
    # no temp files left behind
    assert not [p for p in certs.iterdir() if ".tmp-" in p.name]


def test_wrong_password_fails_that_cert_only(tmp_path, pfx_spec, cer_spec, ca):
    bad = CertSpec(pfx_spec.thumbprint, "sha1", "pfx", pfx_spec.data, "definitely-wrong-password")
    results = install_certificates(str(tmp_path / "certs"), [bad, cer_spec], owner=None)
    assert results[0] == CertInstallResult(
        pfx_spec.thumbprint.lower(),
        False,
        "cannot open the pfx: wrong password or damaged PKCS#12 data",
        [],
    )
    assert "definitely-wrong-password" not in (results[0].error or "")
    assert results[1].ok
    assert sorted(p.name for p in (tmp_path / "certs").iterdir()) == [f"sha1-{thumb(ca[1])}.cer"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"thumbprint_algorithm": "sha256"}, "thumbprint algorithm must be 'sha1'"),
        ({"thumbprint": "not-hex"}, "thumbprint must be 1 to 40 hexadecimal digits"),
        ({"thumbprint": "ab" * 20}, "thumbprint mismatch: expected " + "ab" * 20),
        ({"certificate_format": "p7b"}, "certificate format must be 'pfx' or 'cer'"),
        ({"data": b"\x00garbage"}, "data is not an X.509 certificate (DER or PEM)"),
    ],
)
def test_bad_cer_specs_fail_with_clear_errors(tmp_path, cer_spec, change, message):
    spec = CertSpec(**{**_fields(cer_spec), **change})
    [result] = install_certificates(str(tmp_path), [spec], owner=None)
    assert not result.ok
    assert result.error is not None
    assert result.error.startswith(message)
    assert result.files == []
    assert list(tmp_path.iterdir()) == []


def test_damaged_pfx_and_pfx_without_password(tmp_path, pfx_spec):
    damaged = CertSpec(pfx_spec.thumbprint, "sha1", "pfx", pfx_spec.data[:-7], PASSWORD)
    no_pw = CertSpec(pfx_spec.thumbprint, "sha1", "pfx", pfx_spec.data, None)
    results = install_certificates(str(tmp_path), [damaged, no_pw], owner=None)
    assert [r.ok for r in results] == [False, False]
    assert all("cannot open the pfx" in (r.error or "") for r in results)


def test_reinstall_replaces_files_and_tightens_dir_mode(tmp_path, cer_spec, ca):
    certs = tmp_path / "certs"
    certs.mkdir(mode=0o755)
    target = certs / f"sha1-{thumb(ca[1])}.cer"
    target.write_bytes(b"stale")
    [result] = install_certificates(str(certs), [cer_spec], owner=None)
    assert result.ok
    assert mode_of(certs) == 0o700
    assert target.read_bytes() == ca[1].public_bytes(serialization.Encoding.DER)


def test_unknown_owner_is_refused_before_writing(tmp_path, cer_spec):
    with pytest.raises(ValueError, match="not a user on this node"):
        install_certificates(str(tmp_path / "certs"), [cer_spec], owner="no-such-user-tvm")
    assert not (tmp_path / "certs").exists()


def test_files_are_chowned_to_the_owner(tmp_path, pfx_spec):
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user on this machine")
    certs = tmp_path / "certs"
    [result] = install_certificates(str(certs), [pfx_spec], owner="nobody")
    assert result.ok
    for path in [certs, *certs.iterdir()]:
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid), path


def test_spec_repr_hides_data_and_password(pfx_spec):
    text = repr(pfx_spec)
    assert PASSWORD not in text
    assert "data" not in text


def _fields(spec: CertSpec) -> dict:
    return {
        "thumbprint": spec.thumbprint,
        "thumbprint_algorithm": spec.thumbprint_algorithm,
        "certificate_format": spec.certificate_format,
        "data": spec.data,
        "password": spec.password,
    }


def test_write_failure_removes_that_certs_partial_files(tmp_path, pfx_spec, cer_spec, leaf, ca):
    certs = tmp_path / "certs"
    t_leaf = thumb(leaf[1])
    # a directory squatting on the .pem name makes the last rename of the pfx fail
    (certs / f"sha1-{t_leaf}.pem").mkdir(parents=True)
    results = install_certificates(str(certs), [pfx_spec, cer_spec], owner=None)
    assert not results[0].ok
    assert results[0].error is not None
    assert results[0].error.startswith("cannot write certificate files")
    assert results[1].ok
    names = sorted(p.name for p in certs.iterdir())
    assert names == sorted([f"sha1-{t_leaf}.pem", f"sha1-{thumb(ca[1])}.cer"])
