"""The one error type the REST API answers with: `{code, message: {lang, value}, values}`."""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, **values: object) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.values = {k: str(v) for k, v in values.items()}
        self.retry_after: int | None = None  # seconds, sent as Retry-After (503, 429)


def quoted(value: object, limit: int = 64) -> str:
    """`value` as an error message quotes it (its repr), cut after `limit` characters: a request is
    bounded, but its answer need not repeat a long value whole."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def unavailable(code: str, message: str, retry_after: int, **values: object) -> ApiError:
    """503: the service cannot do this now (it did not); the client may retry after a while."""
    exc = ApiError(503, code, message, **values)
    exc.retry_after = retry_after
    return exc


def bad_request(code: str, message: str, **values: object) -> ApiError:
    return ApiError(400, code, message, **values)


def not_found(kind: str, name: str) -> ApiError:
    codes = {
        "pool": "PoolNotFound",
        "workitem": "WorkItemNotFound",
        "job": "JobNotFound",
        "task": "TaskNotFound",
        "tvm": "TVMNotFound",
        "file": "FileNotFound",
        "certificate": "CertificateNotFound",
    }
    return ApiError(
        404,
        codes.get(kind, "ResourceNotFound"),
        f"The specified {kind} '{name}' does not exist.",
        name=name,
    )


def conflict(kind: str, name: str) -> ApiError:
    codes = {
        "pool": "PoolExists",
        "workitem": "WorkItemExists",
        "task": "TaskExists",
        "certificate": "CertificateExists",
    }
    return ApiError(
        409,
        codes.get(kind, "ResourceExists"),
        f"The specified {kind} '{name}' already exists.",
        name=name,
    )
