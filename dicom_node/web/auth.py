"""Console sessions: random cookie tokens (only an HMAC of them is stored), CSRF tokens, login throttling.

Guessing is throttled per account, but a browser that has logged in to an account before carries a signed
device cookie for it and has a throttle of its own (OWASP's "device cookies"): someone trying passwords
for ``admin`` locks out only the browsers that never logged in as ``admin``, not the administrator.

A session expires after ``web.session_minutes`` without use (a page's own automatic reload, marked
``?auto=1``, is not use) and ``web.session_max_hours`` after its login whatever the use, so an
unattended workstation does not keep patient data on screen for ever.
The HMAC key (of session tokens and of the device cookies that exempt a browser from another's login
lockout) is ``web.secret_key``, or one made once and kept in ``node.data_dir``
(:func:`dicom_node.web.web_key`), so that sessions and device cookies outlive a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated

from pydantic import AfterValidator
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from dicom_node.store.models import User, UserRole, WebSession

SESSION_COOKIE = "cxr_session"
DEVICE_COOKIE = "cxr_device"
DEVICE_COOKIE_DAYS = 365
LOGIN_CSRF_COOKIE = "cxr_login_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
# Do not rewrite a session row on every click; refresh the expiry at most this often.
_REFRESH_AFTER = timedelta(minutes=1)


@dataclass(frozen=True)
class Principal:
    """The logged-in user of one request."""

    user_id: int
    username: str
    role: UserRole
    session_id: int
    csrf_token: str
    #: when the session ends unless it is used again (``web.session_minutes`` idle), and when it ends
    #: whatever the use (``web.session_max_hours`` after its login): the console warns before either
    expires_at: datetime
    ends_at: datetime

    @property
    def is_admin(self) -> bool:
        return self.role is UserRole.ADMIN


def aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything the node stores is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


#: A time in the JSON API: always with its zone (``...Z``), whatever the database handed back. A naive
#: value reads as the browser's local time in JavaScript's ``new Date()``.
UtcDatetime = Annotated[datetime, AfterValidator(aware)]


class SessionTokens:
    """Creates, resolves and ends console sessions."""

    def __init__(self, key: bytes, lifetime: timedelta, max_age: timedelta = timedelta(hours=12)) -> None:
        self._key = key
        self.lifetime = lifetime
        self.max_age = max_age

    def digest(self, token: str) -> str:
        return hmac.new(self._key, token.encode(), hashlib.sha256).hexdigest()

    def create(self, session: Session, user: User) -> str:
        """Start a session for ``user``; returns the cookie token (never stored)."""
        token = secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        session.add(
            WebSession(
                token_hash=self.digest(token),
                user_pk=user.id,
                csrf_token=secrets.token_urlsafe(32),
                created_at=now,
                expires_at=now + min(self.lifetime, self.max_age),
            )
        )
        session.flush()
        return token

    def resolve(self, session: Session, token: str | None, *, used: bool = True) -> Principal | None:
        """The principal for a cookie token, or None when unknown, expired or the user is disabled.
        ``used``: the request is the user's doing, so the idle expiry moves forward."""
        if not token or len(token) > 128:
            return None
        row = session.scalar(select(WebSession).where(WebSession.token_hash == self.digest(token)))
        if row is None:
            return None
        now = datetime.now(UTC)
        ends = aware(row.created_at) + self.max_age
        if min(aware(row.expires_at), ends) <= now or not row.user.active:
            session.delete(row)
            session.commit()
            return None
        extended = min(now + self.lifetime, ends)
        if used and extended - aware(row.expires_at) > _REFRESH_AFTER:  # not a write on every click
            row.expires_at = extended
            session.commit()
        expires_at = min(aware(row.expires_at), ends)
        return Principal(row.user.id, row.user.username, row.user.role, row.id, row.csrf_token,
                         expires_at, ends)

    def device_cookie(self, username: str) -> str:
        """A cookie saying this browser logged in as ``username`` (set at each successful login)."""
        nonce = secrets.token_urlsafe(16)
        return f"{nonce}.{self._device_mac(username, nonce)}"

    def throttle_key(self, account: str, device_cookie: str | None) -> str:
        """What failed logins are counted against: the browser when its device cookie is for this
        account (`users.account_name`), else every browser without one for it."""
        name = account
        cookie = device_cookie or ""
        nonce, _, mac = cookie.partition(".")
        expected = self._device_mac(name, nonce).encode()
        if nonce and len(cookie) <= 128 and hmac.compare_digest(mac.encode(), expected):
            return f"device:{nonce}"
        return f"user:{name}"

    def _device_mac(self, username: str, nonce: str) -> str:
        message = f"device|{username}|{nonce}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()[:32]

    def end(self, session: Session, session_id: int) -> None:
        session.execute(delete(WebSession).where(WebSession.id == session_id))

    def end_token(self, session: Session, token: str | None) -> None:
        """End the session of a cookie token, if it names one."""
        if token and len(token) <= 128:
            session.execute(delete(WebSession).where(WebSession.token_hash == self.digest(token)))

    def purge_expired(self, session: Session) -> None:
        """Delete expired rows (called at login so the table does not grow without bound)."""
        session.execute(delete(WebSession).where(WebSession.expires_at <= datetime.now(UTC)))


def tokens_match(expected: str, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(expected.encode(), (given or "").encode())


class LoginThrottle:
    """Slows password guessing: after ``limit`` failures for one key (:meth:`SessionTokens.throttle_key`)
    within ``window`` seconds, further attempts with that key are refused until the window has passed.

    Anyone can try any username, so the memory is bounded: keys whose failures have expired are
    dropped, and beyond ``max_names`` the keys with the fewest failures go first (the oldest first among
    equals), a blocked key last: evicting by age alone forgot the blocked key first, so failing for made-up
    names bought a locked-out account new guesses."""

    def __init__(self, limit: int = 8, window: float = 900.0, max_names: int = 10_000) -> None:
        self.limit = limit
        self.window = window
        self.max_names = max_names
        self._failures: dict[str, deque[float]] = {}
        self._reported: set[str] = set()  # keys whose block was audited in their current window
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> int:
        """Failures of ``key`` within the window (expired ones and empty names are dropped)."""
        entries = self._failures.get(key)
        if entries is None:
            return 0
        while entries and now - entries[0] > self.window:
            entries.popleft()
        if not entries:
            del self._failures[key]
            self._reported.discard(key)
        return len(entries)

    def first_block(self, key: str) -> bool:
        """True once per blocked window: one audit event per lockout, not one per refused attempt."""
        key = key.strip().lower()
        with self._lock:
            if key in self._reported:
                return False
            self._reported.add(key)
            return True

    def admit(self, username: str) -> bool:
        """Whether an attempt with this key may go on; if so, it is counted as a failure at once, until
        :meth:`succeeded` says otherwise. Asking whether the key was blocked first and counting a failure
        after the password check let guesses sent at once all pass before the first was counted (review)."""
        key = username.strip().lower()
        with self._lock:
            now = time.monotonic()
            if self._recent(key, now) >= self.limit:
                return False
            if key not in self._failures and len(self._failures) >= self.max_names:
                for name in list(self._failures):
                    self._recent(name, now)
                while len(self._failures) >= self.max_names:
                    least = min(self._failures, key=lambda name: (len(self._failures[name]),
                                                                   self._failures[name][0]))
                    del self._failures[least]
                    self._reported.discard(least)
            self._failures.setdefault(key, deque()).append(now)
            return True

    def succeeded(self, username: str) -> None:
        with self._lock:
            self._failures.pop(username.strip().lower(), None)
            self._reported.discard(username.strip().lower())
