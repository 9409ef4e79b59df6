"""A finding records whether its image looked the wrong way up

Revision ID: 0004_finding_better_turn
Revises: 0003_finding_novelty
Create Date: 2026-12-02 15:20:00

``finding.better_turn`` is the number of counter-clockwise quarter turns that made the image clearly more
familiar to the model when its header did not say which way is up (classifier.novelty.better_turn); 0 when
it looked upright or was not checked, and for findings made before this revision. With
``pipeline.skip_unfamiliar`` off such an image is classified anyway, and the study page, PDF and SR read
this column to say the model doubted it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004_finding_better_turn'
down_revision = '0003_finding_novelty'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('finding', schema=None) as batch_op:
        batch_op.add_column(sa.Column('better_turn', sa.Integer(), nullable=False, server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('finding', schema=None) as batch_op:
        batch_op.drop_column('better_turn')
