"""`tvm k8s manifests`: Kubernetes manifests for agents as pods, from a `kubernetes` provisioner of
the coordinator's config (or the defaults), printed as JSON (`kubectl apply -f -` reads it)."""

from __future__ import annotations

import json
import os
import tomllib

import click

from ._common import CONTEXT


def register(cli: click.Group) -> None:
    @cli.group("k8s", context_settings=CONTEXT)
    def k8s() -> None:
        """Kubernetes: agents as pods."""

    @k8s.command("manifests", context_settings=CONTEXT)
    @click.option("--config", type=click.Path(dir_okay=False), help="The coordinator's TOML.")
    @click.option("--provisioner", "name", default=None, help="A kubernetes provisioner there.")
    @click.option(
        "--coordinator", "url", default=None, help="URL the pods reach the coordinator at."
    )
    @click.option(
        "--token-file",
        type=click.Path(dir_okay=False),
        default=None,
        help="File holding the join token for the Secret (or env TVM_JOIN_TOKEN).",
    )
    @click.option("--replicas", type=int, default=None, help="Agents (pods).")
    @click.option("--vm-size", default="small", show_default=True, help="Cores/memory per pod.")
    def manifests(
        config: str | None,
        name: str | None,
        url: str | None,
        token_file: str | None,
        replicas: int | None,
        vm_size: str,
    ) -> None:
        """Print a Secret with the join token and a StatefulSet (or Job) of agent pods."""
        import msgspec

        from coordinator.core.records import VM_SIZES
        from coordinator.runtime.provisioners.config import (
            K8sSpec,
            ProvisionerConfigError,
            parse_provisioners,
        )
        from coordinator.runtime.provisioners.k8s import manifests as build

        spec = K8sSpec(type="kubernetes")
        if config:
            try:
                with open(config, "rb") as f:
                    table = tomllib.load(f).get("provisioner", {})
                named = parse_provisioners(table, config).named
            except (OSError, tomllib.TOMLDecodeError, ProvisionerConfigError) as exc:
                raise click.ClickException(str(exc)) from None
            kube = {n: s for n, s in named.items() if isinstance(s, K8sSpec)}
            if name is None and len(kube) == 1:
                name = next(iter(kube))
            if name not in kube:
                raise click.UsageError(
                    f"--provisioner must name a kubernetes provisioner of {config}"
                    f" ({', '.join(sorted(kube)) or 'none defined'})"
                )
            spec = kube[name]
        name = name or "agents"
        if replicas is not None:
            if replicas < 0:
                raise click.BadParameter("must be 0 or more", param_hint="--replicas")
            spec = msgspec.structs.replace(spec, replicas=replicas)
        url = url or spec.coordinator_url
        if not url:
            raise click.UsageError("give --coordinator URL (or coordinator-url in the provisioner)")
        from protocol.config import validate_coordinator_url

        why = validate_coordinator_url(url)
        if why:
            raise click.BadParameter(why, param_hint="--coordinator")
        if token_file:
            try:
                with open(token_file) as f:
                    token = f.read().strip()
            except OSError as exc:
                raise click.ClickException(f"{token_file}: {exc.strerror}") from None
        else:
            token = os.environ.get("TVM_JOIN_TOKEN", "")
        if not token:
            raise click.UsageError("give --token-file PATH (or set TVM_JOIN_TOKEN)")
        if vm_size not in VM_SIZES:
            raise click.BadParameter(
                f"one of {', '.join(VM_SIZES)}, got {vm_size!r}", param_hint="--vm-size"
            )
        cores, memory, disk = VM_SIZES[vm_size]
        doc = build(name, spec, url, token, cores=cores, memory_mib=memory, disk_gib=disk)
        click.echo(json.dumps(doc, indent=2))
