"""Pending references to stored objects (object_pins), written before the files they protect.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('object_pins',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('pin_id', sa.String(length=36), nullable=False),
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_object_pins'))
    )
    with op.batch_alter_table('object_pins', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_object_pins_pin_id'), ['pin_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_object_pins_key'), ['key'], unique=False)
        batch_op.create_index(batch_op.f('ix_object_pins_expires_at'), ['expires_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('object_pins', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_object_pins_expires_at'))
        batch_op.drop_index(batch_op.f('ix_object_pins_key'))
        batch_op.drop_index(batch_op.f('ix_object_pins_pin_id'))
    op.drop_table('object_pins')
