"""A finding records whether its image looked like a negative

Revision ID: 0005_finding_negative
Revises: 0004_finding_better_turn
Create Date: 2026-12-02 18:30:00

``finding.negative`` is true when the model's negative check found the image inverted (bone dark, lungs
light) and familiar inverted back (classifier.novelty, ``Prediction.negative``): its display polarity was
wrong or lost. False for findings made before this revision. With ``pipeline.skip_unfamiliar`` off such an
image is classified anyway, and the study page, PDF and SR read this column to say the model doubted it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005_finding_negative'
down_revision = '0004_finding_better_turn'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('finding', schema=None) as batch_op:
        batch_op.add_column(sa.Column('negative', sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table('finding', schema=None) as batch_op:
        batch_op.drop_column('negative')
