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
    _walk(obj, "")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _walk(obj: Any, path: str) -> None:
    if isinstance(obj, msgspec.Struct):
        if isinstance(obj, m.EnvironmentSetting):
            _no_nul(obj.name, _join(path, "name"))
            _no_nul(obj.value, _join(path, "value"))
            return
        if isinstance(obj, m.ResourceFile):
            _no_nul(obj.file_path, _join(path, "filePath"))
            _no_nul(obj.blob_source, _join(path, "blobSource"))
            return
        for f in msgspec.structs.fields(obj):
            value = getattr(obj, f.name)
            field = _join(path, f.encode_name)
            if f.name in _COMMAND_LINES and isinstance(value, str):
                _command_line(value, field)
            elif f.name == "max_wall_clock_time" and isinstance(value, str):
                if parse_duration(value, field) == 0:
                    raise bad_request(
                        "InvalidPropertyValue",
                        f"{field} must be longer than zero; omit it for no limit",
                        field=field,
                    )
            else:
                _walk(value, field)
    elif isinstance(obj, list | tuple):
        for i, item in enumerate(obj):
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
