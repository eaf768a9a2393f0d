"""Checks and conversions of request parts several areas share (pure functions, no state)."""

from __future__ import annotations

import re

from coordinator.common import models as m
from coordinator.common.certificates import CertificateError, normalize_thumbprint
from coordinator.common.errors import bad_request
from coordinator.common.timeutil import parse_duration
from coordinator.common.validation import check_env, check_name, check_range
from protocol import config
from protocol import messages as pm
from protocol.exitcodes import WALL_CLOCK_EXIT_CODE as WALL_CLOCK_EXIT_CODE
from protocol.paths import validate_relative_path

MAX_COLLECTION = 100
MAX_TASKS_PER_JOB = config.MAX_TASKS_PER_JOB
MAX_TASKS = config.MAX_TASKS
MAX_POOLS = config.MAX_POOLS
MAX_ACTIVE_JOBS = config.MAX_ACTIVE_JOBS
DEFAULT_RETENTION_S = 7 * 86400.0
ALL_COMPLETE_ACTIONS = ("noaction", "terminatejob")

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def check_files(files: list[m.ResourceFile], field: str) -> None:
    for i, rf in enumerate(files):
        try:
            validate_relative_path(rf.file_path)
        except ValueError as exc:
            raise bad_request(
                "InvalidResourceFilePath",
                f"{field}[{i}].filePath: {exc}",
                field=f"{field}[{i}].filePath",
            ) from None
        src = rf.blob_source
        store = src.startswith("filestore:sha256:")
        if not (src.startswith(("http://", "https://")) or store) or (
            store and not _SHA256.fullmatch(src[len("filestore:sha256:") :])
        ):
            raise bad_request(
                "InvalidResourceFileSource",
                f"{field}[{i}].blobSource must be an http(s) URL or filestore:sha256:<64 hex>",
                field=f"{field}[{i}].blobSource",
            )
        if rf.sha256 is not None and not _SHA256.fullmatch(rf.sha256):
            raise bad_request(
                "InvalidPropertyValue",
                f"{field}[{i}].sha256 must be 64 hex digits",
                field=f"{field}[{i}].sha256",
            )
        if rf.file_size is not None and rf.file_size < 0:
            raise bad_request(
                "InvalidPropertyValue",
                f"{field}[{i}].fileSize must not be negative",
                field=f"{field}[{i}].fileSize",
            )


def check_job_task(
    spec: m.JobManager | m.JobPreparationTask | m.JobReleaseTask, field: str
) -> None:
    """What a job's own tasks (its manager, preparation and release task) all need: a valid name,
    a command line, well-formed environment settings and resource files."""
    check_name(spec.name, f"{field}.name")
    if not spec.command_line.strip():
        raise bad_request(
            "MissingRequiredProperty",
            f"{field}.commandLine must not be empty",
            field=f"{field}.commandLine",
        )
    check_env(spec.environment_settings, f"{field}.environmentSettings")
    check_files(spec.resource_files, f"{field}.resourceFiles")


def task_constraints(c: m.TaskConstraints) -> tuple[float | None, int | None, float | None]:
    """(max wall clock s, max retries, retention s) of a task's constraints."""
    max_wall = (
        parse_duration(c.max_wall_clock_time, "taskConstraints.maxWallClockTime")
        if c.max_wall_clock_time
        else None
    )
    max_retries = None
    if c.max_task_retry_count is not None:
        max_retries = check_range(
            c.max_task_retry_count, -1, 10**6, "taskConstraints.maxTaskRetryCount"
        )
    retention = (
        parse_duration(c.retention_time, "taskConstraints.retentionTime")
        if c.retention_time
        else None
    )
    return max_wall, max_retries, retention


def job_constraints(c: m.JobConstraints | None) -> tuple[float | None, int | None]:
    if c is None:
        return None, None
    wall = (
        parse_duration(c.max_wall_clock_time, "jobConstraints.maxWallClockTime")
        if c.max_wall_clock_time
        else None
    )
    retries = None
    if c.max_task_retry_count is not None:
        retries = check_range(c.max_task_retry_count, -1, 10**6, "jobConstraints.maxTaskRetryCount")
    return wall, retries


def check_all_complete(value: str | None, field: str = "onAllTasksComplete") -> None:
    if value is not None and value not in ALL_COMPLETE_ACTIONS:
        raise bad_request(
            "InvalidPropertyValue",
            f"{field} must be noaction or terminatejob, got {value!r}",
            field=field,
        )


def check_affinity(value: str | None, field: str = "affinityId") -> str | None:
    """A task's affinity: a TVM's name (Azure's node affinityId, `TVM:<name>`, is accepted as it
    is shown). Only a hint: a name no TVM has is kept and never matches."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 128 or "\0" in value:
        raise bad_request(
            "InvalidPropertyValue",
            f"{field} must be a TVM's name (at most 128 characters)",
            field=field,
        )
    return value.removeprefix("TVM:")


def check_max_parallel(value: int | None, field: str = "maxParallelTasks") -> None:
    """-1 (no limit) or at least 1 (Azure's rule: 0 would never run a task); None: not given."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or (value != -1 and value < 1):
        raise bad_request(
            "InvalidPropertyValue",
            f"{field} must be -1 (no limit) or at least 1, got {value!r}",
            field=field,
        )


def resource_file(r: m.ResourceFile) -> pm.ResourceFile:
    return pm.ResourceFile(
        url=r.blob_source,
        file_path=r.file_path,
        sha256=r.sha256 or "",
        size=r.file_size if r.file_size is not None else -1,
    )


def cert_key(thumbprint: str) -> str:
    """A certificate's key in the account (and the journal): "sha1-<thumbprint>"."""
    return f"sha1-{thumbprint}"


def ref_thumb(ref: m.CertificateReference) -> str:
    """The normalised thumbprint a pool's certificate reference names (as given if malformed)."""
    try:
        return normalize_thumbprint(ref.thumbprint)
    except CertificateError:
        return ref.thumbprint
