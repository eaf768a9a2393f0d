"""SharedKey signing (Azure Batch scheme): string-to-sign, verification, freshness, both keys."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from coordinator.common.sharedkey import (
    MAX_SKEW_S,
    AuthError,
    sign,
    sign_request,
    string_to_sign,
    verify,
)

KEY1 = base64.b64encode(b"k" * 64).decode()
KEY2 = base64.b64encode(b"q" * 64).decode()
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
DATE = format_datetime(NOW, usegmt=True)  # "Fri, 02 Jan 2026 03:04:05 GMT"


def _expected_hmac(key_b64: str, text: str) -> str:
    """Computed here, independently of coordinator.common.sharedkey."""
    return base64.b64encode(
        hmac.new(base64.b64decode(key_b64), text.encode("utf-8"), hashlib.sha256).digest()
    ).decode()


def test_known_vector_post_with_body_headers_and_query():
    headers = {
        "Content-Type": "application/json; odata=minimalmetadata",
        "Content-Length": "27",
        "ocp-date": DATE,
        "OCP-Custom": "  spaced value  ",
        "client-request-id": "not-signed",
        "Accept": "application/json",
    }
    text = string_to_sign(
        "post", "/pools", "api-version=2015-01-01&TimeOut=30&b=2", headers, "acct"
    )
    expected = (
        "POST\n"
        "\n"  # Content-Encoding
        "\n"  # Content-Language
        "27\n"  # Content-Length
        "\n"  # Content-MD5
        "application/json; odata=minimalmetadata\n"
        "\n"  # Date
        "\n\n\n\n"  # If-Modified-Since, If-Match, If-None-Match, If-Unmodified-Since
        "\n"  # Range
        "ocp-custom:spaced value\n"
        f"ocp-date:{DATE}\n"
        "/acct/pools"
        "\napi-version:2015-01-01"
        "\nb:2"
        "\ntimeout:30"
    )
    assert text == expected
    assert sign(KEY1, text) == _expected_hmac(KEY1, expected)


def test_content_length_zero_is_signed_as_zero_and_absent_as_empty_line():
    with_zero = string_to_sign("POST", "/x", "", {"Content-Length": "0", "ocp-date": DATE}, "a")
    absent = string_to_sign("POST", "/x", "", {"ocp-date": DATE}, "a")
    assert with_zero.split("\n")[3] == "0"
    assert absent.split("\n")[3] == ""
    assert with_zero != absent
    # A request signed with "0" but sent without the header (or vice versa) fails verification.
    h = {"Content-Length": "0", "ocp-date": DATE}
    sign_request("POST", "/x", "", h, "a", KEY1)
    del h["Content-Length"]
    with pytest.raises(AuthError) as e:
        verify("POST", "/x", "", h, "a", [KEY1], NOW.timestamp())
    assert (e.value.status, e.value.code) == (403, "AuthenticationFailed")


def test_query_parameters_lowercased_sorted_and_multi_values_joined():
    text = string_to_sign("GET", "/p", "Zeta=1&alpha=b&alpha=a&Mid=", {}, "acct")
    assert text.endswith("/acct/p\nalpha:a,b\nmid:\nzeta:1")


def test_ocp_headers_sorted_lowercased_only_ocp_prefix():
    text = string_to_sign(
        "GET",
        "/p",
        "",
        {"Ocp-B": "2", "ocp-a": "1", "x-ms-date": "no", "Range": "bytes=0-1"},
        "acct",
    )
    lines = text.split("\n")
    assert lines[11] == "bytes=0-1"  # Range is the 11th standard header
    assert lines[12:14] == ["ocp-a:1", "ocp-b:2"]
    assert "x-ms-date" not in text


def test_all_eleven_standard_headers_in_order():
    names = [
        "Content-Encoding",
        "Content-Language",
        "Content-Length",
        "Content-MD5",
        "Content-Type",
        "Date",
        "If-Modified-Since",
        "If-Match",
        "If-None-Match",
        "If-Unmodified-Since",
        "Range",
    ]
    headers = {n: f"v{i}" for i, n in enumerate(names)}
    text = string_to_sign("DELETE", "/p", "", headers, "acct")
    assert text.split("\n")[:12] == ["DELETE"] + [f"v{i}" for i in range(11)]


def _signed(method="GET", path="/pools", query="", key=KEY1, account="acct", **extra):
    h = {"ocp-date": DATE, **extra}
    sign_request(method, path, query, h, account, key)
    return h


def test_both_keys_accepted():
    for key in (KEY1, KEY2):
        verify("GET", "/pools", "", _signed(key=key), "acct", [KEY1, KEY2], NOW.timestamp())


def test_wrong_key_rejected():
    other = base64.b64encode(b"z" * 64).decode()
    with pytest.raises(AuthError) as e:
        verify("GET", "/pools", "", _signed(key=other), "acct", [KEY1, KEY2], NOW.timestamp())
    assert (e.value.status, e.value.code) == (403, "AuthenticationFailed")


@pytest.mark.parametrize(
    "tamper", ["method", "path", "query", "header", "ocp", "account-in-header"]
)
def test_tampering_detected(tamper):
    h = _signed("POST", "/pools", "api-version=1", **{"Content-Length": "10", "ocp-extra": "a"})
    method, path, query = "POST", "/pools", "api-version=1"
    if tamper == "method":
        method = "PUT"
    elif tamper == "path":
        path = "/pools/other"
    elif tamper == "query":
        query = "api-version=2"
    elif tamper == "header":
        h["Content-Length"] = "11"
    elif tamper == "ocp":
        h["ocp-extra"] = "b"
    elif tamper == "account-in-header":
        h["Authorization"] = h["Authorization"].replace("acct:", "other:")
    with pytest.raises(AuthError) as e:
        verify(method, path, query, h, "acct", [KEY1], NOW.timestamp())
    assert e.value.status == 403


def test_unsigned_and_malformed_authorization_are_401():
    with pytest.raises(AuthError) as e:
        verify("GET", "/pools", "", {"ocp-date": DATE}, "acct", [KEY1], NOW.timestamp())
    assert (e.value.status, e.value.code) == (401, "AuthenticationFailed")
    for bad in ("Basic abc", "SharedKey acct", "SharedKey acct:", "SharedKey"):
        with pytest.raises(AuthError) as e:
            verify(
                "GET",
                "/pools",
                "",
                {"ocp-date": DATE, "Authorization": bad},
                "acct",
                [KEY1],
                NOW.timestamp(),
            )
        assert e.value.status == 401, bad


def test_stale_and_future_requests_rejected_fresh_accepted():
    h = _signed()
    verify("GET", "/pools", "", h, "acct", [KEY1], NOW.timestamp() + MAX_SKEW_S - 1)
    verify("GET", "/pools", "", h, "acct", [KEY1], NOW.timestamp() - MAX_SKEW_S + 1)
    for now in (NOW.timestamp() + MAX_SKEW_S + 1, NOW.timestamp() - MAX_SKEW_S - 1):
        with pytest.raises(AuthError) as e:
            verify("GET", "/pools", "", h, "acct", [KEY1], now)
        assert (e.value.status, e.value.code) == (403, "RequestTooOld")


def test_missing_or_bad_date_rejected():
    h = _signed()
    del h["ocp-date"]
    with pytest.raises(AuthError) as e:
        verify("GET", "/pools", "", h, "acct", [KEY1], NOW.timestamp())
    assert (e.value.status, e.value.code) == (403, "MissingRequiredHeader")
    h = {"ocp-date": "yesterday"}
    sign_request("GET", "/pools", "", h, "acct", KEY1)
    with pytest.raises(AuthError) as e:
        verify("GET", "/pools", "", h, "acct", [KEY1], NOW.timestamp())
    assert (e.value.status, e.value.code) == (403, "InvalidHeaderValue")


def test_date_header_accepted_instead_of_ocp_date():
    # A client that sends only Date signs it as one of the standard headers.
    h2 = {"Date": DATE}
    h2["Authorization"] = "SharedKey acct:" + _expected_hmac(
        KEY1, string_to_sign("GET", "/pools", "", h2, "acct")
    )
    verify("GET", "/pools", "", h2, "acct", [KEY1], NOW.timestamp())


def test_wrong_account_name_is_403():
    h = _signed(account="someone")
    with pytest.raises(AuthError) as e:
        verify("GET", "/pools", "", h, "acct", [KEY1], NOW.timestamp())
    assert (e.value.status, e.value.code) == (403, "AccountNameMismatch")


def test_empty_key_list_rejects_everything():
    with pytest.raises(AuthError):
        verify("GET", "/pools", "", _signed(), "acct", [], NOW.timestamp())


def test_encoded_path_signed_as_sent_like_the_azure_sdks():
    path = "/workitems/wi/jobs/job-0000000001/tasks/t/files/wd/my%20file.txt"
    h = {"ocp-date": DATE}
    expected = "GET\n" + "\n" * 11 + f"ocp-date:{DATE}\n/acct{path}"
    assert string_to_sign("GET", path, "", h, "acct") == expected
    h["Authorization"] = "SharedKey acct:" + _expected_hmac(KEY1, expected)
    verify("GET", path, "", h, "acct", [KEY1], NOW.timestamp())
    # A client that signed the decoded path is accepted too.
    decoded = expected.replace("my%20file", "my file")
    h["Authorization"] = "SharedKey acct:" + _expected_hmac(KEY1, decoded)
    verify("GET", path, "", h, "acct", [KEY1], NOW.timestamp())
    # But not a different path.
    h["Authorization"] = "SharedKey acct:" + _expected_hmac(
        KEY1, expected.replace("my%20file", "other")
    )
    with pytest.raises(AuthError):
        verify("GET", path, "", h, "acct", [KEY1], NOW.timestamp())


def _hand_signed(text: str, account: str) -> dict[str, str]:
    return {"ocp-date": DATE, "Authorization": f"SharedKey {account}:{_expected_hmac(KEY1, text)}"}


_SDK_HEAD = "GET\n" + "\n" * 11 + f"ocp-date:{DATE}\n"


def test_python_sdk_form_names_keep_their_case_and_empty_values_are_left_out():
    query = "timeOut=30&api-version=2024-07-01.20.0&empty="
    # Written out by hand as the Python Azure SDKs build it (sorted by the names as sent).
    text = _SDK_HEAD + "/Acct/pools\napi-version:2024-07-01.20.0\ntimeOut:30"
    assert (
        string_to_sign(
            "GET", "/pools", query, {"ocp-date": DATE}, "Acct", keep_case=True, skip_blank=True
        )
        == text
    )
    verify("GET", "/pools", query, _hand_signed(text, "Acct"), "Acct", [KEY1], NOW.timestamp())


def test_java_sdk_form_names_and_account_lower_cased():
    query = "timeOut=30&empty="
    text = _SDK_HEAD + "/acct/pools\nempty:\ntimeout:30"
    verify("GET", "/pools", query, _hand_signed(text, "Acct"), "Acct", [KEY1], NOW.timestamp())


def test_every_canonical_form_still_covers_the_parameters():
    text = _SDK_HEAD + "/Acct/pools\ntimeOut:30"
    for query in ("timeOut=31", "timeOut=30&maxresults=5", ""):
        with pytest.raises(AuthError):
            verify(
                "GET", "/pools", query, _hand_signed(text, "Acct"), "Acct", [KEY1], NOW.timestamp()
            )
