"""Database schema upgrades (Alembic, scripts in ``node/migrations``).

``upgrade(url)`` is run at start by ``hpb-node serve`` and ``worker``: it creates
a new database or brings an existing one to the newest revision. SQLite by
default (the file's directory is created), PostgreSQL by URL
(``postgresql+psycopg://user@host/db``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from node.db import Base, create_engine_for
from node.errors import ConfigError

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config(url: str) -> Config:
    """An Alembic configuration for ``url`` without an ini file."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _prepare(url: str) -> None:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(str(parsed.database)).parent.mkdir(parents=True, exist_ok=True)


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision``; ConfigError if it cannot be reached."""
    _prepare(url)
    try:
        command.upgrade(alembic_config(url), revision)
    except SQLAlchemyError as exc:
        raise ConfigError(f"database.url: cannot upgrade the schema: {exc}") from exc
    log.info("database schema at %s", revision)


def schema_differences(url: str) -> list[Any]:
    """Differences between the database at ``url`` and the models (empty: in step)."""
    import node.clinical.store  # noqa: F401  (registers its tables on Base.metadata)

    engine = create_engine_for(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()
