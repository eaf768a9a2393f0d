"""SharedKey request signing, the Azure Batch scheme (reference §0, python-ecosystem §9).

StringToSign = VERB + the values of 11 standard headers, each followed by "\\n" (as received:
Content-Length "0" is signed as "0", an absent header as an empty line), the canonicalized `ocp-*`
headers, then "/<account><path>" and the sorted, lower-cased query parameters. The path is signed
as sent, percent-encoded (the Azure SDKs sign the request URL's encoded path).

The SDKs disagree on the query part: the Python Azure SDKs keep each parameter name's case and leave
out parameters with an empty value; the Java SDK lower-cases the names and the account. `verify`
accepts every one of these canonical forms (each covers the same request), `sign_request` produces
the lower-cased one.
"""

from __future__ import annotations

import base64
import functools
import hmac
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from urllib.parse import parse_qsl, unquote

MAX_SKEW_S = 15 * 60

_STANDARD = (
    "content-encoding",
    "content-language",
    "content-length",
    "content-md5",
    "content-type",
    "date",
    "if-modified-since",
    "if-match",
    "if-none-match",
    "if-unmodified-since",
    "range",
)


class AuthError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def string_to_sign(
    method: str,
    path: str,
    query: str,
    headers: Mapping[str, str],
    account: str,
    *,
    keep_case: bool = False,
    skip_blank: bool = False,
) -> str:
    """`keep_case`: query names as sent (Python SDKs), else lower-cased; `skip_blank`: parameters
    with an empty value are left out (Python SDKs)."""
    h = {k.lower(): v for k, v in headers.items()}
    parts = [method.upper()]
    parts.extend(h.get(name, "") for name in _STANDARD)
    ocp = sorted((k, v.strip()) for k, v in h.items() if k.startswith("ocp-"))
    out = "\n".join(parts) + "\n"
    out += "".join(f"{k}:{v}\n" for k, v in ocp)
    out += f"/{account}{path}"
    params: dict[str, list[str]] = {}
    for k, v in parse_qsl(query, keep_blank_values=True):
        if skip_blank and not v:
            continue
        params.setdefault(k if keep_case else k.lower(), []).append(v)
    for k in sorted(params):
        out += f"\n{k}:{','.join(sorted(params[k]))}"
    return out


def sign(key_b64: str, text: str) -> str:
    return base64.b64encode(hmac.digest(_key_bytes(key_b64), text.encode(), "sha256")).decode()


@functools.lru_cache(maxsize=16)
def _key_bytes(key_b64: str) -> bytes:
    return base64.b64decode(key_b64)


@functools.lru_cache(maxsize=64)
def _stamp_time(stamp: str) -> float:
    """An RFC 1123 date's POSIX time (a client's requests of one second share their stamp)."""
    return parsedate_to_datetime(stamp).timestamp()


def now_header() -> str:
    return format_datetime(datetime.now(UTC), usegmt=True)


def sign_request(
    method: str, path: str, query: str, headers: dict[str, str], account: str, key_b64: str
) -> None:
    """Add `ocp-date` and `Authorization` to `headers` (mutated)."""
    headers.setdefault("ocp-date", now_header())
    headers["Authorization"] = (
        f"SharedKey {account}:{sign(key_b64, string_to_sign(method, path, query, headers, account))}"
    )


def verify(
    method: str,
    path: str,
    query: str,
    headers: Mapping[str, str],
    account: str,
    keys: list[str],
    now: float,
) -> None:
    """Raise AuthError unless the request is signed with one of `keys` and is fresh."""
    h = {k.lower(): v for k, v in headers.items()}
    auth = h.get("authorization")
    if not auth:
        raise AuthError(
            401, "AuthenticationFailed", "The request is not signed (no Authorization header)"
        )
    scheme, _, cred = auth.partition(" ")
    name, _, signature = cred.partition(":")
    if scheme != "SharedKey" or not signature:
        raise AuthError(
            401, "AuthenticationFailed", "Authorization must be 'SharedKey <account>:<signature>'"
        )
    if name != account:
        raise AuthError(403, "AccountNameMismatch", f"unknown account {name!r}")
    stamp = h.get("ocp-date") or h.get("date")
    if not stamp:
        raise AuthError(403, "MissingRequiredHeader", "ocp-date (or Date) header is required")
    try:
        when = _stamp_time(stamp)
    except (TypeError, ValueError):
        raise AuthError(
            403, "InvalidHeaderValue", f"ocp-date is not an RFC 1123 date: {stamp!r}"
        ) from None
    if abs(now - when) > MAX_SKEW_S:
        raise AuthError(
            403, "RequestTooOld", "The request time is more than 15 minutes from the server time"
        )
    for text in _candidate_texts(method, path, query, headers, account):
        for key in keys:
            if hmac.compare_digest(sign(key, text), signature):
                return
    raise AuthError(
        403, "AuthenticationFailed", "The request signature does not match (wrong key or tampered)"
    )


def _candidate_texts(
    method: str, path: str, query: str, headers: Mapping[str, str], account: str
) -> Iterator[str]:
    """Every canonical form a known client may have signed, without repeats (usually one or two),
    made one at a time: the first is the one nearly every client signs, the rest are built only
    when it does not match."""
    paths = (
        [path, unquote(path)] if "%" in path else [path]
    )  # decoded: clients that sign before encoding
    accounts = (
        [account, account.lower()] if account != account.lower() else [account]
    )  # Java lower-cases it
    texts: set[str] = set()
    for p in paths:
        for acct in accounts:
            for keep_case in (False, True):
                for skip_blank in (False, True):
                    text = string_to_sign(
                        method, p, query, headers, acct, keep_case=keep_case, skip_blank=skip_blank
                    )
                    if text not in texts:
                        texts.add(text)
                        yield text
