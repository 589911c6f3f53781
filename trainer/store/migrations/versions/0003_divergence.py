"""Divergence: where a run's loss or gradients first became non-finite.

Three nullable columns on ``runs``: ``diverged_step`` (global 0-based training step),
``diverged_epoch`` and ``diverged_layer`` (the first parameter with a non-finite gradient).
Existing runs get NULL (never diverged, or diverged before this was recorded).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

COLUMNS = ("diverged_step", "diverged_epoch", "diverged_layer")


def upgrade() -> None:
    # plain ADD COLUMN on both back ends (no table copy: epochs reference runs)
    op.add_column("runs", sa.Column("diverged_step", sa.BigInteger(), nullable=True))
    op.add_column("runs", sa.Column("diverged_epoch", sa.Integer(), nullable=True))
    op.add_column("runs", sa.Column("diverged_layer", sa.String(256), nullable=True))


def downgrade() -> None:
    # ALTER TABLE ... DROP COLUMN (SQLite >= 3.35): copying the table instead would drop
    # ``runs`` and, with foreign keys on, cascade-delete every epoch row
    for name in reversed(COLUMNS):
        op.drop_column("runs", name)
