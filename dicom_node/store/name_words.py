"""The words of each patient's name as the results search by name finds them (``patient_name_word``).

The search matches each word typed with the start of a word of the name. A ``LIKE '%word%'`` on
``patient.name_folded`` read every patient's name for every search (70,000 names at 100,000 studies);
the words in their own indexed table are found by prefix. Every write of a patient's name keeps the rows
here in step: the ingest's Core statements call :func:`keep`, an ORM insert or update of a
:class:`~dicom_node.store.models.Patient` through the model's mapper events, and migration 0014
filled them for the patients already stored. A patient row's deletion takes its words with it
(ON DELETE CASCADE).
"""

from __future__ import annotations

from typing import cast

from sqlalchemy import Connection, Table, delete, insert, select

from dicom_node.store.folding import name_words
from dicom_node.store.models import Patient, PatientNameWord

_WORD = cast(Table, PatientNameWord.__table__)
_PATIENT = cast(Table, Patient.__table__)


def keep(conn: Connection, patient_pk: int, name_folded: str | None = None) -> None:
    """Make the word rows of ``patient_pk`` those of its folded name (read from the row unless given),
    writing only what differs: the ingest calls it for every image that gives a name.

    Called after the statement that wrote the name, in its transaction: on PostgreSQL that UPDATE holds
    the patient row's lock, so a concurrent image of the same patient reads the words only once this
    transaction has committed them, and never inserts the same word twice."""
    if name_folded is None:
        name_folded = conn.execute(
            select(_PATIENT.c.name_folded).where(_PATIENT.c.id == patient_pk)
        ).scalar_one_or_none()
        if name_folded is None:  # no such patient (any more)
            return
    wanted = name_words(name_folded)
    stored = set(conn.execute(select(_WORD.c.word).where(_WORD.c.patient_pk == patient_pk)).scalars())
    gone = stored - wanted
    if gone:
        conn.execute(delete(_WORD).where(_WORD.c.patient_pk == patient_pk, _WORD.c.word.in_(gone)))
    new = wanted - stored
    if new:
        conn.execute(insert(_WORD), [{"patient_pk": patient_pk, "word": word} for word in sorted(new)])

