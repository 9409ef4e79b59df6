"""Administration pages: node settings (read-only), callers and destinations, users, audit log."""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import ColumnElement, or_, select, tuple_
from sqlalchemy.orm import Session

from dicom_node import aes, audit, users
from dicom_node.errors import ConflictError, NodeError
from dicom_node.outbox import wake
from dicom_node.settings import Settings
from dicom_node.statuses import Status
from dicom_node.store.db import masked_url
from dicom_node.store.models import AeRole, AuditEvent, RemoteAe, UserRole
from dicom_node.web import paging
from dicom_node.web.auth import Principal
from dicom_node.web.deps import (
    ROW_ID_MAX,
    AdminDep,
    Console,
    ConsoleDep,
    CsrfAdminDep,
    DbDep,
    RowId,
    admin_user,
    console,
    release,
)
from dicom_node.web.templating import render

LOGGER = logging.getLogger(__name__)

router = APIRouter(prefix="/admin", include_in_schema=False, dependencies=[Depends(admin_user)])

AUDIT_PAGE = 50


# ---------------------------------------------------------------------------------------------
# Settings (read-only)
# ---------------------------------------------------------------------------------------------


def settings_view(settings: Settings) -> dict[str, dict[str, str]]:
    """Settings as group -> key -> text, secrets masked by pydantic's SecretStr."""
    dumped = settings.model_dump(mode="json")
    view: dict[str, dict[str, str]] = {}
    for group, values in dumped.items():
        flat: dict[str, str] = {}
        _flatten(values, "", flat)
        view[group] = flat
    return view


def _flatten(value: Any, prefix: str, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(inner, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(value, list):
        out[prefix] = json.dumps(value) if value else "[]"
    else:
        out[prefix] = "—" if value is None else str(value)


@router.get("/settings")
def settings_page(request: Request, con: ConsoleDep, principal: AdminDep) -> Response:
    derived = {
        "database": masked_url(con.settings.database_url),
        "storage directory": str(con.settings.storage_dir),
        "results directory": str(con.settings.results_dir),
    }
    return render(
        request,
        "admin_settings.html",
        principal,
        active="settings",
        groups=settings_view(con.settings),
        derived=derived,
    )


# ---------------------------------------------------------------------------------------------
# Remote AEs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AeForm:
    """The AE form as typed, so a rejected entry is shown again with its error."""

    role: str = "destination"
    ae_title: str = ""
    host: str = ""
    port: str = ""
    tls: bool = False
    description: str = ""
    reply_to: str = ""
    enabled: bool = True
    storage_commitment: bool = False

    @classmethod
    def of(cls, ae: RemoteAe) -> AeForm:
        return cls(
            role=ae.role.value,
            ae_title=ae.ae_title,
            host=ae.host or "",
            port=str(ae.port or ""),
            tls=ae.tls,
            description=ae.description,
            reply_to=ae.reply_to.ae_title if ae.reply_to else "",
            enabled=ae.enabled,
            storage_commitment=ae.storage_commitment,
        )

    def spec(self) -> aes.AeSpec:
        try:
            role = AeRole(self.role)
        except ValueError as exc:
            raise aes.InvalidAeError("choose caller or destination") from exc
        port: int | None = None
        if self.port.strip():
            if not re.fullmatch(r"[0-9]{1,5}", self.port.strip()):  # "²".isdigit() is true: int() raised
                raise aes.InvalidAeError("port must be a number 1-65535", field="port")
            port = int(self.port)
        return aes.AeSpec(
            ae_title=self.ae_title,
            role=role,
            host=self.host or None,
            port=port,
            tls=self.tls,
            description=self.description,
            reply_to=self.reply_to or None,
            enabled=self.enabled,
            storage_commitment=self.storage_commitment,
        )


def ae_form(
    role: Annotated[str, Form(max_length=16)] = "destination",
    ae_title: Annotated[str, Form(max_length=64)] = "",
    host: Annotated[str, Form(max_length=255)] = "",
    port: Annotated[str, Form(max_length=8)] = "",
    tls: Annotated[str, Form(max_length=8)] = "",
    description: Annotated[str, Form(max_length=255)] = "",
    reply_to: Annotated[str, Form(max_length=16)] = "",
    enabled: Annotated[str, Form(max_length=8)] = "",
    storage_commitment: Annotated[str, Form(max_length=8)] = "",
) -> AeForm:
    return AeForm(role, ae_title, host, port, bool(tls), description, reply_to, bool(enabled),
                  bool(storage_commitment))


AeFormDep = Annotated[AeForm, Depends(ae_form)]


@dataclass(frozen=True)
class EchoOutcome:
    ae_title: str
    ok: bool
    message: str


def echo_test(con: Console, db: Session, ae_id: int, username: str) -> EchoOutcome:
    """C-ECHO an AE and describe the outcome in words an admin can act on. Recorded in the audit log, as
    ``cxr-node ae echo`` records it, then the transaction is ended before the network wait."""
    ae = aes.get_by_id(db, ae_id)
    audit.record(db, audit.user_actor(username), "ae.echo", f"remote_ae:{ae.id}", {})
    release(db)  # the echo may take seconds
    started = time.monotonic()
    address = f"{ae.host}:{ae.port}"
    try:
        status = con.services.echo(ae)
    except NodeError as exc:
        LOGGER.info("echo test to remote_ae %d failed: %s", ae.id, type(exc).__name__)
        return EchoOutcome(ae.ae_title, False, f"C-ECHO to {ae.ae_title} at {address} failed: {exc}")
    elapsed = 1000.0 * (time.monotonic() - started)
    if status == Status.SUCCESS:
        return EchoOutcome(
            ae.ae_title,
            True,
            f"C-ECHO to {ae.ae_title} at {address} succeeded (status 0x0000, {elapsed:.0f} ms).",
        )
    return EchoOutcome(
        ae.ae_title, False, f"C-ECHO to {ae.ae_title} at {address} answered status 0x{status:04X}."
    )


def _fields(exc: NodeError) -> tuple[str, ...]:
    """The form fields a refusal is about, as the console's pages take them (login and account too)."""
    return (exc.field,) if exc.field else ()


def _aes_page(
    request: Request,
    db: Session,
    principal: Principal,
    *,
    form: AeForm | None = None,
    error: str = "",
    error_fields: tuple[str, ...] = (),
    echo: EchoOutcome | None = None,
    status: int = 200,
) -> Response:
    """``error_fields``: the form fields ``error`` is about (marked invalid and described by it)."""
    all_aes = aes.list_aes(db)
    return render(
        request,
        "admin_aes.html",
        principal,
        status=status,
        active="aes",
        fixed_destinations=console(request).settings.pipeline.fixed_destinations,
        callers=[a for a in all_aes if a.role is AeRole.CALLER],
        destinations=[a for a in all_aes if a.role is AeRole.DESTINATION],
        form=form or AeForm(),
        error=error,
        error_fields=error_fields,
        echo=echo,
    )


@router.get("/aes")
def aes_page(request: Request, db: DbDep, principal: AdminDep) -> Response:
    return _aes_page(request, db, principal)


@router.post("/aes")
def ae_add(request: Request, db: DbDep, principal: CsrfAdminDep, form: AeFormDep) -> Response:
    try:
        aes.add(db, form.spec(), audit.user_actor(principal.username))
        db.commit()
    except NodeError as exc:
        db.rollback()
        return _aes_page(request, db, principal, form=form, error=str(exc), error_fields=_fields(exc),
                         status=422)
    return RedirectResponse("/admin/aes?notice=ae-added", status_code=303)


def _ae_edit_page(
    request: Request,
    db: Session,
    principal: Principal,
    ae: RemoteAe,
    *,
    form: AeForm | None = None,
    error: str = "",
    error_fields: tuple[str, ...] = (),
    echo: EchoOutcome | None = None,
    status: int = 200,
) -> Response:
    """``error_fields``: the form fields ``error`` is about (marked invalid and described by it)."""
    return render(
        request,
        "admin_ae_edit.html",
        principal,
        status=status,
        active="aes",
        ae=ae,
        form=form or AeForm.of(ae),
        destinations=aes.list_aes(db, AeRole.DESTINATION),
        error=error,
        error_fields=error_fields,
        echo=echo,
    )


@router.get("/aes/{ae_id}")
def ae_edit(request: Request, db: DbDep, principal: AdminDep, ae_id: RowId) -> Response:
    return _ae_edit_page(request, db, principal, aes.get_by_id(db, ae_id))


@router.post("/aes/{ae_id}")
def ae_update(
    request: Request, db: DbDep, principal: CsrfAdminDep, ae_id: RowId, form: AeFormDep
) -> Response:
    ae = aes.get_by_id(db, ae_id)
    try:
        updated = aes.update(db, ae_id, form.spec(), audit.user_actor(principal.username))
        db.commit()
    except NodeError as exc:
        db.rollback()
        return _ae_edit_page(
            request, db, principal, aes.get_by_id(db, ae.id), form=form, error=str(exc),
            error_fields=_fields(exc), status=422,
        )
    if updated.role is AeRole.DESTINATION:
        wake([ae_id])  # deliveries made due by a mended address go now, not at the outbox's next sweep
    return RedirectResponse("/admin/aes?notice=ae-updated", status_code=303)


@router.post("/aes/{ae_id}/delete")
def ae_delete(request: Request, db: DbDep, principal: CsrfAdminDep, ae_id: RowId) -> Response:
    try:
        aes.remove(db, ae_id, audit.user_actor(principal.username))
        db.commit()
    except ConflictError as exc:  # a destination with deliveries: the page says to disable it
        db.rollback()
        return _aes_page(request, db, principal, error=str(exc), status=409)
    return RedirectResponse("/admin/aes?notice=ae-removed", status_code=303)


@router.post("/aes/{ae_id}/echo")
def ae_echo(request: Request, con: ConsoleDep, db: DbDep, principal: CsrfAdminDep, ae_id: RowId) -> Response:
    outcome = echo_test(con, db, ae_id, principal.username)
    ae = aes.get_by_id(db, ae_id)
    if request.query_params.get("from") == "edit":
        return _ae_edit_page(request, db, principal, ae, echo=outcome)
    return _aes_page(request, db, principal, echo=outcome)


# ---------------------------------------------------------------------------------------------
# Users
# ---------------------------------------------------------------------------------------------


def _users_page(
    request: Request,
    db: Session,
    principal: Principal,
    *,
    error: str = "",
    error_fields: tuple[str, ...] = (),
    status: int = 200,
    **form: str,
) -> Response:
    """``error_fields``: the fields of the new-user form that ``error`` is about."""
    return render(
        request,
        "admin_users.html",
        principal,
        status=status,
        active="users",
        users=users.list_users(db),
        roles=[r.value for r in UserRole],
        error=error,
        error_fields=error_fields,
        form=form,
    )


@router.get("/users")
def users_page(request: Request, db: DbDep, principal: AdminDep) -> Response:
    return _users_page(request, db, principal)


@router.post("/users")
def user_add(
    request: Request,
    db: DbDep,
    principal: CsrfAdminDep,
    username: Annotated[str, Form(max_length=64)],
    role: Annotated[str, Form(max_length=16)],
    password: Annotated[str, Form(max_length=1024)],
    password_repeat: Annotated[str, Form(max_length=1024)],
) -> Response:
    try:
        if password != password_repeat:
            raise users.InvalidUserError("the two passwords differ", field="password_repeat")
        try:
            user_role = UserRole(role)
        except ValueError as exc:
            raise users.InvalidUserError("choose a role", field="role") from exc
        users.create_user(db, username, password, user_role, audit.user_actor(principal.username))
        db.commit()
    except NodeError as exc:
        db.rollback()
        return _users_page(request, db, principal, error=str(exc), error_fields=_fields(exc), status=422,
                           username=username, role=role)
    return RedirectResponse("/admin/users?notice=user-added", status_code=303)


@router.post("/users/{user_id}/active")
def user_set_active(
    request: Request,
    db: DbDep,
    principal: CsrfAdminDep,
    user_id: RowId,
    active: Annotated[str, Form(max_length=8)],
) -> Response:
    enable = active == "1"
    users.get_by_id(db, user_id)  # no such user: 404, as for an AE (it answered 409, a conflict)
    try:
        users.set_active(db, user_id, enable, audit.user_actor(principal.username))
        db.commit()
    except NodeError as exc:
        db.rollback()
        return _users_page(request, db, principal, error=str(exc), status=409)
    return RedirectResponse(
        f"/admin/users?notice={'user-enabled' if enable else 'user-disabled'}", status_code=303
    )


@router.post("/users/{user_id}/password")
def user_set_password(
    request: Request,
    db: DbDep,
    principal: CsrfAdminDep,
    user_id: RowId,
    password: Annotated[str, Form(max_length=1024)],
    password_repeat: Annotated[str, Form(max_length=1024)],
) -> Response:
    users.get_by_id(db, user_id)  # no such user: 404, as for an AE (it answered 422, invalid input)
    try:
        if password != password_repeat:
            raise users.InvalidUserError("the two passwords differ", field="password_repeat")
        users.set_password(db, user_id, password, audit.user_actor(principal.username))
        db.commit()
    except NodeError as exc:
        db.rollback()
        return _users_page(request, db, principal, error=str(exc), status=422)
    if user_id == principal.user_id:
        return RedirectResponse("/login", status_code=303)
    return RedirectResponse("/admin/users?notice=password-set", status_code=303)


# ---------------------------------------------------------------------------------------------
# Audit log
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditPage:
    events: list[AuditEvent]
    page: int
    pages: int  # when ``capped``, the pages the counted events fill (there are more)
    total: int  # when ``capped``, paging.COUNT_CAP: there are more
    action: str
    actor: str
    capped: bool = False
    more: bool = False  # a page of older events follows this one
    # The query parameters that seek the page after this one (older) and the one before (newer) from
    # this page's last and first event, instead of counting past every event before them.
    older: dict[str, int] = field(default_factory=dict)
    newer: dict[str, int] = field(default_factory=dict)


#: Where the actor the audit log's filter names is written after a prefix: "user:alice", "cli:root".
_ACTOR_PREFIXES = ("", "user:", "cli:")


def _audit_criteria(action: str, actor: str) -> list[ColumnElement[bool]]:
    """The filter: the action from its start, the actor from its start or its name's start after
    "user:" or "cli:" ("ali" finds user:alice). Both are prefixes of an index (migration 0015): a LIKE
    '%actor%' read all 500,000 events of a hospital's year for every filtered page."""
    criteria: list[ColumnElement[bool]] = []
    if action:
        criteria.append(AuditEvent.action.like(_prefix_pattern(action), escape="\\"))
    if actor:
        criteria.append(or_(*[AuditEvent.actor.like(_prefix_pattern(prefix + actor), escape="\\")
                              for prefix in _ACTOR_PREFIXES]))
    return criteria


def _prefix_pattern(value: str) -> str:
    """``value`` as a LIKE pattern of the values that start with it. Made here, not in SQL (startswith()
    sends ``? || '%'``): SQLite searches an index only for a LIKE pattern it is given whole."""
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def audit_page_data(
    db: Session, *, page: int, action: str, actor: str, per_page: int = AUDIT_PAGE,
    before: int | None = None, after: int | None = None,
) -> AuditPage:
    """One page of the audit log, newest first. ``before``/``after``: the id of the event the page
    follows (the previous page's last) or precedes (the next page's first), as the pager's links give
    them: the page is sought from that event's (at, id) in the index, where an OFFSET walked past every
    event of the pages before it. Without them (a typed page number, an event gone) the page is counted
    from the start."""
    criteria = _audit_criteria(action, actor)
    count = paging.capped_count(db, select(AuditEvent.id).where(*criteria))
    key = tuple_(AuditEvent.at, AuditEvent.id)
    # The page's ids first, from the filter's index alone (it holds at and id), then only their rows: a
    # filter that matches many events (user.login, a tenth of them) otherwise read each matching row
    # from the table to sort them, 38 ms a page on SQLite instead of 13.
    newest_first = select(AuditEvent.id).where(*criteria).order_by(AuditEvent.at.desc(), AuditEvent.id.desc())
    anchor_id = before if before is not None else after
    anchor = db.get(AuditEvent, anchor_id) if anchor_id is not None else None
    if anchor is not None and before is not None:
        # one event more than the page tells whether an older page follows
        ids = list(db.scalars(newest_first.where(key < (anchor.at, anchor.id)).limit(per_page + 1)))
        more = len(ids) > per_page
    elif anchor is not None:  # the page before the one ``anchor`` starts: that one follows
        oldest_first = (select(AuditEvent.id).where(*criteria, key > (anchor.at, anchor.id))
                        .order_by(AuditEvent.at, AuditEvent.id).limit(per_page))
        ids = list(reversed(list(db.scalars(oldest_first))))
        more = True
    else:
        ids = list(db.scalars(newest_first.offset((page - 1) * per_page).limit(per_page + 1)))
        more = len(ids) > per_page
    ids = ids[:per_page]
    by_id = {e.id: e for e in db.scalars(select(AuditEvent).where(AuditEvent.id.in_(ids)))} if ids else {}
    events = [by_id[pk] for pk in ids]
    return AuditPage(
        events, page, count.pages(per_page), count.total, action, actor, capped=count.capped, more=more,
        older={"before": events[-1].id} if events and more else {},
        newer={"after": events[0].id} if events and page > 1 else {},
    )


@router.get("/audit")
def audit_log(
    request: Request,
    db: DbDep,
    principal: AdminDep,
    page: Annotated[int, Query(ge=1, le=100000)] = 1,
    action: Annotated[str, Query(max_length=64)] = "",
    actor: Annotated[str, Query(max_length=128)] = "",
    before: Annotated[int | None, Query(ge=1, le=ROW_ID_MAX)] = None,
    after: Annotated[int | None, Query(ge=1, le=ROW_ID_MAX)] = None,
) -> Response:
    data = audit_page_data(db, page=page, action=action, actor=actor, before=before, after=after)
    return render(
        request,
        "admin_audit.html",
        principal,
        active="audit",
        data=data,
        params={"action": action, "actor": actor},
    )
