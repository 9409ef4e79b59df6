"""A user's own account: any logged-in user (radiologist or admin) changes their own password."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.orm import Session

from dicom_node import audit, users
from dicom_node.errors import AuthenticationError, NodeError
from dicom_node.web.auth import DEVICE_COOKIE, SESSION_COOKIE, Principal
from dicom_node.web.deps import Console, ConsoleDep, CsrfUserDep, DbDep, UserDep, current_user
from dicom_node.web.login import THROTTLED, client_address, refused_as_blocked, set_cookie
from dicom_node.web.templating import render

router = APIRouter(include_in_schema=False, dependencies=[Depends(current_user)])

#: Why :func:`change_own_password` refused (besides a new password the checks refuse): the HTTP status.
#: A wrong current password is 403, not 401, which the API keeps for "not logged in".
WRONG_CURRENT = 403


def change_own_password(
    request: Request, con: Console, db: Session, principal: Principal, current: str, new: str
) -> str | int:
    """Check the current password as a login would (the same throttle key, so a stolen session is no
    way round the lockout), then set the new one with :func:`users.set_password`: its checks, its
    audit event, and the end of every session of the user. This browser goes on in a new session.

    Returns the new session's cookie token, or :data:`THROTTLED` / :data:`WRONG_CURRENT`; raises
    :class:`users.InvalidUserError` for a new password the checks refuse (the caller rolls back)."""
    key = con.tokens.throttle_key(principal.username, request.cookies.get(DEVICE_COOKIE))
    if refused_as_blocked(request, con, db, principal.username, key):
        return THROTTLED
    user = users.get_by_id(db, principal.user_id)
    actor = audit.user_actor(user.username)
    last_login = user.last_login_at
    try:
        users.authenticate(db, user.username, current)
    except AuthenticationError:  # counted as failed already: refused_as_blocked
        client = {"client": client_address(request)}
        audit.record(db, actor, "user.password_change_failed", f"app_user:{user.id}", client)
        db.commit()
        return WRONG_CURRENT
    con.throttle.succeeded(key)
    user.last_login_at = last_login  # proving the password is not a login
    users.set_password(db, user.id, new, actor)
    token = con.tokens.create(db, user)
    db.commit()
    return token


def _password_page(
    request: Request,
    principal: Principal,
    *,
    error: str = "",
    fields: tuple[str, ...] = (),
    status: int = 200,
) -> Response:
    """``fields``: the form fields that ``error`` is about (marked invalid, described by it)."""
    return render(
        request, "account_password.html", principal, status=status, active="account", error=error,
        error_fields=fields, min_length=users.MIN_PASSWORD_LENGTH,
    )


@router.get("/account/password")
def password_form(request: Request, principal: UserDep) -> Response:
    return _password_page(request, principal)


@router.post("/account/password")
def password_change(
    request: Request,
    con: ConsoleDep,
    db: DbDep,
    principal: CsrfUserDep,
    current_password: Annotated[str, Form(max_length=1024)],
    password: Annotated[str, Form(max_length=1024)],
    password_repeat: Annotated[str, Form(max_length=1024)],
) -> Response:
    if password != password_repeat:
        return _password_page(
            request, principal, error="The two new passwords differ.", fields=("password", "password_repeat"),
            status=422,
        )
    try:
        outcome = change_own_password(request, con, db, principal, current_password, password)
    except NodeError as exc:
        db.rollback()
        return _password_page(
            request, principal, error=f"Not changed: {exc}.", fields=(exc.field,) if exc.field else (),
            status=422,
        )
    if outcome == THROTTLED:
        error = "Too many wrong passwords; wait a few minutes and try again."
        return _password_page(request, principal, error=error, status=429)
    if not isinstance(outcome, str):
        return _password_page(
            request, principal, error="The current password is wrong.", fields=("current_password",),
            status=403,
        )
    response = RedirectResponse("/account/password?notice=password-changed", status_code=303)
    set_cookie(response, con, SESSION_COOKIE, outcome)
    return response
