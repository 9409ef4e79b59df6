"""Storage commitment: which destinations are asked to keep what they received, and what they answered

Revision ID: 0017_storage_commitment
Revises: 0016_study_patient_received
Create Date: 2026-12-06 07:00:00

A PACS answers a C-STORE with success and may still not keep the object (a routing rule or a filter that
drops it, a disk that fails before the archive has it). The node could not tell. A destination now may be
set to Storage Commitment (``remote_ae.storage_commitment``): after delivering, the node asks it by
N-ACTION to commit to the objects and records its N-EVENT-REPORT on each delivery (``delivery.commitment``
and the transaction UID, time, request count and note beside it). Existing rows: not asked (NULL).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0017_storage_commitment'
down_revision = '0016_study_patient_received'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN with a literal default: with sa.false() (an SQL expression) Alembic's batch mode
    # rebuilds the table on SQLite, and dropping remote_ae, which every delivery references, fails.
    op.add_column('remote_ae',
                  sa.Column('storage_commitment', sa.Boolean(), nullable=False, server_default='0'))
    with op.batch_alter_table('delivery', schema=None) as batch_op:
        batch_op.add_column(sa.Column(
            'commitment',
            sa.Enum('due', 'requested', 'committed', 'unconfirmed', name='commitmentstate',
                    native_enum=False, length=24),
            nullable=True))
        batch_op.add_column(sa.Column('commitment_uid', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('commitment_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column('commitment_requests', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('commitment_note', sa.Text(), nullable=False, server_default=''))
        batch_op.create_index(batch_op.f('ix_delivery_commitment_uid'), ['commitment_uid'], unique=False)
        batch_op.create_index('ix_delivery_commitment_at', ['commitment', 'commitment_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('delivery', schema=None) as batch_op:
        batch_op.drop_index('ix_delivery_commitment_at')
        batch_op.drop_index(batch_op.f('ix_delivery_commitment_uid'))
        batch_op.drop_column('commitment_note')
        batch_op.drop_column('commitment_requests')
        batch_op.drop_column('commitment_at')
        batch_op.drop_column('commitment_uid')
        batch_op.drop_column('commitment')
    with op.batch_alter_table('remote_ae', schema=None) as batch_op:
        batch_op.drop_column('storage_commitment')
