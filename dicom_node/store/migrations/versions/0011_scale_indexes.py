"""Indexes for the dashboard's and the metrics' counts at a hospital's volume

Revision ID: 0011_scale_indexes
Revises: 0010_patient_name_folded
Create Date: 2026-12-06 02:00:00

With a year of chest radiographs (100,000 studies, benchmarks/console_scale.py) every dashboard load read
the whole instance table for "images today" and every study of a state for the studies analysed, skipped
or failed today; every Prometheus scrape read the instance and delivery_attempt tables for their counts
by state and outcome; and the outbox's lease and next-retry lookups for a destination read every
delivery ever made to it (30 ms after each batch on SQLite). These indexes let each read only its own rows
(or a small index). ``ix_delivery_destination_pk`` goes: the new index on (destination_pk, state,
next_attempt_at) serves its lookups, and while it stayed SQLite kept walking it in id order for the lease.
"""

from __future__ import annotations

from alembic import op

revision = '0011_scale_indexes'
down_revision = '0010_patient_name_folded'
branch_labels = None
depends_on = None

INDEXES = (
    ('ix_instance_received_at', 'instance', ['received_at']),
    ('ix_instance_state', 'instance', ['state']),
    ('ix_study_state_analysed_at', 'study', ['state', 'analysed_at']),
    ('ix_study_state_last_received_at', 'study', ['state', 'last_received_at']),
    ('ix_delivery_attempt_outcome', 'delivery_attempt', ['outcome']),
    ('ix_delivery_destination_state_next', 'delivery', ['destination_pk', 'state', 'next_attempt_at']),
)


def upgrade() -> None:
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns, unique=False)
    op.drop_index('ix_delivery_destination_pk', table_name='delivery')


def downgrade() -> None:
    op.create_index('ix_delivery_destination_pk', 'delivery', ['destination_pk'], unique=False)
    for name, table, _ in reversed(INDEXES):
        op.drop_index(name, table_name=table)
