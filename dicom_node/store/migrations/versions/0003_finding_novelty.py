"""A finding records how unlike the training images its image was

Revision ID: 0003_finding_novelty
Revises: 0002_scheduler_jobs
Create Date: 2026-12-02 11:35:00

``finding.novelty`` is the model's novelty ratio (classifier.novelty; 1.0 is its limit), NULL for findings
made before this revision or by a model without a novelty check. Analysed images keep it so that an
administrator can see how close to the limit the hospital's images run.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003_finding_novelty'
down_revision = '0002_scheduler_jobs'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('finding', schema=None) as batch_op:
        batch_op.add_column(sa.Column('novelty', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('finding', schema=None) as batch_op:
        batch_op.drop_column('novelty')
