"""A patient row keeps its name folded for the console's search

Revision ID: 0010_patient_name_folded
Revises: 0009_study_id_and_offset
Create Date: 2026-12-05 21:40:00

``patient.name_folded`` is the name without case and Latin accents (dicom_node.store.folding), so that
"muller" finds MÜLLER^JÖRG on SQLite and PostgreSQL alike. Existing rows are folded here, in Python, with
the same function the node uses.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from dicom_node.store.folding import fold

revision = '0010_patient_name_folded'
down_revision = '0009_study_id_and_offset'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('patient', schema=None) as batch_op:
        batch_op.add_column(
            sa.Column('name_folded', sa.String(length=324), nullable=False, server_default='')
        )
    patient = sa.table('patient', sa.column('id', sa.Integer), sa.column('name', sa.String),
                       sa.column('name_folded', sa.String))
    conn = op.get_bind()
    rows = conn.execute(sa.select(patient.c.id, patient.c.name).where(patient.c.name != '')).all()
    for row in rows:
        conn.execute(patient.update().where(patient.c.id == row.id).values(name_folded=fold(row.name)[:324]))


def downgrade() -> None:
    with op.batch_alter_table('patient', schema=None) as batch_op:
        batch_op.drop_column('name_folded')
