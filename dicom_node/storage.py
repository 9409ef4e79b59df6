"""The node's files against its rows.

The database and ``node.data_dir`` are backed up and restored separately. Restored from different times,
or after a disk lost part of ``results/``, they disagree: rows whose files are gone, and files no row
names. A result object whose file is gone is made again from the database, as a new revision (its
earlier revision may have reached a PACS, so its UIDs are not used for other content): the outbox asks
for that when it finds the file missing (:mod:`dicom_node.outbox`), and so does an image of the study
sent again (:mod:`dicom_node.ingest`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, exists, select, update
from sqlalchemy.orm import Session

from dicom_node.store.models import (
    Delivery,
    ResultKind,
    ResultObject,
    Study,
    StudyState,
)

LOGGER = logging.getLogger(__name__)

REMAKE_REASON = "result files missing: its results are being made again as a new revision"


def pdf_path(relative_path: str) -> str:
    """Where the plain PDF of an Encapsulated PDF result object is kept (beside it, ``.pdf``)."""
    return str(Path(relative_path).with_suffix(".pdf"))


def result_files(kind: ResultKind, relative_path: str) -> tuple[str, ...]:
    """The files of a result object, relative to the results directory: the DICOM object, and for a
    PDF the plain PDF beside it (a copy the console hands out; without it, it takes the document from
    the DICOM object, which alone is the record of what was sent)."""
    return (relative_path, pdf_path(relative_path)) if kind is ResultKind.PDF else (relative_path,)


# ---------------------------------------------------------------------------------------------
# Results whose files are gone
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LostResult:
    """The latest revision of one of a study's result objects, whose DICOM file is gone."""

    id: int
    kind: ResultKind
    model_name: str
    model_version: str
    revision: int
    sent: bool  # handed to the outbox (it has deliveries): it may be on a PACS under its UIDs


def lost_results(conn: Connection | Session, results_dir: Path, study_pk: int) -> list[LostResult]:
    """The study's latest result objects (one per kind and model) whose files are gone. Earlier
    revisions are left out: a later one replaced them, and is what a new revision would replace."""
    rows = conn.execute(
        select(
            ResultObject.id, ResultObject.kind, ResultObject.model_name, ResultObject.model_version,
            ResultObject.revision, ResultObject.file_path,
            exists().where(Delivery.result_object_pk == ResultObject.id).label("sent"),
        )
        .where(ResultObject.study_pk == study_pk)
        .order_by(ResultObject.revision.desc(), ResultObject.id.desc())
    ).all()
    latest: dict[tuple[ResultKind, str, str], Any] = {}
    for row in rows:
        latest.setdefault((row.kind, row.model_name, row.model_version), row)
    return [
        LostResult(row.id, row.kind, row.model_name, row.model_version, row.revision, bool(row.sent))
        for row in latest.values()
        if not (results_dir / row.file_path).is_file()
    ]


def reopen_to_remake(conn: Connection | Session, study_pk: int, *, failed: bool = False) -> bool:
    """Make a finished study RECEIVED again so that its settle timer readies it and the pipeline makes
    its lost results again (the node's settle sweep arms the timer, from any process). A FAILED study
    is reopened only when ``failed`` (an operator's image sent again, not the outbox's retries).
    Returns whether it was reopened (False: it is already on its way round, or failed)."""
    states = [StudyState.ANALYSED, StudyState.SKIPPED, *([StudyState.FAILED] if failed else [])]
    reopened = conn.execute(
        update(Study)
        .where(Study.id == study_pk, Study.state.in_(states))
        .values(state=StudyState.RECEIVED, state_reason=REMAKE_REASON)
    )
    if reopened.rowcount:  # type: ignore[attr-defined]
        LOGGER.info("study %d reopened: files of its results are missing; they are made again", study_pk)
        return True
    return False

