"""The words of each patient's name, indexed, for the results search by name

Revision ID: 0014_patient_name_words
Revises: 0013_result_sha256
Create Date: 2026-12-06 06:00:00

The results search by a word of the patient's name compared ``patient.name_folded LIKE '%word%'``, which
no index serves: every search read every patient's name (70,000 at 100,000 studies,
benchmarks/console_scale.py). ``patient_name_word`` holds each word of each folded name, and each tail
of a word after a mark inside it ("o'brien" and "brien"; dicom_node.store.folding.name_words), indexed as
each database's LIKE searches by prefix: NOCASE on SQLite, varchar_pattern_ops on PostgreSQL. The words
of the patients already stored are made here, in Python, with the function the node uses.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from dicom_node.store.folding import name_words

revision = '0014_patient_name_words'
down_revision = '0013_result_sha256'
branch_labels = None
depends_on = None

WORD_LENGTH = 324  # patient.name_folded's


def upgrade() -> None:
    op.create_table(
        'patient_name_word',
        sa.Column('patient_pk', sa.Integer(), nullable=False),
        sa.Column('word', sa.String(WORD_LENGTH).with_variant(sa.String(WORD_LENGTH, collation='NOCASE'),
                                                              'sqlite'), nullable=False),
        sa.ForeignKeyConstraint(['patient_pk'], ['patient.id'], ondelete='CASCADE',
                                name=op.f('fk_patient_name_word_patient_pk_patient')),
        sa.PrimaryKeyConstraint('patient_pk', 'word', name=op.f('pk_patient_name_word')),
    )
    conn = op.get_bind()
    patient = sa.table('patient', sa.column('id', sa.Integer), sa.column('name_folded', sa.String))
    word = sa.table('patient_name_word', sa.column('patient_pk', sa.Integer), sa.column('word', sa.String))
    rows: list[dict[str, object]] = []
    for patient_pk, folded in conn.execute(sa.select(patient.c.id, patient.c.name_folded)):
        rows.extend({'patient_pk': patient_pk, 'word': w} for w in sorted(name_words(folded or '')))
    for start in range(0, len(rows), 5000):
        conn.execute(word.insert(), rows[start:start + 5000])
    # after the rows: one sort builds the index instead of an insert into it per row
    op.create_index('ix_patient_name_word_word', 'patient_name_word', ['word', 'patient_pk'], unique=False,
                    postgresql_ops={'word': 'varchar_pattern_ops'})


def downgrade() -> None:
    op.drop_index('ix_patient_name_word_word', table_name='patient_name_word')
    op.drop_table('patient_name_word')
