"""A study records the patient's age at the examination

Revision ID: 0006_study_patient_age
Revises: 0005_finding_negative
Create Date: 2026-12-03 08:40:00

``study.patient_age`` is Patient Age (0010,1010) as the sender wrote it (an Age String such as "045Y").
The pipeline does not classify a patient younger than ``pipeline.minimum_patient_age_years``
(dicom_node.eligibility), by this column or, without it, by the patient's birth date and the study date.
Empty for studies received before this revision: they are judged by the birth date alone.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006_study_patient_age'
down_revision = '0005_finding_negative'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.add_column(sa.Column('patient_age', sa.String(length=16), nullable=False, server_default=''))


def downgrade() -> None:
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.drop_column('patient_age')
