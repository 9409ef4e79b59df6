"""The SHA-256 of each result object's file, as the node wrote it

Revision ID: 0013_result_sha256
Revises: 0012_identifier_folded
Create Date: 2026-12-06 05:00:00

The outbox sent a result file as it found it. A file cut short by a damaged disk or a partial restore
still parses (pydicom reads a truncated last element, Pixel Data or Encapsulated Document, as a shorter
value), so the PACS got a broken heat map or PDF. ``result_object.sha256`` is the digest the file store
computed when it wrote the file; the outbox, the check for results to make again and ``cxr-node storage
check --verify`` compare the file with it. Rows made before this revision keep NULL and are checked by
reading them as DICOM, as before.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0013_result_sha256'
down_revision = '0012_identifier_folded'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('result_object', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sha256', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('result_object', schema=None) as batch_op:
        batch_op.drop_column('sha256')
