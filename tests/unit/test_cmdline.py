"""The agent's command-line splitter: the same words as shlex.split (POSIX), in linear time."""

from __future__ import annotations

import shlex

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tvmagent import cmdline

# Quoting characters, shlex's whitespace and some it does not treat as whitespace.
_ALPHABET = st.sampled_from(list("ab \t\r\n'\"\\#;$\v\f") + ["é", "\u00a0", "\u2003"])


def _shlex(s: str) -> list[str] | None:
    try:
        return shlex.split(s)
    except ValueError:
        return None


def _ours(s: str) -> list[str] | None:
    try:
        return cmdline.split(s)
    except cmdline.CommandLineError:
        return None


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet=_ALPHABET, max_size=24))
def test_split_matches_shlex(s: str) -> None:
    assert _ours(s) == _shlex(s)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=40))
def test_split_matches_shlex_on_any_text(s: str) -> None:
    assert _ours(s) == _shlex(s)


@pytest.mark.parametrize(
    "s",
    [
        "",
        "   ",
        "a",
        "a b",
        "'a b' c",
        '"a \\" b"',
        '"a\\b"',
        "a\\ b",
        '""',
        "''",
        'a"b c"d',
        "\\",
        "'open",
        '"open',
        '"\\',
        'x "" y',
        "a\\\nb",
        "\t a \r\n",
    ],
)
def test_split_matches_shlex_on_edges(s: str) -> None:
    assert _ours(s) == _shlex(s)


@pytest.mark.parametrize(
    "poison",
    [
        "a" * 2_000_000,
        '"' + "a" * 2_000_000 + '"',
        '"' + "\\a" * 1_000_000 + '"',
        "'" + "a" * 2_000_000,  # unterminated: an error, found without quadratic work
        "a'b'" * 500_000,
    ],
)
def test_two_megabyte_poison_returns(poison: str) -> None:
    # No timing assertion: shlex.split needs minutes here; this returns (or refuses) promptly.
    result = _ours(poison)
    assert result is None or sum(map(len, result)) > 0


def test_parse_refuses_long_nul_and_empty() -> None:
    assert cmdline.parse("/bin/echo 'a b'") == ["/bin/echo", "a b"]
    assert len(cmdline.parse("x" * cmdline.MAX_COMMAND_LINE)) == 1
    with pytest.raises(cmdline.CommandLineError, match="8192 characters long; the limit is 8191"):
        cmdline.parse("x" * (cmdline.MAX_COMMAND_LINE + 1))
    with pytest.raises(cmdline.CommandLineError, match="NUL"):
        cmdline.parse("echo a\0b")
    with pytest.raises(cmdline.CommandLineError, match="empty command line"):
        cmdline.parse("  \t")
    with pytest.raises(cmdline.CommandLineError, match="No closing quotation"):
        cmdline.parse("echo 'a")
