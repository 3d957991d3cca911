"""The node's processes: ``serve`` (everything) and ``worker`` (workers only).

:class:`NodeService` starts, in order: the database schema (Alembic upgrade),
the rules and destinations of ``settings.rules_file`` (validated, written to the
database), spool reconciliation, the Storage SCP, the HTTP server (uvicorn in a
thread: STOW-RS, /health, admin API), the scheduler (stability sweep and
routing, outbox sender, retention) and N worker threads.

:meth:`NodeService.stop` (SIGTERM/SIGINT) reverses it: workers stop claiming,
the SCP stops accepting and lets associations in flight finish, the scheduler
and HTTP server stop, and a job still running is given back to the queue
(QUEUED, the attempt not counted). ``hpb-node worker`` runs only the workers
against a shared database (PostgreSQL) for scale-out.
"""

from __future__ import annotations

import importlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from node import migrate
from node.db import create_engine_for, session_factory
from node.settings import Settings
from node.worker import Worker, worker_id

log = logging.getLogger(__name__)


def import_pipeline_modules(modules: list[str]) -> None:
    """Import modules that register extra pipelines (``node.pipelines.register``)."""
    for name in modules:
        importlib.import_module(name)
        log.info("pipeline module %s loaded", name)


def open_database(settings: Settings) -> sessionmaker[Session]:
    """Upgrade the schema and return a session factory."""
    migrate.upgrade(settings.database.url)
    engine = create_engine_for(settings.database.url)
    try:
        from node.clinical.store import ensure_tables

        ensure_tables(engine)
    except ImportError:  # pragma: no cover
        pass
    return session_factory(engine)


def load_rules_into(sessions: sessionmaker[Session], settings: Settings) -> int:
    """Validate ``settings.rules_file`` and write its rules/destinations to the database."""
    if settings.rules_file is None:
        return 0
    from node.rules import load_rules_file, sync_to_database

    ruleset = load_rules_file(settings.rules_file)
    with sessions.begin() as session:
        sync_to_database(session, ruleset, actor="system:rules-file")
    log.info(
        "loaded %d rule(s) and %d destination(s) from %s",
        len(ruleset.rules),
        len(ruleset.destinations),
        settings.rules_file,
    )
    return len(ruleset.rules)


@dataclass
class NodeService:
    settings: Settings
    workers: int | None = None  # None: settings.workers.count
    run_scp: bool = True
    run_http: bool = True
    run_scheduler: bool = True
    sessions: sessionmaker[Session] | None = None
    scp: Any = None
    dicom_port: int = 0
    http_port: int = 0
    _workers: list[Worker] = field(default_factory=list)
    _scheduler: Any = None
    _uvicorn: Any = None
    _http_thread: threading.Thread | None = None

    def start(self) -> None:
        s = self.settings
        self.sessions = sessions = open_database(s)
        load_rules_into(sessions, s)
        if self.run_scp or self.run_http:
            from node.ingest import StorageSCP, Store

            store = Store.from_settings(s, sessions)
            store.reconcile()
            if self.run_scp:
                self.scp = StorageSCP(s.ingest, store)
                self.dicom_port = self.scp.start()
            if self.run_http:
                self._start_http(store)
        if self.run_scheduler:
            self._start_scheduler()
        count = s.workers.count if self.workers is None else self.workers
        for i in range(count):
            w = Worker(sessions, s, index=i)
            w.start()
            self._workers.append(w)
        log.info(
            "node started: DICOM %s, HTTP %s, %d worker(s)",
            self.dicom_port or "-",
            self.http_port or "-",
            count,
        )

    def _start_http(self, store: Any) -> None:
        import uvicorn

        from node.app import create_app

        assert self.sessions is not None
        app = create_app(self.settings, self.sessions, store)
        config = uvicorn.Config(
            app,
            host=self.settings.http.host,
            port=self.settings.http.port,
            log_level="warning",
            lifespan="off",
        )
        server = uvicorn.Server(config)
        self._uvicorn = server
        self._http_thread = threading.Thread(target=server.run, name="http", daemon=True)
        self._http_thread.start()
        deadline = time.monotonic() + 20
        while not server.started and self._http_thread.is_alive():
            if time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start within 20 s")
            time.sleep(0.05)
        if not server.started:
            raise RuntimeError(
                f"the HTTP server could not listen on {self.settings.http.host}:"
                f"{self.settings.http.port} (port in use?)"
            )
        self.http_port = self.settings.http.port

    def _start_scheduler(self) -> None:
        from node.export import send_due
        from node.stability import make_scheduler, sweep

        s = self.settings
        sessions = self.sessions
        assert sessions is not None
        sender = worker_id(99)
        tasks: list[tuple[str, Any, float]] = [
            ("stability-sweep", lambda: sweep(sessions, s), s.scheduler.sweep_interval_s),
            (
                "outbox-sender",
                lambda: send_due(sessions, s, owner=sender),
                max(min(s.scheduler.sweep_interval_s, 2.0), 0.2),
            ),
        ]
        try:
            from node.retention import purge_delivered
            from node.spool import Spool

            spool = Spool(s.spool.root)
            tasks.append(
                (
                    "retention",
                    lambda: purge_delivered(sessions, spool, s.spool.retention_hours),
                    300.0,
                )
            )
        except ImportError:  # pragma: no cover
            log.warning("retention module missing: spooled files are not purged")
        self._scheduler = make_scheduler(tasks)
        self._scheduler.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful stop (see module docstring)."""
        log.info("node stopping")
        for w in self._workers:
            w.request_stop()
        if self.scp is not None:
            self.scp.stop(timeout=timeout)
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
            if self._http_thread is not None:
                self._http_thread.join(10)
        for w in self._workers:
            w.stop(timeout=timeout)
        log.info("node stopped")

    def describe(self) -> dict[str, Any]:
        return {
            "dicom_port": self.dicom_port,
            "http_port": self.http_port,
            "ae_title": self.settings.ingest.ae_title,
            "workers": len(self._workers),
        }


def write_ready_file(path: Path | None, info: dict[str, Any]) -> None:
    """Write ``info`` as JSON atomically (tests and scripts wait for it)."""
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)
