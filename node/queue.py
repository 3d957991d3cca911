"""The durable job queue, kept in the database (``jobs`` table).

States: QUEUED → RUNNING → SUCCEEDED | FAILED (dead letter, ``last_error`` says why)
| CANCELLED. A claim takes one job whose ``not_before`` has passed, or a RUNNING
job whose lease expired (its worker died), sets a lease (owner, expiry) and
counts an attempt. The worker renews the lease by :func:`heartbeat`; every
transition checks that the caller still owns the lease, so a worker that lost
its lease cannot overwrite the state another worker set.

Concurrency: on PostgreSQL the candidate row is locked with
``SELECT ... FOR UPDATE SKIP LOCKED`` so several processes on several machines
never claim the same job and never wait on each other; on SQLite (one machine)
the claim is a conditional ``UPDATE ... WHERE id = ? AND state = <seen state>``
whose row count tells whether this caller won (SQLite serialises writers).

Retries: a retryable failure re-queues with exponential backoff
(``backoff_s * 2**(attempts-1)``) until ``max_attempts``; then FAILED. A job
whose lease expired with no attempts left is FAILED as "worker lost". A
graceful stop (:func:`release`) gives the job back without burning an attempt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from node.db import Job, JobState, audit, utcnow
from node.errors import QueueError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claim:
    """A job this worker holds (plain values: safe to use outside a session)."""

    job_id: int
    owner: str
    attempt: int
    series_id: int
    series_generation: int
    rule_name: str
    pipeline: str
    pipeline_version: str
    destinations: tuple[str, ...]
    max_attempts: int


def enqueue(
    session: Session,
    *,
    series_id: int,
    rule_name: str,
    pipeline: str,
    destinations: list[str],
    generation: int = 1,
    pipeline_version: str = "",
    max_attempts: int = 3,
    not_before: datetime | None = None,
) -> Job:
    """Add a QUEUED job (the caller commits)."""
    job = Job(
        series_id=series_id,
        series_generation=generation,
        rule_name=rule_name,
        pipeline=pipeline,
        pipeline_version=pipeline_version,
        destinations=list(destinations),
        state=JobState.QUEUED,
        max_attempts=max_attempts,
        not_before=not_before or utcnow(),
    )
    session.add(job)
    session.flush()
    audit(session, "system", "job.queued", f"job:{job.id}", rule=rule_name, pipeline=pipeline)
    return job


def _candidates(now: datetime) -> Any:
    return or_(
        and_(Job.state == JobState.QUEUED, Job.not_before <= now),
        and_(Job.state == JobState.RUNNING, Job.lease_expires_at < now),
    )


def claim(
    sessions: sessionmaker[Session], owner: str, lease_s: float, *, now: datetime | None = None
) -> Claim | None:
    """Take the next due job for ``owner`` (None when there is none)."""
    for _ in range(5):  # another claimer may win the race on SQLite: try the next one
        with sessions.begin() as session:
            now = now or utcnow()
            stmt = (
                select(Job.id, Job.state, Job.attempts, Job.max_attempts)
                .where(_candidates(now))
                .order_by(Job.not_before, Job.id)
                .limit(1)
            )
            if session.get_bind().dialect.name == "postgresql":
                stmt = stmt.with_for_update(skip_locked=True, of=Job)
            row = session.execute(stmt).first()
            if row is None:
                return None
            job_id, state, attempts, max_attempts = row
            if state == JobState.RUNNING and attempts >= max_attempts:
                # its worker died on the last attempt: dead letter, not another try
                done = session.execute(
                    update(Job)
                    .where(
                        Job.id == job_id, Job.state == JobState.RUNNING, Job.lease_expires_at < now
                    )
                    .values(
                        state=JobState.FAILED,
                        lease_owner=None,
                        lease_expires_at=None,
                        finished_at=now,
                        last_error=(
                            f"the worker running this job stopped responding {attempts} time(s)"
                            " (crash or lost machine); attempts exhausted"
                        ),
                    )
                    .execution_options(synchronize_session=False)
                )
                if _rowcount(done):
                    audit(session, owner, "job.failed", f"job:{job_id}", reason="worker lost")
                    log.error("job %d failed: worker lost on its last attempt", job_id)
                continue
            result = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == state, Job.attempts == attempts)
                .values(
                    state=JobState.RUNNING,
                    attempts=attempts + 1,
                    lease_owner=owner,
                    lease_expires_at=now + timedelta(seconds=lease_s),
                    heartbeat_at=now,
                    started_at=now,
                )
                .execution_options(synchronize_session=False)
            )
            if _rowcount(result) != 1:
                continue
            job = session.get(Job, job_id)
            assert job is not None
            if state == JobState.RUNNING:
                log.warning("job %d: lease of a lost worker expired; taken by %s", job_id, owner)
            return Claim(
                job_id=job.id,
                owner=owner,
                attempt=job.attempts,
                series_id=job.series_id,
                series_generation=job.series_generation,
                rule_name=job.rule_name,
                pipeline=job.pipeline,
                pipeline_version=job.pipeline_version,
                destinations=tuple(job.destinations or ()),
                max_attempts=job.max_attempts,
            )
        now = None
    return None


def _owned(claim: Claim) -> Any:
    return and_(
        Job.id == claim.job_id, Job.state == JobState.RUNNING, Job.lease_owner == claim.owner
    )


def heartbeat(sessions: sessionmaker[Session], claim: Claim, lease_s: float) -> None:
    """Renew the lease; QueueError when it was lost (another worker took the job)."""
    now = utcnow()
    with sessions.begin() as session:
        result = session.execute(
            update(Job)
            .where(_owned(claim))
            .values(heartbeat_at=now, lease_expires_at=now + timedelta(seconds=lease_s))
            .execution_options(synchronize_session=False)
        )
        if _rowcount(result) != 1:
            raise QueueError(
                f"job {claim.job_id}: lease lost (taken by another worker or cancelled)"
            )


def owned_job(session: Session, claim: Claim) -> Job:
    """The job row, locked to this claim; QueueError when the lease is gone."""
    job = session.scalars(select(Job).where(_owned(claim))).first()
    if job is None:
        raise QueueError(f"job {claim.job_id}: lease lost (taken by another worker or cancelled)")
    return job


def succeed(
    session: Session, claim: Claim, outcome: str, result: dict[str, Any] | None = None
) -> Job:
    """Mark the job SUCCEEDED in ``session`` (commit together with its outbox rows)."""
    job = owned_job(session, claim)
    now = utcnow()
    job.state = JobState.SUCCEEDED
    job.outcome = outcome
    job.result = result or {}
    job.last_error = ""
    job.lease_owner = None
    job.lease_expires_at = None
    job.finished_at = now
    audit(session, claim.owner, "job.succeeded", f"job:{claim.job_id}", outcome=outcome)
    return job


def fail(
    sessions: sessionmaker[Session],
    claim: Claim,
    error: str,
    *,
    retryable: bool,
    backoff_s: float,
) -> JobState:
    """Record a failed attempt: re-queue with backoff, or FAILED with ``error``."""
    now = utcnow()
    with sessions.begin() as session:
        job = owned_job(session, claim)
        if job.outcome.startswith("running: "):
            job.outcome = ""  # the progress note of the attempt that failed
        job.last_error = error[:4000]
        job.lease_owner = None
        job.lease_expires_at = None
        if retryable and job.attempts < job.max_attempts:
            delay = backoff_s * 2 ** max(job.attempts - 1, 0)
            job.state = JobState.QUEUED
            job.not_before = now + timedelta(seconds=delay)
            audit(
                session, claim.owner, "job.retry", f"job:{job.id}", error=error[:500], delay_s=delay
            )
            log.warning(
                "job %d attempt %d failed, retry in %.1f s: %s", job.id, job.attempts, delay, error
            )
        else:
            job.state = JobState.FAILED
            job.finished_at = now
            if retryable:
                job.last_error = f"failed {job.attempts} time(s), giving up; last error: {error}"[
                    :4000
                ]
            audit(session, claim.owner, "job.failed", f"job:{job.id}", error=error[:500])
            log.error("job %d failed: %s", job.id, job.last_error)
        return job.state


def finish_without_result(sessions: sessionmaker[Session], claim: Claim, outcome: str) -> None:
    """SUCCEEDED with an outcome and nothing to send (e.g. "no model for US")."""
    with sessions.begin() as session:
        succeed(session, claim, outcome)


def release(sessions: sessionmaker[Session], claim: Claim) -> bool:
    """Give the job back (graceful stop): QUEUED again, the attempt not counted."""
    with sessions.begin() as session:
        job = session.scalars(select(Job).where(_owned(claim))).first()
        if job is None:
            return False
        job.state = JobState.QUEUED
        if job.outcome.startswith("running: "):
            job.outcome = ""
        job.attempts = max(job.attempts - 1, 0)
        job.lease_owner = None
        job.lease_expires_at = None
        job.not_before = utcnow()
        audit(session, claim.owner, "job.released", f"job:{job.id}")
    log.info("job %d returned to the queue (worker stopping)", claim.job_id)
    return True


def cancel_superseded(session: Session, series_id: int, rule_name: str, generation: int) -> int:
    """Cancel QUEUED jobs of older generations of a series for a rule (re-opened series)."""
    jobs = session.scalars(
        select(Job).where(
            Job.series_id == series_id,
            Job.rule_name == rule_name,
            Job.series_generation < generation,
            Job.state == JobState.QUEUED,
        )
    ).all()
    for job in jobs:
        job.state = JobState.CANCELLED
        job.finished_at = utcnow()
        job.outcome = f"superseded by generation {generation} of the series (late instances)"
    return len(jobs)


def _rowcount(result: Any) -> int:
    """Rows an UPDATE changed (CursorResult.rowcount; typed loosely by SQLAlchemy)."""
    return int(result.rowcount)


def rerun(session: Session, job_id: int, actor: str) -> Job:
    """Queue a finished job again (fresh attempts); its results replace the earlier ones."""
    job = session.get(Job, job_id)
    if job is None:
        raise QueueError(f"job {job_id} not found")
    if job.state in (JobState.QUEUED, JobState.RUNNING):
        raise QueueError(f"job {job_id} is {job.state.value}; it is already queued or running")
    job.state = JobState.QUEUED
    job.attempts = 0
    job.not_before = utcnow()
    job.last_error = ""
    job.finished_at = None
    audit(session, actor, "job.rerun", f"job:{job_id}")
    return job
