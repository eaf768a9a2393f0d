"""Provisioner plugins chosen per pool (ssh, slurm; kubernetes manifests) and the hub that routes
each pool's requests to its provisioner. See hub.py and config.py."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import ProvisionersConfig, SlurmSpec, SshSpec
from .hub import Plugin, ProvisionerHub

if TYPE_CHECKING:
    from ..service import CoordinatorService


def build_hub(
    service: CoordinatorService,
    cfg: ProvisionersConfig,
    fallback: Any,
    agent_url: str,
    state_dir: str,
) -> ProvisionerHub:
    """One plugin per configured provisioner (kubernetes ones only generate manifests)."""
    plugins: dict[str, Plugin] = {}
    for name, spec in cfg.named.items():
        if isinstance(spec, SshSpec):
            from .ssh import SshProvisioner

            plugins[name] = SshProvisioner(name, spec, state_dir, agent_url, service.join_token)
        elif isinstance(spec, SlurmSpec):
            from .slurm import SlurmProvisioner

            plugins[name] = SlurmProvisioner(name, spec, agent_url, service.join_token)
    return ProvisionerHub(service, plugins, cfg.default, fallback)
