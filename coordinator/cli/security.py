"""`tvm cert ...`, `tvm keys regenerate`, `tvm agent revoke`, `tvm token ...`, `tvm tvm user ...`."""

from __future__ import annotations

import base64
import os
from typing import Any

import click

from ._common import CONTEXT, _client, _emit, _run, credentials, output_option

CERT_COLS = [
    ("thumbprint", lambda c: c.thumbprint),
    ("format", lambda c: c.certificate_format),
    ("state", lambda c: c.state),
    ("subject", lambda c: c.subject),
    ("expiry", lambda c: c.expiry),
    ("pools", lambda c: ",".join(c.pools)),
]
USER_COLS = [
    ("name", lambda u: u.name),
    ("expiry", lambda u: u.expiry_time),
    ("admin", lambda u: u.is_admin),
]


def register(cli: click.Group) -> None:
    cli.add_command(cert)
    cli.add_command(keys)
    cli.add_command(token)
    agent_group = cli.commands.get("agent")
    if isinstance(agent_group, click.Group):
        agent_group.add_command(agent_revoke)
    tvm_group = cli.commands.get("tvm")
    if isinstance(tvm_group, click.Group):
        tvm_group.add_command(tvm_user)


def _thumbprint_of(raw: bytes, fmt: str, password: str | None) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.serialization import pkcs12

    try:
        cert: x509.Certificate | None
        if fmt == "cer":
            cert = (
                x509.load_pem_x509_certificate(raw)
                if raw.lstrip().startswith(b"-----BEGIN")
                else x509.load_der_x509_certificate(raw)
            )
        else:
            _, cert, extra = pkcs12.load_key_and_certificates(raw, (password or "").encode())
            cert = cert or (extra[0] if extra else None)
        if cert is None:
            raise ValueError("no certificate in the pfx")
    except ValueError:
        raise click.ClickException(
            f"cannot read the {fmt} file (wrong password or not a {fmt} file); "
            "pass --thumbprint to let the service check it"
        ) from None
    return cert.fingerprint(hashes.SHA1()).hex()


# --------------------------------------------------------------------------- certificates


@click.group(context_settings=CONTEXT)
def cert() -> None:
    """Account certificates (pfx with password, or cer) that pools install on their TVMs."""


@cert.command("add")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["pfx", "cer"]),
    default=None,
    help="Default: from the file name (.cer/.crt/.pem -> cer, else pfx).",
)
@click.option(
    "--password-env",
    default="TVM_CERT_PASSWORD",
    show_default=True,
    help="Environment variable holding the pfx password (never on the command line).",
)
@click.option(
    "--thumbprint", default=None, help="sha1 thumbprint (default: computed from the file)."
)
@credentials
@output_option
def cert_add(
    path: str, fmt: str | None, password_env: str, thumbprint: str | None, output: str, **cred: Any
) -> None:
    """Add the certificate in PATH."""
    with open(path, "rb") as f:
        raw = f.read()
    fmt = fmt or (
        "cer" if os.path.splitext(path)[1].lower() in (".cer", ".crt", ".pem", ".der") else "pfx"
    )
    password = os.environ.get(password_env) if fmt == "pfx" else None
    if fmt == "pfx" and password is None:
        password = click.prompt("pfx password", hide_input=True, default="", show_default=False)
    thumb = thumbprint or _thumbprint_of(raw, fmt, password)
    c = _client(**cred)
    _emit(
        output,
        _run(
            lambda: c.certificates.add(
                thumb, base64.b64encode(raw).decode(), certificate_format=fmt, password=password
            )
        ),
    )


@cert.command("list")
@credentials
@output_option
def cert_list(output: str, **cred: Any) -> None:
    """List certificates."""
    c = _client(**cred)
    _emit(output, _run(c.certificates.list), CERT_COLS)


@cert.command("show")
@click.argument("thumbprint")
@credentials
@output_option
def cert_show(thumbprint: str, output: str, **cred: Any) -> None:
    """Show one certificate (THUMBPRINT or sha1-THUMBPRINT)."""
    c = _client(**cred)
    _emit(output, _run(lambda: c.certificates.get(thumbprint.removeprefix("sha1-"))))


@cert.command("delete")
@click.argument("thumbprint")
@credentials
@output_option
def cert_delete(thumbprint: str, output: str, **cred: Any) -> None:
    """Delete a certificate (refused while a pool references it)."""
    c = _client(**cred)
    thumb = thumbprint.removeprefix("sha1-")
    _run(lambda: c.certificates.delete(thumb))
    _emit(output, {"deleted": f"sha1-{thumb.lower()}"})


# --------------------------------------------------------------------------- keys and agents


@click.group(context_settings=CONTEXT)
def keys() -> None:
    """Account keys (SharedKey): two of them, so one can be rotated while the other is in use."""


@keys.command("regenerate")
@click.argument("key_name", type=click.Choice(["primary", "secondary"]))
@credentials
@output_option
def keys_regenerate(key_name: str, output: str, **cred: Any) -> None:
    """Replace KEY_NAME with a new random key; prints both keys."""
    c = _client(**cred)
    _emit(output, _run(lambda: c.account_keys.regenerate(key_name)))


@click.command("revoke", context_settings=CONTEXT)
@click.argument("agent_id")
@credentials
@output_option
def agent_revoke(agent_id: str, output: str, **cred: Any) -> None:
    """Revoke an agent: its link is closed, its TVM leaves its pool, and the id can never join again."""
    c = _client(**cred)
    _run(lambda: c.agents.revoke(agent_id))
    _emit(output, {"revoked": agent_id})


# --------------------------------------------------------------------------- agent join tokens

TOKEN_COLS = [
    ("id", lambda t: t.id),
    ("created", lambda t: t.creation_time),
    ("expires", lambda t: t.expiry_time or "never"),
    ("single-use", lambda t: t.single_use),
    ("used-by", lambda t: t.used_by),
]


@click.group(context_settings=CONTEXT)
def token() -> None:
    """Join tokens for agents that expire and/or enrol a single agent (besides the account's join token)."""


@token.command("create")
@click.option(
    "--expires",
    "expires",
    default=None,
    metavar="DURATION",
    help="ISO 8601 duration after which the token enrols no new agent (e.g. PT1H); default: never",
)
@click.option("--single-use", is_flag=True, help="the token enrols exactly one agent id")
@credentials
@output_option
def token_create(expires: str | None, single_use: bool, output: str, **cred: Any) -> None:
    """Create a join token; its secret is printed this once (give it to the agent, not on a command line)."""
    c = _client(**cred)
    _emit(output, _run(lambda: c.agents.create_token(expires_in=expires, single_use=single_use)))


@token.command("list")
@credentials
@output_option
def token_list(output: str, **cred: Any) -> None:
    """Agent join tokens (never their secrets)."""
    c = _client(**cred)
    _emit(output, _run(lambda: c.agents.list_tokens()), TOKEN_COLS)


@token.command("revoke")
@click.argument("token_id")
@credentials
@output_option
def token_revoke(token_id: str, output: str, **cred: Any) -> None:
    """Revoke a join token: it enrols no further agent (agents it enrolled keep their credential)."""
    c = _client(**cred)
    _run(lambda: c.agents.revoke_token(token_id))
    _emit(output, {"revoked": token_id})


# --------------------------------------------------------------------------- remote login


@click.group("user", context_settings=CONTEXT)
def tvm_user() -> None:
    """Remote-login users on a TVM (SSH public key, expiry)."""


@tvm_user.command("add")
@click.argument("pool")
@click.argument("tvm_name")
@click.argument("name")
@click.option("--ssh-key-file", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--expiry", default=None, help="RFC 3339 time (default: one day from now).")
@click.option("--admin", is_flag=True, help="Add the user to sudo.")
@credentials
@output_option
def tvm_user_add(
    pool: str,
    tvm_name: str,
    name: str,
    ssh_key_file: str,
    expiry: str | None,
    admin: bool,
    output: str,
    **cred: Any,
) -> None:
    """Add user NAME to a TVM."""
    with open(ssh_key_file) as f:
        key = f.read().strip()
    c = _client(**cred)
    _emit(
        output,
        _run(
            lambda: c.tvm_users.add(pool, tvm_name, name, key, expiry_time=expiry, is_admin=admin)
        ),
    )
    settings = _run(lambda: c.tvm_users.remote_login_settings(pool, tvm_name))
    click.echo(
        f"ssh -p {settings.remote_login_port} {name}@{settings.remote_login_ip_address}", err=True
    )


@tvm_user.command("list")
@click.argument("pool")
@click.argument("tvm_name")
@credentials
@output_option
def tvm_user_list(pool: str, tvm_name: str, output: str, **cred: Any) -> None:
    """List a TVM's remote-login users."""
    c = _client(**cred)
    _emit(output, _run(lambda: c.tvm_users.list(pool, tvm_name)), USER_COLS)


@tvm_user.command("delete")
@click.argument("pool")
@click.argument("tvm_name")
@click.argument("name")
@credentials
@output_option
def tvm_user_delete(pool: str, tvm_name: str, name: str, output: str, **cred: Any) -> None:
    """Delete a remote-login user (the agent removes the Linux user and its home)."""
    c = _client(**cred)
    _run(lambda: c.tvm_users.delete(pool, tvm_name, name))
    _emit(output, {"deleted": name})
