"""Teardown for tests whose root agents joined pools: the agents made a pool group each
(``tvmp-<hash>``, named in ``<agent root>/pool-group``) and a killed agent does not delete it."""

from __future__ import annotations

import os
import warnings

from tvmagent import isolation


def remove_pool_groups(base: str) -> list[str]:
    """Delete the pool groups named by the agent roots under `base`; returns the ones deleted."""
    removed: list[str] = []
    for dirpath, _dirs, files in os.walk(base):
        if "pool-group" not in files:
            continue
        with open(os.path.join(dirpath, "pool-group")) as f:
            name = f.read().strip()
        try:
            if isolation.remove_group(name):
                removed.append(name)
        except (OSError, ValueError) as exc:
            warnings.warn(f"pool group {name} left behind: {exc}", stacklevel=2)
    return removed
