"""Rules remember who manages them: the rules file or the admin API (``rules.source``).

A rules-file load deletes the file-managed rules that are no longer in the file;
rules created through the admin API or ``hpb-node admin rule apply`` are never
deleted by it. Rows that exist before this revision cannot tell where they came
from, so they become ``api`` (kept); the next load of the rules file adopts each
rule it still defines as ``file``.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 03:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rules", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "source",
                sa.Enum("file", "api", name="rulesource", native_enum=False, length=16),
                server_default="api",
                nullable=False,
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("rules", schema=None) as batch_op:
        batch_op.drop_column("source")
