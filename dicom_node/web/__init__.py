"""The web console and JSON API of the node (FastAPI, server-rendered Jinja2 pages, no JS build).

:func:`create_app` is the only way to get an application: everything it needs is passed in, nothing
is built at import time. ``dicom_node.web.server.WebServer`` serves it from the node's process.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy.exc import DataError
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException

from dicom_node import __version__
from dicom_node.audit import RecentReads
from dicom_node.errors import NodeError, NotFoundError, describe_exception
from dicom_node.metrics import metrics_router
from dicom_node.settings import Settings
from dicom_node.store.db import session_scope
from dicom_node.store.files import kept_value
from dicom_node.users import CREATE_ADMIN_HINT, admin_exists
from dicom_node.web import account, admin, api, login, pages
from dicom_node.web.auth import SESSION_COOKIE, LoginThrottle, Principal, SessionTokens
from dicom_node.web.deps import HEAD_ONLY, Console, Forbidden, NotAuthenticated
from dicom_node.web.errors import http_status
from dicom_node.web.imagegate import ImageGate, busy_headers
from dicom_node.web.limits import ASGIApp, Message, Receive, RequestBodyGuard, Scope, Send
from dicom_node.web.services import ConsoleServices, NodeConsoleServices
from dicom_node.web.templating import configure_templates
from dicom_node.web.uploads import UploadStore

LOGGER = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).parent


WEB_KEY_FILE = "web-secret-key"
_WEB_KEY = re.compile(r"[0-9a-f]{64}")


def web_key(data_dir: Path) -> str:
    """The console's key when ``web.secret_key`` is not set: made at random once and kept in ``data_dir``
    (0600). A key made anew in each process ended every session at a restart and voided the browsers'
    device cookies, so that guessing at an administrator's password locked them out after one (review)."""
    return kept_value(data_dir / WEB_KEY_FILE, lambda: secrets.token_hex(32),
                      lambda value: _WEB_KEY.fullmatch(value) is not None, "64 hexadecimal digits")


def create_app(
    settings: Settings,
    session_factory: sessionmaker[Session],
    services: ConsoleServices | None = None,
) -> FastAPI:
    """Build the console for one node. ``services`` defaults to the node's real ones."""
    key_secret = settings.web.secret_key
    secret = key_secret.get_secret_value() if key_secret is not None else web_key(settings.node.data_dir)
    key = secret.encode()
    templates = configure_templates(Jinja2Templates(directory=PACKAGE_DIR / "templates"), settings)
    state = Console(
        settings=settings,
        session_factory=session_factory,
        services=services or NodeConsoleServices(settings, session_factory),
        tokens=SessionTokens(key, timedelta(minutes=settings.web.session_minutes),
                             timedelta(hours=settings.web.session_max_hours)),
        throttle=LoginThrottle(),
        uploads=UploadStore(),
        templates=templates,
        reads=RecentReads(),
        images=ImageGate(settings.web.image_workers, settings.web.image_wait_seconds),
    )
    app = FastAPI(
        title=f"{settings.node.name} console API",
        version=__version__,
        openapi_url=None,  # served by api.router behind the login, like every other route
        docs_url=None,
        redoc_url=None,
    )
    app.state.console = state
    app.mount("/static", StaticFiles(directory=PACKAGE_DIR / "static"), name="static")
    _include_health(app, session_factory)
    app.include_router(login.public_router)
    app.include_router(login.router)
    app.include_router(pages.router)
    app.include_router(account.router)
    app.include_router(admin.router)
    app.include_router(api.public_router)
    app.include_router(api.router)
    _install_error_handlers(app, templates)
    app.add_middleware(RequestBodyGuard, logged_in=_session_checker(state))  # inside the headers below
    app.add_middleware(HeadAsGet)
    app.middleware("http")(_security_headers)
    _warn_without_admin(session_factory)
    return app


class HeadAsGet:
    """HEAD wherever GET is, as HTTP asks (monitors and link checkers send it; FastAPI's routes answered
    405): the route runs as for GET, with its login and audit, and the answer goes out without its body
    (its headers, Content-Length included, stay the GET's). The audit event says so (:data:`HEAD_ONLY`):
    it was recorded as a read of the patient's data, which never went out."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        marked = HEAD_ONLY.set(True)
        try:
            await self.app({**scope, "method": "GET"}, receive, headers_only)
        finally:
            HEAD_ONLY.reset(marked)


#: ``blob:`` images are made only by the console's own script (script-src 'self'): an image refused while the
#: console was busy, which console.js asked for again and got, is shown from the bytes it got.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob:; style-src 'self'; script-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


async def _security_headers(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    """Pages carry patient data: no caching, no framing, no referrer (search URLs hold names); the static
    files are revalidated on each use.

    Also the last line of defence for unexpected errors: logged by type and code location only, since
    exception texts (pydicom, SQL) can embed patient data; the user gets a plain 500 page.
    """
    try:
        response = await call_next(request)
    except Exception as exc:  # anything a route did not map to a NodeError
        route = getattr(request.scope.get("route"), "path", "?")
        LOGGER.error("console request %s %s failed: %s", request.method, route, describe_exception(exc))
        response = PlainTextResponse("Internal error; the node's log names its location.", status_code=500)
    headers = response.headers
    headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("Referrer-Policy", "no-referrer")
    # The console's script and style hold no patient data, but they change with an upgrade: without a
    # Cache-Control a browser kept them by its own guess (a tenth of their age), and new pages ran with the
    # old script for days. "no-cache" keeps them and asks each time; unchanged, the answer is a 304.
    headers.setdefault("Cache-Control", "no-cache" if request.url.path.startswith("/static/") else "no-store")
    return response


def _session_checker(state: Console) -> Callable[[str | None], bool]:
    def logged_in(token: str | None) -> bool:
        with session_scope(state.session_factory) as session:
            return state.tokens.resolve(session, token) is not None

    return logged_in


def _include_health(app: FastAPI, session_factory: sessionmaker[Session]) -> None:
    """``/healthz`` and ``/metrics`` from the node's metrics module."""
    app.include_router(metrics_router(session_factory))


def _warn_without_admin(session_factory: sessionmaker[Session]) -> None:
    with session_scope(session_factory) as session:
        if not admin_exists(session):
            LOGGER.warning("no console administrator exists yet; create one with: %s", CREATE_ADMIN_HINT)


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


#: The error page's title and text for what the router refuses; the address is not repeated on the page.
_HTTP_ERROR_PAGES = {
    404: ("Not found", "There is no page at this address; use the menu or go back to the dashboard."),
    405: ("Not possible here", "This address does not take this kind of request; open it as a page."),
}


def _install_error_handlers(app: FastAPI, templates: Jinja2Templates) -> None:
    def error_page(
        request: Request, status: int, title: str, message: str, principal: Principal | None = None
    ) -> Response:
        context = {
            "title": title,
            "message": message,
            "principal": principal,
            "csrf": principal.csrf_token if principal else "",
        }
        return templates.TemplateResponse(request, "error.html", context, status_code=status)

    @app.exception_handler(NotAuthenticated)
    async def not_authenticated(request: Request, exc: NotAuthenticated) -> Response:
        if _is_api(request):
            return JSONResponse({"detail": "not logged in"}, status_code=401)
        # Back to the same page after logging in, search terms and all; a session that has just ended
        # (its cookie is still sent) is said so, instead of a login page out of nowhere.
        target = request.url.path if request.method == "GET" else "/"
        if request.method == "GET" and request.url.query:
            target += f"?{request.url.query}"
        ended = "&notice=session-ended" if request.cookies.get(SESSION_COOKIE) else ""
        return RedirectResponse(f"/login?next={quote(target, safe='/')}{ended}", status_code=303)

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, exc: Forbidden) -> Response:
        if _is_api(request):
            return JSONResponse({"detail": exc.reason}, status_code=403)
        return error_page(request, 403, "Not permitted", exc.reason, exc.principal)

    @app.exception_handler(NodeError)
    async def node_error(request: Request, exc: NodeError) -> Response:
        status = http_status(exc)
        if status >= 500:
            LOGGER.warning("console request failed: %s", type(exc).__name__)
        if _is_api(request):
            body = {"detail": str(exc)} if exc.field is None else {"detail": str(exc), "field": exc.field}
            return JSONResponse(body, status_code=status, headers=busy_headers(exc))
        title = "Not found" if isinstance(exc, NotFoundError) else "Could not complete the request"
        response = error_page(request, status, title, str(exc))
        response.headers.update(busy_headers(exc))
        return response

    @app.exception_handler(DataError)
    async def value_the_database_refuses(request: Request, exc: DataError) -> Response:
        """A value PostgreSQL will not compare or store, a NUL character in a login name, a search or an
        audit filter: the request's fault, answered 422, where it was a 500 (review). SQLite takes it."""
        LOGGER.info("console request with a value the database refuses (%s)", type(exc.orig).__name__)
        message = "a value in the request cannot be searched or stored (a NUL or other control character?)"
        if _is_api(request):
            return JSONResponse({"detail": message}, status_code=422)
        return error_page(request, 422, "Could not complete the request", message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """What the router itself refuses (no such path, a method the path does not take): JSON for the API,
        the console's own page for a browser, which showed a bare ``{"detail":"Not Found"}``."""
        if _is_api(request):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        title, message = _HTTP_ERROR_PAGES.get(
            exc.status_code, ("Could not complete the request", f"The console answered {exc.status_code}.")
        )
        response = error_page(request, exc.status_code, title, message)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        if _is_api(request):
            # Without "input": a rejected body may hold a password, and it need not travel back.
            errors = [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in exc.errors()]
            return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)
        fields = ", ".join(".".join(str(p) for p in e.get("loc", ())[1:]) for e in exc.errors())
        return error_page(request, 422, "Invalid input", f"Please check: {fields or 'the form'}.")
