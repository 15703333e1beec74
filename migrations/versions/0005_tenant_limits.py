"""Per-tenant limits on the tenant row (NULL = the setting's default); index for fair scheduling.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

LIMITS = ('max_running_jobs', 'max_queued_jobs', 'max_steps_per_job', 'max_images_per_dataset', 'max_models')


def upgrade() -> None:
    with op.batch_alter_table('tenants', schema=None) as batch_op:
        for name in LIMITS:
            batch_op.add_column(sa.Column(name, sa.Integer(), nullable=True))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_tenant_started', ['tenant_id', 'started_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_tenant_started')
    with op.batch_alter_table('tenants', schema=None) as batch_op:
        for name in reversed(LIMITS):
            batch_op.drop_column(name)
