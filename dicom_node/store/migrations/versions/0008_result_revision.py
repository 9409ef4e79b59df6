"""Result objects have revisions: an image that arrives after a study's results gets new ones

Revision ID: 0008_result_revision
Revises: 0007_patient_empty_id
Create Date: 2026-12-05 00:20:00

There was one result object per (study, kind, model version). An image that arrived after the study's
results were made was classified, but the SR and PDF that already existed were neither rebuilt nor sent
again, so the PACS never saw its finding. ``revision`` numbers the objects of one kind, and ``covers``
lists the instances each one reports on; when that set changes the pipeline makes the next revision.
Rows made before this revision keep revision 1 and no ``covers`` (taken to cover what the study had).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008_result_revision'
down_revision = '0007_patient_empty_id'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('result_object', schema=None) as batch_op:
        batch_op.add_column(sa.Column('revision', sa.Integer(), nullable=False, server_default='1'))
        batch_op.add_column(sa.Column('covers', sa.JSON(), nullable=True))
        batch_op.drop_constraint('uq_result_object_study_pk', type_='unique')
        batch_op.create_unique_constraint(
            'uq_result_object_study_pk', ['study_pk', 'kind', 'model_name', 'model_version', 'revision']
        )


def downgrade() -> None:
    # Fails while a study has a second revision of a result: which one to keep would be a guess.
    with op.batch_alter_table('result_object', schema=None) as batch_op:
        batch_op.drop_constraint('uq_result_object_study_pk', type_='unique')
        batch_op.create_unique_constraint(
            'uq_result_object_study_pk', ['study_pk', 'kind', 'model_name', 'model_version']
        )
        batch_op.drop_column('covers')
        batch_op.drop_column('revision')
