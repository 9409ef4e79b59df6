"""The console's per-app state and the request dependencies (database session, user, role, CSRF)."""

from __future__ import annotations

from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.audit import RecentReads
from dicom_node.errors import AuthenticationError, PermissionDeniedError
from dicom_node.settings import Settings
from dicom_node.web.auth import (
    CSRF_FIELD,
    CSRF_HEADER,
    SESSION_COOKIE,
    LoginThrottle,
    Principal,
    SessionTokens,
    tokens_match,
)
from dicom_node.web.imagegate import ImageGate
from dicom_node.web.services import ConsoleServices
from dicom_node.web.uploads import UploadStore

#: Set while a HEAD request runs as its GET (dicom_node.web.HeadAsGet): the access log says that nothing of
#: the page or file went out, only its headers (a monitor's or link checker's request, with a session).
HEAD_ONLY: ContextVar[bool] = ContextVar("head_only", default=False)


@dataclass
class Console:
    """Everything the routes share, built once by :func:`dicom_node.web.create_app`."""

    settings: Settings
    session_factory: sessionmaker[Session]
    services: ConsoleServices
    tokens: SessionTokens
    throttle: LoginThrottle
    uploads: UploadStore
    templates: Jinja2Templates
    reads: RecentReads  # whose reads of a study's images were recorded lately
    images: ImageGate  # how many images (uploads, a study's radiographs and heat maps) are decoded at once


class NotAuthenticated(AuthenticationError):
    """No valid session: pages redirect to the login page, the API answers 401."""


class Forbidden(PermissionDeniedError):
    """The user's role does not allow this (403), or the CSRF token is wrong."""

    def __init__(self, reason: str, principal: Principal | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.principal = principal


def console(request: Request) -> Console:
    state: Console = request.app.state.console
    return state


ConsoleDep = Annotated[Console, Depends(console)]


def db_session(request: Request) -> Iterator[Session]:
    """One session per request; routes that change something commit explicitly."""
    session = console(request).session_factory()
    try:
        yield session
    finally:
        session.rollback()
        session.close()


DbDep = Annotated[Session, Depends(db_session)]

#: A row id in a URL or a page's cursor: the ids are SQL INTEGER columns, 32-bit on PostgreSQL, and a larger
#: number (a typed or crafted URL) must be refused as invalid input naming it (422) before the database
#: refuses it (review: 2**63 - 1 let 2**31 through, which PostgreSQL refused as "out of range").
ROW_ID_MAX = 2**31 - 1
RowId = Annotated[int, Path(ge=1, le=ROW_ID_MAX)]


def release(db: Session) -> None:
    """End the request's transaction before slow work (image decoding, DICOM network, inference).

    On SQLite every transaction takes the database's write lock (BEGIN IMMEDIATE), so a console
    request must not hold one while the node is receiving images.
    """
    db.commit()


#: Query marker of a page's own automatic reload (dashboard, a study being processed): not a user's action.
AUTO_RELOAD = "auto"
#: What a browser fetches for a page it shows (Sec-Fetch-Dest): the images of a page that reloads itself
#: come again with it, and are no more the user's doing than the reload.
_SUBRESOURCES = frozenset({"image", "style", "script", "font"})


def auto_reload(request: Request) -> bool:
    """The request is a page's own reload (:data:`AUTO_RELOAD`), not the user's doing."""
    return request.query_params.get(AUTO_RELOAD) == "1"


def optional_user(request: Request, db: DbDep) -> Principal | None:
    used = not auto_reload(request) and request.headers.get("sec-fetch-dest", "") not in _SUBRESOURCES
    principal = console(request).tokens.resolve(db, request.cookies.get(SESSION_COOKIE), used=used)
    release(db)
    return principal


def current_user(principal: Annotated[Principal | None, Depends(optional_user)]) -> Principal:
    if principal is None:
        raise NotAuthenticated()
    return principal


UserDep = Annotated[Principal, Depends(current_user)]


def admin_user(principal: UserDep) -> Principal:
    if not principal.is_admin:
        raise Forbidden("This page is for administrators.", principal)
    return principal


AdminDep = Annotated[Principal, Depends(admin_user)]


async def _csrf_for(request: Request, principal: Principal) -> Principal:
    given = request.headers.get(CSRF_HEADER)
    if given is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        form = await request.form()
        value = form.get(CSRF_FIELD)
        given = value if isinstance(value, str) else None
    if not tokens_match(principal.csrf_token, given):
        raise Forbidden(
            "The form has expired or did not come from this console; reload the page and retry.", principal
        )
    return principal


async def csrf_user(request: Request, principal: UserDep) -> Principal:
    """A logged-in user whose unsafe request carries the session's CSRF token (form field or header)."""
    return await _csrf_for(request, principal)


async def csrf_admin(request: Request, principal: AdminDep) -> Principal:
    return await _csrf_for(request, principal)


CsrfUserDep = Annotated[Principal, Depends(csrf_user)]
CsrfAdminDep = Annotated[Principal, Depends(csrf_admin)]
