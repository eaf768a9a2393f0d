"""Teardown for tests whose root agents joined pools: the agents made a pool group each
(``tvmp-<hash>``, named in ``<agent root>/pool-group``) and a killed agent does not delete it."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

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


@contextmanager
def open_agent_base(prefix: str) -> Iterator[str]:
    """A directory for agent roots that task users can reach (pytest's tmp dirs sit under a 0700
    directory nobody else may enter); afterwards the pool groups its agents made and the directory
    are deleted (the harness kills agents, so they do not leave their pools)."""
    base = tempfile.mkdtemp(prefix=prefix)
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        remove_pool_groups(base)
        shutil.rmtree(base, ignore_errors=True)
