"""Logging in and out of the console, and the liveness probe."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.orm import Session

from dicom_node import audit
from dicom_node.errors import AuthenticationError
from dicom_node.store.models import User
from dicom_node.users import CREATE_ADMIN_HINT, account_name, admin_exists, authenticate
from dicom_node.users import find as find_user
from dicom_node.web.auth import (
    DEVICE_COOKIE,
    DEVICE_COOKIE_DAYS,
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    Principal,
    tokens_match,
)
from dicom_node.web.deps import Console, ConsoleDep, CsrfUserDep, DbDep, current_user, optional_user
from dicom_node.web.templating import render

public_router = APIRouter(include_in_schema=False)
router = APIRouter(include_in_schema=False, dependencies=[Depends(current_user)])


def _safe_next(target: str | None) -> str:
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def set_cookie(response: Response, con: Console, name: str, value: str) -> None:
    response.set_cookie(
        name, value, httponly=True, samesite="strict", secure=con.settings.web.secure_cookies, path="/"
    )


def set_device_cookie(response: Response, con: Console, username: str) -> None:
    """Remember that this browser logged in as ``username``: its failed logins are then counted apart
    from everyone else's, so others' guessing does not lock it out."""
    response.set_cookie(
        DEVICE_COOKIE, con.tokens.device_cookie(username), max_age=DEVICE_COOKIE_DAYS * 86400, httponly=True,
        samesite="strict", secure=con.settings.web.secure_cookies, path="/",
    )


def client_address(request: Request) -> str:
    """The address the request came from, for the audit trail: the direct peer's. The settings name no
    trusted proxy, so an X-Forwarded-For header, which any client can write, is not believed (and the web
    server is told not to rewrite the peer from it)."""
    return request.client.host if request.client is not None else ""


def refused_as_blocked(request: Request, con: Console, db: Session, username: str, key: str) -> bool:
    """The throttle refuses this attempt; its first refusal in a lockout window is audited. An attempt it
    lets through is counted as a failure from then on, until its password is found right
    (:meth:`LoginThrottle.admit`): attempts sent at once are counted as they come, not once checked."""
    if con.throttle.admit(key):
        return False
    if con.throttle.first_block(key):
        record_failed_login(db, username, "user.login_blocked", client_address(request))
        db.commit()
    return True


#: Why :func:`log_in` refused: the HTTP status both login routes answer with.
THROTTLED, WRONG_CREDENTIALS = 429, 401


def log_in(
    request: Request, con: Console, db: Session, username: str, password: str
) -> tuple[User, str] | int:
    """The login both the form and the JSON API do: throttle (per device cookie, else per account),
    password check, audit, a new session. Returns the user and the session's cookie token, or
    :data:`THROTTLED` / :data:`WRONG_CREDENTIALS`."""
    key = con.tokens.throttle_key(account_name(db, username), request.cookies.get(DEVICE_COOKIE))
    if refused_as_blocked(request, con, db, username, key):
        return THROTTLED
    try:
        user = authenticate(db, username, password)
    except AuthenticationError:  # counted as failed already: refused_as_blocked
        record_failed_login(db, username, "user.login_failed", client_address(request))
        db.commit()
        return WRONG_CREDENTIALS
    con.throttle.succeeded(key)
    con.tokens.purge_expired(db)
    # A login in a browser that holds a session (another user's, or an earlier one of the same user) ends
    # it: its cookie is replaced, and the session must not live on behind the browser's back (review).
    con.tokens.end_token(db, request.cookies.get(SESSION_COOKIE))
    token = con.tokens.create(db, user)
    audit.record(
        db, audit.user_actor(user.username), "user.login", f"app_user:{user.id}",
        {"client": client_address(request)},
    )
    db.commit()
    return user, token


def set_session_cookies(response: Response, con: Console, token: str, username: str) -> None:
    """The session cookie, and the device cookie that gives this browser its own login throttle."""
    set_cookie(response, con, SESSION_COOKIE, token)
    set_device_cookie(response, con, username)


def _login_page(
    request: Request,
    con: Console,
    db: DbDep,
    *,
    error: str = "",
    fields: tuple[str, ...] = (),
    next_url: str = "/",
    status: int = 200,
) -> Response:
    """``fields``: the form fields that ``error`` is about (marked invalid, described by it)."""
    login_csrf = secrets.token_urlsafe(32)
    response = render(
        request,
        "login.html",
        None,
        status=status,
        login_csrf=login_csrf,
        error=error,
        error_fields=fields,
        next_url=_safe_next(next_url),
        no_admin=not admin_exists(db),
        admin_hint=CREATE_ADMIN_HINT,
    )
    set_cookie(response, con, LOGIN_CSRF_COOKIE, login_csrf)
    return response


def record_failed_login(db: Session, username: str, action: str, client: str) -> None:
    """Audit a refused login under the account's name only if the account exists: people type
    passwords into the username field, and those must not end up in the audit log. ``client``: where
    the attempt came from (the audit log's details, which the plain log does not carry)."""
    user = find_user(db, username) if username.strip() else None
    if user is not None:
        audit.record(db, audit.user_actor(user.username), action, f"app_user:{user.id}", {"client": client})
    else:
        audit.record(db, "anonymous", action, "", {"known_user": False, "client": client})


@public_router.get("/login")
def login_form(
    request: Request,
    con: ConsoleDep,
    db: DbDep,
    principal: Annotated[Principal | None, Depends(optional_user)],
    next: str = "/",
) -> Response:
    if principal is not None:
        return RedirectResponse(_safe_next(next), status_code=303)
    return _login_page(request, con, db, next_url=next)


@public_router.post("/login")
def login(
    request: Request,
    con: ConsoleDep,
    db: DbDep,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)],
    csrf_token: Annotated[str, Form(max_length=128)] = "",
    next: Annotated[str, Form(max_length=512)] = "/",
) -> Response:
    if not tokens_match(request.cookies.get(LOGIN_CSRF_COOKIE, ""), csrf_token):
        return _login_page(request, con, db, error="The login form expired; please try again.", status=403)
    outcome = log_in(request, con, db, username, password)
    if outcome == THROTTLED:
        return _login_page(
            request, con, db, error="Too many failed attempts; wait a few minutes and try again.", status=429
        )
    if not isinstance(outcome, tuple):
        return _login_page(
            request, con, db, error="Unknown user or wrong password.", fields=("username", "password"),
            next_url=next, status=401,
        )
    user, token = outcome
    response = RedirectResponse(_safe_next(next), status_code=303)
    set_session_cookies(response, con, token, user.username)
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/")
    return response


@router.post("/logout")
def logout(con: ConsoleDep, db: DbDep, principal: CsrfUserDep) -> Response:
    con.tokens.end(db, principal.session_id)
    audit.record(db, audit.user_actor(principal.username), "user.logout", f"app_user:{principal.user_id}")
    db.commit()
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response

