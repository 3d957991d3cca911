"""Admin REST API: rules, destinations, jobs, tokens, audit, health, metrics.

``admin_router(sessions, settings)`` returns a FastAPI ``APIRouter`` that the
node's application includes. Every route under ``/api`` needs a bearer token
(``Authorization: Bearer <token>``): a ``viewer`` token reads, an ``admin``
token is required for every route that changes something (401 without a
token or with an unknown one, 403 with a viewer token); an ``ingest`` token,
made for STOW-RS (``node.app``), gets 403 everywhere here but ``/api/whoami``
(the roles and their dependencies are in ``node.auth``). ``/api/health`` and
``/metrics`` are open (they carry no patient data); ``/ui`` is a small page
listing jobs that asks for a token in the browser.

Every change made here is written to the audit log (``node.db.audit``) in the
same transaction as the change itself. The plain functions below the models
do the work; the routes and the ``hpb-node admin`` command call them.
"""

import logging
import re
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Response, status
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from node import auth, rules
from node.db import (
    TERMINAL_JOB_STATES,
    AuditEvent,
    Destination,
    Job,
    JobState,
    Rejection,
    RuleRow,
    Series,
    audit,
    utcnow,
)
from node.errors import ConfigError
from node.metrics import metrics_registry, render
from node.settings import Settings

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# The job page: static HTML; the token typed in stays in the tab (sessionStorage)
# and goes only to this origin's /api. Text is inserted with textContent (no HTML
# from the API is ever interpreted).
UI_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>hpb-node jobs</title>
<link rel="icon" href="data:,">
<meta http-equiv="Content-Security-Policy" content="default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'">
<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}
td,th{border:1px solid #999;padding:.2em .6em;text-align:left}#status{color:#a00}</style>
</head><body><h1>hpb-node: jobs</h1>
<form id="login"><label>API token <input id="token" type="password" autocomplete="off"></label>
<button type="submit">Show jobs</button></form><p id="status"></p>
<table id="jobs" hidden><thead><tr><th>Job</th><th>Modality</th><th>Pipeline</th><th>State</th>
<th>Attempts</th><th>Outcome or error</th><th>Created</th></tr></thead><tbody></tbody></table>
<script>
const st = document.getElementById("status");
async function load() {
  const token = sessionStorage.getItem("hpb-token") || "";
  const r = await fetch("api/jobs?limit=200", {headers: {Authorization: "Bearer " + token}});
  if (!r.ok) { st.textContent = "Error " + r.status + ": " + (await r.json()).detail; return; }
  const jobs = await r.json(), body = document.querySelector("#jobs tbody");
  body.replaceChildren();
  for (const j of jobs) {
    const tr = document.createElement("tr");
    for (const v of [j.id, j.modality, j.pipeline, j.state, j.attempts + "/" + j.max_attempts,
                     j.last_error || j.outcome, j.created_at]) {
      const td = document.createElement("td"); td.textContent = String(v ?? ""); tr.append(td);
    }
    tr.dataset.state = j.state; body.append(tr);
  }
  st.textContent = jobs.length + " job(s)";
  document.getElementById("jobs").hidden = false;
}
document.getElementById("login").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem("hpb-token", document.getElementById("token").value);
  load();
});
if (sessionStorage.getItem("hpb-token")) load();
</script></body></html>
"""


# --------------------------------------------------------------------------- models


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RuleIn(_In):
    """A routing rule as an admin submits it; ``definition`` is the rule body."""

    name: str
    priority: int = Field(default=100, ge=0, le=10_000)
    enabled: bool = True
    definition: dict[str, Any]

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("1-64 letters, digits, '_', '.', '-', starting with a letter or digit")
        return v


# One schema for destinations, from the YAML file or the API.
DestinationIn = rules.DestinationSpec


class TokenIn(_In):
    name: str
    role: auth.Role


class DryRunIn(_In):
    """Series attributes to test the rules against (no job is created)."""

    attributes: dict[str, Any]


# --------------------------------------------------------------------------- rules


class InvalidInput(ConfigError):
    """Input that fails validation deeper than the request model (answered 422)."""


def validate_rule(rule: RuleIn) -> dict[str, Any]:
    """The rule's normalised definition; InvalidInput naming the field when it is wrong."""
    body = {"name": rule.name, "priority": rule.priority, "enabled": rule.enabled}
    body.update(rule.definition)
    try:
        return rules.parse_rule(body).definition()
    except ConfigError as exc:
        raise InvalidInput(str(exc)) from exc


def rule_dict(row: RuleRow) -> dict[str, Any]:
    return {
        "name": row.name,
        "priority": row.priority,
        "enabled": row.enabled,
        "definition": row.definition,
        "updated_at": row.updated_at.isoformat(),
        # "file": managed by the rules file, which replaces API edits at the next start
        "source": row.source.value,
    }


def _rule(session: Session, name: str) -> RuleRow | None:
    return session.scalars(select(RuleRow).where(RuleRow.name == name)).first()


def list_rules(session: Session) -> list[dict[str, Any]]:
    rows = session.scalars(select(RuleRow).order_by(RuleRow.priority, RuleRow.name)).all()
    return [rule_dict(r) for r in rows]


def put_rule(session: Session, rule: RuleIn, actor: str, *, create: bool) -> dict[str, Any]:
    definition = validate_rule(rule)
    row = _rule(session, rule.name)
    if create and row is not None:
        raise ConfigError(f"rule {rule.name} already exists")
    if not create and row is None:
        raise LookupError(f"rule {rule.name} not found")
    if row is None:
        row = RuleRow(name=rule.name)
        session.add(row)
    row.priority, row.enabled, row.definition = rule.priority, rule.enabled, definition
    row.updated_at = utcnow()
    audit(
        session,
        actor,
        "rule.create" if create else "rule.update",
        f"rule:{rule.name}",
        priority=rule.priority,
        enabled=rule.enabled,
        definition=definition,
    )
    session.flush()
    return rule_dict(row)


def delete_rule(session: Session, name: str, actor: str) -> None:
    row = _rule(session, name)
    if row is None:
        raise LookupError(f"rule {name} not found")
    session.delete(row)
    audit(session, actor, "rule.delete", f"rule:{name}")


def dry_run(session: Session, attributes: dict[str, Any]) -> dict[str, Any]:
    """Which enabled rules would match a series with ``attributes``; changes nothing."""
    rows = session.scalars(select(RuleRow).order_by(RuleRow.priority, RuleRow.name)).all()
    try:
        return rules.dry_run([rule_dict(r) for r in rows], attributes)
    except (ConfigError, ValueError) as exc:
        raise InvalidInput(str(exc)) from exc


# --------------------------------------------------------------------------- destinations


def destination_dict(row: Destination) -> dict[str, Any]:
    return {
        "name": row.name,
        "kind": row.kind,
        "ae_title": row.ae_title,
        "host": row.host,
        "port": row.port,
        "url": row.url,
        "enabled": row.enabled,
    }


def _destination(session: Session, name: str) -> Destination | None:
    return session.scalars(select(Destination).where(Destination.name == name)).first()


def list_destinations(session: Session) -> list[dict[str, Any]]:
    rows = session.scalars(select(Destination).order_by(Destination.name)).all()
    return [destination_dict(r) for r in rows]


def put_destination(
    session: Session, dest: DestinationIn, actor: str, *, create: bool
) -> dict[str, Any]:
    row = _destination(session, dest.name)
    if create and row is not None:
        raise ConfigError(f"destination {dest.name} already exists")
    if not create and row is None:
        raise LookupError(f"destination {dest.name} not found")
    if row is None:
        row = Destination(name=dest.name)
        session.add(row)
    for key in ("kind", "ae_title", "host", "port", "url", "enabled"):
        setattr(row, key, getattr(dest, key))
    audit(
        session,
        actor,
        "destination.create" if create else "destination.update",
        f"destination:{dest.name}",
        **dest.model_dump(exclude={"name"}),
    )
    session.flush()
    return destination_dict(row)


def delete_destination(session: Session, name: str, actor: str) -> None:
    row = _destination(session, name)
    if row is None:
        raise LookupError(f"destination {name} not found")
    session.delete(row)
    audit(session, actor, "destination.delete", f"destination:{name}")


# --------------------------------------------------------------------------- jobs


def job_dict(job: Job) -> dict[str, Any]:
    def iso(t: datetime | None) -> str | None:
        return None if t is None else t.isoformat()

    return {
        "id": job.id,
        "series_instance_uid": job.series.series_instance_uid,
        "modality": job.series.modality,
        "rule": job.rule_name,
        "pipeline": job.pipeline,
        "pipeline_version": job.pipeline_version,
        "destinations": job.destinations,
        "state": str(job.state),
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "last_error": job.last_error,
        "outcome": job.outcome,
        "result": job.result,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
    }


def list_jobs(
    session: Session,
    *,
    state: str | None = None,
    pipeline: str | None = None,
    series_uid: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[dict[str, Any]]:
    query = select(Job).join(Series).order_by(Job.id.desc())
    if state:
        query = query.where(Job.state == JobState(state))
    if pipeline:
        query = query.where(Job.pipeline == pipeline)
    if series_uid:
        query = query.where(Series.series_instance_uid == series_uid)
    return [job_dict(j) for j in session.scalars(query.limit(limit).offset(offset)).all()]


def _job(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise LookupError(f"job {job_id} not found")
    return job


def retry_job(session: Session, job_id: int, actor: str) -> dict[str, Any]:
    """Queue a failed or cancelled job again with a fresh attempt budget."""
    job = _job(session, job_id)
    if job.state not in (JobState.FAILED, JobState.CANCELLED):
        raise ConfigError(f"job {job_id} is {job.state}; only failed or cancelled jobs are retried")
    previous = str(job.state)
    job.state, job.attempts, job.not_before = JobState.QUEUED, 0, utcnow()
    job.lease_owner = job.lease_expires_at = job.finished_at = None
    audit(session, actor, "job.retry", f"job:{job_id}", previous=previous, error=job.last_error)
    job.last_error = ""
    session.flush()
    return job_dict(job)


def cancel_job(session: Session, job_id: int, actor: str) -> dict[str, Any]:
    """Cancel a queued or running job (a running worker drops its lease)."""
    job = _job(session, job_id)
    if job.state in TERMINAL_JOB_STATES:
        raise ConfigError(f"job {job_id} is already {job.state}")
    previous = str(job.state)
    job.state, job.finished_at, job.outcome = JobState.CANCELLED, utcnow(), f"cancelled by {actor}"
    job.lease_owner = job.lease_expires_at = None
    audit(session, actor, "job.cancel", f"job:{job_id}", previous=previous)
    session.flush()
    return job_dict(job)


# --------------------------------------------------------------------------- health


def health(session: Session, settings: Settings) -> dict[str, Any]:
    checks: dict[str, str] = {}
    try:
        session.execute(text("SELECT 1"))
        checks["database"] = "ok"
        queued = session.scalar(select(func.count(Job.id)).where(Job.state == JobState.QUEUED))
    except SQLAlchemyError as exc:
        checks["database"] = f"error: {type(exc).__name__}"
        queued = None
    root = Path(settings.spool.root)
    checks["spool"] = "ok" if root.is_dir() else f"missing: {root}"
    ok = all(v == "ok" for v in checks.values())
    return {"status": "ok" if ok else "degraded", "checks": checks, "queued_jobs": queued}


# --------------------------------------------------------------------------- router


def admin_router(sessions: sessionmaker[Any], settings: Settings) -> APIRouter:
    """The admin API, health, metrics and job page for ``sessions`` (node database)."""
    router = APIRouter()
    registry = metrics_registry(sessions)

    def db() -> Iterator[Session]:
        with sessions() as session:
            yield session

    DB = Annotated[Session, Depends(db)]

    principal = auth.bearer_principal(
        sessions, settings.http.admin_token, settings.http.ingest_token
    )
    Anyone = Annotated[auth.Principal, Depends(principal)]
    Viewer = Annotated[auth.Principal, Depends(auth.require(principal, auth.READ_ROLES, "reading"))]
    Admin = Annotated[
        auth.Principal, Depends(auth.require(principal, auth.ADMIN_ROLES, "this action"))
    ]

    def commit(session: Session, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` and commit; map node errors to HTTP answers."""
        try:
            result = fn()
            session.commit()
        except LookupError as exc:
            session.rollback()
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc).strip("'\"")) from exc
        except InvalidInput as exc:
            session.rollback()
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
        except ConfigError as exc:
            session.rollback()
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
        return result

    @router.get("/api/health", tags=["health"])
    def get_health(session: DB, response: Response) -> dict[str, Any]:
        body = health(session, settings)
        if body["status"] != "ok":
            response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return body

    @router.get("/metrics", tags=["health"], response_class=Response)
    def get_metrics() -> Response:
        return Response(render(registry), media_type="text/plain; version=0.0.4")

    @router.get("/ui", tags=["ui"], response_class=HTMLResponse, include_in_schema=False)
    def get_ui() -> HTMLResponse:
        return HTMLResponse(UI_HTML)

    @router.get("/api/whoami", tags=["tokens"])
    def whoami(who: Anyone) -> dict[str, str]:
        return {"name": who.name, "role": who.role.value}

    # rules
    @router.get("/api/rules", tags=["rules"])
    def get_rules(session: DB, who: Viewer) -> list[dict[str, Any]]:
        return list_rules(session)

    @router.post("/api/rules", tags=["rules"], status_code=201)
    def post_rule(body: RuleIn, session: DB, who: Admin) -> dict[str, Any]:
        return commit(session, lambda: put_rule(session, body, who.name, create=True))  # type: ignore[no-any-return]

    @router.put("/api/rules/{name}", tags=["rules"])
    def update_rule(name: str, body: RuleIn, session: DB, who: Admin) -> dict[str, Any]:
        if body.name != name:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT, "name in body and URL differ"
            )
        return commit(session, lambda: put_rule(session, body, who.name, create=False))  # type: ignore[no-any-return]

    @router.delete("/api/rules/{name}", tags=["rules"], status_code=204)
    def remove_rule(name: str, session: DB, who: Admin) -> Response:
        commit(session, lambda: delete_rule(session, name, who.name))
        return Response(status_code=204)

    @router.post("/api/rules/dry-run", tags=["rules"])
    def post_dry_run(body: DryRunIn, session: DB, who: Admin) -> dict[str, Any]:
        try:
            return dry_run(session, body.attributes)
        except InvalidInput as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc

    # destinations
    @router.get("/api/destinations", tags=["destinations"])
    def get_destinations(session: DB, who: Viewer) -> list[dict[str, Any]]:
        return list_destinations(session)

    @router.post("/api/destinations", tags=["destinations"], status_code=201)
    def post_destination(body: DestinationIn, session: DB, who: Admin) -> dict[str, Any]:
        return commit(session, lambda: put_destination(session, body, who.name, create=True))  # type: ignore[no-any-return]

    @router.put("/api/destinations/{name}", tags=["destinations"])
    def update_destination(
        name: str, body: DestinationIn, session: DB, who: Admin
    ) -> dict[str, Any]:
        if body.name != name:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT, "name in body and URL differ"
            )
        return commit(session, lambda: put_destination(session, body, who.name, create=False))  # type: ignore[no-any-return]

    @router.delete("/api/destinations/{name}", tags=["destinations"], status_code=204)
    def remove_destination(name: str, session: DB, who: Admin) -> Response:
        commit(session, lambda: delete_destination(session, name, who.name))
        return Response(status_code=204)

    # jobs
    @router.get("/api/jobs", tags=["jobs"])
    def get_jobs(
        session: DB,
        who: Viewer,
        state: Annotated[JobState | None, Query()] = None,
        pipeline: Annotated[str | None, Query(max_length=64)] = None,
        series_uid: Annotated[str | None, Query(max_length=64)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> list[dict[str, Any]]:
        return list_jobs(
            session,
            state=state.value if state else None,
            pipeline=pipeline,
            series_uid=series_uid,
            limit=limit,
            offset=offset,
        )

    @router.get("/api/jobs/{job_id}", tags=["jobs"])
    def get_job(job_id: int, session: DB, who: Viewer) -> dict[str, Any]:
        try:
            return job_dict(_job(session, job_id))
        except LookupError as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc).strip("'\"")) from exc

    @router.post("/api/jobs/{job_id}/retry", tags=["jobs"])
    def post_retry(job_id: int, session: DB, who: Admin) -> dict[str, Any]:
        return commit(session, lambda: retry_job(session, job_id, who.name))  # type: ignore[no-any-return]

    @router.post("/api/jobs/{job_id}/cancel", tags=["jobs"])
    def post_cancel(job_id: int, session: DB, who: Admin) -> dict[str, Any]:
        return commit(session, lambda: cancel_job(session, job_id, who.name))  # type: ignore[no-any-return]

    # rejections and audit
    @router.get("/api/rejections", tags=["audit"])
    def get_rejections(
        session: DB, who: Viewer, limit: Annotated[int, Query(ge=1, le=1000)] = 100
    ) -> list[dict[str, Any]]:
        rows = session.scalars(select(Rejection).order_by(Rejection.id.desc()).limit(limit))
        return [
            {
                "at": r.at.isoformat(),
                "channel": r.channel,
                "calling_ae": r.calling_ae,
                "status": r.status,
                "reason": r.reason,
            }
            for r in rows
        ]

    @router.get("/api/audit", tags=["audit"])
    def get_audit(
        session: DB,
        who: Admin,
        action: Annotated[str | None, Query(max_length=64)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[dict[str, Any]]:
        query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
        if action:
            query = query.where(AuditEvent.action == action)
        return [
            {
                "at": e.at.isoformat(),
                "actor": e.actor,
                "action": e.action,
                "target": e.target,
                "detail": e.detail,
            }
            for e in session.scalars(query)
        ]

    # tokens
    @router.get("/api/tokens", tags=["tokens"])
    def get_tokens(session: DB, who: Admin) -> list[dict[str, str]]:
        return auth.list_tokens(session)

    @router.post("/api/tokens", tags=["tokens"], status_code=201)
    def post_token(body: TokenIn, session: DB, who: Admin) -> dict[str, str]:
        token = commit(session, lambda: auth.create_token(session, body.name, body.role, who.name))
        return {"name": body.name, "role": body.role.value, "token": str(token)}

    @router.delete("/api/tokens/{name}", tags=["tokens"], status_code=204)
    def remove_token(name: str, session: DB, who: Admin) -> Response:
        def go() -> None:
            if not auth.delete_token(session, name, who.name):
                raise LookupError(f"token {name} not found")

        commit(session, go)
        return Response(status_code=204)

    return router
