"""The `tvm` command. Heavy imports (trio, httpx2) happen inside commands so `--help` stays fast."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from tvmagent.cli import agent as _agent_command

from . import k8s, resources, security, store, tasks, ui
from ._common import CONTEXT, _setup_logging, lock_state_dir, refuse_empty_values

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

# --------------------------------------------------------------------------- root


@click.group(context_settings=CONTEXT)
@click.version_option("0.1.0", prog_name="tvm")
def cli() -> None:
    """TVM Batch: pools of task virtual machines, workitems, jobs and tasks on your own machines.

    Start everything locally with `tvm up`, paste the three export lines it prints, then use
    `tvm pool add`, `tvm workitem add`, `tvm task add-many` and `tvm task wait`.
    """


@cli.command(context_settings=CONTEXT)
@click.option(
    "--agents",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Local agent processes to start.",
)
@click.option(
    "--state-dir", default="./tvm-state", show_default=True, help="Database, files and agent roots."
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option(
    "--listen",
    default=None,
    help="Listen address (same as --host; 0.0.0.0 lets other machines' agents join).",
)
@click.option(
    "--public-url",
    default=None,
    help="The http(s):// URL other machines reach this coordinator at (printed join command).",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=7070,
    show_default=True,
    help="REST and agent port (0: any free port).",
)
@click.option(
    "--heartbeat-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds before a silent TVM is lost.",
)
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True)
@click.option(
    "--provision/--no-provision",
    default=True,
    show_default=True,
    help="Start more local agents when a pool needs more than are free.",
)
@click.option(
    "--tvm-root-dir",
    default=None,
    help="Where local agents' TVM roots go (made 0711) [root: /var/lib/tvm-up/<id>, else STATE_DIR/tvms].",
)
@click.option(
    "--accept-degraded",
    is_flag=True,
    help="Do not warn about what this host cannot enforce (it is still shown by `tvm status`).",
)
def up(
    agents: int,
    state_dir: str,
    host: str,
    port: int,
    heartbeat_timeout: float,
    log_level: str,
    provision: bool,
    tvm_root_dir: str | None,
    accept_degraded: bool,
    listen: str | None,
    public_url: str | None,
) -> None:
    """Run the embedded default: coordinator + SQLite + N local agents, in the foreground.

    Prints `export TVM_ENDPOINT=…`, `TVM_ACCOUNT`, `TVM_KEY` on stdout once the REST endpoint
    accepts requests. Ctrl-C or SIGTERM stops everything.
    """
    import trio

    from coordinator.daemon.embedded import run_up
    from coordinator.daemon.joining import check_public_url

    _setup_logging(log_level)
    host = listen or host
    if public_url and (why := check_public_url(public_url)):
        raise click.UsageError(why)
    _check_local_agents(agents)
    _check_state_dir(state_dir)
    sys.exit(
        trio.run(
            run_up,
            state_dir,
            host,
            port,
            agents,
            heartbeat_timeout,
            provision,
            tvm_root_dir,
            accept_degraded,
            public_url or "",
        )
    )


def _check_local_agents(agents: int) -> None:
    """More local agents than the host's memory holds is refused before anything starts (each is a
    process of its own)."""
    from coordinator.runtime.provisioner import AGENT_MIB, room_for_agents

    room = room_for_agents()
    if room is not None and agents > room:
        raise click.UsageError(
            f"--agents {agents}: each local agent takes about {AGENT_MIB} MiB, and this host has "
            f"memory for {room}"
        )


def _check_state_dir(state_dir: str) -> None:
    """Private from the first byte: umask 077 for this process, the directory created or repaired
    0700; and this process's own (the lock)."""
    from coordinator.runtime.statedir import PRIVATE_UMASK, StateDirError, secure_state_dir

    os.umask(PRIVATE_UMASK)
    try:
        state_dir = secure_state_dir(state_dir)
    except (StateDirError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    lock_state_dir(state_dir)


@cli.command(context_settings=CONTEXT)
@click.option(
    "--tasks",
    "n_tasks",
    type=click.IntRange(min=1),
    default=200,
    show_default=True,
    help="Tasks in the sample workload.",
)
@click.option("--agents", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--state-dir", default=None, help="Keep state here (default: a temporary directory).")
def quickstart(n_tasks: int, agents: int, state_dir: str | None) -> None:
    """Start a coordinator and local agents, run a sample workload end to end, print the results."""
    import trio

    from coordinator.daemon.embedded import run_quickstart

    _setup_logging("warning")
    _check_local_agents(agents)
    if state_dir is not None:
        _check_state_dir(state_dir)
    else:
        from coordinator.runtime.statedir import PRIVATE_UMASK

        os.umask(PRIVATE_UMASK)
    sys.exit(trio.run(run_quickstart, n_tasks, agents, state_dir))


@cli.group(context_settings=CONTEXT, invoke_without_command=True)
@click.option("--config", type=click.Path(dir_okay=False), help="TOML config file.")
@click.option("--host", "--listen", "host", default=None, help="Listen address [127.0.0.1].")
@click.option(
    "--public-url",
    default=None,
    help="The http(s):// URL other machines reach this coordinator at (join command, provisioners).",
)
@click.option("--port", type=int, default=None, help="Listen port [7070].")
@click.option("--state-dir", default=None, help="State directory [./tvm-state].")
@click.option("--account", default=None, help="Account name on first start [tvm].")
@click.option(
    "--store",
    default=None,
    help="postgresql://USER@HOST/DB: keep the state in PostgreSQL, shared with standby "
    "coordinators (or env TVM_STORE; a password goes in ~/.pgpass or PGPASSWORD, not here) "
    "[STATE_DIR/coordinator.db].",
)
@click.option(
    "--lease-ttl",
    type=float,
    default=None,
    help="Seconds a standby waits after the active coordinator went silent [10].",
)
@click.option("--heartbeat-timeout", type=float, default=None, help="Seconds [30].")
@click.option(
    "--link-grace",
    type=float,
    default=None,
    help="Seconds a closed agent link may stay away before its TVM is lost [5].",
)
@click.option(
    "--unknown-tvm-timeout",
    type=float,
    default=None,
    help="Seconds an unknown TVM stays in its pool before it is replaced [120].",
)
@click.option(
    "--join-token",
    default=None,
    hidden=True,
    help="Refused: use TVM_JOIN_TOKEN or --join-token-file.",
)
@click.option(
    "--join-token-file",
    default=None,
    help="0600 file holding the token agents must present "
    "(or env TVM_JOIN_TOKEN; default: generated, kept in STATE_DIR/join-token).",
)
@click.option(
    "--tls-cert", default=None, help="PEM certificate (chain): serve https:// and wss://."
)
@click.option("--tls-key", default=None, help="PEM private key for --tls-cert.")
@click.option(
    "--port-range", default=None, help="Ports for communicating pools, LOW-HIGH [1100-32767]."
)
@click.option(
    "--ports-per-tvm", type=int, default=None, help="Ports each TVM of such a pool gets [50]."
)
@click.option("--log-level", default=None, help="debug|info|warning|error [info].")
@click.option(
    "--log-format",
    default=None,
    help="json (one object per line, for journald/collectors) or console [json].",
)
@click.pass_context
def coordinator(ctx: click.Context, config: str | None, **flags: Any) -> None:
    """Run the coordinator service (REST API + agent websocket) in the foreground (or `tvm
    coordinator install-service`)."""
    if ctx.invoked_subcommand is not None:
        given = [k for k, v in flags.items() if v is not None] + (["config"] if config else [])
        if given:  # they would be dropped without a word
            shown = ", ".join("--" + k.replace("_", "-") for k in sorted(given))
            raise click.UsageError(
                f"{shown}: options of the coordinator `tvm coordinator` runs, not of"
                f" `{ctx.invoked_subcommand}`; put its own options after it (see its --help)"
            )
        return
    import trio

    from coordinator.daemon.embedded import run_coordinator_main
    from coordinator.runtime.statedir import PRIVATE_UMASK
    from protocol.config import ConfigError, load_coordinator_config
    from tvmagent.tokens import TokenError, resolve_token

    if flags.pop("join_token") is not None:
        raise click.UsageError(
            "--join-token is not accepted on the command line (ps shows command lines to "
            "every user): set TVM_JOIN_TOKEN or pass --join-token-file PATH (a 0600 file)"
        )
    if os.environ.get("TVM_JOIN_TOKEN"):
        flags["join_token"] = os.environ["TVM_JOIN_TOKEN"]
    if flags.get("store") and _has_password(flags["store"]):
        raise click.UsageError(
            "--store must not carry a password (ps shows command lines to every user): put it "
            "in ~/.pgpass, PGPASSWORD, TVM_STORE or the config file"
        )
    if flags.get("store") is None and os.environ.get("TVM_STORE"):
        flags["store"] = os.environ["TVM_STORE"]
    os.umask(
        PRIVATE_UMASK
    )  # state, keys and tokens: nothing this process writes is for other users
    try:
        cfg = load_coordinator_config(config, flags)
        cfg.join_token = resolve_token(cfg.join_token, cfg.join_token_file, config, "join-token")
    except (ConfigError, TokenError) as exc:
        raise click.ClickException(str(exc)) from None
    from coordinator.daemon.joining import check_public_url
    from coordinator.runtime.provisioners.config import (
        ProvisionerConfigError,
        parse_provisioners,
    )

    if cfg.public_url and (why := check_public_url(cfg.public_url)):
        raise click.ClickException(why)
    try:
        provisioners = parse_provisioners(cfg.provisioner, config or "config")
    except ProvisionerConfigError as exc:
        raise click.ClickException(str(exc)) from None
    _check_state_dir(cfg.state_dir)
    _setup_logging(cfg.log_level, cfg.log_format)
    sys.exit(trio.run(run_coordinator_main, cfg, provisioners))


@coordinator.command("install-service", context_settings=CONTEXT)
@click.option(
    "--host",
    default=None,
    help="Listen address written to a new coordinator.toml: 0.0.0.0 (or this machine's address)"
    " when agents run on other machines [127.0.0.1].",
)
@click.option(
    "--port", type=int, default=None, help="Listen port for a new coordinator.toml [7070]."
)
@click.option(
    "--public-url",
    default=None,
    help="The http(s):// URL other machines reach this coordinator at, for a new coordinator.toml.",
)
@click.option(
    "--unit-dir",
    default="/etc/systemd/system",
    show_default=True,
    help="Where the unit file (tvm-coordinator.service) and its drop-in directory are written.",
)
@click.option(
    "--config-dir",
    default="/etc/tvm",
    show_default=True,
    help="Where coordinator.toml is written (0600), unless one is there already (it is kept).",
)
def install_service(
    host: str | None, port: int | None, public_url: str | None, unit_dir: str, config_dir: str
) -> None:
    """Write and enable a systemd unit running this coordinator. Its state (keys, join token,
    database) goes to /var/lib/tvm-coordinator; a `tvm` installed under /root, /home or /tmp, which
    the unit hides, is made readable to it by a drop-in."""
    from coordinator.cli.install_service import install_coordinator_service
    from tvmagent.install_service import InstallError, running_tvm

    try:
        for line in install_coordinator_service(
            host=host,
            port=port,
            public_url=public_url,
            unit_dir=unit_dir,
            config_dir=config_dir,
            tvm_bin=running_tvm(),
        ):
            click.echo(line)
    except InstallError as exc:
        raise click.ClickException(str(exc)) from None


def _has_password(url: str) -> bool:
    from coordinator.runtime.pgstore import has_password

    return has_password(url)


# `tvm agent ...` is tvmagent's own command line (also `python -m tvmagent ...`).
cli.add_command(_agent_command)
for _register in (
    resources.register,
    tasks.register,
    security.register,
    ui.register,
    store.register,
    k8s.register,
):
    _register(cli)
refuse_empty_values(cli)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="tvm")
