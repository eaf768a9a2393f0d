"""The OData `$filter` / `$select` / `$expand` subset of the Azure Batch API, on plain dicts."""

from __future__ import annotations

from typing import Any

import pytest

from coordinator.common.errors import ApiError
from coordinator.rest.azure.odata import (
    FILTER_PROPERTIES,
    MAX_DEPTH,
    MAX_FILTER_CHARS,
    ODataError,
    parse_expand,
    parse_filter,
    parse_select,
)

TASKS: list[dict[str, Any]] = [
    {
        "id": "task1",
        "state": "completed",
        "creationTime": "2024-05-01T10:00:00.1234567Z",
        "executionInfo": {"exitCode": 0, "result": "success", "retryCount": 0},
        "stats": {"readIOps": "12"},
        "requiredSlots": 1,
    },
    {
        "id": "task2",
        "state": "completed",
        "creationTime": "2024-05-01T11:00:00Z",
        "executionInfo": {"exitCode": 3, "result": "failure", "retryCount": 2},
        "stats": {"readIOps": "900"},
        "requiredSlots": 2,
    },
    {
        "id": "render-7",
        "state": "active",
        "creationTime": "2024-05-02T09:30:00Z",
        "executionInfo": {"retryCount": 0, "requeueCount": 0},
        "requiredSlots": 1,
    },
    {"id": "Render-8", "state": "running", "creationTime": "2024-05-03T00:00:00Z"},
]
POOLS: list[dict[str, Any]] = [
    {"id": "p1", "enableAutoScale": False, "vmSize": "standard_d2s_v3"},
    {"id": "p2", "enableAutoScale": True, "vmSize": "standard_a1_v2"},
]


def ids(text: str, items: list[dict[str, Any]] = TASKS, **kw: Any) -> list[str]:
    f = parse_filter(text, **kw)
    return [r["id"] for r in items if f(r)]


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("state eq 'completed'", ["task1", "task2"]),
        ("state eq 'Completed'", ["task1", "task2"]),  # values compare case-insensitively
        ("state ne 'completed'", ["render-7", "Render-8"]),
        ("executionInfo/result eq 'success'", ["task1"]),
        ("executionInfo/exitCode gt 0", ["task2"]),
        ("executionInfo/exitCode ge 0", ["task1", "task2"]),
        ("executionInfo/exitCode lt 3", ["task1"]),
        ("executionInfo/exitCode le 3", ["task1", "task2"]),
        ("executionInfo/exitCode eq null", ["render-7", "Render-8"]),
        ("executionInfo/exitCode ne null", ["task1", "task2"]),
        ("executionInfo/retryCount eq 0 and state eq 'active'", ["render-7"]),
        ("state eq 'active' or state eq 'running'", ["render-7", "Render-8"]),
        ("startswith(id,'render')", ["render-7", "Render-8"]),
        ("startswith(id, 'task') and executionInfo/result eq 'failure'", ["task2"]),
        ("startswith(id,'task') eq true", ["task1", "task2"]),
        ("startswith(id,'task') eq false", ["render-7", "Render-8"]),
        ("startswith(id,'task') ne true", ["render-7", "Render-8"]),
        (
            "(state eq 'active' or state eq 'running') and startswith(id,'R')",
            ["render-7", "Render-8"],
        ),
        ("state eq 'completed' and (executionInfo/exitCode eq 3 or id eq 'nope')", ["task2"]),
        # and binds tighter than or
        ("id eq 'task1' or id eq 'task2' and state eq 'active'", ["task1"]),
        ("creationTime gt DateTime'2024-05-01T10:30:00Z'", ["task2", "render-7", "Render-8"]),
        ("creationTime le datetime'2024-05-01T10:00:00.1234567Z'", ["task1"]),
        ("creationTime lt DateTime'Thu, 02 May 2024 00:00:00 GMT'", ["task1", "task2"]),
        # a timestamp in plain quotes is compared as a time (7 vs 0 fractional digits)
        ("creationTime ge '2024-05-01T10:00:00.1Z'", ["task1", "task2", "render-7", "Render-8"]),
        ("creationTime gt '2024-05-01T10:00:00.2Z'", ["task2", "render-7", "Render-8"]),
        # 64-bit counters are strings in 2025-06-01; numbers still compare as numbers
        ("stats/readIOps gt 100", ["task2"]),
        ("requiredSlots eq 2L", ["task2"]),
        ("id gt 'render-7'", ["task1", "task2", "Render-8"]),
        ("  state   eq   'active'  ", ["render-7"]),
        ("state EQ 'active' AND id Eq 'render-7'", ["render-7"]),
        ("missing/deep/path eq 'x'", []),
        ("missing/deep/path ne 'x'", ["task1", "task2", "render-7", "Render-8"]),
        ("executionInfo/exitCode gt 'abc'", []),  # incomparable: no ordering holds
    ],
)
def test_filter_selects_the_right_subset(text: str, want: list[str]) -> None:
    assert ids(text) == want


def test_filter_on_booleans_and_quotes() -> None:
    assert ids("enableAutoScale eq true", POOLS) == ["p2"]
    assert ids("enableAutoScale ne true", POOLS) == ["p1"]
    assert ids("vmSize eq 'STANDARD_D2S_V3'", POOLS) == ["p1"]
    quoted = [{"id": "it's"}, {"id": "its"}]
    assert ids("id eq 'it''s'", quoted) == ["it's"]
    # numbers against a numeric property that is missing: nothing matches but `ne`
    assert ids("targetDedicatedNodes gt -1", POOLS) == []


def test_filter_reports_the_paths_it_reads() -> None:
    f = parse_filter("state eq 'active' and startswith(id,'a') or executionInfo/exitCode gt 1")
    assert f.paths == {"state", "id", "executionInfo/exitCode"}
    assert f.text.startswith("state")


def test_allowed_properties_refuse_others() -> None:
    tasks = FILTER_PROPERTIES["tasks"]
    assert ids("executionInfo/result eq 'success'", allowed=tasks) == ["task1"]
    with pytest.raises(ODataError) as e:
        parse_filter("commandLine eq 'x'", allowed=tasks)
    assert "commandLine" in e.value.reason
    assert "filterable" in e.value.reason


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("state", "expected one of eq"),
        ("state eq", "expected a literal"),
        ("state has 'x'", "expected one of eq"),
        ("state eq active", "strings are single-quoted"),
        ("not state eq 'active'", "not supported"),
        ("endswith(id,'x')", "not supported"),
        ("substringof('x', id)", "not supported"),
        ("'active' eq state", "expected a property name"),
        ("state eq 'active' and", "expected a property name"),
        ("state eq 'active' state eq 'x'", "joined with 'and'/'or'"),
        ("(state eq 'active'", "expected ')'"),
        ("state eq 'active')", "unexpected ')'"),
        ("state eq 'unterminated", "unterminated string"),
        ("state eq 'a' & id eq 'b'", "unexpected character '&'"),
        ("enableAutoScale gt true", "boolean can only be compared"),
        ("id lt null", "null can only be compared"),
        ("creationTime gt DateTime'yesterday'", "not a date and time"),
        ("requiredSlots eq 1.2.3", "bad number"),
        ("startswith(id)", "expected ','"),
        ("startswith(id, 5)", "expected a quoted string"),
        ("startswith(id,'x') eq 'y'", "followed by true or false"),
        ("a//b eq 'x'", "is not a property name"),
        ("executionInfo/ eq 'x'", "is not a property name"),
    ],
)
def test_bad_filters_are_clear_400s(text: str, fragment: str) -> None:
    with pytest.raises(ODataError) as e:
        parse_filter(text)
    err = e.value
    assert isinstance(err, ApiError)
    assert err.status == 400
    assert err.code == "InvalidQueryParameterValue"
    assert err.values["QueryParameterName"] == "$filter"
    assert err.values["QueryParameterValue"] == text
    assert fragment in err.reason, err.reason
    assert fragment in err.message


def test_filter_input_is_bounded() -> None:
    with pytest.raises(ODataError, match="longer than"):
        parse_filter("id eq '" + "x" * MAX_FILTER_CHARS + "'")
    deep = "(" * (MAX_DEPTH + 1) + "id eq 'a'" + ")" * (MAX_DEPTH + 1)
    with pytest.raises(ODataError, match="nested deeper"):
        parse_filter(deep)
    ok = "(" * MAX_DEPTH + "id eq 'a'" + ")" * MAX_DEPTH
    assert parse_filter(ok)({"id": "A"})
    # a long flat chain parses without recursion and evaluates correctly
    many = " or ".join(f"id eq 'id{i}'" for i in range(900))
    assert len(many) < MAX_FILTER_CHARS
    f = parse_filter(many)
    assert f({"id": "id899"})
    assert not f({"id": "id900"})
    # the value echoed in the error is truncated
    with pytest.raises(ODataError) as e:
        parse_filter("x" * 1000)
    assert len(e.value.values["QueryParameterValue"]) < 300


def test_select_keeps_only_the_named_properties() -> None:
    task = TASKS[1]
    sel = parse_select("id,state")
    assert sel.apply(task) == {"id": "task2", "state": "completed"}
    nested = parse_select(" id , executionInfo/result,stats ")
    assert nested.apply(task) == {
        "id": "task2",
        "executionInfo": {"result": "failure"},
        "stats": {"readIOps": "900"},
    }
    # a whole property wins over one of its parts, in either order
    both = parse_select("executionInfo/result,executionInfo")
    assert both.apply(task)["executionInfo"] == task["executionInfo"]
    both = parse_select("executionInfo,executionInfo/result")
    assert both.apply(task)["executionInfo"] == task["executionInfo"]
    # missing properties are simply absent; the input is not changed
    assert parse_select("id,nodeInfo").apply(task) == {"id": "task2"}
    assert parse_select("*").apply(task) == task
    assert "executionInfo" in task
    assert task["executionInfo"]["exitCode"] == 3


@pytest.mark.parametrize("text", ["", "id,", "id,,state", "id state", "a//b", "9lives", "id;drop"])
def test_bad_selects_are_clear_400s(text: str) -> None:
    with pytest.raises(ODataError) as e:
        parse_select(text)
    assert e.value.status == 400
    assert e.value.values["QueryParameterName"] == "$select"


def test_select_allowed_names() -> None:
    assert parse_select("id,state", allowed={"id", "state"}).paths == ("id", "state")
    with pytest.raises(ODataError, match="not a property of this resource"):
        parse_select("id,bogus", allowed={"id", "state"})


def test_expand_only_stats() -> None:
    assert parse_expand("stats") == {"stats"}
    with pytest.raises(ODataError, match="only 'stats'"):
        parse_expand("nodes")
    with pytest.raises(ODataError):
        parse_expand("stats,foo")
