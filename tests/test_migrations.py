"""Alembic migrations: upgrade on SQLite and PostgreSQL; migrations match the models."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text

from node.db import Base
from node.migrate import alembic_config, schema_differences, upgrade


def test_single_head() -> None:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert len(script.get_heads()) == 1


def test_upgrade_sqlite_matches_models(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sub' / 'node.db'}"
    upgrade(url)
    upgrade(url)  # idempotent: already at head
    assert schema_differences(url) == []
    engine = create_engine(url)
    try:
        tables = set(inspect(engine).get_table_names())
        assert set(Base.metadata.tables) <= tables
        assert {"studies", "series", "instances", "rejections", "jobs", "outbox", "audit"} <= tables
        with engine.connect() as conn:
            head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
            assert conn.execute(text("select version_num from alembic_version")).scalar() == head
    finally:
        engine.dispose()


def test_difference_is_detected(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    upgrade(url)
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP INDEX ix_jobs_claim"))
    finally:
        engine.dispose()
    assert any("ix_jobs_claim" in str(d) for d in schema_differences(url))


@pytest.mark.postgres
def test_upgrade_postgresql_matches_models(pg_url: str) -> None:
    upgrade(pg_url)
    assert schema_differences(pg_url) == []
    engine = create_engine(pg_url)
    try:
        assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
