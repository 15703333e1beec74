"""Job presets, time estimates, the device a job trained on, and the training history table.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('preset', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('estimated_seconds', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('device', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('versions', sa.JSON(), nullable=True))

    op.create_table('job_history',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.String(length=36), nullable=False),
    sa.Column('step', sa.Integer(), nullable=False),
    sa.Column('loss', sa.Float(), nullable=True),
    sa.Column('train_accuracy', sa.Float(), nullable=True),
    sa.Column('lr', sa.Float(), nullable=True),
    sa.Column('val_accuracy', sa.Float(), nullable=True),
    sa.Column('elapsed_s', sa.Float(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_history_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job_history'))
    )
    with op.batch_alter_table('job_history', schema=None) as batch_op:
        batch_op.create_index('ix_job_history_job_step', ['job_id', 'step'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('job_history', schema=None) as batch_op:
        batch_op.drop_index('ix_job_history_job_step')
    op.drop_table('job_history')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('versions')
        batch_op.drop_column('device')
        batch_op.drop_column('estimated_seconds')
        batch_op.drop_column('preset')
