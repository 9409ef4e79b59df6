"""A patient's studies newest first from one index

Revision ID: 0016_study_patient_received
Revises: 0015_audit_filter_indexes
Create Date: 2026-12-06 08:00:00

A search by name finds its patients from the index of their names' words (0014), then their studies
newest first. With ``ix_study_patient_pk`` (patient_pk alone) PostgreSQL read the whole study table to
join them (14 ms for "Müller Jörg", 673 of 100,000 studies, benchmarks/console_scale.py): each study's
receipt time was a heap read away. ``ix_study_patient_pk_first_received_at`` holds (patient_pk,
first_received_at, id), so the page's studies come from the index alone (3 ms); it serves every lookup
by patient_pk the old index served, which goes.
"""

from __future__ import annotations

from alembic import op

revision = '0016_study_patient_received'
down_revision = '0015_audit_filter_indexes'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_study_patient_pk_first_received_at', 'study',
                    ['patient_pk', 'first_received_at', 'id'], unique=False)
    op.drop_index('ix_study_patient_pk', table_name='study')


def downgrade() -> None:
    op.create_index('ix_study_patient_pk', 'study', ['patient_pk'], unique=False)
    op.drop_index('ix_study_patient_pk_first_received_at', table_name='study')
