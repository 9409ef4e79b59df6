"""A user's own account: changing one's password, for any role."""

from __future__ import annotations

from datetime import datetime

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.store.db import session_scope
from dicom_node.store.models import AuditEvent, User, WebSession
from tests.web.conftest import ADMIN, RADIOLOGIST, form_csrf, login

pytestmark = [pytest.mark.unit]

NEW_PASSWORD = "a brand new phrase for rob"


def _change(client: TestClient, csrf: str | None, current: str, new: str, repeat: str | None = None) -> int:
    data = {"current_password": current, "password": new,
            "password_repeat": new if repeat is None else repeat}
    if csrf is not None:
        data["csrf_token"] = csrf
    return client.post("/account/password", data=data).status_code


def _events(factory: sessionmaker[Session], action: str) -> list[AuditEvent]:
    with session_scope(factory) as s:
        events = list(s.scalars(select(AuditEvent).where(AuditEvent.action == action)))
        s.expunge_all()
        return events


def _sessions_of(factory: sessionmaker[Session], user_id: int) -> int:
    with session_scope(factory) as s:
        count = select(func.count()).select_from(WebSession).where(WebSession.user_pk == user_id)
        return int(s.scalar(count) or 0)


def _last_login(factory: sessionmaker[Session], user_id: int) -> datetime | None:
    with session_scope(factory) as s:
        user = s.get(User, user_id)
        assert user is not None
        return user.last_login_at


def _logs_in(app: FastAPI, username: str, password: str) -> bool:
    with TestClient(app, follow_redirects=False) as fresh:
        page = fresh.get("/login")
        response = fresh.post(
            "/login", data={"username": username, "password": password, "csrf_token": form_csrf(page.text)}
        )
        return response.status_code == 303


def test_a_radiologist_changes_their_own_password_and_their_other_sessions_end(
    app: FastAPI, rad_client: tuple[TestClient, str], factory: sessionmaker[Session], accounts: dict[str, int]
) -> None:
    client, _ = rad_client
    with TestClient(app, follow_redirects=False) as elsewhere:  # the same user at another workstation
        login(elsewhere, *RADIOLOGIST)
        assert elsewhere.get("/").status_code == 200
        page = client.get("/")
        assert 'href="/account/password"' in page.text  # linked from the navigation
        last_login = _last_login(factory, accounts["radiologist"])
        form = client.get("/account/password")
        assert form.status_code == 200 and 'name="current_password"' in form.text
        response = client.post(
            "/account/password",
            data={"current_password": RADIOLOGIST[1], "password": NEW_PASSWORD,
                  "password_repeat": NEW_PASSWORD, "csrf_token": form_csrf(form.text)},
        )
        assert response.status_code == 303
        assert response.headers["location"] == "/account/password?notice=password-changed"
        assert elsewhere.get("/").status_code == 303  # the other session ended
        assert _last_login(factory, accounts["radiologist"]) == last_login  # proving a password is no login
        assert elsewhere.get("/api/session").status_code == 401
    done = client.get(response.headers["location"])  # this browser goes on, with a new session
    assert done.status_code == 200 and "Your password was changed" in done.text
    assert _sessions_of(factory, accounts["radiologist"]) == 1
    assert not _logs_in(app, *RADIOLOGIST)
    assert _logs_in(app, RADIOLOGIST[0], NEW_PASSWORD)
    (event,) = _events(factory, "user.set_password")
    assert (event.actor, event.target) == ("user:rob", f"app_user:{accounts['radiologist']}")
    assert NEW_PASSWORD not in str(event.details) and RADIOLOGIST[1] not in str(event.details)


def test_the_new_password_goes_through_the_usual_checks(rad_client: tuple[TestClient, str]) -> None:
    client, csrf = rad_client
    weak = client.post(
        "/account/password",
        data={"current_password": RADIOLOGIST[1], "password": "password123", "password_repeat": "password123",
              "csrf_token": csrf},
    )
    assert weak.status_code == 422 and "guessers try" in weak.text
    assert _change(client, csrf, RADIOLOGIST[1], NEW_PASSWORD, repeat=NEW_PASSWORD + "x") == 422
    assert client.get("/").status_code == 200  # nothing changed, the session lives on


def test_a_wrong_current_password_is_refused_audited_and_throttled_like_a_login(
    app: FastAPI, rad_client: tuple[TestClient, str], factory: sessionmaker[Session], accounts: dict[str, int]
) -> None:
    client, csrf = rad_client
    response = client.post(
        "/account/password",
        data={"current_password": "not-my-password", "password": NEW_PASSWORD,
              "password_repeat": NEW_PASSWORD, "csrf_token": csrf},
    )
    assert response.status_code == 403 and "current password is wrong" in response.text
    (event,) = _events(factory, "user.password_change_failed")
    assert (event.actor, event.target) == ("user:rob", f"app_user:{accounts['radiologist']}")
    assert "not-my-password" not in str(event.details)
    # a session is no way round the login throttle: 8 wrong passwords in all, then refused
    statuses = [_change(client, csrf, f"guess-{i}-guess", NEW_PASSWORD) for i in range(7)]
    assert statuses == [403] * 7
    assert _change(client, csrf, RADIOLOGIST[1], NEW_PASSWORD) == 429  # even the right one, for now
    assert len(_events(factory, "user.login_blocked")) == 1
    assert _events(factory, "user.set_password") == []
    with TestClient(app, follow_redirects=False) as same_browser:  # its device cookie is blocked too
        same_browser.cookies.set("cxr_device", client.cookies["cxr_device"])
        page = same_browser.get("/login")
        blocked = same_browser.post(
            "/login",
            data={"username": RADIOLOGIST[0], "password": RADIOLOGIST[1], "csrf_token": form_csrf(page.text)},
        )
        assert blocked.status_code == 429


def test_the_change_needs_the_csrf_token(
    rad_client: tuple[TestClient, str], factory: sessionmaker[Session]
) -> None:
    client, csrf = rad_client
    assert _change(client, None, RADIOLOGIST[1], NEW_PASSWORD) == 403
    assert _change(client, "x" * 43, RADIOLOGIST[1], NEW_PASSWORD) == 403
    body = {"current_password": RADIOLOGIST[1], "new_password": NEW_PASSWORD}
    assert client.post("/api/account/password", json=body).status_code == 403
    assert _events(factory, "user.set_password") == []


def test_anonymous_requests_cannot_change_a_password(client: TestClient, accounts: dict[str, int]) -> None:
    assert client.get("/account/password").status_code == 303
    response = client.post(
        "/account/password",
        data={"current_password": RADIOLOGIST[1], "password": NEW_PASSWORD, "password_repeat": NEW_PASSWORD},
    )
    assert response.status_code == 303 and response.headers["location"].startswith("/login")
    body = {"current_password": RADIOLOGIST[1], "new_password": NEW_PASSWORD}
    assert client.post("/api/account/password", json=body).status_code == 401


def test_an_admin_changes_their_own_password_over_the_api(
    app: FastAPI,
    admin_client: tuple[TestClient, str],
    factory: sessionmaker[Session],
    accounts: dict[str, int],
) -> None:
    client, csrf = admin_client
    headers = {"X-CSRF-Token": csrf}
    wrong = client.post(
        "/api/account/password", json={"current_password": "nope-nope-nope", "new_password": NEW_PASSWORD},
        headers=headers,
    )
    assert wrong.status_code == 403
    weak = client.post(
        "/api/account/password", json={"current_password": ADMIN[1], "new_password": "short"}, headers=headers
    )
    assert weak.status_code == 422
    changed = client.post(
        "/api/account/password", json={"current_password": ADMIN[1], "new_password": NEW_PASSWORD},
        headers=headers,
    )
    assert changed.status_code == 200, changed.text
    new_csrf = changed.json()["csrf_token"]
    assert new_csrf != csrf and changed.json()["username"] == ADMIN[0]
    assert client.get("/api/session").json()["csrf_token"] == new_csrf
    assert _sessions_of(factory, accounts["admin"]) == 1
    assert _logs_in(app, ADMIN[0], NEW_PASSWORD) and not _logs_in(app, *ADMIN)
