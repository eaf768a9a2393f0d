"""Limits every decoded request body is held to before anything is stored.

One walk over the request Struct, wherever the field sits (a task, a task collection, a pool's or an
auto pool's start task, a job manager, prep and release tasks, schedules): command lines at most
Azure's 8,191 characters, no NUL where a process argument, environment variable or file name must
carry the text, and no zero `maxWallClockTime` (PT0S would otherwise read as "no limit").
"""

from __future__ import annotations

from typing import Any

import msgspec

from coordinator.common import models as m
from coordinator.common.errors import bad_request
from coordinator.common.timeutil import parse_duration

MAX_COMMAND_LINE = 8191  # Azure Batch's limit for commandLine
_COMMAND_LINES = frozenset({"command_line", "coordination_command_line"})


def check_request(obj: Any) -> None:
    """400 naming the offending field (its JSON path, e.g. `value[3].commandLine`) if any limit fails."""
    if (
        type(obj) is m.TaskAdd
        and not obj.resource_files
        and not obj.environment_settings
        and obj.task_constraints is None
    ):
        # The common task (a collection checks each one): its command line is all there is to check.
        cl = obj.command_line
        if len(cl) > MAX_COMMAND_LINE or "\0" in cl:
            _command_line(cl, "commandLine")
        return
    _walk(obj, "")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# (attribute, JSON name) per Struct type: msgspec.structs.fields() builds FieldInfo objects on every
# call, which made this walk a visible share of adding a task.
_FIELDS: dict[type, tuple[tuple[str, str], ...]] = {}


def _fields(cls: type) -> tuple[tuple[str, str], ...]:
    found = _FIELDS.get(cls)
    if found is None:
        found = _FIELDS[cls] = tuple(
            zip(cls.__struct_fields__, cls.__struct_encode_fields__, strict=True)  # type: ignore[attr-defined]
        )
    return found


def _walk(obj: Any, path: str) -> None:
    # Field paths are joined only where the walk goes deeper or a check fails: this runs per task.
    if isinstance(obj, msgspec.Struct):
        if isinstance(obj, m.EnvironmentSetting):
            _no_nul(obj.name, _join(path, "name"))
            _no_nul(obj.value, _join(path, "value"))
            return
        if isinstance(obj, m.ResourceFile):
            _no_nul(obj.file_path, _join(path, "filePath"))
            _no_nul(obj.blob_source, _join(path, "blobSource"))
            return
        for name, encoded in _fields(type(obj)):
            value = getattr(obj, name)
            if value is None or isinstance(value, bool | int | float):
                continue
            if isinstance(value, str):
                if name in _COMMAND_LINES:
                    if len(value) > MAX_COMMAND_LINE or "\0" in value:
                        _command_line(value, _join(path, encoded))
                elif name == "max_wall_clock_time":
                    field = _join(path, encoded)
                    if parse_duration(value, field) == 0:
                        raise bad_request(
                            "InvalidPropertyValue",
                            f"{field} must be longer than zero; omit it for no limit",
                            field=field,
                        )
                continue
            _walk(value, _join(path, encoded))
    elif isinstance(obj, list | tuple):
        for i, item in enumerate(obj):
            if not isinstance(item, str):
                _walk(item, f"{path}[{i}]")
    elif isinstance(obj, dict):
        for key, item in obj.items():
            _walk(item, _join(path, str(key)))


def _command_line(value: str, field: str) -> None:
    if len(value) > MAX_COMMAND_LINE:
        raise bad_request(
            "InvalidPropertyValue",
            f"{field} is {len(value)} characters long; the limit is {MAX_COMMAND_LINE}",
            field=field,
            maxLength=str(MAX_COMMAND_LINE),
        )
    _no_nul(value, field)


def _no_nul(value: str, field: str) -> None:
    if "\0" in value:
        raise bad_request(
            "InvalidPropertyValue",
            f"{field} contains a NUL character, which a command line, an environment "
            "variable or a file name cannot carry",
            field=field,
        )
