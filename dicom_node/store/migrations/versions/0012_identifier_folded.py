"""Folded Patient IDs and accession numbers for the search, and retention's index

Revision ID: 0012_identifier_folded
Revises: 0011_scale_indexes
Create Date: 2026-12-06 03:00:00

The results search matches a Patient ID or an accession from its start, in any case. It compared
``lower(column) LIKE 'x%'``, which no index serves: at 100,000 studies (benchmarks/console_scale.py)
SQLite ran Python's lower() on every study's patient, 310 ms a search by Patient ID and 150 ms by
accession. ``patient.patient_id_folded`` and ``study.accession_number_folded`` hold the values lower-cased
(dicom_node.store.folding.identifier), indexed as each database's LIKE can search them by prefix: NOCASE
on SQLite, varchar_pattern_ops on PostgreSQL. Existing rows are lower-cased here, in Python, with the same
function the node uses.

Retention's hourly look-up of files not yet removed read every analysed image for its ``purged_at``;
``ix_instance_state_purged_at`` finds them, and serves the metrics' counts by state that
``ix_instance_state`` served, which goes.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from dicom_node.store.folding import IDENTIFIER_GROWTH, identifier

revision = '0012_identifier_folded'
down_revision = '0011_scale_indexes'
branch_labels = None
depends_on = None

# (table, column, its length, index)
FOLDED = (
    ('patient', 'patient_id', 64, 'ix_patient_patient_id_folded'),
    ('study', 'accession_number', 16, 'ix_study_accession_number_folded'),
)


def _folded_type(length: int) -> sa.String:
    size = length * IDENTIFIER_GROWTH
    return sa.String(size).with_variant(sa.String(size, collation='NOCASE'), 'sqlite')


def upgrade() -> None:
    conn = op.get_bind()
    for table_name, column, length, index in FOLDED:
        folded = f'{column}_folded'
        with op.batch_alter_table(table_name, schema=None) as batch_op:
            batch_op.add_column(sa.Column(folded, _folded_type(length), nullable=False, server_default=''))
        table = sa.table(table_name, sa.column('id', sa.Integer), sa.column(column, sa.String),
                         sa.column(folded, sa.String))
        rows = conn.execute(sa.select(table.c.id, table.c[column]).where(table.c[column] != '')).all()
        statement = table.update().where(table.c.id == sa.bindparam('row_id'))
        statement = statement.values({folded: sa.bindparam('value')})
        for start in range(0, len(rows), 1000):
            conn.execute(statement, [{'row_id': row.id, 'value': identifier(row[1])}
                                     for row in rows[start:start + 1000]])
        op.create_index(index, table_name, [folded], unique=False,
                        postgresql_ops={folded: 'varchar_pattern_ops'})
    op.create_index('ix_instance_state_purged_at', 'instance', ['state', 'purged_at'], unique=False)
    op.drop_index('ix_instance_state', table_name='instance')


def downgrade() -> None:
    op.create_index('ix_instance_state', 'instance', ['state'], unique=False)
    op.drop_index('ix_instance_state_purged_at', table_name='instance')
    for table_name, column, _, index in reversed(FOLDED):
        op.drop_index(index, table_name=table_name)
        with op.batch_alter_table(table_name, schema=None) as batch_op:
            batch_op.drop_column(f'{column}_folded')
