"""A study records its Study ID and the sender's Timezone Offset From UTC

Revision ID: 0009_study_id_and_offset
Revises: 0008_result_revision
Create Date: 2026-12-05 07:00:00

``study.study_id`` is Study ID (0020,0010) and ``study.timezone_offset`` Timezone Offset From UTC
(0008,0201), as the sender wrote them. When retention has removed a study's first image, a later image
rebuilds the study's results from the database (dicom_node.pipeline): with these two columns their General
Study module and the offset their dates are stated in are the source's, as for a study whose files are all
there. Empty for studies received before this revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0009_study_id_and_offset'
down_revision = '0008_result_revision'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.add_column(sa.Column('study_id', sa.String(length=16), nullable=False, server_default=''))
        batch_op.add_column(
            sa.Column('timezone_offset', sa.String(length=16), nullable=False, server_default='')
        )


def downgrade() -> None:
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.drop_column('timezone_offset')
        batch_op.drop_column('study_id')
