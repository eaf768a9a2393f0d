"""Task arrays: one command line expanded over a range of indexes into ordinary tasks.

Each task gets its index in the command line (every `{}`) and in two environment variables:
`TVM_TASK_INDEX` and `BATCH_TASK_INDEX` (the Azure-style spelling; `AZ_BATCH_*` names are reserved
for what the service itself sets, so the alias drops the prefix). A task is named `<prefix><index>`:
with the default empty prefix the names are the indexes, so `dependsOn.taskIdRanges` can address an
array as a whole.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from coordinator.common import models as m

from ._tasks import chunks, task_spec

if TYPE_CHECKING:
    from ._client import AsyncClient, Client

INDEX_VARS = ("TVM_TASK_INDEX", "BATCH_TASK_INDEX")
MAX_ARRAY = 1_000_000

_RANGE = re.compile(r"(\d+)(?:-(\d+))?(?::(\d+))?")

Progress = Callable[[int, int], None]  # (tasks added so far, total)


def parse_range(text: str) -> range:
    """`START-END[:STEP]` (inclusive) or one `INDEX`; a ValueError that says why otherwise."""
    mt = _RANGE.fullmatch(text.strip())
    if not mt:
        raise ValueError(
            f"range {text!r} is not START-END[:STEP] with whole numbers >= 0 (e.g. 1-10000:2)"
        )
    start = int(mt.group(1))
    end = int(mt.group(2)) if mt.group(2) is not None else start
    step = int(mt.group(3)) if mt.group(3) is not None else 1
    if end < start:
        raise ValueError(f"range {text!r}: the end {end} is before the start {start}")
    if step < 1:
        raise ValueError(f"range {text!r}: the step must be at least 1")
    out = range(start, end + 1, step)
    if len(out) > MAX_ARRAY:
        raise ValueError(
            f"range {text!r} has {len(out)} indexes; an array holds at most {MAX_ARRAY}"
        )
    return out


def array_specs(
    command_line: str,
    indexes: range | Sequence[int],
    *,
    prefix: str = "",
    env: dict[str, str] | None = None,
    **kw: object,
) -> list[m.TaskAdd]:
    """The tasks of an array (see the module's docstring); `kw` as for `task_spec`."""
    out = []
    for i in indexes:
        if i < 0:
            raise ValueError(f"array index {i} is negative")
        s = str(i)
        out.append(
            task_spec(
                f"{prefix}{s}",
                command_line.replace("{}", s),
                env={**(env or {}), **dict.fromkeys(INDEX_VARS, s)},
                **kw,  # type: ignore[arg-type]
            )
        )
    return out


def add_array(
    client: Client,
    workitem: str,
    job: str,
    specs: Sequence[m.TaskAdd],
    progress: Progress | None = None,
) -> list[m.TaskAddResult]:
    """Add the array's tasks in collections of 100; `progress` after each collection."""
    out: list[m.TaskAddResult] = []
    for part in chunks(specs):
        out.extend(client.tasks.add_collection(workitem, job, part))
        if progress is not None:
            progress(len(out), len(specs))
    return out


async def add_array_async(
    client: AsyncClient,
    workitem: str,
    job: str,
    specs: Sequence[m.TaskAdd],
    progress: Progress | None = None,
) -> list[m.TaskAddResult]:
    out: list[m.TaskAddResult] = []
    for part in chunks(specs):
        out.extend(await client.tasks.add_collection(workitem, job, part))
        if progress is not None:
            progress(len(out), len(specs))
    return out
