"""Studies with an empty Patient ID no longer share one patient row

Revision ID: 0007_patient_empty_id
Revises: 0006_study_patient_age
Create Date: 2026-12-03 14:40:00

Patient ID (0010,0020) is Type 2: a sender may leave it empty. The unique constraint on (patient_id,
issuer_of_patient_id) made every such study share the first one's patient row, so the console showed
that patient's name and birth date, and the age check read that birth date. The constraint becomes a
unique index over the non-empty IDs only; the ingest gives each study with an empty ID its own row.
Rows already merged stay as they are (which study carried which demographics is not recorded).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007_patient_empty_id'
down_revision = '0006_study_patient_age'
branch_labels = None
depends_on = None

_WHERE = sa.text("patient_id != ''")


def upgrade() -> None:
    with op.batch_alter_table('patient', schema=None) as batch_op:
        batch_op.drop_constraint('uq_patient_patient_id', type_='unique')
    op.create_index(
        'uq_patient_patient_id', 'patient', ['patient_id', 'issuer_of_patient_id'], unique=True,
        sqlite_where=_WHERE, postgresql_where=_WHERE,
    )


def downgrade() -> None:
    # Fails while two studies with an empty Patient ID exist: merging their patients would be a guess.
    op.drop_index('uq_patient_patient_id', table_name='patient')
    with op.batch_alter_table('patient', schema=None) as batch_op:
        batch_op.create_unique_constraint('uq_patient_patient_id', ['patient_id', 'issuer_of_patient_id'])
