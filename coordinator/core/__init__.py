"""The coordinator's pure core (see facade.py for how its areas compose).

Shaped like dask's WorkerState and h11: methods take a command (REST) or an event (agent message,
clock tick), change the store, and leave typed instructions — journal writes, messages to agents,
link closes, provisioning requests — that the Trio shell collects with `take_effects()` and
carries out. No I/O, no Trio.
"""

from __future__ import annotations

from .facade import CoordinatorState as CoordinatorState
from .instructions import Close as Close
from .instructions import Effects as Effects
from .instructions import Provision as Provision
from .instructions import Retire as Retire
from .instructions import Send as Send
from .instructions import Write as Write
from .records import LOAD_ORDER as LOAD_ORDER
from .records import TASK_DONE as TASK_DONE
from .records import CertRec as CertRec
from .specs import MAX_ACTIVE_JOBS as MAX_ACTIVE_JOBS
from .specs import MAX_COLLECTION as MAX_COLLECTION
from .specs import MAX_POOLS as MAX_POOLS
from .specs import MAX_TASKS as MAX_TASKS
from .specs import MAX_TASKS_PER_JOB as MAX_TASKS_PER_JOB
from .specs import WALL_CLOCK_EXIT_CODE as WALL_CLOCK_EXIT_CODE
from .states import IllegalTransition as IllegalTransition
from .store import AutoscaleTiming as AutoscaleTiming
