"""`tvm ui`: print a one-time login URL for the web dashboard at /ui/.

The command signs a request with the account key (like every other command); the coordinator
answers a short-lived single-use token, so the key itself never goes into a URL or a browser.
"""

from __future__ import annotations

import json
from typing import Any

import click

from ._common import CONTEXT, _mk, _run, credentials, output_option


def register(cli: click.Group) -> None:
    @cli.command("ui", context_settings=CONTEXT)
    @credentials
    @click.option(
        "--allow-actions",
        is_flag=True,
        help="The session may terminate tasks and jobs and resize pools (default: read-only).",
    )
    @click.option("--open", "open_browser", is_flag=True, help="Also open it in a web browser.")
    @output_option
    def ui(
        endpoint: str | None,
        account: str | None,
        key: str | None,
        allow_actions: bool,
        open_browser: bool,
        output: str,
    ) -> None:
        """Print a one-time login URL for the dashboard (valid 2 minutes, usable once)."""
        from coordinator.client._http import _Call

        client = _mk(endpoint, account, key)

        def parse(r: Any) -> dict[str, Any]:
            return dict(r.json())

        got = _run(
            lambda: client._call(
                _Call("POST", "/ui/api/login-token", {"write": allow_actions}, parse=parse)
            )
        )
        url = client.endpoint.rstrip("/") + got["path"]
        mode = "actions allowed" if got["write"] else "read-only"
        if output == "json":
            click.echo(
                json.dumps(
                    {"url": url, "write": got["write"], "expiresInSeconds": got["expiresInSeconds"]}
                )
            )
            return
        click.echo(url)
        click.echo(f"(one-time login, {mode}; expires in {got['expiresInSeconds']} s)", err=True)
        if open_browser:
            import webbrowser

            webbrowser.open(url)
