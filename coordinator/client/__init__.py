"""Python client for the TVM Batch REST API (see `_client` for how it is built)."""

from ._arrays import INDEX_VARS, add_array, add_array_async, array_specs, parse_range
from ._client import AsyncClient, Client
from ._http import BatchError
from ._resources import (
    AccountKeys,
    Agents,
    Certificates,
    Jobs,
    Ops,
    Pools,
    Tvms,
    TvmUsers,
    Workitems,
)
from ._tasks import (
    Files,
    Tasks,
    add_many,
    add_many_async,
    chunks,
    output_file,
    task_spec,
    wait_for_tasks,
    wait_for_tasks_async,
)

__all__ = [
    "INDEX_VARS",
    "add_array",
    "add_array_async",
    "array_specs",
    "parse_range",
    "AccountKeys",
    "Agents",
    "AsyncClient",
    "BatchError",
    "Certificates",
    "Client",
    "Files",
    "Jobs",
    "Ops",
    "Pools",
    "Tasks",
    "Tvms",
    "TvmUsers",
    "Workitems",
    "add_many",
    "add_many_async",
    "chunks",
    "output_file",
    "task_spec",
    "wait_for_tasks",
    "wait_for_tasks_async",
]
