"""SHA-512 crypt(3) (`$6$salt$hash`, Drepper's specification), for node users' passwords.

A node user's password is hashed here, in the REST handler that received it: only the hash is sent
to the agent (which sets it as the account's password with `useradd`/`usermod --password`), and
neither is stored by the coordinator. Pure Python: the standard `crypt` module is gone in 3.13.
"""

from __future__ import annotations

import hashlib
import secrets

_ITOA64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_SALT_CHARS = _ITOA64
ROUNDS = 5000  # the default: the hash then carries no `rounds=` field
# The byte order of the final encoding (three bytes to four characters), from the specification.
_ORDER = (
    (0, 21, 42), (22, 43, 1), (44, 2, 23), (3, 24, 45), (25, 46, 4), (47, 5, 26), (6, 27, 48),
    (28, 49, 7), (50, 8, 29), (9, 30, 51), (31, 52, 10), (53, 11, 32), (12, 33, 54),
    (34, 55, 13), (56, 14, 35), (15, 36, 57), (37, 58, 16), (59, 17, 38), (18, 39, 60),
    (40, 61, 19), (62, 20, 41),
)  # fmt: skip


def _b64(b2: int, b1: int, b0: int, n: int) -> str:
    w = (b2 << 16) | (b1 << 8) | b0
    out = []
    for _ in range(n):
        out.append(_ITOA64[w & 0x3F])
        w >>= 6
    return "".join(out)


def _repeat(digest: bytes, length: int) -> bytes:
    return (digest * (length // len(digest) + 1))[:length]


def sha512_crypt(password: str, salt: str | None = None) -> str:
    """The `$6$` hash of `password` (UTF-8) with `salt` (random 16 characters when None)."""
    pw = password.encode()
    if salt is None:
        salt = "".join(secrets.choice(_SALT_CHARS) for _ in range(16))
    s = salt[:16].encode()
    b = hashlib.sha512(pw + s + pw).digest()
    a = hashlib.sha512(pw + s)
    n = len(pw)
    while n > 64:
        a.update(b)
        n -= 64
    a.update(b[:n])
    n = len(pw)
    while n:
        a.update(b if n & 1 else pw)
        n >>= 1
    c = a.digest()
    p = _repeat(hashlib.sha512(pw * len(pw)).digest(), len(pw))
    ds = _repeat(hashlib.sha512(s * (16 + c[0])).digest(), len(s))
    for i in range(ROUNDS):
        h = hashlib.sha512(p if i & 1 else c)
        if i % 3:
            h.update(ds)
        if i % 7:
            h.update(p)
        h.update(c if i & 1 else p)
        c = h.digest()
    enc = "".join(_b64(c[x], c[y], c[z], 4) for x, y, z in _ORDER) + _b64(0, 0, c[63], 2)
    return f"$6${s.decode()}${enc}"
