"""Names written with a typographic apostrophe or dash folded to the ASCII mark

Revision ID: 0018_name_marks_folded
Revises: 0017_storage_commitment
Create Date: 2026-12-07 22:00:00

The search folded "O’NEILL" (U+2019) to "o’neill", so "o'neill" typed at a keyboard did not find it, nor
"D’Arcy" pasted from a letter D'ARCY; a U+02BC inside a name was no mark at all ("olau" did not find
KOʼOLAU). dicom_node.store.folding.fold now folds every apostrophe and hyphen it knows to "'" and "-". The
patients whose names hold one of them are folded again here, with the function the node uses, and their
name words (migration 0014) made again.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from dicom_node.store.folding import APOSTROPHES, HYPHENS, fold, name_words

revision = '0018_name_marks_folded'
down_revision = '0017_storage_commitment'
branch_labels = None
depends_on = None

NAME_LENGTH = 324  # patient.name_folded's


def upgrade() -> None:
    conn = op.get_bind()
    patient = sa.table('patient', sa.column('id', sa.Integer), sa.column('name', sa.String),
                       sa.column('name_folded', sa.String))
    word = sa.table('patient_name_word', sa.column('patient_pk', sa.Integer), sa.column('word', sa.String))
    marked = sa.or_(*(patient.c.name.contains(mark, autoescape=True) for mark in APOSTROPHES + HYPHENS))
    rows = conn.execute(sa.select(patient.c.id, patient.c.name).where(marked)).all()
    for row in rows:
        folded = fold(row.name)[:NAME_LENGTH]
        conn.execute(patient.update().where(patient.c.id == row.id).values(name_folded=folded))
        conn.execute(word.delete().where(word.c.patient_pk == row.id))
        words = [{'patient_pk': row.id, 'word': w} for w in sorted(name_words(folded))]
        if words:
            conn.execute(word.insert(), words)


def downgrade() -> None:
    """Nothing to undo: the names stay folded with the ASCII marks, which the earlier search finds too."""
