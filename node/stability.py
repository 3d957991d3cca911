"""Series stability and routing: the sweep that turns received series into jobs.

DICOM has no "end of series" message, so a series is taken as complete when no
instance has arrived for N seconds: N is the ``stable_after_s`` of the first
enabled rule (by priority) that matches the series, else
``settings.scheduler.stable_after_s``. :func:`sweep` runs every
``settings.scheduler.sweep_interval_s`` from an APScheduler BackgroundScheduler
(:func:`make_scheduler`) and does two things:

1. Completion: a RECEIVING series idle for N s becomes COMPLETE. The update is
   conditional on the ``last_received_at`` the sweep saw, so an instance that
   arrives at the same moment keeps the series open.
2. Routing: a COMPLETE series without a routing note is matched against the
   rules (read from the database each sweep, so admin changes apply at once).
   ``every`` rules queue a job for the series; ``best_per_study`` rules queue
   one job per study (below). The routing note records which rule matched and
   why the others did not; "no rule matched" is noted and audited, never silent.

Best series per study (one result set per study and rule, never two):

- The choice waits until the study is quiet: no series of it still RECEIVING
  and, if the rule sets ``selection.study_quiet_s``, no instance of it received
  for that long. Then the best complete matching series by ``order_by`` gets
  the job; the others are noted "matched, but series X is the best".
- A better series can still complete later (a modality that sends the series
  of one study minutes apart). If the job of the earlier choice is still
  QUEUED, it is CANCELLED (outcome "superseded by series Y ...", audit
  ``job.superseded``, a line added to the earlier series' routing note) and the
  better series gets the job. If a worker has already taken it (RUNNING,
  SUCCEEDED or FAILED), the selection stands: the later series gets no job,
  its note says "not selected: job N already <state> for series X", and the
  audit event ``series.not_selected`` records it. Processing the other series
  as well is an admin's decision, never the sweep's.
- The selected series stays selected: when late instances re-open it, it is
  routed again under the late-instance policy below, whichever series is best.

Late instances: ingest re-opens a COMPLETE series (state RECEIVING, generation
+1); when it completes again it is routed again. With
``late_instances: reopen`` the new job replaces the earlier results (same
pipeline version → same output UIDs → the PACS overwrites) and queued jobs of
older generations are cancelled; with ``new_job`` the new job's pipeline version
carries ``+g<generation>``, so its results are new objects beside the earlier ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, joinedload, sessionmaker

from node import pipelines, queue
from node.db import Job, JobState, RuleRow, Series, SeriesState, Study, audit, utcnow
from node.errors import PipelineError
from node.rules import Rule, SeriesAttributes, best_of, rules_from_rows
from node.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class SweepReport:
    completed: list[int] = field(default_factory=list)  # series ids
    jobs: list[int] = field(default_factory=list)  # job ids queued
    unrouted: list[int] = field(default_factory=list)  # series ids no rule matched
    deferred: list[int] = field(default_factory=list)  # waiting for their study
    not_selected: list[int] = field(default_factory=list)  # another series has the study's job


def load_rules(session: Session) -> list[Rule]:
    return rules_from_rows(session.scalars(select(RuleRow).where(RuleRow.enabled.is_(True))).all())


def stable_after(rules: list[Rule], attrs: SeriesAttributes, default: float) -> float:
    for rule in rules:
        if rule.stable_after_s is not None and rule.explain(attrs)[0]:
            return rule.stable_after_s
    return default


def _version(rule: Rule, generation: int, late_policy: str) -> str:
    try:
        version = pipelines.get(rule.pipeline).version
    except PipelineError:
        version = ""  # resolved by the worker (the pipeline may live only there)
    if late_policy == "new_job" and generation > 1:
        version = f"{version or '0'}+g{generation}"
    return version


def _complete(
    sessions: sessionmaker[Session], settings: Settings, now: datetime, report: SweepReport
) -> None:
    with sessions() as session:
        rules = load_rules(session)
        receiving = session.scalars(
            select(Series)
            .options(joinedload(Series.study))
            .where(Series.state == SeriesState.RECEIVING)
        ).all()
        due: list[tuple[int, datetime]] = []
        for s in receiving:
            wait = stable_after(
                rules, SeriesAttributes.from_row(s), settings.scheduler.stable_after_s
            )
            if s.last_received_at + timedelta(seconds=wait) <= now:
                due.append((s.id, s.last_received_at))
    for series_id, seen in due:
        with sessions.begin() as session:
            result = session.execute(
                update(Series)
                .where(
                    Series.id == series_id,
                    Series.state == SeriesState.RECEIVING,
                    Series.last_received_at == seen,
                )
                .values(state=SeriesState.COMPLETE, completed_at=now, routing_note="")
                .execution_options(synchronize_session=False)
            )
            if int(getattr(result, "rowcount", 0)) == 1:
                report.completed.append(series_id)
                log.info("series %d complete (idle since %s)", series_id, seen.isoformat())


# A job in one of these states was taken by a worker: it may have produced results,
# so the series it is for stays the study's selection under its rule.
_TAKEN = (JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED)


class _Pick(StrEnum):
    """What best-per-study selection decided for one series under one rule."""

    GO = "go"  # this series is the study's selection: queue (or keep) its job
    WAIT = "wait"  # the study is not quiet yet: route again at the next sweep
    SKIP = "skip"  # another series is (or was already) selected: noted, no job


def _uid_of(session: Session, series_id: int) -> str:
    return session.scalar(select(Series.series_instance_uid).where(Series.id == series_id)) or ""


def _pick_best(
    session: Session,
    series: Series,
    rule: Rule,
    now: datetime,
    notes: list[str],
    report: SweepReport,
) -> _Pick:
    """Decide whether ``series`` is the one series of its study that ``rule`` runs on.

    See the module docstring ("Best series per study") for the policy.
    """
    if session.get_bind().dialect.name == "postgresql":
        # one routing decision per study at a time (SQLite serialises writers anyway)
        session.execute(select(Study.id).where(Study.id == series.study_id).with_for_update())
    siblings = session.scalars(
        select(Series).options(joinedload(Series.study)).where(Series.study_id == series.study_id)
    ).all()
    if any(s.state == SeriesState.RECEIVING for s in siblings):
        notes.append(f"rule {rule.name}: waiting for the study's other series to complete")
        return _Pick.WAIT
    quiet = rule.selection.study_quiet_s
    last = max(s.last_received_at for s in siblings)
    if quiet and last + timedelta(seconds=quiet) > now:
        notes.append(f"rule {rule.name}: waiting until the study has been quiet for {quiet:g} s")
        return _Pick.WAIT
    candidates = [
        SeriesAttributes.from_row(s)
        for s in siblings
        if s.state == SeriesState.COMPLETE and rule.explain(SeriesAttributes.from_row(s))[0]
    ]
    best = best_of(rule.selection, candidates) if candidates else None
    jobs = session.scalars(
        select(Job)
        .join(Series, Job.series_id == Series.id)
        .where(
            Series.study_id == series.study_id,
            Job.rule_name == rule.name,
            Job.state != JobState.CANCELLED,
        )
        .order_by(Job.id)
    ).all()
    taken = [j for j in jobs if j.state in _TAKEN]
    if any(j.series_id == series.id for j in taken):
        return _Pick.GO  # already the study's selection (e.g. re-opened by late instances)
    if taken:
        return _not_selected(session, series, rule, taken[0], best, notes, report)
    if best is None or best.series_uid != series.series_instance_uid:
        shown = best.series_uid if best is not None else "another series"
        notes.append(f"rule {rule.name}: matched, but series {shown} is the best of the study")
        return _Pick.SKIP
    for job in jobs:
        if job.series_id == series.id:
            continue
        # queued for a series that is no longer the best: cancel it, unless a worker
        # took it in the meantime (then that series stays the selection)
        outcome = f"superseded by series {series.series_instance_uid}, better for rule {rule.name}"
        result = session.execute(
            update(Job)
            .where(Job.id == job.id, Job.state == JobState.QUEUED)
            .values(state=JobState.CANCELLED, finished_at=now, outcome=outcome)
            .execution_options(synchronize_session=False)
        )
        if int(getattr(result, "rowcount", 0)) != 1:
            session.refresh(job)
            return _not_selected(session, series, rule, job, best, notes, report)
        replaced = session.get(Series, job.series_id)
        if replaced is not None:
            replaced.routing_note = (
                f"{replaced.routing_note}\nrule {rule.name}: job {job.id} cancelled, "
                f"series {series.series_instance_uid} is better"
            )[:4000]
        audit(
            session,
            "system",
            "job.superseded",
            f"job:{job.id}",
            rule=rule.name,
            by_series=series.id,
            reason="a better series of the study completed before the job started",
        )
        notes.append(
            f"rule {rule.name}: queued job {job.id} of series "
            f"{replaced.series_instance_uid if replaced else job.series_id} cancelled (this series is better)"
        )
        log.info("job %d superseded by series %d (rule %s)", job.id, series.id, rule.name)
    return _Pick.GO


def _not_selected(
    session: Session,
    series: Series,
    rule: Rule,
    job: Job,
    best: SeriesAttributes | None,
    notes: list[str],
    report: SweepReport,
) -> _Pick:
    """Record that ``series`` gets no job: ``job`` (another series) was already taken."""
    chosen = _uid_of(session, job.series_id)
    better = best is not None and best.series_uid == series.series_instance_uid
    notes.append(
        f"rule {rule.name}: matched{', better by order_by' if better else ''}, but not selected:"
        f" job {job.id} already {job.state.value} for series {chosen}"
    )
    audit(
        session,
        "system",
        "series.not_selected",
        f"series:{series.id}",
        rule=rule.name,
        job=job.id,
        job_state=job.state.value,
        selected_series=job.series_id,
        better=better,
    )
    report.not_selected.append(series.id)
    return _Pick.SKIP


def _route_one(
    session: Session,
    series: Series,
    rules: list[Rule],
    settings: Settings,
    now: datetime,
    report: SweepReport,
) -> None:
    attrs = SeriesAttributes.from_row(series)
    notes: list[str] = []
    queued = False
    waiting = False
    selected_elsewhere = False
    for rule in rules:
        ok, lines = rule.explain(attrs)
        if not ok:
            first_fail = next((ln for ln in lines if "FAIL" in ln), "did not match").strip()
            notes.append(
                f"rule {rule.name}: not matched ({first_fail.removeprefix('FAIL ').strip()})"
            )
            continue
        if rule.selection.policy == "best_per_study":
            pick = _pick_best(session, series, rule, now, notes, report)
            if pick == _Pick.WAIT:
                waiting = True
                continue
            if pick == _Pick.SKIP:
                selected_elsewhere = True
                continue
        exists = session.scalar(
            select(Job.id).where(
                Job.series_id == series.id,
                Job.rule_name == rule.name,
                Job.series_generation == series.generation,
            )
        )
        if exists is not None:
            notes.append(f"rule {rule.name}: matched (job {exists})")
            queued = True
            continue
        late = settings.scheduler.late_instances
        if late == "reopen" and series.generation > 1:
            cancelled = queue.cancel_superseded(session, series.id, rule.name, series.generation)
            if cancelled:
                notes.append(
                    f"rule {rule.name}: {cancelled} queued job(s) of earlier generations cancelled"
                )
        job = queue.enqueue(
            session,
            series_id=series.id,
            rule_name=rule.name,
            pipeline=rule.pipeline,
            destinations=rule.destinations,
            generation=series.generation,
            pipeline_version=_version(rule, series.generation, late),
            max_attempts=settings.workers.max_attempts,
        )
        report.jobs.append(job.id)
        queued = True
        notes.append(f"rule {rule.name}: matched, job {job.id} queued ({rule.pipeline})")
    if waiting and not queued:
        report.deferred.append(series.id)
        return  # routing note stays empty: routed again next sweep
    if not queued and not waiting and not selected_elsewhere:
        notes.insert(0, "no rule matched")
        report.unrouted.append(series.id)
        audit(session, "system", "series.unrouted", f"series:{series.id}", modality=series.modality)
        log.info("series %d: no rule matched", series.id)
    series.routing_note = "\n".join(notes)[:4000] or "no rules configured"


def _route(
    sessions: sessionmaker[Session], settings: Settings, now: datetime, report: SweepReport
) -> None:
    with sessions() as session:
        pending = list(
            session.scalars(
                select(Series.id).where(
                    Series.state == SeriesState.COMPLETE, Series.routing_note == ""
                )
            )
        )
    for series_id in pending:
        with sessions.begin() as session:
            series = session.scalars(
                select(Series).options(joinedload(Series.study)).where(Series.id == series_id)
            ).first()
            if series is None or series.state != SeriesState.COMPLETE or series.routing_note:
                continue
            _route_one(session, series, load_rules(session), settings, now, report)


def sweep(
    sessions: sessionmaker[Session], settings: Settings, *, now: datetime | None = None
) -> SweepReport:
    """Complete idle series and route complete ones (safe to run concurrently and repeatedly)."""
    report = SweepReport()
    now = now or utcnow()
    _complete(sessions, settings, now, report)
    _route(sessions, settings, now, report)
    return report


def make_scheduler(jobs: list[tuple[str, Any, float]]) -> Any:
    """An APScheduler BackgroundScheduler running each ``(name, fn, interval_s)``.

    Each job runs at most once at a time (``max_instances=1``, ``coalesce``); an
    exception is logged and the job runs again at its next interval.
    """
    from apscheduler.schedulers.background import BackgroundScheduler

    scheduler = BackgroundScheduler(timezone="UTC")
    for name, fn, interval in jobs:
        scheduler.add_job(
            _guarded(name, fn),
            "interval",
            seconds=interval,
            id=name,
            name=name,
            max_instances=1,
            misfire_grace_time=None,
            coalesce=True,
            next_run_time=utcnow(),
        )
    return scheduler


def _guarded(name: str, fn: Any) -> Any:
    def run() -> None:
        try:
            fn()
        except Exception:
            log.exception("scheduled task %s failed", name)

    run.__name__ = name
    return run
