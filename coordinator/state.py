"""The coordinator's pure core: every resource in memory, the scheduler and TVM allocation.

Shaped like dask's WorkerState and h11: methods take a command (REST) or an event (agent message,
clock tick), mutate state, and leave *effects* — journal writes, messages to agents — that the Trio
shell collects with `take_effects()` and carries out. Validation happens before any mutation, so a
refused request leaves nothing behind. No I/O, no Trio.

The class is assembled from one private module per area (trio's layout: small private modules,
a small public surface): `_core_base` (state, effects, restore), `_core_pools`, `_core_agents`,
`_core_jobs`, `_core_tasks`.
"""

from __future__ import annotations

from ._core_agents import AgentsMixin
from ._core_autoscale import AutoscaleMixin
from ._core_base import MAX_COLLECTION as MAX_COLLECTION
from ._core_base import WALL_CLOCK_EXIT_CODE as WALL_CLOCK_EXIT_CODE
from ._core_base import Effects as Effects
from ._core_base import Write as Write
from ._core_certs import CertsMixin
from ._core_jobs import JobsMixin
from ._core_pools import PoolsMixin
from ._core_tasks import TasksMixin


class CoordinatorState(AutoscaleMixin, PoolsMixin, AgentsMixin, JobsMixin, TasksMixin, CertsMixin):
    """The whole pure core (see the module docstring)."""
