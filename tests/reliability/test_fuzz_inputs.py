"""Fuzz: the protocol decoder and link session (and the core fed by what they accept), and every
REST route of the seed and Azure APIs through the coordinator's ASGI app: no crash, no 5xx, every
refusal a 4xx with a JSON `{code, message}` body and its error-code header. The default run is a
few thousand inputs; `-m slow` runs the full size (benchmarks/reliability/fuzz.py FULL_*)."""

from __future__ import annotations

import pytest

from benchmarks.reliability import fuzz


def _clean(tally: fuzz.Tally) -> None:
    assert tally.findings == [], "\n\n".join(tally.findings[:5])
    assert not any(status >= 500 for status in tally.statuses)


def test_protocol_decoder_and_session() -> None:
    tally = fuzz.protocol_fuzz(*fuzz.DEFAULT_PROTOCOL)
    assert tally.inputs == sum(fuzz.DEFAULT_PROTOCOL)
    _clean(tally)


def test_rest_routes_seed_and_azure() -> None:
    tally = fuzz.rest_fuzz(*fuzz.DEFAULT_REST)
    assert tally.inputs == sum(fuzz.DEFAULT_REST)
    _clean(tally)
    # The inputs reach the handlers, not only the router: some pass, many are refused as bad.
    assert tally.statuses[400] > 100
    assert sum(c for s, c in tally.statuses.items() if 200 <= s < 300) > 50


def test_a_refusal_without_a_clear_body_is_a_finding() -> None:
    """The checker itself: a 5xx, a bare 4xx, or one without its code header are findings."""
    ok_headers = {"x-tvm-error-code": "X"}
    assert fuzz.check_answer("GET", 500, ok_headers, b'{"code":"X","message":"m"}')
    assert fuzz.check_answer("GET", 400, ok_headers, b"bad")
    assert fuzz.check_answer("GET", 400, {}, b'{"code":"X","message":"m"}')
    assert not fuzz.check_answer("GET", 400, ok_headers, b'{"code":"X","message":"m"}')
    assert not fuzz.check_answer("HEAD", 404, ok_headers, b"")


@pytest.mark.slow
def test_full_size_fuzz() -> None:
    _clean(fuzz.protocol_fuzz(*fuzz.FULL_PROTOCOL))
    _clean(fuzz.rest_fuzz(*fuzz.FULL_REST))


# ---------------------------------------------------------------------------- what it found


def test_invalid_utf8_inside_a_json_string_is_a_400(tmp_path) -> None:
    bad = b'{"name": "p\xff", "vmSize": "small"}'
    with fuzz.AppThread(str(tmp_path)) as app:
        for query in ("", "api-version=2025-06-01"):
            status, _, body = app.request("POST", "/pools", query, body=bad)
            assert status == 400, body
            assert b"InvalidRequestBody" in body
            assert b"UTF-8" in body
        status, _, _ = app.request("GET", "/pools/p")
        assert status == 404  # nothing was stored


def test_invalid_utf8_in_a_message_is_a_protocol_error() -> None:
    import msgspec

    from protocol import LinkSession, coordinator_codec
    from protocol import messages as pm
    from protocol.codec import ProtocolError

    codec = coordinator_codec()
    good = msgspec.msgpack.encode(pm.Draining(reason="ok"))
    bad = good.replace(b"ok", b"\xff\xfe")
    hello = msgspec.msgpack.encode(pm.Hello(agent_id="a\xe9", token="t")).replace(
        "a\xe9".encode(), b"a\xff"
    )
    with pytest.raises(ProtocolError):
        codec.decode_handshake(hello)
    # A frame whose second message is malformed is refused whole: its first message does not
    # count as received, so a resumed session has the peer send both again.
    session = LinkSession(codec, "s")
    frame = msgspec.msgpack.encode(pm.Frame(first=1, msgs=[msgspec.Raw(good), msgspec.Raw(bad)]))
    with pytest.raises(ProtocolError):
        session.receive_frame(frame)
    assert session.received == 0
    got = session.receive_frame(msgspec.msgpack.encode(pm.Frame(first=1, msgs=[msgspec.Raw(good)])))
    assert [r.seq for r in got] == [1]
