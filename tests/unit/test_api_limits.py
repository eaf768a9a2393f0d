"""Request-body limits that need no server: JSON nesting, Content-MD5 parsing, body size."""

from __future__ import annotations

import base64
import hashlib

import msgspec
import pytest

from coordinator.common.errors import ApiError
from coordinator.rest.dispatch import _decode
from coordinator.rest.limits import MAX_PRE_AUTH_MESSAGE, BodyStream, read_body


class _Loose(msgspec.Struct):
    # A field of any JSON type: the decoder descends into whatever it holds.
    data: object = None


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deep_json_is_a_400_not_a_recursion_error(depth: int) -> None:
    body = b'{"data": ' + b"[" * depth + b"]" * depth + b"}"
    with pytest.raises(ApiError) as err:
        _decode(body, _Loose)
    assert err.value.status == 400
    assert err.value.code == "InvalidRequestBody"
    assert err.value.values == {"reason": "JsonNestingTooDeep"}


def test_shallow_json_still_decodes() -> None:
    assert _decode(b'{"data": [[[1]]]}', _Loose).data == [[[1]]]


def _receiver(chunks: list[bytes]):  # noqa: ANN202 - an ASGI receive callable
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]

    async def receive() -> dict:
        return messages.pop(0)

    return receive


async def test_read_body_limits_and_md5() -> None:
    data = [b"a" * 10, b"b" * 10]
    md5 = base64.b64encode(hashlib.md5(b"".join(data)).digest()).decode()
    assert await read_body(_receiver(list(data)), {"content-md5": md5}, 20) == b"".join(data)
    with pytest.raises(ApiError) as err:
        await read_body(_receiver(list(data)), {}, 19)
    assert (err.value.status, err.value.code) == (413, "RequestBodyTooLarge")
    with pytest.raises(ApiError) as err:
        await read_body(_receiver([]), {"content-length": "21"}, 20)  # refused before any receive
    assert err.value.status == 413
    with pytest.raises(ApiError) as err:
        await read_body(
            _receiver(list(data)), {"content-md5": base64.b64encode(b"x" * 16).decode()}, 20
        )
    assert (err.value.status, err.value.code) == (400, "Md5Mismatch")
    for bad in ("zz", base64.b64encode(b"short").decode()):
        with pytest.raises(ApiError) as err:
            await read_body(_receiver(list(data)), {"content-md5": bad}, 20)
        assert (err.value.status, err.value.code) == (400, "InvalidHeaderValue")


async def test_body_stream_checks_md5_only_at_its_end() -> None:
    stream = BodyStream(
        _receiver([b"x" * 5, b"y" * 5]), {"content-md5": base64.b64encode(b"0" * 16).decode()}, 100
    )
    seen: list[bytes] = []

    async def consume() -> None:
        async for chunk in stream.chunks():
            seen.append(chunk)

    with pytest.raises(ApiError) as err:
        await consume()
    assert seen == [b"x" * 5, b"y" * 5]  # every chunk was handed on before the verdict
    assert err.value.code == "Md5Mismatch"


def test_the_largest_legitimate_hello_fits_the_pre_auth_limit() -> None:
    from protocol import messages as pm

    # 256 cores x 4 slots running, as many finished and unacknowledged, names at their longest.
    key = "w" * 64 + "/" + "j" * 64 + "/" + "t" * 64
    entries = [pm.RunningTask(key=f"{key}{i:05d}", attempt=99) for i in range(1024)]
    hello = pm.Hello(
        agent_id="a" * 128,
        token="t" * 64,
        capabilities=["c" * 32] * 16,
        hostname="h" * 255,
        running=entries,
        finished=entries,
        session_id="s" * 64,
        proof="p" * 64,
    )
    assert len(msgspec.msgpack.encode(hello)) < MAX_PRE_AUTH_MESSAGE
