"""Checks shared by every resource: names, environment settings, counts."""

from __future__ import annotations

import re

from .errors import bad_request

# \Z, not $: `$` also matches before a trailing newline, which would let "name\n" through.
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")

# The seed's variables: a user setting may never override them (DESIGN.md §3).
RESERVED_ENV = frozenset(
    {
        "WATASK_ACCOUNT_NAME",
        "WATASK_WORKITEM_NAME",
        "WATASK_JOB_NAME",
        "WATASK_TASK_NAME",
        "WATASK_POOL_NAME",
        "WATASK_TVM_NAME",
        "WATASK_TVM_ROOT_DIR",
        "WATASK_PORTRANGE_LOW",
        "WATASK_PORTRANGE_HIGH",
        "WATASK_CERTIFICATES_DIR",
    }
)


def check_name(name: object, field: str = "name") -> str:
    if not isinstance(name, str) or not name:
        raise bad_request(
            "MissingRequiredProperty", f"{field} must be a non-empty string", field=field
        )
    if not _NAME.match(name):
        if len(name) > 64:
            raise bad_request(
                "InvalidPropertyValue", f"{field} is longer than 64 characters", field=field
            )
        raise bad_request(
            "InvalidPropertyValue",
            f"{field} {name!r} may contain only letters, digits, '-' and '_'",
            field=field,
        )
    return name


def check_env(settings: list, field: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for i, s in enumerate(settings):
        name = s.name
        if not name or "=" in name or "\0" in name or "\0" in s.value:
            raise bad_request(
                "InvalidPropertyValue",
                f"{field}[{i}].name {name!r} is not a valid variable name",
                field=field,
            )
        if name.upper() in RESERVED_ENV or name.upper().startswith(("WATASK_", "AZ_BATCH_")):
            raise bad_request(
                "ReservedEnvironmentVariable",
                f"{field}[{i}] tries to set {name}, a variable the service sets itself",
                field=field,
                name=name,
            )
        env[name] = s.value
    return env


def check_range(value: int, low: int, high: int, field: str) -> int:
    if value < low or value > high:
        raise bad_request(
            "InvalidPropertyValue",
            f"{field} must be between {low} and {high}, got {value}",
            field=field,
        )
    return value


# A high surrogate escape with no low one after it: msgspec reads on for the pair and reports the
# body as "truncated", which sends a client looking for a cut-off upload.
_LONE_SURROGATE = re.compile(
    rb"(?<!\\)(?:\\\\)*(\\u[dD][89abAB][0-9a-fA-F]{2})(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
)


def json_error(raw: bytes, exc: Exception) -> str:
    """Why `raw` is not JSON, from the decoder's `exc`, made plain where its text misleads."""
    text = str(exc)
    if "truncated" in text or "surrogate" in text:
        lone = _LONE_SURROGATE.search(raw)
        if lone is not None:
            return (
                f"a lone UTF-16 surrogate escape ({lone.group(1).decode()}) is not a character;"
                " send the character itself, or its escape pair"
            )
    return text
