"""What every `tvm` command group shares: options, output, the client and its errors."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click

CONTEXT: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _setup_logging(level: str = "info", fmt: str = "console") -> None:
    from protocol.logsetup import configure_logging

    configure_logging(level, fmt)


# --------------------------------------------------------------------------- output helpers


def _to_plain(obj: Any) -> Any:
    import msgspec

    return msgspec.to_builtins(obj)


def _emit(
    ctx_output: str,
    obj: Any,
    columns: list[tuple[str, Callable[[Any], Any]]] | None = None,
    title: str | None = None,
) -> None:
    plain = _to_plain(obj)
    if ctx_output == "json":
        click.echo(json.dumps(plain, indent=2, sort_keys=False))
        return
    if columns is None or not isinstance(obj, list):
        click.echo(json.dumps(plain, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for name, _ in columns:
        table.add_column(name)
    for item in obj:
        table.add_row(*[("" if (v := fn(item)) is None else str(v)) for _, fn in columns])
    Console().print(table)


def output_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--output",
        "-o",
        type=click.Choice(["table", "json"]),
        default="table",
        show_default=True,
        help="Output format (json for scripts).",
    )(f)


class NonEmptyText(click.ParamType):
    """Text that is not empty: `--recurrence "$INTERVAL"` with the variable unset must not quietly
    mean "no schedule"."""

    name = "text"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value.strip():
            self.fail("must not be empty (an unset shell variable?)", param, ctx)
        return value


class Seconds(click.FloatRange):
    """A duration: 0 or more seconds, "inf" for no limit; "nan" (which no range check catches) is
    refused."""

    name = "number of seconds"

    def __init__(self) -> None:
        super().__init__(min=0)

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str:
        return "SECONDS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if rv != rv:
            self.fail("is not a number of seconds", param, ctx)
        return rv


CREDENTIALS = ("endpoint", "account", "key")  # empty: taken from the environment, as documented


def refuse_empty_values(group: click.Group) -> None:
    """Every text option of every command under `group` refuses an empty value, except where empty
    is its default (a prefix) or means "from the environment" (the credentials)."""
    for cmd in group.commands.values():
        if isinstance(cmd, click.Group):
            refuse_empty_values(cmd)
            continue
        for p in cmd.params:
            if (
                isinstance(p, click.Option)
                and isinstance(p.type, click.types.StringParamType)
                and not p.is_flag
                and p.default != ""
                and p.name not in CREDENTIALS
            ):
                p.type = NonEmptyText()


def lock_state_dir(state_dir: str) -> None:
    """One coordinator per state directory: a second one (another `tvm up` in the same place, a
    migration while it runs) would write the same database and start the same local agents."""
    from protocol.hostio import InUse, hold_lock

    try:
        hold_lock(
            os.path.join(state_dir, "coordinator.lock"),
            f"the state directory {state_dir}",
            "a coordinator runs there; stop it first (or use another --state-dir)",
        )
    except InUse as exc:
        raise click.ClickException(str(exc)) from None


def credentials(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--key", envvar="TVM_KEY", help="Account key (env TVM_KEY).", show_envvar=False
    )(f)
    f = click.option("--account", envvar="TVM_ACCOUNT", help="Account name (env TVM_ACCOUNT).")(f)
    f = click.option("--endpoint", envvar="TVM_ENDPOINT", help="Service URL (env TVM_ENDPOINT).")(f)
    return f


def _client(endpoint: str | None, account: str | None, key: str | None):  # noqa: ANN202
    from coordinator.client import BatchError, Client

    try:
        client = Client(endpoint, account, key)
    except BatchError as exc:
        raise click.ClickException(exc.message) from None
    # Closed with the command (also when it exits early): a command run in-process (a script,
    # a test) would otherwise keep its kept-alive connection open until collected.
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(client.close)
    return client


def _run(fn: Callable[[], Any]) -> Any:
    from coordinator.client import BatchError

    try:
        return fn()
    except BatchError as exc:
        click.echo(f"error: {exc.code}: {exc.message}", err=True)
        sys.exit(1)


def _mk(endpoint: str | None, account: str | None, key: str | None):  # noqa: ANN202
    return _client(endpoint, account, key)
