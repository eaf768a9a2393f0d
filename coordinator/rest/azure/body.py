"""Lenient reading of Azure request bodies, as the real service reads them.

Unknown properties are ignored and recorded in a debug log (newer clients send fields an older
service does not know); numbers may come as numeric strings (`az batch` sends `"2"`); a property
with the wrong type or a refused value is a 400 `InvalidPropertyValue` naming its full path.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from coordinator.common.errors import ApiError, bad_request, quoted
from coordinator.common.validation import json_error

from .conv import invalid

log = logging.getLogger("tvm.api.azure")

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def parse_json(raw: bytes, *, required: bool = True) -> Body:
    if not raw.strip():
        if required:
            raise bad_request("MissingRequiredProperty", "the request needs a JSON body")
        return Body({}, "")
    try:
        data = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        why = json_error(raw, exc)
        raise bad_request("InvalidRequestBody", f"the body is not valid JSON: {why}") from None
    except UnicodeDecodeError as exc:  # msgspec checks a string's UTF-8 as it decodes it
        raise bad_request("InvalidRequestBody", f"the body is not valid UTF-8: {exc}") from None
    except RecursionError:
        raise bad_request("InvalidRequestBody", "the body is nested too deeply") from None
    if not isinstance(data, dict):
        raise bad_request("InvalidRequestBody", "the body must be a JSON object")
    return Body(data, "")


class Body:
    """One JSON object of a request; remembers which properties were read."""

    def __init__(self, data: dict[str, Any], path: str) -> None:
        self.data = data
        self.path = path
        self.read: set[str] = set()
        self.children: list[Body] = []

    def _p(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def kept(self) -> dict[str, Any]:
        """This object as sent, to be stored and shown again as it is (an image reference, an
        auto pool's specification). Refused, naming the place, if the journal could not hold it:
        an integer past 64 bits (JSON has no bound)."""
        stack: list[tuple[Any, str]] = [(self.data, self.path)]
        while stack:
            value, where = stack.pop()
            if isinstance(value, dict):
                stack.extend((v, f"{where}.{k}" if where else str(k)) for k, v in value.items())
            elif isinstance(value, list):
                stack.extend((v, f"{where}[{i}]") for i, v in enumerate(value))
            elif isinstance(value, int) and not -(2**63) <= value < 2**64:
                raise invalid(where, str(value)[:40], f"{where}: the number is too large")
        return dict(self.data)

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def raw(self, key: str) -> Any:
        self.read.add(key)
        return self.data.get(key)

    def text(self, key: str, *, required: bool = False, default: str | None = None) -> str | None:
        v = self.raw(key)
        if v is None:
            if required:
                raise ApiError(
                    400,
                    "MissingRequiredProperty",
                    f"the property {self._p(key)} is required",
                    field=self._p(key),
                )
            return default
        if not isinstance(v, str):
            raise invalid(self._p(key), v, f"{self._p(key)} must be a string")
        return v

    def req_text(self, key: str) -> str:
        v = self.text(key, required=True)
        assert v is not None
        return v

    def integer(self, key: str, default: int | None = None) -> int | None:
        """An Int32 of Azure's schema (every integer a request carries is one)."""
        v = self.raw(key)
        if v is None:
            return default
        if isinstance(v, bool):
            raise invalid(self._p(key), v, f"{self._p(key)} must be a whole number")
        n: int | None = None
        if isinstance(v, int):
            n = v
        elif isinstance(v, float) and v.is_integer():
            n = int(v)
        elif isinstance(v, str):
            s = v.strip()
            if s.lstrip("+-").isdigit() and len(s) <= 40:
                n = int(s)
        shown = quoted(v, 40)
        value = v if shown == repr(v) else shown  # PropertyValue: as sent, or cut
        if n is None:
            raise invalid(
                self._p(key), value, f"{self._p(key)} must be a whole number, got {shown}"
            )
        if not INT32_MIN <= n <= INT32_MAX:
            # Past it, Azure refuses the request too; kept, such a number could not be journaled.
            raise invalid(
                self._p(key),
                value,
                f"{self._p(key)} must be a whole number from {INT32_MIN} to {INT32_MAX},"
                f" got {shown}",
            )
        return n

    def flag(self, key: str, default: bool = False) -> bool:
        v = self.raw(key)
        if v is None:
            return default
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.strip().lower() in ("true", "false"):
            return v.strip().lower() == "true"
        raise invalid(self._p(key), v, f"{self._p(key)} must be true or false")

    def obj(self, key: str) -> Body | None:
        v = self.raw(key)
        if v is None:
            return None
        if not isinstance(v, dict):
            raise invalid(self._p(key), "", f"{self._p(key)} must be an object")
        child = Body(v, self._p(key))
        self.children.append(child)
        return child

    def objs(self, key: str) -> list[Body]:
        v = self.raw(key)
        if v is None:
            return []
        if not isinstance(v, list):
            raise invalid(self._p(key), "", f"{self._p(key)} must be a list")
        out = []
        for i, item in enumerate(v):
            if not isinstance(item, dict):
                raise invalid(f"{self._p(key)}[{i}]", "", f"{self._p(key)}[{i}] must be an object")
            child = Body(item, f"{self._p(key)}[{i}]")
            self.children.append(child)
            out.append(child)
        return out

    def texts(self, key: str) -> list[str]:
        v = self.raw(key)
        if v is None:
            return []
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise invalid(self._p(key), "", f"{self._p(key)} must be a list of strings")
        return list(v)

    def refuse(self, keys: tuple[str, ...], why: str) -> None:
        """Settings this service cannot honour: a clear 400 naming the first one present."""
        for key in keys:
            if self.data.get(key) not in (None, [], {}):
                raise invalid(self._p(key), "", f"{self._p(key)} is not supported: {why}")

    def accept(self, *keys: str) -> None:
        """Properties accepted and echoed or left without effect (documented in the README)."""
        self.read.update(keys)

    def unknown(self) -> list[str]:
        out = [self._p(k) for k in self.data if k not in self.read]
        for c in self.children:
            out.extend(c.unknown())
        return out

    def log_unknown(self, what: str) -> None:
        extra = self.unknown()
        if extra:
            log.debug("%s: ignored unknown properties %s", what, ", ".join(sorted(extra)))
