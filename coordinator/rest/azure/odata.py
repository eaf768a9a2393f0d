"""The OData query subset Azure Batch clients send: `$filter`, `$select` and `$expand`.

Pure: text in, a predicate or a projection out. `$filter` is parsed once into a predicate over the
plain JSON dict of a resource (camelCase REST names, nested with `/`), so a list is filtered with one
pass over its items. Grammar (as the Batch service documents it):

    expr       := and_expr ('or' and_expr)*
    and_expr   := term ('and' term)*
    term       := '(' expr ')' | path op literal | startswith(path, 'text') [('eq'|'ne') bool]
    op         := eq | ne | gt | ge | lt | le
    literal    := 'string' | number | true | false | null | DateTime'2011-05-08T08:49:37Z'

Property names are case-sensitive, values are compared case-insensitively (as the service does).
A property a resource lacks is null: `eq` is false, `ne` true, an ordering false. Anything else
(`not`, `endswith`, arithmetic, a literal on the left, ...) is refused with `ODataError`, a 400
`InvalidQueryParameterValue` naming the parameter and the reason. Input is bounded
(`MAX_FILTER_CHARS`, `MAX_DEPTH`) and scanned once, so parsing is linear and cannot recurse deep.
"""

from __future__ import annotations

import email.utils
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from coordinator.common.errors import ApiError

MAX_FILTER_CHARS = 16384
MAX_SELECT_CHARS = 4096
MAX_DEPTH = 32  # parentheses nesting; the parser recurses once per level

COMPARISONS = ("eq", "ne", "gt", "ge", "lt", "le")

# The properties each list accepts in $filter (REST reference "OData filters in Batch"). Pass one of
# these as `allowed` to refuse the others with a 400 as the service does; generous on purpose.
_TIMES = ("stateTransitionTime", "creationTime", "lastModified")
FILTER_PROPERTIES: dict[str, frozenset[str]] = {
    "pools": frozenset(
        (
            "id",
            "displayName",
            "state",
            "allocationState",
            "allocationStateTransitionTime",
            "enableAutoScale",
            "enableInterNodeCommunication",
            "vmSize",
            "targetDedicatedNodes",
            "currentDedicatedNodes",
            "taskSlotsPerNode",
            *_TIMES,
        )
    ),
    "nodes": frozenset(
        (
            "id",
            "state",
            "schedulingState",
            "stateTransitionTime",
            "lastBootTime",
            "allocationTime",
            "ipAddress",
            "isDedicated",
            "vmSize",
            "runningTasksCount",
            "runningTaskSlotsCount",
            "totalTasksRun",
            "totalTasksSucceeded",
            "startTaskInfo/state",
            "startTaskInfo/result",
            "startTaskInfo/exitCode",
            "startTaskInfo/startTime",
            "startTaskInfo/endTime",
        )
    ),
    "jobs": frozenset(
        (
            "id",
            "displayName",
            "state",
            "priority",
            "usesTaskDependencies",
            "onAllTasksComplete",
            "onTaskFailure",
            "executionInfo/startTime",
            "executionInfo/endTime",
            "executionInfo/poolId",
            "executionInfo/terminateReason",
            "poolInfo/poolId",
            *_TIMES,
        )
    ),
    "jobschedules": frozenset(
        (
            "id",
            "displayName",
            "state",
            "schedule/doNotRunUntil",
            "schedule/doNotRunAfter",
            "executionInfo/nextRunTime",
            "executionInfo/endTime",
            "executionInfo/recentJob/id",
            *_TIMES,
        )
    ),
    "tasks": frozenset(
        (
            "id",
            "displayName",
            "state",
            "previousState",
            "previousStateTransitionTime",
            "requiredSlots",
            "executionInfo/startTime",
            "executionInfo/endTime",
            "executionInfo/exitCode",
            "executionInfo/result",
            "executionInfo/retryCount",
            "executionInfo/requeueCount",
            "executionInfo/failureInfo/category",
            "executionInfo/failureInfo/code",
            "nodeInfo/nodeId",
            "nodeInfo/poolId",
            *_TIMES,
        )
    ),
    "prepreleasestatus": frozenset(
        (
            "nodeId",
            "poolId",
            "jobPreparationTaskExecutionInfo/state",
            "jobPreparationTaskExecutionInfo/result",
            "jobPreparationTaskExecutionInfo/exitCode",
            "jobReleaseTaskExecutionInfo/state",
            "jobReleaseTaskExecutionInfo/result",
            "jobReleaseTaskExecutionInfo/exitCode",
        )
    ),
    "files": frozenset(("name", "isDirectory")),
    "nodecounts": frozenset(("poolId",)),
    "supportedimages": frozenset(
        (
            "osType",
            "verificationType",
            "nodeAgentSKUId",
            "imageReference/publisher",
            "imageReference/offer",
            "imageReference/sku",
        )
    ),
    "poolusagemetrics": frozenset(("poolId", "vmSize", "startTime", "endTime")),
}


class ODataError(ApiError):
    """400 InvalidQueryParameterValue, with the values the service gives (name, value, reason)."""

    def __init__(self, parameter: str, value: str, reason: str) -> None:
        shown = value if len(value) <= 256 else value[:256] + "..."
        super().__init__(
            400,
            "InvalidQueryParameterValue",
            f"The value for the query parameter {parameter} is not valid: {reason}",
            QueryParameterName=parameter,
            QueryParameterValue=shown,
            Reason=reason,
        )
        self.parameter = parameter
        self.reason = reason


Resource = Mapping[str, Any]
Predicate = Callable[[Resource], bool]

# ---------------------------------------------------------------------------------------- tokens

_PUNCT = {"(": "(", ")": ")", ",": ","}


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str  # "(", ")", ",", "name", "str", "num", "dt", "end"
    text: str
    pos: int
    value: Any = None


def _is_name_start(c: str) -> bool:
    return c.isascii() and (c.isalpha() or c == "_")


def _is_name_char(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c in "_/")


def _tokens(src: str) -> list[_Tok]:
    """One left-to-right pass; each character is looked at a bounded number of times."""
    out: list[_Tok] = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if c.isspace():
            i += 1
        elif c in _PUNCT:
            out.append(_Tok(c, c, i))
            i += 1
        elif c == "'":
            text, i = _string(src, i)
            out.append(_Tok("str", text, i, text))
        elif c.isdigit() or (
            c in "-+" and i + 1 < n and (src[i + 1].isdigit() or src[i + 1] == ".")
        ):
            j = i + 1
            while j < n and (
                src[j].isdigit() or src[j] in ".eE" or (src[j] in "+-" and src[j - 1] in "eE")
            ):
                j += 1
            if j < n and src[j] in "LlMmDdFf":  # OData type suffixes: 5L, 1.5M, 2.0d
                j += 1
                raw = src[i : j - 1]
            else:
                raw = src[i:j]
            out.append(_Tok("num", src[i:j], i, _number(raw, src, i)))
            i = j
        elif _is_name_start(c):
            j = i + 1
            while j < n and _is_name_char(src[j]):
                j += 1
            word = src[i:j]
            if j < n and src[j] == "'" and word.lower() in ("datetime", "datetimeoffset"):
                text, end = _string(src, j)
                out.append(_Tok("dt", src[i:end], i, _datetime_literal(text, src)))
                i = end
            else:
                out.append(_Tok("name", word, i))
                i = j
        else:
            raise _err(src, f"unexpected character {c!r} at position {i}")
    out.append(_Tok("end", "", n))
    return out


def _string(src: str, start: int) -> tuple[str, int]:
    """A single-quoted literal starting at `start`; `''` is a quote inside it."""
    parts: list[str] = []
    i, n = start + 1, len(src)
    while i < n:
        j = src.find("'", i)
        if j < 0:
            break
        parts.append(src[i:j])
        if j + 1 < n and src[j + 1] == "'":
            parts.append("'")
            i = j + 2
            continue
        return "".join(parts), j + 1
    raise _err(src, f"unterminated string starting at position {start}")


def _number(raw: str, src: str, pos: int) -> int | float:
    try:
        return int(raw)
    except ValueError:
        pass
    try:
        value = float(raw)
    except ValueError:
        raise _err(src, f"bad number {raw!r} at position {pos}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise _err(src, f"bad number {raw!r} at position {pos}")
    return value


def _parse_datetime(text: str) -> datetime | None:
    """RFC 3339 / ISO 8601 (up to 7 fractional digits) or RFC 1123; naive means UTC."""
    t = text.strip()
    if not t:
        return None
    try:
        dt = datetime.fromisoformat(t[:-1] + "+00:00" if t[-1] in "zZ" else t)
    except ValueError:
        try:
            dt = email.utils.parsedate_to_datetime(t)
        except (TypeError, ValueError, IndexError):
            return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt


def _datetime_literal(text: str, src: str) -> datetime:
    dt = _parse_datetime(text)
    if dt is None:
        raise _err(src, f"DateTime'{text}' is not a date and time (use 2011-05-08T08:49:37Z)")
    return dt


def _looks_like_datetime(text: str) -> datetime | None:
    # Only a full timestamp counts: an id such as '2024' must stay a string.
    if len(text) >= 19 and text[4] == "-" and text[10] in "Tt ":
        return _parse_datetime(text)
    return None


def _err(src: str, reason: str) -> ODataError:
    return ODataError("$filter", src, reason)


# ---------------------------------------------------------------------------------------- values


def _lookup(resource: Resource, path: tuple[str, ...]) -> Any:
    cur: Any = resource
    for key in path:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(key)
    return cur


_MISMATCH = object()  # the two sides are not comparable: eq false, ne true, orderings false


def _as_number(v: Any) -> int | float | object:
    if isinstance(v, bool):
        return _MISMATCH
    if isinstance(v, int | float):
        return v
    if isinstance(v, str):  # 64-bit counters are JSON strings in 2025-06-01
        try:
            return int(v)
        except ValueError:
            try:
                f = float(v)
            except ValueError:
                return _MISMATCH
            return f if f == f else _MISMATCH
    return _MISMATCH


def _as_datetime(v: Any) -> datetime | object:
    if isinstance(v, datetime):
        return v if v.tzinfo else v.replace(tzinfo=UTC)
    if isinstance(v, str):
        dt = _parse_datetime(v)
        return _MISMATCH if dt is None else dt
    return _MISMATCH


def _as_text(v: Any) -> str | object:
    if isinstance(v, str):
        return v.casefold()
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    return _MISMATCH


_ORDER: dict[str, Callable[[Any, Any], bool]] = {
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
}


def _comparison(path: tuple[str, ...], op: str, lit: _Tok, src: str) -> Predicate:
    test = _ORDER[op]
    missing = op == "ne"  # a null or incomparable value is "not equal" and nothing else

    def compare(convert: Callable[[Any], Any], rhs: Any) -> Predicate:
        def pred(r: Resource) -> bool:
            v = _lookup(r, path)
            if v is None:
                return missing
            lhs = convert(v)
            if lhs is _MISMATCH:
                return missing
            return bool(test(lhs, rhs))

        return pred

    if lit.kind == "name":
        word = lit.text.lower()
        if word == "null":
            if op not in ("eq", "ne"):
                raise _err(src, f"null can only be compared with eq or ne, not {op}")
            want_null = op == "eq"
            return lambda r: (_lookup(r, path) is None) is want_null
        if word in ("true", "false"):
            if op not in ("eq", "ne"):
                raise _err(src, f"a boolean can only be compared with eq or ne, not {op}")
            return compare(_as_text, word)
        raise _err(
            src,
            f"expected a literal after '{op}' at position {lit.pos}, got the name {lit.text!r} "
            "(strings are single-quoted)",
        )
    if lit.kind == "num":
        return compare(_as_number, lit.value)
    if lit.kind == "dt":
        return compare(_as_datetime, lit.value)
    if lit.kind == "str":
        text: str = lit.value
        as_dt = _looks_like_datetime(text)
        if as_dt is not None:  # a timestamp in plain quotes: compare as time when both are times
            folded = text.casefold()

            def by_time_or_text(r: Resource) -> bool:
                v = _lookup(r, path)
                if v is None:
                    return missing
                t = _as_datetime(v)
                if t is not _MISMATCH:
                    return bool(test(t, as_dt))
                s = _as_text(v)
                return missing if s is _MISMATCH else bool(test(s, folded))

            return by_time_or_text
        return compare(_as_text, text.casefold())
    raise _err(src, f"expected a literal after '{op}' at position {lit.pos}")


def _startswith(path: tuple[str, ...], prefix: str) -> Predicate:
    folded = prefix.casefold()

    def pred(r: Resource) -> bool:
        v = _lookup(r, path)
        return isinstance(v, str) and v.casefold().startswith(folded)

    return pred


# ---------------------------------------------------------------------------------------- parser


class _Parser:
    def __init__(self, src: str, allowed: Collection[str] | None) -> None:
        self.src = src
        self.toks = _tokens(src)
        self.i = 0
        self.allowed = allowed
        self.paths: set[str] = set()

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        if tok.kind != "end":
            self.i += 1
        return tok

    def keyword(self, *words: str) -> str | None:
        tok = self.peek()
        if tok.kind == "name" and tok.text.lower() in words:
            self.i += 1
            return tok.text.lower()
        return None

    def expect(self, kind: str, what: str) -> _Tok:
        tok = self.take()
        if tok.kind != kind:
            got = "the end of the filter" if tok.kind == "end" else repr(tok.text)
            raise _err(self.src, f"expected {what} at position {tok.pos}, got {got}")
        return tok

    def parse(self) -> Predicate:
        pred = self.expr(0)
        tok = self.peek()
        if tok.kind != "end":
            raise _err(
                self.src,
                f"unexpected {tok.text!r} at position {tok.pos} (terms are joined with 'and'/'or')",
            )
        return pred

    def expr(self, depth: int) -> Predicate:
        terms = [self.and_expr(depth)]
        while self.keyword("or"):
            terms.append(self.and_expr(depth))
        if len(terms) == 1:
            return terms[0]
        return lambda r: any(p(r) for p in terms)

    def and_expr(self, depth: int) -> Predicate:
        terms = [self.term(depth)]
        while self.keyword("and"):
            terms.append(self.term(depth))
        if len(terms) == 1:
            return terms[0]
        return lambda r: all(p(r) for p in terms)

    def term(self, depth: int) -> Predicate:
        tok = self.peek()
        if tok.kind == "(":
            if depth >= MAX_DEPTH:
                raise _err(self.src, f"parentheses nested deeper than {MAX_DEPTH}")
            self.take()
            inner = self.expr(depth + 1)
            self.expect(")", "')'")
            return inner
        if tok.kind != "name":
            got = "the end of the filter" if tok.kind == "end" else repr(tok.text)
            raise _err(
                self.src,
                f"expected a property name, '(' or startswith(...) at position {tok.pos}, got {got}",
            )
        self.take()
        word = tok.text.lower()
        if self.peek().kind == "(":
            if word != "startswith":
                raise _err(
                    self.src,
                    f"function {tok.text!r} is not supported (only startswith(property,'text'))",
                )
            return self.startswith()
        if word in ("not", "and", "or"):
            raise _err(self.src, f"operator {tok.text!r} is not supported at position {tok.pos}")
        path = self.path(tok)
        op_tok = self.take()
        op = op_tok.text.lower() if op_tok.kind == "name" else ""
        if op not in COMPARISONS:
            got = "the end of the filter" if op_tok.kind == "end" else repr(op_tok.text)
            raise _err(
                self.src,
                f"expected one of {', '.join(COMPARISONS)} after {tok.text!r}, got {got}",
            )
        lit = self.take()
        if lit.kind not in ("str", "num", "dt", "name"):
            raise _err(self.src, f"expected a literal after '{op}' at position {lit.pos}")
        return _comparison(path, op, lit, self.src)

    def startswith(self) -> Predicate:
        self.expect("(", "'('")
        prop = self.expect("name", "a property name")
        path = self.path(prop)
        self.expect(",", "','")
        prefix = self.expect("str", "a quoted string")
        self.expect(")", "')'")
        pred = _startswith(path, prefix.value)
        # OData v3 spelling: startswith(name,'x') eq true
        op = self.keyword("eq", "ne")
        if op is None:
            return pred
        value = self.keyword("true", "false")
        if value is None:
            raise _err(self.src, f"startswith(...) {op} must be followed by true or false")
        if (op == "eq") == (value == "true"):
            return pred
        return lambda r: not pred(r)

    def path(self, tok: _Tok) -> tuple[str, ...]:
        parts = tuple(tok.text.split("/"))
        if any(not p or not _is_name_start(p[0]) for p in parts):
            raise _err(self.src, f"{tok.text!r} is not a property name")
        if self.allowed is not None and tok.text not in self.allowed:
            raise _err(
                self.src,
                f"property {tok.text!r} cannot be used in $filter here; filterable: "
                + ", ".join(sorted(self.allowed)),
            )
        self.paths.add(tok.text)
        return parts


@dataclass(frozen=True, slots=True)
class Filter:
    """A parsed `$filter`: call it on a resource dict. `paths` are the properties it reads."""

    text: str
    paths: frozenset[str]
    _pred: Predicate

    def __call__(self, resource: Resource) -> bool:
        return self._pred(resource)


def parse_filter(text: str, allowed: Collection[str] | None = None) -> Filter:
    """Parse a `$filter` once. `allowed`: the property paths this list accepts (None: any)."""
    if not isinstance(text, str):
        raise ODataError("$filter", repr(text), "must be a string")
    if len(text) > MAX_FILTER_CHARS:
        raise ODataError("$filter", text, f"longer than {MAX_FILTER_CHARS} characters")
    if not text.strip():
        raise ODataError("$filter", text, "is empty")
    p = _Parser(text, allowed)
    pred = p.parse()
    return Filter(text, frozenset(p.paths), pred)


# ---------------------------------------------------------------------------------------- select

_Tree = dict[str, "_Tree | None"]  # None: the whole property


@dataclass(frozen=True, slots=True)
class Select:
    """A parsed `$select`: the property paths to keep (`None` tree: keep everything)."""

    paths: tuple[str, ...]
    _tree: _Tree | None

    def apply(self, resource: Resource) -> dict[str, Any]:
        return _project(resource, self._tree)


def _project(resource: Resource, tree: _Tree | None) -> dict[str, Any]:
    if tree is None:
        return dict(resource)
    out: dict[str, Any] = {}
    for key, sub in tree.items():
        if key not in resource:
            continue
        v = resource[key]
        if sub is None or not isinstance(v, Mapping):
            out[key] = v
        else:
            out[key] = _project(v, sub)
    return out


def parse_select(text: str, allowed: Collection[str] | None = None) -> Select:
    """`id,state,executionInfo/result` (or `*`). `allowed`: top-level names this resource has."""
    if not isinstance(text, str):
        raise ODataError("$select", repr(text), "must be a string")
    if len(text) > MAX_SELECT_CHARS:
        raise ODataError("$select", text, f"longer than {MAX_SELECT_CHARS} characters")
    items = [s.strip() for s in text.split(",")]
    if items == ["*"]:
        return Select(("*",), None)
    tree: _Tree = {}
    for item in items:
        if not item:
            raise ODataError("$select", text, "has an empty property name")
        parts = item.split("/")
        if any(not p or not _is_name_start(p[0]) or not all(map(_is_name_char, p)) for p in parts):
            raise ODataError("$select", text, f"{item!r} is not a property name")
        if allowed is not None and parts[0] not in allowed:
            raise ODataError(
                "$select",
                text,
                f"{parts[0]!r} is not a property of this resource; known: "
                + ", ".join(sorted(allowed)),
            )
        node = tree
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if part in node and node[part] is None:
                break  # the whole property is already selected
            if last:
                node[part] = None
            else:
                child = node.setdefault(part, {})
                assert child is not None
                node = child
    return Select(tuple(items), tree)


def parse_expand(text: str) -> frozenset[str]:
    """`$expand`: the service knows only `stats`."""
    if not isinstance(text, str) or len(text) > 256:
        raise ODataError("$expand", str(text)[:256], "only 'stats' can be expanded")
    items = {s.strip() for s in text.split(",")}
    unknown = sorted(i for i in items if i != "stats")
    if unknown:
        raise ODataError("$expand", text, f"only 'stats' can be expanded, not {unknown[0]!r}")
    return frozenset(items)
