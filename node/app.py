"""The node's HTTP application: STOW-RS, /health, and the admin API.

``create_app(settings, sessions, store)`` composes the routers; ``hpb-node
serve`` runs it with uvicorn. STOW-RS needs a bearer token whose role may store
(``ingest`` or ``admin``, :data:`node.auth.STORE_ROLES`): 401 without one, 403
with a ``viewer`` token. The admin API (``node.api``) is included when
present; it adds ``/api/...``, ``/metrics`` and ``/ui``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Depends, FastAPI, Response
from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from node import auth
from node.db import Job, JobState
from node.ingest import Store
from node.settings import Settings
from node.stow import stow_router

log = logging.getLogger(__name__)


def create_app(settings: Settings, sessions: sessionmaker[Session], store: Store) -> FastAPI:
    app = FastAPI(title="hpb-node", version="1.0")
    principal = auth.bearer_principal(
        sessions, settings.http.admin_token, settings.http.ingest_token
    )
    may_store = auth.require(principal, auth.STORE_ROLES, "storing instances (STOW-RS)")
    app.include_router(stow_router(store, dependencies=[Depends(may_store)]))

    @app.get("/health", tags=["health"])
    def health(response: Response) -> dict[str, Any]:
        try:
            with sessions() as session:
                session.execute(text("SELECT 1"))
                queued = session.scalar(
                    select(func.count(Job.id)).where(Job.state == JobState.QUEUED)
                )
            return {"status": "ok", "queued_jobs": int(queued or 0)}
        except SQLAlchemyError as exc:
            response.status_code = 503
            return {"status": "degraded", "database": type(exc).__name__}

    try:
        from node.api import admin_router
    except ImportError:  # pragma: no cover - the admin API ships with the node
        log.warning("admin API not installed")
    else:
        app.include_router(admin_router(sessions, settings))
    return app
