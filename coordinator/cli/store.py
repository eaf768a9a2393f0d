"""`tvm store ...`: the coordinator's state store."""

from __future__ import annotations

import os

import click

from ._common import CONTEXT, _emit, lock_state_dir, output_option


@click.group(context_settings=CONTEXT)
def store() -> None:
    """The coordinator's state store (SQLite in STATE_DIR, or PostgreSQL)."""


@store.command(context_settings=CONTEXT)
@click.option(
    "--state-dir",
    required=True,
    help="The stopped coordinator's state directory (its coordinator.db is only read).",
)
@click.option(
    "--to",
    "url",
    default=None,
    help="postgresql://USER@HOST/DB of an empty database (or env TVM_STORE; a password goes in "
    "~/.pgpass or PGPASSWORD).",
)
@output_option
def migrate(state_dir: str, url: str | None, output: str) -> None:
    """Copy a coordinator's SQLite state into PostgreSQL.

    Then run `tvm coordinator --store URL` (on as many machines as you want standbys): pools, jobs,
    tasks, account keys, the join token and uploaded files all come along; agents keep their
    credentials.
    """
    from coordinator.runtime.pgstore import StoreUnreachable, has_password, is_postgres_url
    from coordinator.runtime.storemigrate import MigrateError
    from coordinator.runtime.storemigrate import migrate as run

    if url and has_password(url):
        raise click.UsageError(
            "--to must not carry a password (ps shows command lines to every user): put it in "
            "~/.pgpass, PGPASSWORD or TVM_STORE"
        )
    url = url or os.environ.get("TVM_STORE")
    if not url or not is_postgres_url(url):
        raise click.UsageError("--to must be a postgresql://USER@HOST/DB URL (or set TVM_STORE)")

    def progress(n: int) -> None:
        click.echo(f"  {n} objects copied", err=True)

    if os.path.isdir(state_dir):
        lock_state_dir(state_dir)
    try:
        objects, meta, files = run(state_dir, url, progress)
    except (MigrateError, StoreUnreachable) as exc:
        raise click.ClickException(str(exc)) from None
    if output == "json":
        _emit(output, {"objects": objects, "metaRows": meta, "files": files})
    else:
        click.echo(
            f"migrated {objects} objects, {meta} account/agent rows and {files} uploaded files"
            " into the store"
        )


def register(cli: click.Group) -> None:
    cli.add_command(store)
