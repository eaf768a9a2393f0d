"""Task command lines: the limits and a linear-time split with `shlex.split`'s POSIX rules.

`shlex.split` grows each token one character at a time (`self.token += c`), so a long token costs
quadratic time: a 1.6 MB command line held the agent's event loop for a minute. This splitter walks
the string with regex runs and `str.find`, each step consuming at least one character, and joins
every token once, so the work is linear. It gives the same words as `shlex.split(s)` (posix=True,
no comments) and raises `CommandLineError` (a ValueError) wherever shlex raises ValueError.
"""

from __future__ import annotations

import re

# Azure Batch's documented limit; the coordinator refuses longer ones with 400 (an agent may still be
# sent one by an older coordinator, hence the same check here).
MAX_COMMAND_LINE = 8191

_WS = " \t\r\n"  # shlex's whitespace; not str.isspace (no \v, \f or Unicode spaces)
_SKIP_WS = re.compile(r"[ \t\r\n]*")
_PLAIN = re.compile(r"[^ \t\r\n'\"\\]+")  # word characters outside quotes
_DQ_PLAIN = re.compile(r'[^"\\]+')  # inside double quotes, up to the next quote or backslash


class CommandLineError(ValueError):
    """A command line that cannot be run; the message is shown to the user."""


def refusal(command_line: str) -> str | None:
    """Why this command line is refused before any parsing (too long, NUL), else None. Cheap:
    `len` and one C-level scan, so it is safe to call on the event loop."""
    if len(command_line) > MAX_COMMAND_LINE:
        return (
            f"commandLine is {len(command_line)} characters long; the limit is {MAX_COMMAND_LINE}"
        )
    if "\0" in command_line:
        return "commandLine contains a NUL character, which no program argument can carry"
    return None


def split(s: str) -> list[str]:
    """The words of `s` under shlex's POSIX rules, in time linear in len(s)."""
    words: list[str] = []
    n = len(s)
    i = _SKIP_WS.match(s, 0).end()  # type: ignore[union-attr]
    while i < n:
        parts: list[str] = []
        while i < n and s[i] not in _WS:
            c = s[i]
            if c == "'":
                end = s.find("'", i + 1)
                if end < 0:
                    raise CommandLineError("No closing quotation")
                parts.append(s[i + 1 : end])
                i = end + 1
            elif c == '"':
                i = _double_quoted(s, i + 1, parts)
            elif c == "\\":
                if i + 1 >= n:
                    raise CommandLineError("No escaped character")
                parts.append(s[i + 1])
                i += 2
            else:
                m = _PLAIN.match(s, i)
                assert m is not None  # s[i] is none of the characters _PLAIN excludes
                parts.append(m.group())
                i = m.end()
        # A word ends at whitespace or the end; "" and '' make an empty word, as in shlex.
        words.append("".join(parts))
        i = _SKIP_WS.match(s, i).end()  # type: ignore[union-attr]
    return words


def _double_quoted(s: str, i: int, parts: list[str]) -> int:
    """Append the contents of a "..." starting after its quote at `i`; the index after the close.
    Inside, a backslash escapes only `"` and `\\`; before anything else it stays literal."""
    n = len(s)
    while True:
        m = _DQ_PLAIN.match(s, i)
        if m is not None:
            parts.append(m.group())
            i = m.end()
        if i >= n:
            raise CommandLineError("No closing quotation")
        if s[i] == '"':
            return i + 1
        # a backslash
        if i + 1 >= n:
            raise CommandLineError("No escaped character")
        nxt = s[i + 1]
        parts.append(nxt if nxt in '"\\' else "\\" + nxt)
        i += 2


def parse(command_line: str) -> list[str]:
    """The argv of a task's command line, or CommandLineError saying why it cannot run."""
    why = refusal(command_line)
    if why is not None:
        raise CommandLineError(why)
    try:
        argv = split(command_line)
    except CommandLineError as exc:
        raise CommandLineError(f"cannot parse command line: {exc}") from None
    if not argv:
        raise CommandLineError("cannot parse command line: empty command line")
    return argv
