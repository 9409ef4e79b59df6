"""The radiologist's pages: dashboard, upload & classify, results, study details and downloads."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import parse_qsl, urlencode

import pydicom
from fastapi import APIRouter, Depends, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node import audit
from dicom_node.eligibility import AgePolicy, not_classified
from dicom_node.errors import (
    ConflictError,
    DamagedFileError,
    IneligibleImageError,
    NodeError,
    NotFoundError,
    describe_exception,
)
from dicom_node.outbox import requeue, wake
from dicom_node.store.models import (
    Delivery,
    Finding,
    Instance,
    ResultKind,
    ResultObject,
    Series,
    StudyState,
    utcnow,
)
from dicom_node.users import CREATE_ADMIN_HINT, admin_exists
from dicom_node.web import results
from dicom_node.web.auth import Principal
from dicom_node.web.deps import (
    HEAD_ONLY,
    ROW_ID_MAX,
    Console,
    ConsoleDep,
    CsrfAdminDep,
    CsrfUserDep,
    DbDep,
    RowId,
    UserDep,
    auto_reload,
    current_user,
    release,
)
from dicom_node.web.errors import http_status
from dicom_node.web.imagegate import ConsoleBusyError, busy_headers
from dicom_node.web.imaging import load_heatmap, overlay_png, png_bytes, png_gray
from dicom_node.web.services import IngestOutcome, picture_preview
from dicom_node.web.templating import render
from dicom_node.web.uploads import (
    MAX_UPLOAD_BYTES,
    HeldUpload,
    NotStorableUploadError,
    UploadTooLargeError,
    read_upload,
)

LOGGER = logging.getLogger(__name__)

T = TypeVar("T")

router = APIRouter(include_in_schema=False, dependencies=[Depends(current_user)])

# ---------------------------------------------------------------------------------------------
# Dashboard
# ---------------------------------------------------------------------------------------------


@router.get("/")
def dashboard_page(request: Request, db: DbDep, con: ConsoleDep, principal: UserDep) -> Response:
    latest = results.ResultQuery(per_page=10)
    recent = results.search(db, latest)
    # the ten latest studies, with their patients; the page's reload every minute only when it shows
    # other studies than those the user was last recorded reading here within the hour
    shown = f"dashboard:{','.join(str(row.study_id) for row in recent.rows)}"
    if con.reads.first(audit.user_actor(principal.username), shown) or not auto_reload(request):
        audit_search(db, principal, latest, recent)
    return render(
        request,
        "dashboard.html",
        principal,
        active="dashboard",
        stats=results.dashboard(db),
        recent=recent,
        no_admin=not admin_exists(db),
        admin_hint=CREATE_ADMIN_HINT,
    )


# ---------------------------------------------------------------------------------------------
# Upload & classify
# ---------------------------------------------------------------------------------------------


async def read_limited(file: UploadFile) -> bytes:
    data = await file.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise UploadTooLargeError(f"the file is larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MB")
    return data


@router.get("/upload")
def upload_form(request: Request, principal: UserDep) -> Response:
    return render(request, "upload.html", principal, active="upload", held=None, error="")


@router.post("/upload")
async def upload(request: Request, con: ConsoleDep, principal: CsrfUserDep, file: UploadFile) -> Response:
    try:
        data = await read_limited(file)
        held = await run_in_threadpool(hold_upload, con, principal, file.filename or "upload", data)
    except NodeError as exc:
        return upload_refused(request, principal, None, exc, status=422)
    LOGGER.info(
        "upload %s by user %d (%s)",
        held.token[:6],
        principal.user_id,
        "dicom" if held.upload.is_dicom else "picture",
    )
    return RedirectResponse(f"/upload/{held.token}", status_code=303)


def upload_refused(
    request: Request, principal: Principal, held: HeldUpload | None, exc: NodeError, *, status: int
) -> Response:
    """The upload page saying why ``exc`` stopped it, answered ``status``; or 503 with Retry-After when
    the console was busy with other images (nothing is wrong with this one: it can be tried again)."""
    if isinstance(exc, ConsoleBusyError):
        status = http_status(exc)
    response = render(
        request, "upload.html", principal, status=status, active="upload", held=held, error=str(exc)
    )
    response.headers.update(busy_headers(exc))
    return response


def held_upload(con: Console, principal: Principal, token: str) -> HeldUpload:
    return con.uploads.get(principal.user_id, token)


def hold_upload(con: Console, principal: Principal, filename: str, data: bytes) -> HeldUpload:
    """Read an uploaded file and hold it for its user, judged by the node's own age limit.

    Decodes up to MAX_UPLOAD_BYTES: async routes call it in the thread pool, never on the event loop,
    which serves every other console request (and the health check) meanwhile, and only in its turn
    (``web.image_workers`` images at once)."""
    ages = AgePolicy.of(con.settings.pipeline)
    with con.images.turn():
        upload = read_upload(filename, data, ages=ages)
    return con.uploads.add(principal.user_id, upload)


@router.get("/upload/{token}")
def upload_view(request: Request, con: ConsoleDep, principal: UserDep, token: str) -> Response:
    held = held_upload(con, principal, token)
    return render(request, "upload.html", principal, active="upload", held=held, error=held.refusal)


def upload_preview_png(con: Console, held: HeldUpload) -> bytes:
    if held.preview_png is None:
        with con.images.turn():
            if held.upload.dataset is not None:
                gray = con.services.dicom_preview(held.upload.dataset)
            else:
                gray = picture_preview(held.upload)
            held.preview_png = png_bytes(gray)
    return held.preview_png


@router.get("/upload/{token}/image.png")
def upload_image(con: ConsoleDep, principal: UserDep, token: str) -> Response:
    held = held_upload(con, principal, token)
    return Response(upload_preview_png(con, held), media_type="image/png")


@router.get("/upload/{token}/heatmap.png")
def upload_heatmap(con: ConsoleDep, principal: UserDep, token: str) -> Response:
    held = held_upload(con, principal, token)
    if held.prediction is None or held.prediction.heatmap is None:
        raise NotFoundError("no heat map for this upload")
    preview = upload_preview_png(con, held)  # the preview the page shows, made once: not decoded again
    with con.images.turn():
        png = overlay_png(png_gray(preview), held.prediction.heatmap)
    return Response(png, media_type="image/png")


PICTURE_UNCONFIRMED = (
    "a picture has no header that gives the patient's age or the view: confirm that it is a frontal chest "
    "radiograph of an adult"
)


def classify_held(con: Console, held: HeldUpload, *, adult_chest: bool = False) -> None:
    """Classify an upload, unless its DICOM header says the model is not made for it (as the node would).

    A picture has no header, so its user must confirm (``adult_chest``) what a header would have shown:
    a frontal chest radiograph of an adult. The model calls most young children's radiographs COVID-19."""
    try:
        verdict = held.upload.eligibility
        if verdict is not None and not verdict.eligible:
            raise IneligibleImageError(not_classified(verdict.reason))
        if not held.upload.is_dicom and not adult_chest:
            raise IneligibleImageError(not_classified(PICTURE_UNCONFIRMED))
        with con.images.turn():
            held.prediction = con.services.classify(held.upload)
    except ConsoleBusyError:
        raise  # nothing the upload's page need keep saying: another try may do
    except NodeError as exc:
        held.refusal = str(exc)  # the upload's page keeps saying why, after a reload too
        raise
    held.refusal = ""
    held.analysed_at = utcnow()


@router.post("/upload/{token}/classify")
def upload_classify(
    request: Request,
    con: ConsoleDep,
    principal: CsrfUserDep,
    token: str,
    adult_chest: Annotated[str, Form(max_length=8)] = "",
) -> Response:
    held = held_upload(con, principal, token)
    try:
        classify_held(con, held, adult_chest=adult_chest == "yes")
    except NodeError as exc:
        return upload_refused(request, principal, held, exc, status=http_status(exc))
    return RedirectResponse(f"/upload/{held.token}", status_code=303)


def upload_report_response(con: Console, held: HeldUpload) -> Response:
    if held.prediction is None or held.analysed_at is None:
        # the upload is held, only not classified yet: 404 read as "the upload is gone" (review)
        raise ConflictError("classify the image before saving the report")
    with con.images.turn():
        pdf = con.services.report_pdf(held.upload, held.prediction, analysed_at=held.analysed_at)
    stamp = held.analysed_at.astimezone().strftime("%Y%m%d-%H%M%S")
    return Response(
        pdf,
        media_type="application/pdf",
        headers={
            "Content-Disposition": f'attachment; filename="cxr-report-{stamp}.pdf"',
            "Cache-Control": "no-store",
        },
    )


@router.get("/upload/{token}/report.pdf")
def upload_report(con: ConsoleDep, principal: UserDep, token: str) -> Response:
    return upload_report_response(con, held_upload(con, principal, token))


def store_held(con: Console, db: Session, principal: Principal, held: HeldUpload) -> IngestOutcome:
    """Store an uploaded DICOM file in the node, so it is analysed and sent on like a C-STORE, and audit
    who did (the sender column holds ``WEB:`` and at most 12 characters of the name: an AE title)."""
    if not held.upload.is_dicom:
        raise NotStorableUploadError("only DICOM uploads can be stored in the node")
    release(db)  # no transaction held while the ingest writes
    outcome = con.services.ingest(held.upload, calling_ae=f"WEB:{principal.username}"[:16])
    held.ingest = outcome
    audit_read(db, principal, "upload.store", f"study:{outcome.study_pk}",
               {"instance_id": outcome.instance_pk, "duplicate": outcome.duplicate})
    return outcome


@router.post("/upload/{token}/store")
def upload_store(request: Request, con: ConsoleDep, db: DbDep, principal: CsrfUserDep, token: str) -> Response:
    """Store an uploaded DICOM file in the node, so it is analysed and sent on like a C-STORE."""
    held = held_upload(con, principal, token)
    try:
        outcome = store_held(con, db, principal, held)
    except NotFoundError:
        raise
    except NodeError as exc:
        # the status the API and "Classify" give it: a full disk or a database that is down is the node's
        # (503, to be retried), the node's own result a conflict (409), not the request's fault (422)
        return upload_refused(request, principal, held, exc, status=http_status(exc))
    notice = "duplicate" if outcome.duplicate else "stored"
    return RedirectResponse(f"/results/{outcome.study_pk}?notice={notice}", status_code=303)


# ---------------------------------------------------------------------------------------------
# Results and details
# ---------------------------------------------------------------------------------------------


def result_query(
    patient: Annotated[str, Query(max_length=128)] = "",
    accession: Annotated[str, Query(max_length=16)] = "",
    date_from: Annotated[str, Query(max_length=10)] = "",
    date_to: Annotated[str, Query(max_length=10)] = "",
    finding: Annotated[str, Query(max_length=32)] = "",
    state: Annotated[str, Query(max_length=16)] = "",
    page: Annotated[int, Query(ge=1, le=100000)] = 1,
    per_page: Annotated[int, Query(ge=1, le=100)] = 25,
    before: Annotated[
        int | None, Query(ge=1, le=ROW_ID_MAX, description="the id of the study the page follows")
    ] = None,
    after: Annotated[
        int | None, Query(ge=1, le=ROW_ID_MAX, description="the id of the study the page precedes")
    ] = None,
) -> results.ResultQuery:
    """The search form's fields; empty fields (as browsers send them) mean "any"."""

    def parsed(name: str, raw: str, parse: Callable[[str], T]) -> T | None:
        if not raw:
            return None
        try:
            return parse(raw)
        except ValueError as exc:
            raise RequestValidationError(
                [{"loc": ("query", name), "msg": f"invalid {name}", "type": "value_error", "input": raw}]
            ) from exc

    first = parsed("date_from", date_from, date.fromisoformat)
    last = parsed("date_to", date_to, date.fromisoformat)
    if first is not None and last is not None and last < first:
        # the two dates swapped matched no study, and the page said none matches: refused, it says which
        raise RequestValidationError([{
            "loc": ("query", "date_to"), "msg": "the end date is before the start date",
            "type": "value_error", "input": date_to,
        }])
    return results.ResultQuery(
        patient=patient,
        accession=accession,
        date_from=first,
        date_to=last,
        finding=finding,
        state=parsed("state", state, StudyState),
        page=page,
        per_page=per_page,
        before=before,
        after=after,
    )


ResultQueryDep = Annotated[results.ResultQuery, Depends(result_query)]


@router.get("/results")
def results_page(request: Request, db: DbDep, principal: UserDep, query: ResultQueryDep) -> Response:
    page = results.search(db, query)
    audit_search(db, principal, query, page)
    # the search's fields: the pager's links add the page and the study they seek from
    params = query.model_dump(mode="json", exclude={"page", "before", "after"}, exclude_defaults=True)
    return render(
        request,
        "results.html",
        principal,
        active="results",
        page=page,
        params=params,
        back=urlencode(query.model_dump(mode="json", exclude_defaults=True)),
        states=[s.value for s in StudyState],
    )


def results_back(back: str) -> str:
    """The query of the results list a study was opened from (its rows' ``back``), for the study page's
    "Back to results": that search and page, not the plain list, which made the user search and page
    again for the next patient. Only the search's own parameters are kept, encoded again."""
    fields = results.ResultQuery.model_fields
    return urlencode([(name, value) for name, value in parse_qsl(back) if name in fields])


def audit_read(
    db: Session, principal: Principal, action: str, target: str, details: dict[str, Any] | None = None
) -> None:
    """Record who opened which patient's data (an access log, as hospitals keep), and commit it. A HEAD
    request is recorded too, marked ``"method": "HEAD"``: asked for, but nothing of it went out."""
    if HEAD_ONLY.get():
        details = {**(details or {}), "method": "HEAD"}
    audit.record(db, audit.user_actor(principal.username), action, target, details)
    db.commit()


@contextmanager
def audited_download(db: Session, principal: Principal, action: str, target: str) -> Iterator[None]:
    """Record a download of patient data once the body is ready to be handed out, and a request the node
    cannot serve (a 404, a damaged file) as such: asked for, with the reason, and not counted as a read."""
    try:
        yield
    except NodeError as exc:
        audit_read(db, principal, action, target, {"served": False, "reason": str(exc)})
        raise
    audit_read(db, principal, action, target)


def audit_search(
    db: Session, principal: Principal, query: results.ResultQuery, page: results.ResultPage
) -> None:
    """Record a results list read (``results.search``, page or API): its filters and the studies it showed.
    A list names each study's patient, ID and accession; paging through it read every patient's data and
    left no trace, where opening one study was recorded (review)."""
    filters = query.model_dump(mode="json", exclude_defaults=True)
    audit_read(db, principal, "results.search", "study", {
        "filters": filters, "studies": [row.study_id for row in page.rows],
    })  # fmt: skip


def audit_study_view(
    db: Session, con: Console, principal: Principal, study_id: int, *, reloaded: bool = False
) -> None:
    """Record that ``principal`` opened the study (page or API); the images its page then loads are part
    of that read (:func:`audit_image_read`), and so are the page's own reloads (``reloaded``) every 10 s
    while the study is analysed, unless the user's last recorded read of it is over an hour old."""
    target = f"study:{study_id}"
    if con.reads.first(audit.user_actor(principal.username), target) or not reloaded:
        audit_read(db, principal, "study.view", target)


def audit_image_read(db: Session, con: Console, principal: Principal, study_id: int) -> None:
    """Record a read of the study's images (``study.images``) unless the user opened the study, or read
    its images, within the last hour: a study page loads every image and heat map, one request each, and
    a script that fetched images without opening the study was in no log (review)."""
    target = f"study:{study_id}"
    if con.reads.first(audit.user_actor(principal.username), target):
        audit_read(db, principal, "study.images", target)


@router.get("/results/{study_id}")
def study_page(
    request: Request,
    db: DbDep,
    con: ConsoleDep,
    principal: UserDep,
    study_id: RowId,
    back: Annotated[str, Query(max_length=1024, description="the results list's query")] = "",
) -> Response:
    detail = results.study_detail(db, study_id, ages=AgePolicy.of(con.settings.pipeline),
                                  storage_dir=con.settings.storage_dir, results_dir=con.settings.results_dir)
    audit_study_view(db, con, principal, study_id, reloaded=auto_reload(request))
    return render(request, "study.html", principal, active="results", study=detail, back=results_back(back))


def _instance(db: DbDep, study_id: int, instance_id: int) -> Instance:
    instance = db.scalar(
        select(Instance)
        .join(Series, Instance.series_pk == Series.id)
        .where(Instance.id == instance_id, Series.study_pk == study_id)
    )
    if instance is None:
        raise NotFoundError("no such image in this study")
    if instance.purged_at is not None:
        raise NotFoundError("the image was removed by the retention policy; the findings remain")
    return instance


@router.get("/results/{study_id}/instances/{instance_id}/image.png")
def instance_image(
    con: ConsoleDep, db: DbDep, principal: UserDep, study_id: RowId, instance_id: RowId
) -> Response:
    instance = _instance(db, study_id, instance_id)
    audit_image_read(db, con, principal, study_id)
    release(db)  # no transaction held while the request waits for its turn
    with con.images.turn():
        png = png_bytes(con.services.stored_preview(instance.file_path))
    return Response(png, media_type="image/png")


RESULT_FILE_MISSING = (
    "the result file is missing on the node: an administrator can restore results/ from the backup "
    "(`cxr-node storage check` lists such files), or an image of the study sent again makes a new revision"
)
HEATMAP_FILE_MISSING = (
    "the heat-map file is missing on the node: an administrator can restore results/heatmaps/ from the "
    "backup (`cxr-node storage check` lists such files); the finding is kept"
)


def _under(root: Path, relative: str, missing: str = RESULT_FILE_MISSING) -> Path:
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise NotFoundError("the file is not in the node's results directory")
    if not path.is_file():
        raise NotFoundError(missing)
    return path


@router.get("/results/{study_id}/findings/{finding_id}/heatmap.png")
def finding_heatmap(
    con: ConsoleDep, db: DbDep, principal: UserDep, study_id: RowId, finding_id: RowId
) -> Response:
    finding = db.get(Finding, finding_id)
    if finding is None or not finding.heatmap_path:
        raise NotFoundError("no heat map for this finding")
    instance = _instance(db, study_id, finding.instance_pk)
    audit_image_read(db, con, principal, study_id)
    release(db)  # no transaction held while the request waits for its turn
    heat_path = _under(con.settings.results_dir, finding.heatmap_path, HEATMAP_FILE_MISSING)
    with con.images.turn():
        heat = load_heatmap(heat_path)
        png = overlay_png(con.services.stored_preview(instance.file_path), heat)
    return Response(png, media_type="image/png")


def _result_object(db: DbDep, study_id: int, object_id: int) -> ResultObject:
    obj = db.get(ResultObject, object_id)
    if obj is None or obj.study_pk != study_id:
        raise NotFoundError("no such result object in this study")
    return obj


@router.get("/results/{study_id}/objects/{object_id}/object.dcm")
def result_object_file(
    con: ConsoleDep, db: DbDep, principal: UserDep, study_id: RowId, object_id: RowId
) -> Response:
    """The DICOM object the node made (SR, Encapsulated PDF, heat-map SC), as sent to the PACS."""
    obj = _result_object(db, study_id, object_id)
    with audited_download(db, principal, "result.download", f"result_object:{object_id}"):
        path = _under(con.settings.results_dir, obj.file_path)
    return FileResponse(
        path, media_type="application/dicom", filename=f"{obj.kind.value}-{obj.sop_instance_uid}.dcm"
    )


DAMAGED_REPORT = (
    "the stored report file is damaged and cannot be read. An administrator can restore the results "
    "directory from the backup; an image of the study sent to the node again makes a new report"
)


def report_pdf_bytes(con: Console, obj: ResultObject) -> bytes:
    """The raw PDF kept beside the Encapsulated PDF instance, or the document inside that instance.
    Either must be a PDF: damaged bytes are refused with :data:`DAMAGED_REPORT`, not handed out."""
    if obj.kind is not ResultKind.PDF:
        raise NotFoundError("this result object is not a PDF report")
    encapsulated = _under(con.settings.results_dir, obj.file_path)
    beside = encapsulated.with_suffix(".pdf")
    if beside.is_file():
        document = beside.read_bytes()
    else:
        try:
            ds = pydicom.dcmread(io.BytesIO(encapsulated.read_bytes()))
            document = bytes(ds.EncapsulatedDocument)
        except Exception as exc:  # pydicom raises many types on damaged bytes; the log gets type and place
            LOGGER.warning("result_object %d: stored file unreadable: %s", obj.id, describe_exception(exc))
            raise DamagedFileError(DAMAGED_REPORT) from exc
        # The attribute is padded to even length with a NUL; the PDF itself ends at %%EOF.
        end = document.rfind(b"%%EOF")
        document = document[: end + 5] if end >= 0 else document
    if not document.startswith(b"%PDF-"):
        LOGGER.warning("result_object %d: stored report is not a PDF", obj.id)
        raise DamagedFileError(DAMAGED_REPORT)
    return document


@router.get("/results/{study_id}/objects/{object_id}/report.pdf")
def result_report_pdf(
    con: ConsoleDep, db: DbDep, principal: UserDep, study_id: RowId, object_id: RowId
) -> Response:
    obj = _result_object(db, study_id, object_id)
    with audited_download(db, principal, "report.download", f"result_object:{object_id}"):
        document = report_pdf_bytes(con, obj)
    return Response(
        document,
        media_type="application/pdf",
        headers={"Content-Disposition": f'attachment; filename="cxr-report-{study_id}.pdf"'},
    )


@router.post("/results/{study_id}/deliveries/{delivery_id}/resend")
def resend(
    db: DbDep,
    principal: CsrfAdminDep,
    study_id: RowId,
    delivery_id: RowId,
    back: Annotated[str, Query(max_length=1024, description="the results list's query")] = "",
) -> Response:
    delivery = db.get(Delivery, delivery_id)
    if delivery is None or delivery.result_object.study_pk != study_id:
        raise NotFoundError("no such delivery in this study")
    requeue(db, [delivery_id], audit.user_actor(principal.username))
    db.commit()
    wake([delivery.destination_pk])  # try now, not at the outbox's next sweep
    back = results_back(back)  # the study page's "Back to results" still leads to the user's search
    kept = f"&{urlencode({'back': back})}" if back else ""
    return RedirectResponse(f"/results/{study_id}?notice=resent{kept}#deliveries", status_code=303)
