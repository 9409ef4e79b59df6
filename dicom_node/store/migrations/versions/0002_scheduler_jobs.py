"""APScheduler's job store table under Alembic

Revision ID: 0002_scheduler_jobs
Revises: 0001_initial
Create Date: 2026-11-22 04:35:00

Until now APScheduler created ``apscheduler_jobs`` itself at start-up; databases where it did keep
their table (same columns), new ones get it from here.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002_scheduler_jobs'
down_revision = '0001_initial'
branch_labels = None
depends_on = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table('apscheduler_jobs'):
        return
    op.create_table('apscheduler_jobs',
    sa.Column('id', sa.Unicode(length=191), nullable=False),
    sa.Column('next_run_time', sa.Float(precision=25), nullable=True),
    sa.Column('job_state', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_apscheduler_jobs'))
    )
    with op.batch_alter_table('apscheduler_jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_apscheduler_jobs_next_run_time'), ['next_run_time'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('apscheduler_jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_apscheduler_jobs_next_run_time'))
    op.drop_table('apscheduler_jobs')
