"""Dashboard sessions: one-time login tokens, session cookies and CSRF tokens (pure, no I/O).

The account key never reaches the browser: `tvm ui` (signed with the key) asks for a short-lived
single-use login token, or the login form takes the key once and compares it here. Either way the
browser only ever holds a random session id in an HttpOnly, SameSite=Strict cookie scoped to
/ui/, and a per-session CSRF token that every POST must echo in a header.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

COOKIE = "tvm_ui_session"
LOGIN_TOKEN_TTL = 120.0
SESSION_TTL = 8 * 3600.0
MAX_SESSIONS = 1000  # a flood of logins evicts the oldest sessions instead of growing memory
MAX_TOKENS = 100


@dataclass
class Session:
    sid: str
    csrf: str
    write: bool  # read-only unless asked for at login: actions answer 403 otherwise
    expires: float


def _digest(secret: str) -> str:
    # Only digests are kept in memory: a heap dump does not hand out live sessions.
    return hashlib.sha256(secret.encode()).hexdigest()


class Sessions:
    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        session_ttl: float = SESSION_TTL,
        token_ttl: float = LOGIN_TOKEN_TTL,
    ) -> None:
        self.clock = clock
        self.session_ttl = session_ttl
        self.token_ttl = token_ttl
        self._tokens: dict[str, tuple[float, bool]] = {}
        self._sessions: dict[str, Session] = {}

    def _prune(self) -> None:
        now = self.clock()
        for k in [k for k, (exp, _) in self._tokens.items() if exp <= now]:
            del self._tokens[k]
        for k in [k for k, s in self._sessions.items() if s.expires <= now]:
            del self._sessions[k]

    def issue_login_token(self, write: bool = False) -> str:
        self._prune()
        while len(self._tokens) >= MAX_TOKENS:
            del self._tokens[next(iter(self._tokens))]
        token = secrets.token_urlsafe(32)
        self._tokens[_digest(token)] = (self.clock() + self.token_ttl, write)
        return token

    def redeem(self, token: str) -> Session | None:
        """A new session for a valid login token, which is used up (None: unknown, used, expired)."""
        entry = self._tokens.pop(_digest(token), None)
        if entry is None or entry[0] <= self.clock():
            return None
        return self.create(entry[1])

    def create(self, write: bool) -> Session:
        self._prune()
        while len(self._sessions) >= MAX_SESSIONS:
            del self._sessions[next(iter(self._sessions))]
        sid = secrets.token_urlsafe(32)
        s = Session(sid, secrets.token_urlsafe(24), write, self.clock() + self.session_ttl)
        self._sessions[_digest(sid)] = s
        return s

    def lookup(self, cookie_header: str) -> Session | None:
        sid = cookie_value(cookie_header, COOKIE)
        if not sid:
            return None
        s = self._sessions.get(_digest(sid))
        if s is None:
            return None
        if s.expires <= self.clock():
            del self._sessions[_digest(sid)]
            return None
        return s

    def end(self, session: Session) -> None:
        self._sessions.pop(_digest(session.sid), None)

    def set_cookie(self, session: Session, secure: bool) -> bytes:
        ttl = max(0, int(session.expires - self.clock()))
        attrs = f"{COOKIE}={session.sid}; Path=/ui/; Max-Age={ttl}; HttpOnly; SameSite=Strict"
        return (attrs + ("; Secure" if secure else "")).encode()

    @staticmethod
    def clear_cookie() -> bytes:
        return f"{COOKIE}=; Path=/ui/; Max-Age=0; HttpOnly; SameSite=Strict".encode()


def cookie_value(header: str, name: str) -> str:
    for part in header.split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return ""


def key_matches(given: str, keys: list[str]) -> bool:
    """Compare in constant time against every configured key (rotation keeps two)."""
    ok = False
    for k in keys:
        if k and hmac.compare_digest(given.encode(), k.encode()):
            ok = True
    return ok


def csrf_ok(session: Session, given: str) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), session.csrf.encode())
