"""Login, sessions, CSRF and roles of the console."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import pytest
from argon2 import PasswordHasher
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import audit, users
from dicom_node.errors import ConflictError
from dicom_node.settings import Settings
from dicom_node.store.db import make_engine, make_session_factory, session_scope, upgrade
from dicom_node.store.models import AuditEvent, User, UserRole, WebSession
from dicom_node.web import create_app
from tests.web.conftest import ADMIN, RADIOLOGIST, form_csrf, login

pytestmark = [pytest.mark.unit]


def _sessions(factory: sessionmaker[Session]) -> int:
    with session_scope(factory) as s:
        return int(s.scalar(select(func.count()).select_from(WebSession)) or 0)


def _actions(factory: sessionmaker[Session]) -> list[str]:
    with session_scope(factory) as s:
        return list(s.scalars(select(AuditEvent.action).order_by(AuditEvent.id)))


def test_without_an_admin_the_login_page_and_log_say_how_to_create_one(
    settings: Settings, factory: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        app = create_app(settings, factory)
    assert "cxr-node user add --username <name> --role admin" in caplog.text
    with TestClient(app) as client:
        page = client.get("/login")
    assert "No administrator exists yet" in page.text
    assert "cxr-node user add --username &lt;name&gt; --role admin" in page.text


def test_login_sets_a_strict_httponly_cookie_and_opens_the_dashboard(
    client: TestClient, accounts: dict[str, int], factory: sessionmaker[Session]
) -> None:
    page = client.get("/login")
    assert "No administrator exists yet" not in page.text
    response = client.post(
        "/login", data={"username": ADMIN[0], "password": ADMIN[1], "csrf_token": form_csrf(page.text)}
    )
    assert response.status_code == 303 and response.headers["location"] == "/"
    cookie = next(h for h in response.headers.get_list("set-cookie") if h.startswith("cxr_session="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" not in cookie
    dashboard = client.get("/")
    assert dashboard.status_code == 200 and "Today" in dashboard.text and ADMIN[0] in dashboard.text
    assert _sessions(factory) == 1
    with session_scope(factory) as s:
        stored = s.scalar(select(WebSession.token_hash))
    assert stored is not None and stored not in cookie  # only a keyed hash of the token is kept
    assert "user.login" in _actions(factory)


def test_secure_cookies_when_configured(
    tmp_path: Path, factory: sessionmaker[Session], accounts: dict[str, int]
) -> None:
    settings = Settings(node={"data_dir": tmp_path / "var"}, web={"secure_cookies": True})
    app = create_app(settings, factory)
    with TestClient(app, base_url="https://testserver", follow_redirects=False) as client:
        page = client.get("/login")
        response = client.post(
            "/login", data={"username": ADMIN[0], "password": ADMIN[1], "csrf_token": form_csrf(page.text)}
        )
    cookie = next(h for h in response.headers.get_list("set-cookie") if h.startswith("cxr_session="))
    assert "Secure" in cookie


def test_wrong_password_is_refused_and_audited(
    client: TestClient, accounts: dict[str, int], factory: sessionmaker[Session]
) -> None:
    page = client.get("/login")
    response = client.post(
        "/login",
        data={"username": ADMIN[0], "password": "wrong-password", "csrf_token": form_csrf(page.text)},
    )
    assert response.status_code == 401
    assert "Unknown user or wrong password" in response.text
    assert "cxr_session" not in client.cookies
    assert _actions(factory)[-1] == "user.login_failed"
    assert client.get("/").status_code == 303
    page = client.get("/login")
    client.post(
        "/login", data={"username": "my-secret-password", "password": "x", "csrf_token": form_csrf(page.text)}
    )
    with session_scope(factory) as s:
        failures = [
            (e.actor, e.target)
            for e in s.scalars(select(AuditEvent).where(AuditEvent.action == "user.login_failed"))
        ]
    assert failures == [("user:alice", f"app_user:{accounts['admin']}"), ("anonymous", "")]


def test_login_form_without_its_csrf_token_is_refused(client: TestClient, accounts: dict[str, int]) -> None:
    client.get("/login")
    response = client.post(
        "/login", data={"username": ADMIN[0], "password": ADMIN[1], "csrf_token": "forged"}
    )
    assert response.status_code == 403
    assert "cxr_session" not in client.cookies


def test_repeated_failures_block_the_username(client: TestClient, accounts: dict[str, int]) -> None:
    for _ in range(8):
        page = client.get("/login")
        client.post(
            "/login",
            data={
                "username": RADIOLOGIST[0],
                "password": "nope-nope-nope",
                "csrf_token": form_csrf(page.text),
            },
        )
    page = client.get("/login")
    response = client.post(
        "/login",
        data={"username": RADIOLOGIST[0], "password": RADIOLOGIST[1], "csrf_token": form_csrf(page.text)},
    )
    assert response.status_code == 429
    assert "cxr_session" not in client.cookies


def _try_login(client: TestClient, username: str, password: str) -> int:
    page = client.get("/login")
    response = client.post(
        "/login", data={"username": username, "password": password, "csrf_token": form_csrf(page.text)}
    )
    return response.status_code


def test_guessing_does_not_lock_out_a_browser_that_logged_in_before(
    app: FastAPI, accounts: dict[str, int], factory: sessionmaker[Session]
) -> None:
    """The old throttle counted per username only, refused the right password too and audited every
    refusal: anyone could lock every admin out (and fill the audit log) with a few hundred requests."""
    with TestClient(app, follow_redirects=False) as own, TestClient(app, follow_redirects=False) as other:
        assert _try_login(own, *ADMIN) == 303  # the administrator's browser, earlier
        assert own.cookies.get("cxr_device")
        own.post("/logout", data={"csrf_token": form_csrf(own.get("/").text)})
        for _ in range(8):
            assert _try_login(other, ADMIN[0], "guess-guess-guess") == 401
        refused = [_try_login(other, *ADMIN) for _ in range(5)]
        # a device cookie for another account is no way round the block
        other.cookies.set("cxr_device", app.state.console.tokens.device_cookie(RADIOLOGIST[0]))
        assert _try_login(other, ADMIN[0], "guess-guess-guess") == 429
        assert _try_login(own, *ADMIN) == 303
    assert refused == [429] * 5
    assert _actions(factory).count("user.login_blocked") == 1  # one event per lockout
    with TestClient(app, follow_redirects=False) as forged:  # a made-up device cookie counts as none
        forged.cookies.set("cxr_device", "abc.0123456789abcdef0123456789abcdef")
        assert _try_login(forged, *ADMIN) == 429
    tokens = app.state.console.tokens
    assert tokens.throttle_key("alice", tokens.device_cookie("alice")).startswith("device:")
    assert tokens.throttle_key("alice", "abc.d\u00e9f") == "user:alice"  # not ASCII: no TypeError


def test_sessions_and_device_cookies_outlive_a_restart_without_a_configured_key(
    settings: Settings, accounts: dict[str, int], factory: sessionmaker[Session]
) -> None:
    """Without ``web.secret_key`` (the quick start) each process made its own key: a restart logged every
    user out and voided the device cookies, so that after it eight wrong guesses locked the administrator
    out of their own browser (review). The key is made once and kept in node.data_dir, readable by the
    node's user only."""
    assert settings.web.secret_key is None
    with TestClient(create_app(settings, factory), follow_redirects=False) as before:
        assert _try_login(before, *ADMIN) == 303
        cookies = dict(before.cookies)
    app = create_app(settings, factory)  # the node restarted
    with TestClient(app, follow_redirects=False) as own, TestClient(app, follow_redirects=False) as other:
        own.cookies.update(cookies)
        assert own.get("/api/session").json()["username"] == ADMIN[0]  # still logged in
        own.post("/logout", data={"csrf_token": form_csrf(own.get("/").text)})
        for _ in range(8):
            assert _try_login(other, ADMIN[0], "guess-guess-guess") == 401
        assert _try_login(other, *ADMIN) == 429
        assert _try_login(own, *ADMIN) == 303  # the device cookie from before the restart still counts
    key = settings.node.data_dir / "web-secret-key"
    assert key.stat().st_mode & 0o777 == 0o600


def test_a_name_in_other_letters_is_the_same_account_and_no_way_round_its_lockout(
    app: FastAPI, accounts: dict[str, int], factory: sessionmaker[Session]
) -> None:
    """Names were told apart by case and any printable letter, while the lockout folded them to lower
    case: an admin could add "ALICE" beside "alice" (or "аlice" with a Cyrillic a), and a browser that
    had logged in as one carried a device cookie that also passed the other's lockout."""
    with session_scope(factory) as session:
        with pytest.raises(ConflictError, match="letter case"):
            users.create_user(session, "ALICE", "another-passphrase-9", UserRole.ADMIN, "test")
        with pytest.raises(users.InvalidUserError, match="letters A-Z"):
            users.create_user(session, "\u0430lice", "another-passphrase-9", UserRole.ADMIN, "test")
        # an account made before names were checked so, differing from alice only in case
        legacy = User(username="ALICE", password_hash=users._HASHER.hash("legacy-passphrase-7"),
                      role=UserRole.ADMIN, active=True)
        session.add(legacy)
    with TestClient(app, follow_redirects=False) as own, TestClient(app, follow_redirects=False) as other:
        assert _try_login(own, *ADMIN) == 303  # alice's browser: a device cookie for alice
        own.post("/logout", data={"csrf_token": form_csrf(own.get("/").text)})
        for _ in range(8):
            assert _try_login(other, "ALICE", "guess-guess-guess") == 401
        assert _try_login(own, "ALICE", "legacy-passphrase-7") == 429  # alice's cookie is not ALICE's
        assert _try_login(own, *ADMIN) == 303  # alice herself is not locked out
        assert _try_login(other, "ALICE", "legacy-passphrase-7") == 429
    with TestClient(app, follow_redirects=False) as fresh:
        assert _try_login(fresh, "Rob", RADIOLOGIST[1]) == 303  # one account, whatever the case typed


def test_login_does_not_redirect_off_site(client: TestClient, accounts: dict[str, int]) -> None:
    page = client.get("/login?next=//evil.example/x")
    response = client.post(
        "/login",
        data={
            "username": ADMIN[0],
            "password": ADMIN[1],
            "csrf_token": form_csrf(page.text),
            "next": "//evil.example/x",
        },
    )
    assert response.headers["location"] == "/"


def test_unauthenticated_page_redirects_to_login_and_back(
    client: TestClient, accounts: dict[str, int]
) -> None:
    response = client.get("/results")
    assert response.status_code == 303 and response.headers["location"] == "/login?next=/results"
    page = client.get("/login?next=/results")
    response = client.post(
        "/login",
        data={
            "username": ADMIN[0],
            "password": ADMIN[1],
            "csrf_token": form_csrf(page.text),
            "next": "/results",
        },
    )
    assert response.headers["location"] == "/results"


def test_an_ended_session_says_so_and_leads_back_to_the_same_search(
    client: TestClient, accounts: dict[str, int], factory: sessionmaker[Session]
) -> None:
    """A session that ended sent its user to a bare login page, and after logging in to the page without
    its search terms (a radiologist's search lost, nothing said why: WCAG 2.2.1, 3.3)."""
    login(client, *RADIOLOGIST)
    with session_scope(factory) as s:
        s.scalars(select(WebSession)).one().expires_at = datetime.now(UTC) - timedelta(seconds=1)
    response = client.get("/results?patient=SMITH&state=analysed")
    target = "/login?next=/results%3Fpatient%3DSMITH%26state%3Danalysed&notice=session-ended"
    assert response.status_code == 303 and response.headers["location"] == target
    page = client.get(target)
    assert "Your session has ended" in page.text
    response = client.post(
        "/login",
        data={
            "username": RADIOLOGIST[0],
            "password": RADIOLOGIST[1],
            "csrf_token": form_csrf(page.text),
            "next": "/results?patient=SMITH&state=analysed",
        },
    )
    assert response.headers["location"] == "/results?patient=SMITH&state=analysed"
    assert 'name="next" value="/results?patient=SMITH&amp;state=analysed"' in page.text


def test_expired_session_is_refused_and_removed(
    client: TestClient, accounts: dict[str, int], factory: sessionmaker[Session]
) -> None:
    login(client, *ADMIN)
    with session_scope(factory) as s:
        row = s.scalars(select(WebSession)).one()
        row.expires_at = datetime.now(UTC) - timedelta(seconds=1)
    assert client.get("/").status_code == 303
    assert client.get("/api/dashboard").status_code == 401
    assert _sessions(factory) == 0


def test_use_extends_an_idle_session(
    client: TestClient, accounts: dict[str, int], factory: sessionmaker[Session]
) -> None:
    login(client, *ADMIN)
    soon = datetime.now(UTC) + timedelta(minutes=5)
    with session_scope(factory) as s:
        s.scalars(select(WebSession)).one().expires_at = soon
    assert client.get("/").status_code == 200
    with session_scope(factory) as s:
        expires = s.scalars(select(WebSession)).one().expires_at.replace(tzinfo=UTC)
    assert expires > soon + timedelta(minutes=400)  # session_minutes defaults to 480


def test_a_page_reloading_itself_does_not_keep_the_session_alive(
    client: TestClient, accounts: dict[str, int], factory: sessionmaker[Session]
) -> None:
    """The dashboard reloads every minute (a study being processed every 10 s); the old code counted
    each reload as use, so an unattended workstation never logged off."""
    login(client, *ADMIN)
    dashboard = client.get("/").text
    assert 'data-reload-url="/?auto=1"' in dashboard
    soon = datetime.now(UTC) + timedelta(minutes=5)
    with session_scope(factory) as s:
        s.scalars(select(WebSession)).one().expires_at = soon
    assert client.get("/?auto=1").status_code == 200
    # nor the images it fetches again (the browser says what a request is for: Sec-Fetch-Dest)
    assert client.get("/", headers={"Sec-Fetch-Dest": "image"}).status_code == 200
    with session_scope(factory) as s:
        assert s.scalars(select(WebSession)).one().expires_at.replace(tzinfo=UTC) == soon


def test_the_session_says_when_it_ends_and_asking_with_auto_does_not_use_it(
    client: TestClient, accounts: dict[str, int], factory: sessionmaker[Session]
) -> None:
    """The console warns two minutes before a session ends (console.js, WCAG 2.2.1): pages carry both
    ends, and GET /api/session?auto=1 tells them without moving the idle one; a plain GET, the warning's
    "Stay logged in", moves it."""
    login(client, *ADMIN)
    soon = datetime.now(UTC) + timedelta(minutes=3)
    with session_scope(factory) as s:
        row = s.scalars(select(WebSession)).one()
        row.expires_at = soon
        limit = row.created_at.replace(tzinfo=UTC) + timedelta(hours=12)  # session_max_hours
    asked = client.get("/api/session?auto=1").json()
    assert datetime.fromisoformat(asked["expires_at"]) == soon
    assert datetime.fromisoformat(asked["ends_at"]) == limit
    page = client.get("/results?auto=1").text
    assert f'data-expires-at="{soon.isoformat()}"' in page and f'data-ends-at="{limit.isoformat()}"' in page
    assert 'id="session-warning"' in page and "data-session-extend" in page
    used = client.get("/api/session").json()
    assert datetime.fromisoformat(used["expires_at"]) > soon + timedelta(minutes=400)
    assert 'id="session-warning"' not in client.get("/login").text  # no session, no warning


def test_every_session_ends_after_its_maximum_age_however_it_is_used(
    client: TestClient, accounts: dict[str, int], factory: sessionmaker[Session]
) -> None:
    login(client, *ADMIN)
    with session_scope(factory) as s:
        row = s.scalars(select(WebSession)).one()
        row.created_at = datetime.now(UTC) - timedelta(hours=11, minutes=59)
    assert client.get("/").status_code == 200
    with session_scope(factory) as s:
        s.scalars(select(WebSession)).one().created_at = datetime.now(UTC) - timedelta(hours=12, seconds=1)
    assert client.get("/").status_code == 303
    assert _sessions(factory) == 0


def test_logout_deletes_the_session(
    client: TestClient, accounts: dict[str, int], factory: sessionmaker[Session]
) -> None:
    csrf = login(client, *RADIOLOGIST)
    old_cookie = client.cookies["cxr_session"]
    response = client.post("/logout", data={"csrf_token": csrf})
    assert response.status_code == 303 and response.headers["location"] == "/login"
    assert _sessions(factory) == 0
    client.cookies.set("cxr_session", old_cookie)  # a stolen copy of the cookie is worthless now
    assert client.get("/").status_code == 303
    assert "user.logout" in _actions(factory)


def test_a_login_in_a_browser_that_holds_a_session_ends_that_session(
    client: TestClient, accounts: dict[str, int], factory: sessionmaker[Session]
) -> None:
    """Logging in as another user in the same browser replaced the cookie but left the first session valid
    on the server until it idled out, for whoever had a copy of its cookie (review)."""
    login(client, *ADMIN)
    first = client.cookies["cxr_session"]
    response = client.post("/api/session", json={"username": RADIOLOGIST[0], "password": RADIOLOGIST[1]})
    assert response.status_code == 200
    assert _sessions(factory) == 1 and client.get("/api/session").json()["username"] == RADIOLOGIST[0]
    client.cookies.set("cxr_session", first)
    assert client.get("/api/session").status_code == 401
    client.cookies.delete("cxr_session")
    response = client.post("/api/session", json={"username": ADMIN[0], "password": ADMIN[1]})
    assert response.status_code == 200 and _sessions(factory) == 2  # a browser without one: no other ends


def test_forms_without_the_csrf_token_are_refused(
    admin_client: tuple[TestClient, str], factory: sessionmaker[Session]
) -> None:
    client, csrf = admin_client
    data = {"role": "destination", "ae_title": "PACS", "host": "127.0.0.1", "port": "104"}
    assert client.post("/admin/aes", data=data).status_code == 403
    assert client.post("/admin/aes", data=data | {"csrf_token": "x" * 43}).status_code == 403
    assert client.post("/logout", data={}).status_code == 403
    assert client.post("/admin/aes", data=data | {"csrf_token": csrf}).status_code == 303
    assert _actions(factory).count("ae.add") == 1


def test_api_unsafe_methods_need_the_csrf_header(admin_client: tuple[TestClient, str]) -> None:
    client, csrf = admin_client
    body = {"role": "destination", "ae_title": "PACS2", "host": "127.0.0.1", "port": 104}
    assert client.post("/api/admin/aes", json=body).status_code == 403
    created = client.post("/api/admin/aes", json=body, headers={"X-CSRF-Token": csrf})
    assert created.status_code == 201
    assert client.delete(f"/api/admin/aes/{created.json()['id']}").status_code == 403


def test_radiologist_gets_403_on_admin_pages_and_api(rad_client: tuple[TestClient, str]) -> None:
    client, csrf = rad_client
    for path in ("/admin/aes", "/admin/users", "/admin/audit", "/admin/settings"):
        response = client.get(path)
        assert response.status_code == 403, path
        assert "Not permitted" in response.text
    assert client.get("/api/admin/users").status_code == 403
    denied = client.post(
        "/api/admin/aes", json={"role": "caller", "ae_title": "X"}, headers={"X-CSRF-Token": csrf}
    )
    assert denied.status_code == 403
    for path in ("/", "/results", "/upload", "/api/results", "/api/dashboard"):
        assert client.get(path).status_code == 200, path
    assert "/admin/aes" not in client.get("/").text  # admin links are not offered


def test_api_login_and_logout(
    client: TestClient, accounts: dict[str, int], factory: sessionmaker[Session]
) -> None:
    assert (
        client.post("/api/session", json={"username": ADMIN[0], "password": "bad-password"}).status_code
        == 401
    )
    response = client.post("/api/session", json={"username": ADMIN[0], "password": ADMIN[1]})
    assert response.status_code == 200
    info = response.json()
    assert info["role"] == "admin" and len(info["csrf_token"]) >= 32
    assert client.get("/api/session").json()["username"] == ADMIN[0]
    assert client.delete("/api/session").status_code == 403
    assert client.delete("/api/session", headers={"X-CSRF-Token": info["csrf_token"]}).status_code == 204
    assert client.get("/api/session").status_code == 401
    assert _sessions(factory) == 0


def test_pages_are_not_cached_or_framed(admin_client: tuple[TestClient, str]) -> None:
    client, _ = admin_client
    headers = client.get("/results").headers
    assert headers["cache-control"] == "no-store"
    assert headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["referrer-policy"] == "no-referrer"


def test_the_console_script_and_style_are_checked_for_a_newer_version_on_each_use(
    admin_client: tuple[TestClient, str],
) -> None:
    """Without Cache-Control a browser keeps console.js and console.css by its own guess, a tenth of their
    age since modified: days after an upgrade, the new pages ran with the old script and style."""
    client, _ = admin_client
    for path in ("/static/console.js", "/static/console.css"):
        response = client.get(path)
        assert response.headers["cache-control"] == "no-cache", path
        assert response.headers["etag"]  # revalidated by it: a 304, not the whole file, when unchanged
        again = client.get(path, headers={"If-None-Match": response.headers["etag"]})
        assert again.status_code == 304


def test_api_login_accepts_json_only(client: TestClient, accounts: dict[str, int]) -> None:
    """A cross-site form can post text/plain but not application/json: no login CSRF through the API."""
    body = b'{"username": "alice", "password": "admin-password-1"}'
    response = client.post("/api/session", content=body, headers={"content-type": "text/plain"})
    assert response.status_code == 422
    assert "admin-password-1" not in response.text  # a rejected body is not echoed back
    assert "cxr_session" not in client.cookies


def _client_of(factory: sessionmaker[Session], action: str) -> list[object]:
    with session_scope(factory) as s:
        events = s.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id))
        return [e.details.get("client") for e in events]


def test_logins_record_the_client_address_in_the_audit_trail_only(
    app: FastAPI,
    accounts: dict[str, int],
    factory: sessionmaker[Session],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Success, failure (of a known and an unknown name) and lockout say where the attempt came from; a
    client's own X-Forwarded-For is not believed, and the plain log does not get the address."""
    spoofed = {"X-Forwarded-For": "203.0.113.9"}
    caplog.set_level(logging.INFO)
    with TestClient(app, follow_redirects=False, client=("192.0.2.7", 4711), headers=spoofed) as there:
        assert _try_login(there, "nobody-here", "guess-guess-guess") == 401
        for _ in range(8):
            assert _try_login(there, ADMIN[0], "guess-guess-guess") == 401
        assert _try_login(there, ADMIN[0], "guess-guess-guess") == 429
        assert _try_login(there, *RADIOLOGIST) == 303
    with TestClient(app, client=("2001:db8::5", 4711)) as api:
        blocked = api.post("/api/session", json={"username": ADMIN[0], "password": "nope-nope"})
        assert blocked.status_code == 429
        rad = api.post("/api/session", json={"username": RADIOLOGIST[0], "password": RADIOLOGIST[1]})
        assert rad.status_code == 200
    assert _client_of(factory, "user.login") == ["192.0.2.7", "2001:db8::5"]
    assert _client_of(factory, "user.login_failed") == ["192.0.2.7"] * 9
    assert _client_of(factory, "user.login_blocked") == ["192.0.2.7"]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "user.login_blocked" in logged
    assert "192.0.2.7" not in logged and "2001:db8::5" not in logged and "203.0.113.9" not in logged


class _WritesWhileChecking(PasswordHasher):
    """A password hasher that, while it checks a password, has another thread write to the database and
    notes whether that write got through (the check of a real password takes a good part of a second)."""

    def __init__(self, factory: sessionmaker[Session]) -> None:
        super().__init__(time_cost=1, memory_cost=1024, parallelism=1)
        self.factory = factory
        self.written: list[bool] = []
        self.writers: list[threading.Thread] = []

    def _write(self, done: threading.Event) -> None:
        with session_scope(self.factory) as s:
            audit.record(s, "test", "test.write_during_password_check")
        done.set()

    def verify(self, hash: str | bytes, password: str | bytes) -> Literal[True]:
        done = threading.Event()
        writer = threading.Thread(target=self._write, args=(done,))
        writer.start()
        self.writers.append(writer)
        self.written.append(done.wait(5.0))
        return super().verify(hash, password)


def test_a_login_attempt_holds_no_database_write_lock_while_the_password_is_checked(
    app: FastAPI, accounts: dict[str, int], factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite every transaction holds the node's one write lock, and a login attempt's held it during
    the hash check: anyone sending logins, with made-up names too, kept images being received waiting
    (review). An unknown name, a wrong password, a right one, and a user's check of their current
    password when they change it: none holds the lock while it checks."""
    hasher = _WritesWhileChecking(factory)
    monkeypatch.setattr(users, "_HASHER", hasher)
    try:
        with TestClient(app, follow_redirects=False) as client:
            unknown = {"username": "nobody", "password": "guess"}
            assert client.post("/api/session", json=unknown).status_code == 401
            wrong = {"username": RADIOLOGIST[0], "password": "guess-guess"}
            assert client.post("/api/session", json=wrong).status_code == 401
            right = {"username": RADIOLOGIST[0], "password": RADIOLOGIST[1]}
            session = client.post("/api/session", json=right)
            assert session.status_code == 200
            change = client.post(
                "/api/account/password", headers={"X-CSRF-Token": session.json()["csrf_token"]},
                json={"current_password": "not-it-at-all", "new_password": "a-new-film-reader-phrase"},
            )
            assert change.status_code == 403
    finally:
        for writer in hasher.writers:
            writer.join()
    assert hasher.written == [True, True, True, True]
    with session_scope(factory) as s:
        assert len(list(s.scalars(select(AuditEvent).where(
            AuditEvent.action == "test.write_during_password_check")))) == 4


class _SlowHasher(PasswordHasher):
    """Checks a password as slowly as the node's real parameters do on a loaded machine."""

    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=1024, parallelism=1)

    def verify(self, hash: str | bytes, password: str | bytes) -> Literal[True]:
        time.sleep(0.3)
        return super().verify(hash, password)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_guesses_sent_at_once_get_no_more_tries_than_the_lockout_allows(
    database: str, settings: Settings, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The throttle was asked whether an account was blocked, and told of a failure only after the password
    check: guesses sent at once all passed the question before the first failure was counted, so 16 of them
    were 16 tries against a limit of 8 (review)."""
    if database == "sqlite":
        factory: sessionmaker[Session] = request.getfixturevalue("factory")
    else:
        engine = make_engine(request.getfixturevalue("pg_server").create_database())
        request.addfinalizer(engine.dispose)
        upgrade(engine)
        factory = make_session_factory(engine)
    with session_scope(factory) as s:
        users.create_user(s, RADIOLOGIST[0], RADIOLOGIST[1], UserRole.RADIOLOGIST, "test")
    monkeypatch.setattr(users, "_HASHER", _SlowHasher())
    with TestClient(create_app(settings, factory)) as client:

        def guess(number: int) -> int:
            body = {"username": RADIOLOGIST[0], "password": f"guess-number-{number}"}
            return client.post("/api/session", json=body).status_code

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(guess, range(16)))
        assert sorted(answers) == [401] * 8 + [429] * 8
        assert client.post("/api/session", json={"username": RADIOLOGIST[0], "password": RADIOLOGIST[1]}
                           ).status_code == 429
