"""The JSON API: the console's pages as data, with the same session cookie, roles and CSRF rule.

Log in with ``POST /api/session``; send the returned ``csrf_token`` as the ``X-CSRF-Token`` header
on every POST, PUT, PATCH and DELETE. The OpenAPI description is at ``/api/openapi.json``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from dicom_node import aes, audit, users
from dicom_node.eligibility import AgePolicy
from dicom_node.errors import AuthenticationError, NotFoundError
from dicom_node.outbox import requeue, wake
from dicom_node.store.models import AeRole, DeliveryState, RemoteAe, User, UserRole
from dicom_node.web import results
from dicom_node.web.account import change_own_password
from dicom_node.web.admin import audit_page_data, echo_test, settings_view
from dicom_node.web.auth import SESSION_COOKIE, Principal, UtcDatetime
from dicom_node.web.deps import (
    ROW_ID_MAX,
    Console,
    ConsoleDep,
    CsrfAdminDep,
    CsrfUserDep,
    DbDep,
    RowId,
    UserDep,
    admin_user,
    current_user,
)
from dicom_node.web.login import THROTTLED, log_in, set_cookie, set_session_cookies
from dicom_node.web.pages import (
    ResultQueryDep,
    audit_search,
    audit_study_view,
    classify_held,
    held_upload,
    hold_upload,
    read_limited,
    store_held,
    upload_report_response,
)


class InvalidFieldOut(BaseModel):
    type: str
    loc: list[str | int] = Field(description="where: path, query or body, then the parameter or field")
    msg: str


class ErrorOut(BaseModel):
    """Every refusal (4xx) and failure (5xx), the request's invalid input (422) included."""

    detail: str | list[InvalidFieldOut] = Field(
        description="what went wrong; for a request the router refuses as invalid, one entry per field")
    field: str | None = Field(default=None, description="the field an invalid value entered was in")


#: Documented for every route: the answers were described as only their success and a 422 whose
#: "detail" is a list, while 401, 403, 404, 409, 429 and 503 have a text "detail", and so have the
#: 422s of a value the node itself refuses (an AE title, a user name, an empty upload) (review).
_ERRORS: dict[int | str, dict[str, Any]] = {
    "default": {"model": ErrorOut, "description": "refused or failed; the status says which"}
}

public_router = APIRouter(prefix="/api", tags=["session"], responses=_ERRORS)
router = APIRouter(prefix="/api", dependencies=[Depends(current_user)], responses=_ERRORS)
admin_router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(admin_user)])


# ---------------------------------------------------------------------------------------------
# Session
# ---------------------------------------------------------------------------------------------


class LoginRequest(BaseModel):
    username: str = Field(max_length=64)
    password: str = Field(max_length=1024)


class SessionInfo(BaseModel):
    username: str
    role: UserRole
    csrf_token: str = Field(description="send as X-CSRF-Token on unsafe requests")
    expires_at: UtcDatetime = Field(description="when the session ends unless a request uses it again")
    ends_at: UtcDatetime = Field(description="when the session ends whatever the use (a new login then)")

    @classmethod
    def of(cls, principal: Principal) -> SessionInfo:
        return cls(username=principal.username, role=principal.role, csrf_token=principal.csrf_token,
                   expires_at=principal.expires_at, ends_at=principal.ends_at)


def _new_session(con: Console, db: Session, token: str) -> JSONResponse:
    """The answer to a login or a password change: the session the new ``token`` opened (its cookie is
    the caller's to set)."""
    principal = con.tokens.resolve(db, token)
    if principal is None:
        raise AuthenticationError("the new session could not be read back")
    return JSONResponse(SessionInfo.of(principal).model_dump(mode="json"))


@public_router.post("/session", response_model=SessionInfo)
def api_login(request: Request, body: LoginRequest, con: ConsoleDep, db: DbDep) -> Response:
    """Log in; sets the session cookie. JSON only, so a cross-site form cannot submit it."""
    outcome = log_in(request, con, db, body.username, body.password)
    if outcome == THROTTLED:
        return JSONResponse({"detail": "too many failed attempts; wait and retry"}, status_code=429)
    if not isinstance(outcome, tuple):
        return JSONResponse({"detail": "unknown user or wrong password"}, status_code=401)
    user, token = outcome
    response = _new_session(con, db, token)
    set_session_cookies(response, con, token, user.username)
    return response


@router.get("/session", response_model=SessionInfo, tags=["session"])
def api_session(principal: UserDep) -> SessionInfo:
    return SessionInfo.of(principal)


@router.delete("/session", status_code=204, tags=["session"])
def api_logout(con: ConsoleDep, db: DbDep, principal: CsrfUserDep) -> Response:
    con.tokens.end(db, principal.session_id)
    audit.record(db, audit.user_actor(principal.username), "user.logout", f"app_user:{principal.user_id}")
    db.commit()
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


class PasswordChangeRequest(BaseModel):
    current_password: str = Field(max_length=1024)
    new_password: str = Field(max_length=1024)


@router.post("/account/password", response_model=SessionInfo, tags=["session"])
def api_change_password(
    request: Request, body: PasswordChangeRequest, con: ConsoleDep, db: DbDep, principal: CsrfUserDep
) -> Response:
    """Change one's own password (any role). Every other session of the user ends; this one goes on with
    a new cookie and the returned CSRF token. A wrong current password (403) counts as a failed login."""
    outcome = change_own_password(request, con, db, principal, body.current_password, body.new_password)
    if outcome == THROTTLED:
        return JSONResponse({"detail": "too many wrong passwords; wait and retry"}, status_code=429)
    if not isinstance(outcome, str):
        return JSONResponse({"detail": "the current password is wrong"}, status_code=outcome)
    response = _new_session(con, db, outcome)
    set_cookie(response, con, SESSION_COOKIE, outcome)
    return response


@router.get("/openapi.json", include_in_schema=False)
def api_openapi(request: Request) -> dict[str, Any]:
    app = request.app
    if app.openapi_schema is None:
        app.openapi_schema = get_openapi(
            title=app.title, version=app.version, description=__doc__, routes=app.routes
        )
    schema: dict[str, Any] = app.openapi_schema
    return schema


# ---------------------------------------------------------------------------------------------
# Dashboard, results, details, resend
# ---------------------------------------------------------------------------------------------


@router.get("/dashboard", response_model=results.Dashboard, tags=["results"])
def api_dashboard(db: DbDep) -> results.Dashboard:
    return results.dashboard(db)


@router.get("/results", response_model=results.ResultPage, tags=["results"])
def api_results(db: DbDep, principal: UserDep, query: ResultQueryDep) -> results.ResultPage:
    """Studies newest first (by time of receipt), a page at a time. The next page is sought from this one's
    last study: send ``page`` + 1 and the parameters in ``older`` (``before=<its id>``) with the search's
    fields; ``newer`` (``after=<the first study's id>``) gives the page before. A page given by its number
    alone is counted from the start. Images and files of a study are at
    ``/results/{study}/instances/{instance}/image.png``, ``/results/{study}/findings/{finding}/heatmap.png``,
    ``/results/{study}/objects/{object}/object.dcm`` and ``/results/{study}/objects/{object}/report.pdf``.
    Each call is recorded in the audit log (``results.search``)."""
    page = results.search(db, query)
    audit_search(db, principal, query, page)
    return page


@router.get("/results/{study_id}", response_model=results.StudyDetail, tags=["results"])
def api_study(db: DbDep, con: ConsoleDep, principal: UserDep, study_id: RowId) -> results.StudyDetail:
    detail = results.study_detail(db, study_id, ages=AgePolicy.of(con.settings.pipeline),
                                  storage_dir=con.settings.storage_dir, results_dir=con.settings.results_dir)
    audit_study_view(db, con, principal, study_id)
    return detail


class DeliveryOut(BaseModel):
    id: int
    state: DeliveryState
    next_attempt_at: UtcDatetime | None


@router.post("/deliveries/{delivery_id}/resend", response_model=DeliveryOut, tags=["results"])
def api_resend(db: DbDep, principal: CsrfAdminDep, delivery_id: RowId) -> DeliveryOut:
    (delivery,) = requeue(db, [delivery_id], audit.user_actor(principal.username))
    db.commit()
    wake([delivery.destination_pk])  # try now, not at the outbox's next sweep
    return DeliveryOut(id=delivery.id, state=delivery.state, next_attempt_at=delivery.next_attempt_at)


# ---------------------------------------------------------------------------------------------
# Upload & classify
# ---------------------------------------------------------------------------------------------


class UploadOut(BaseModel):
    token: str
    filename: str
    is_dicom: bool
    image_url: str


class PredictionOut(BaseModel):
    label: str
    top_class: str
    confidence: float
    probabilities: dict[str, float]
    model_name: str
    model_version: str
    analysed_at: UtcDatetime
    heatmap_url: str | None
    report_url: str
    novelty: float | None = None  # how unlike the training images, 1.0 = the model's limit
    # Why the model's own checks would refuse the image (a negative, the wrong way up, unfamiliar) when the
    # node is set to classify it anyway (pipeline.skip_unfamiliar off); None when they would not
    warning: str | None = None
    # A DICOM header with no patient age, classified: confirm the patient is an adult (AGE_UNKNOWN_TEXT)
    age_unknown: bool = False


class IngestOut(BaseModel):
    study_id: int
    instance_id: int
    duplicate: bool


@router.post("/uploads", response_model=UploadOut, status_code=201, tags=["upload"])
async def api_upload(con: ConsoleDep, principal: CsrfUserDep, file: UploadFile) -> UploadOut:
    data = await read_limited(file)
    held = await run_in_threadpool(hold_upload, con, principal, file.filename or "upload", data)
    return UploadOut(
        token=held.token,
        filename=held.upload.filename,
        is_dicom=held.upload.is_dicom,
        image_url=f"/upload/{held.token}/image.png",
    )


@router.post("/uploads/{token}/classify", response_model=PredictionOut, tags=["upload"])
def api_classify(
    con: ConsoleDep,
    principal: CsrfUserDep,
    token: str,
    adult_chest: Annotated[
        bool, Query(description="a picture (PNG/JPEG) only: the caller confirms it is a frontal chest "
                    "radiograph of an adult, which a DICOM header would have shown")
    ] = False,
) -> PredictionOut:
    held = held_upload(con, principal, token)
    classify_held(con, held, adult_chest=adult_chest)
    prediction = held.prediction
    if prediction is None or held.analysed_at is None:
        raise NotFoundError("no prediction")
    return PredictionOut(
        label=prediction.label,
        top_class=prediction.top_class,
        confidence=prediction.confidence,
        probabilities={str(k): float(v) for k, v in prediction.probabilities.items()},
        model_name=prediction.model.name,
        model_version=prediction.model.version,
        analysed_at=held.analysed_at,
        heatmap_url=f"/upload/{token}/heatmap.png" if prediction.heatmap is not None else None,
        report_url=f"/api/uploads/{token}/report.pdf",
        novelty=prediction.novelty,
        warning=prediction.doubt,
        age_unknown=held.upload.age_unknown,
    )


@router.get("/uploads/{token}/report.pdf", tags=["upload"], response_class=Response)
def api_upload_report(con: ConsoleDep, principal: UserDep, token: str) -> Response:
    return upload_report_response(con, held_upload(con, principal, token))


@router.post("/uploads/{token}/store", response_model=IngestOut, tags=["upload"])
def api_upload_store(con: ConsoleDep, db: DbDep, principal: CsrfUserDep, token: str) -> IngestOut:
    outcome = store_held(con, db, principal, held_upload(con, principal, token))
    return IngestOut(study_id=outcome.study_pk, instance_id=outcome.instance_pk, duplicate=outcome.duplicate)


# ---------------------------------------------------------------------------------------------
# Administration
# ---------------------------------------------------------------------------------------------


class AeIn(BaseModel):
    role: AeRole
    ae_title: str = Field(max_length=16)
    host: str | None = Field(default=None, max_length=255)
    port: int | None = Field(default=None, ge=1, le=65535)
    tls: bool = False
    description: str = Field(default="", max_length=255)
    reply_to: str | None = Field(default=None, max_length=16)
    enabled: bool = True
    storage_commitment: bool = Field(
        default=False, description="destinations: after delivering, ask the PACS to commit to keeping the "
        "results (Storage Commitment Push Model); its reports are accepted on associations it opens")

    def spec(self) -> aes.AeSpec:
        return aes.AeSpec(
            ae_title=self.ae_title,
            role=self.role,
            host=self.host,
            port=self.port,
            tls=self.tls,
            description=self.description,
            reply_to=self.reply_to,
            enabled=self.enabled,
            storage_commitment=self.storage_commitment,
        )


class AeOut(AeIn):
    id: int

    @classmethod
    def of(cls, ae: RemoteAe) -> AeOut:
        return cls(
            id=ae.id,
            role=ae.role,
            ae_title=ae.ae_title,
            host=ae.host,
            port=ae.port,
            tls=ae.tls,
            description=ae.description,
            reply_to=ae.reply_to.ae_title if ae.reply_to else None,
            enabled=ae.enabled,
            storage_commitment=ae.storage_commitment,
        )


class EchoOut(BaseModel):
    ok: bool
    message: str


class UserIn(BaseModel):
    username: str = Field(max_length=64)
    role: UserRole
    password: str = Field(max_length=1024)


class UserPatch(BaseModel):
    active: bool | None = None
    password: str | None = Field(default=None, max_length=1024)


class UserOut(BaseModel):
    id: int
    username: str
    role: UserRole
    active: bool
    created_at: UtcDatetime
    last_login_at: UtcDatetime | None

    @classmethod
    def of(cls, user: User) -> UserOut:
        return cls(
            id=user.id,
            username=user.username,
            role=user.role,
            active=user.active,
            created_at=user.created_at,
            last_login_at=user.last_login_at,
        )


class AuditEventOut(BaseModel):
    id: int
    at: UtcDatetime
    actor: str
    action: str
    target: str
    details: dict[str, Any]


class AuditOut(BaseModel):
    total: int = Field(description="the events that match; with total_capped, the cap: there are more")
    total_capped: bool = False
    page: int
    pages: int
    more: bool = Field(default=False, description="an older page follows; ?before=<the last event's id> "
                       "seeks it")
    events: list[AuditEventOut]


@admin_router.get("/settings")
def api_settings(con: ConsoleDep) -> dict[str, dict[str, str]]:
    """The node's settings, read-only, secrets masked."""
    return settings_view(con.settings)


@admin_router.get("/aes", response_model=list[AeOut])
def api_aes(db: DbDep, role: AeRole | None = None) -> list[AeOut]:
    return [AeOut.of(ae) for ae in aes.list_aes(db, role)]


@admin_router.post("/aes", response_model=AeOut, status_code=201)
def api_ae_add(db: DbDep, principal: CsrfAdminDep, body: AeIn) -> AeOut:
    ae = aes.add(db, body.spec(), audit.user_actor(principal.username))
    db.commit()
    return AeOut.of(ae)


@admin_router.put("/aes/{ae_id}", response_model=AeOut)
def api_ae_update(db: DbDep, principal: CsrfAdminDep, ae_id: RowId, body: AeIn) -> AeOut:
    ae = aes.update(db, ae_id, body.spec(), audit.user_actor(principal.username))
    db.commit()
    if ae.role is AeRole.DESTINATION:
        wake([ae.id])  # deliveries made due by a mended address go now, not at the outbox's next sweep
    return AeOut.of(ae)


@admin_router.delete("/aes/{ae_id}", status_code=204)
def api_ae_delete(db: DbDep, principal: CsrfAdminDep, ae_id: RowId) -> Response:
    aes.remove(db, ae_id, audit.user_actor(principal.username))
    db.commit()
    return Response(status_code=204)


@admin_router.post("/aes/{ae_id}/echo", response_model=EchoOut)
def api_ae_echo(con: ConsoleDep, db: DbDep, principal: CsrfAdminDep, ae_id: RowId) -> EchoOut:
    outcome = echo_test(con, db, ae_id, principal.username)
    return EchoOut(ok=outcome.ok, message=outcome.message)


@admin_router.get("/users", response_model=list[UserOut])
def api_users(db: DbDep) -> list[UserOut]:
    return [UserOut.of(u) for u in users.list_users(db)]


@admin_router.post("/users", response_model=UserOut, status_code=201)
def api_user_add(db: DbDep, principal: CsrfAdminDep, body: UserIn) -> UserOut:
    user = users.create_user(
        db, body.username, body.password, body.role, audit.user_actor(principal.username)
    )
    db.commit()
    return UserOut.of(user)


@admin_router.patch("/users/{user_id}", response_model=UserOut)
def api_user_patch(db: DbDep, principal: CsrfAdminDep, user_id: RowId, body: UserPatch) -> UserOut:
    actor = audit.user_actor(principal.username)
    if body.password is not None:
        users.set_password(db, user_id, body.password, actor)
    if body.active is not None:
        users.set_active(db, user_id, body.active, actor)
    db.commit()
    return UserOut.of(users.get_by_id(db, user_id))


@admin_router.get("/audit", response_model=AuditOut)
def api_audit(
    db: DbDep,
    page: Annotated[int, Query(ge=1, le=100000)] = 1,
    action: Annotated[str, Query(max_length=64)] = "",
    actor: Annotated[str, Query(max_length=128)] = "",
    before: Annotated[
        int | None, Query(ge=1, le=ROW_ID_MAX, description="the id of the event the page follows")
    ] = None,
    after: Annotated[
        int | None, Query(ge=1, le=ROW_ID_MAX, description="the id of the event the page precedes")
    ] = None,
) -> AuditOut:
    data = audit_page_data(db, page=page, action=action, actor=actor, before=before, after=after)
    return AuditOut(
        total=data.total,
        total_capped=data.capped,
        page=data.page,
        pages=data.pages,
        more=data.more,
        events=[
            AuditEventOut(
                id=e.id, at=e.at, actor=e.actor, action=e.action, target=e.target, details=e.details
            )
            for e in data.events
        ],
    )


router.include_router(admin_router)
