"""`tvm agent` / `python -m tvmagent`: the agent's command line (click), usable on its own or as a
sub-command of the `tvm` CLI. The join token never comes from the command line (`ps` shows it to every
user): TVM_AGENT_TOKEN, --token-file or a 0600 --config file."""

from __future__ import annotations

import os
import sys

import click

from .tokens import COMMAND_LINE_REFUSED, TokenError, resolve_token

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group("agent", context_settings=CONTEXT, invoke_without_command=True)
@click.option("--config", type=click.Path(dir_okay=False), help="TOML config file.")
@click.option(
    "--coordinator",
    "coordinator_url",
    default=None,
    envvar="TVM_AGENT_COORDINATOR",
    help="Coordinator URL (http://host:port or ws://host:port/agent).",
)
@click.option(
    "--token", default=None, hidden=True, help="Refused: use TVM_AGENT_TOKEN or --token-file."
)
@click.option(
    "--token-file", default=None, help="0600 file holding the join token (or env TVM_AGENT_TOKEN)."
)
@click.option(
    "--root", default=None, help="TVM root directory (tasks/, shared/, start/, certs/; made 0711)."
)
@click.option(
    "--private-dir", default=None, help="The agent's id and credential, 0700 [ROOT.private]."
)
@click.option(
    "--name", default=None, help="Agent id (default: generated once, kept in ROOT/agent-id)."
)
@click.option("--task-user", default=None, help="Run tasks as this Linux user (root agents).")
@click.option(
    "--task-isolation",
    default=None,
    envvar="TVM_AGENT_TASK_ISOLATION",
    help="users: one unprivileged user per running task (root agents); none [users].",
)
@click.option(
    "--ca-file", default=None, help="CA certificate to trust for wss:// / https:// coordinators."
)
@click.option("--log-level", default=None, help="debug|info|warning|error [info].")
@click.option("--log-format", default=None, help="json or console [json].")
@click.pass_context
def agent(
    ctx: click.Context,
    config: str | None,
    coordinator_url: str | None,
    token: str | None,
    token_file: str | None,
    root: str | None,
    private_dir: str | None,
    name: str | None,
    task_user: str | None,
    task_isolation: str | None,
    ca_file: str | None,
    log_level: str | None,
    log_format: str | None,
) -> None:
    """Run a TVM agent in the foreground (or `tvm agent install-service`).

    The join token comes from TVM_AGENT_TOKEN, --token-file or a 0600 --config file, never from the
    command line."""
    if ctx.invoked_subcommand is not None:
        return
    import trio

    from protocol.config import ConfigError, load_agent_config
    from protocol.logsetup import configure_logging

    from .agent import AgentOptions
    from .layout import LayoutError
    from .main import run_agent

    if token is not None:
        raise click.UsageError(f"--token: {COMMAND_LINE_REFUSED}")
    try:
        cfg = load_agent_config(
            config,
            {
                "coordinator": coordinator_url,
                "root": root,
                "token_file": token_file,
                "private_dir": private_dir,
                "name": name,
                "task_user": task_user,
                "log_level": log_level,
                "log_format": log_format,
                "task_isolation": task_isolation,
                "ca_file": ca_file,
            },
        )
        cfg.token = resolve_token(cfg.token, cfg.token_file, config)
    except (ConfigError, TokenError) as exc:
        raise click.ClickException(str(exc)) from None
    if not cfg.coordinator or not cfg.token:
        raise click.UsageError(
            "--coordinator and a join token are required: TVM_AGENT_TOKEN, --token-file "
            "or `token`/`token-file` in a 0600 --config file"
        )
    configure_logging(cfg.log_level, cfg.log_format)
    opts = AgentOptions(
        coordinator=cfg.coordinator,
        token=cfg.token,
        root=cfg.root,
        agent_id=cfg.name,
        private_dir=cfg.private_dir,
        heartbeat_interval=cfg.heartbeat_interval,
        reconnect_max_backoff=cfg.reconnect_max_backoff,
        task_user=cfg.task_user or None,
        use_bwrap=cfg.use_bwrap,
        drain_grace=cfg.drain_grace,
        retention_sweep_interval=cfg.retention_sweep_interval,
        task_isolation=cfg.task_isolation,
        ca_file=cfg.ca_file or None,
    )
    try:
        _lock_agent_dirs(opts.root, opts.private_dir)
        sys.exit(trio.run(run_agent, opts))
    except LayoutError as exc:
        raise click.ClickException(str(exc)) from None


def _lock_agent_dirs(root: str, private_dir: str) -> None:
    """One agent per TVM root and identity: a second one would run its tasks in the same
    directories, under the same name, and take the first one's place at the coordinator."""
    from protocol.hostio import InUse, hold_lock

    from .layout import prepare_agent_dirs

    hint = "an agent runs with it; stop it first (or give this one another --root)"
    try:
        for d in (os.path.abspath(root), prepare_agent_dirs(root, private_dir)):
            hold_lock(os.path.join(d, ".agent.lock"), f"the agent directory {d}", hint)
    except InUse as exc:
        raise click.ClickException(str(exc)) from None


@agent.command("install-service", context_settings=CONTEXT)
@click.option(
    "--coordinator",
    "coordinator_url",
    required=True,
    help="Coordinator URL (http://host:port or ws://host:port/agent; several, comma-separated: "
    "an active coordinator and its standbys).",
)
@click.option(
    "--token", default=None, hidden=True, help="Refused: use TVM_AGENT_TOKEN or --token-file."
)
@click.option(
    "--token-file", default=None, help="0600 file holding the join token (or env TVM_AGENT_TOKEN)."
)
@click.option(
    "--root",
    default="/var/lib/tvm-agent",
    show_default=True,
    help="The TVM root (task directories, shared/, start/, certs/); not under /usr, /boot or "
    "/efi, which the unit makes read-only.",
)
@click.option(
    "--unit-dir",
    default="/etc/systemd/system",
    show_default=True,
    help="Where the unit file (tvm-agent.service) is written.",
)
@click.option(
    "--config-dir",
    default="/etc/tvm",
    show_default=True,
    help="Where agent.toml is written (0600: the join token is in it).",
)
def install_service(
    coordinator_url: str,
    token: str | None,
    token_file: str | None,
    root: str,
    unit_dir: str,
    config_dir: str,
) -> None:
    """Write and enable a systemd unit running this agent (the token goes into a 0600 agent.toml)."""
    from .install_service import InstallError, install_agent_service, running_tvm

    if token is not None:
        raise click.UsageError(f"--token: {COMMAND_LINE_REFUSED}")
    try:
        token = resolve_token(os.environ.get("TVM_AGENT_TOKEN", ""), token_file or "", None)
    except TokenError as exc:
        raise click.ClickException(str(exc)) from None
    if not token:
        raise click.UsageError(
            "a join token is required: set TVM_AGENT_TOKEN or pass --token-file PATH"
        )
    try:
        for line in install_agent_service(
            coordinator_url,
            token,
            root,
            unit_dir=unit_dir,
            config_dir=config_dir,
            tvm_bin=running_tvm(),
        ):
            click.echo(line)
    except InstallError as exc:
        raise click.ClickException(str(exc)) from None


def main(argv: list[str] | None = None) -> None:
    # Named as under the tvm CLI: usage and error lines read the same either way.
    agent.main(args=argv, prog_name="tvm agent")
