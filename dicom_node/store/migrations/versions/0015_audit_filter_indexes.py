"""The audit log's filters by actor and action from an index

Revision ID: 0015_audit_filter_indexes
Revises: 0014_patient_name_words
Create Date: 2026-12-06 07:00:00

The audit log's filter by actor compared ``actor LIKE '%text%'`` and read every event (500,000 in a
hospital's year, benchmarks/console_scale.py); the filter by action, a prefix, read the whole action index
on SQLite (its LIKE searches only a NOCASE index) and every event on PostgreSQL (no varchar_pattern_ops).
The actor now matches from its start or from the name's start after "user:" or "cli:", and both filters
search an index on (value, at, id), which also gives the page's order: NOCASE columns on SQLite (the table
is copied once to change them), varchar_pattern_ops on PostgreSQL.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0015_audit_filter_indexes'
down_revision = '0014_patient_name_words'
branch_labels = None
depends_on = None

COLUMNS = (('actor', 128), ('action', 64))


def upgrade() -> None:
    op.drop_index('ix_audit_event_action', table_name='audit_event')
    if op.get_bind().dialect.name == 'sqlite':
        with op.batch_alter_table('audit_event', schema=None) as batch_op:
            for column, length in COLUMNS:
                batch_op.alter_column(column, existing_type=sa.String(length),
                                      type_=sa.String(length, collation='NOCASE'), existing_nullable=False)
    for column, _ in COLUMNS:
        op.create_index(f'ix_audit_event_{column}', 'audit_event', [column, 'at', 'id'], unique=False,
                        postgresql_ops={column: 'varchar_pattern_ops'})


def downgrade() -> None:
    for column, _ in reversed(COLUMNS):
        op.drop_index(f'ix_audit_event_{column}', table_name='audit_event')
    if op.get_bind().dialect.name == 'sqlite':
        with op.batch_alter_table('audit_event', schema=None) as batch_op:
            for column, length in COLUMNS:
                batch_op.alter_column(column, existing_type=sa.String(length, collation='NOCASE'),
                                      type_=sa.String(length), existing_nullable=False)
    op.create_index('ix_audit_event_action', 'audit_event', ['action'], unique=False)
