"""Jinja2 set-up: how DICOM names, dates and probabilities read on the pages."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from fastapi import Request
from fastapi.responses import Response
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from pydicom.multival import MultiValue

from dicom_node import __version__
from dicom_node.eligibility import not_classified
from dicom_node.settings import Settings
from dicom_node.web.auth import Principal, aware
from dicom_node.web.deps import console
from dicom_node.web.imaging import hot_region
from reporting.codes import finding_for
from reporting.errors import UnknownLabelError
from reporting.pdf import AGE_UNKNOWN_TEXT, person_name_text

# Messages a redirect can ask a page to show (``?notice=<key>``): fixed texts, so a link cannot
# make the console display words of someone else's choosing.
NOTICES = {
    "resent": "The delivery is queued again and will be sent within a few seconds.",
    "stored": "The DICOM file is stored in the node; it is analysed and its results routed like any received study.",
    "duplicate": "This DICOM instance was already stored in the node; nothing new was stored.",
    "ae-added": "The AE was added.",
    "ae-updated": "The AE was saved.",
    "ae-removed": "The AE was removed.",
    "user-added": "The user was created.",
    "user-enabled": "The user can log in again.",
    "user-disabled": "The user is disabled and logged out.",
    "password-set": "The password was changed; the user's sessions were ended.",
    "password-changed": "Your password was changed; your sessions in other browsers were ended.",
    "session-ended": "Your session has ended (unused for too long, or logged out elsewhere). Log in again to "
    "go on where you were.",
}

#: Notices that are news rather than a success: shown as information, not in green.
INFO_NOTICES = frozenset({"session-ended"})

# Findings shown as "no finding" (green), by their coded concept (reporting.codes.FindingConcept.key); any
# other class except indeterminate is flagged.
NO_FINDING_KEYS = frozenset({"NORMAL", "NONCOVID"})


def dicom_value(value: Any) -> str:
    """A header value of an uploaded file as its DICOM text: several values (a backslash in the value)
    joined by a backslash, as a PACS and the PDF show them; the page showed the Python list, "['A', 'B']"."""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(item).strip() for item in value).strip("\\")
    return "" if value is None else str(value).strip()


def person_name(value: Any) -> str:
    """A person name as the PDF prints it (reporting.pdf.person_name_text). A stored name of several values
    keeps DICOM's backslash between them (store.header_columns.text): each is read as a name, "Doe, John;
    Roe, Jane", as the PDF reads the header's, not "Doe, John\\Roe Jane"."""
    if isinstance(value, str) and "\\" in value:
        return person_name_text(value.split("\\"))
    return person_name_text(value)


def dicom_date(value: str | None) -> str:
    if not value or len(value) != 8 or not value.isdigit():
        return value or ""
    return f"{value[:4]}-{value[4:6]}-{value[6:]}"


def dicom_time(value: str | None) -> str:
    if not value or len(value) < 4:
        return value or ""
    return f"{value[:2]}:{value[2:4]}"


def local_time(value: datetime | None, seconds: bool = False) -> str:
    if value is None:
        return ""
    return aware(value).astimezone().strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def time_zone() -> str:
    """The zone the console's times are in (the node's local time), e.g. "CET, UTC+01:00"; the PDF
    report gives its times in UTC and the SR in the image's own offset, so the pages say which."""
    now = datetime.now().astimezone()
    offset = now.strftime("%z")
    return f"{now.strftime('%Z')}, UTC{offset[:3]}:{offset[3:]}"


def percent(value: float | None) -> str:
    if value is None:
        return ""
    return f"{100.0 * value:.1f} %"


def finding_name(label: str) -> str:
    """The words the PDF and SR use for a class label ("covid" -> "COVID-19"), so all three agree."""
    try:
        return finding_for(label).display
    except UnknownLabelError:
        return label.capitalize()


def finding_class(label: str) -> str:
    """CSS class of a finding chip: normal, indeterminate or flagged, by the label's coded concept as the
    SR and the PDF read it. By its lower-cased spelling, "Non_COVID", "Non COVID" and "normal " were
    flagged while the chip said "No COVID-19 pattern" or "Normal" (review)."""
    try:
        key = finding_for(label).key
    except UnknownLabelError:
        return "finding-flagged"
    if key in NO_FINDING_KEYS:
        return "finding-normal"
    return "finding-indeterminate" if key == "INDETERMINATE" else "finding-flagged"


def dimse_status(value: int | None) -> str:
    return "—" if value is None else f"0x{value:04X}"


def query_string(params: dict[str, Any], **changes: Any) -> str:
    merged = {k: v for k, v in {**params, **changes}.items() if v not in (None, "")}
    return "?" + urlencode(merged) if merged else ""


#: Characters a DICOM value may carry that a page must not show: C0 controls (NUL, ESC; tab and line
#: breaks stay) and the Unicode bidirectional overrides and isolates, with which a Study Description
#: holding U+202E showed the rest of the line reversed ("RTL" read "LTR").
_UNSHOWN = dict.fromkeys(
    [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
)


def shown(value: Any) -> Any:
    """Every ``{{ … }}`` of a page passes here before it is escaped (Jinja's ``finalize``)."""
    if isinstance(value, str):
        cleaned = value.translate(_UNSHOWN)
        return Markup(cleaned) if isinstance(value, Markup) else cleaned
    return value


def configure_templates(templates: Jinja2Templates, settings: Settings) -> Jinja2Templates:
    env = templates.env
    env.autoescape = True
    env.finalize = shown
    # tojson (the audit log's details) as letters, not \u escapes: a searched name in Greek or Japanese,
    # even MÜLLER, was unreadable. <, >, & and ' are still escaped by tojson.
    env.policies["json.dumps_kwargs"] = {"sort_keys": True, "ensure_ascii": False}
    env.trim_blocks = True
    env.lstrip_blocks = True
    env.filters.update(
        pn=person_name,  # every form of the name, as the PDF prints it
        da=dicom_date,
        dv=dicom_value,
        tm=dicom_time,
        dt=local_time,
        pct=percent,
        finding_class=finding_class,
        finding_name=finding_name,
        dimse=dimse_status,
        hot_region=hot_region,  # where a heat map is strongest, for its alt text
    )
    env.globals.update(
        node_name=settings.node.name,
        institution=settings.node.institution_name,
        ae_title=settings.dicom.ae_title,
        version=__version__,
        query_string=query_string,
        not_classified=not_classified,
        age_unknown_text=AGE_UNKNOWN_TEXT,
        time_zone=time_zone,
    )
    return templates


def render(
    request: Request, name: str, principal: Principal | None, status: int = 200, **context: Any
) -> Response:
    """Render a page; every page gets the user, the CSRF token and a possible notice."""
    key = request.query_params.get("notice", "")
    notice = NOTICES.get(key)
    return console(request).templates.TemplateResponse(
        request,
        name,
        {
            "principal": principal,
            "csrf": principal.csrf_token if principal else "",
            "notice": notice,
            "notice_kind": "info" if key in INFO_NOTICES else "ok",
            "server_now": datetime.now(UTC).isoformat(),  # the session warning's clock (console.js)
            **context,
        },
        status_code=status,
    )
