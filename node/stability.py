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
   ``every`` rules queue a job for the series; ``best_per_study`` rules wait
   until no series of the study is still receiving, then queue a job only for
   the best complete series by the rule's ordering. The routing note records
   which rule matched and why the others did not; "no rule matched" is noted
   and audited, never silent.

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
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, joinedload, sessionmaker

from node import pipelines, queue
from node.db import Job, RuleRow, Series, SeriesState, audit, utcnow
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


def _route_one(
    session: Session, series: Series, rules: list[Rule], settings: Settings, report: SweepReport
) -> None:
    attrs = SeriesAttributes.from_row(series)
    notes: list[str] = []
    queued = False
    waiting = False
    for rule in rules:
        ok, lines = rule.explain(attrs)
        if not ok:
            first_fail = next((ln for ln in lines if "FAIL" in ln), "did not match").strip()
            notes.append(
                f"rule {rule.name}: not matched ({first_fail.removeprefix('FAIL ').strip()})"
            )
            continue
        if rule.selection.policy == "best_per_study":
            siblings = session.scalars(
                select(Series)
                .options(joinedload(Series.study))
                .where(Series.study_id == series.study_id)
            ).all()
            if any(s.state == SeriesState.RECEIVING for s in siblings):
                waiting = True
                notes.append(f"rule {rule.name}: waiting for the study's other series to complete")
                continue
            candidates = [
                SeriesAttributes.from_row(s)
                for s in siblings
                if s.state == SeriesState.COMPLETE and rule.explain(SeriesAttributes.from_row(s))[0]
            ]
            best = best_of(rule.selection, candidates)
            if best.series_uid != series.series_instance_uid:
                notes.append(
                    f"rule {rule.name}: matched, but series {best.series_uid} is the best of the study"
                )
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
    if not queued and not waiting:
        notes.insert(0, "no rule matched")
        report.unrouted.append(series.id)
        audit(session, "system", "series.unrouted", f"series:{series.id}", modality=series.modality)
        log.info("series %d: no rule matched", series.id)
    series.routing_note = "\n".join(notes)[:4000] or "no rules configured"


def _route(sessions: sessionmaker[Session], settings: Settings, report: SweepReport) -> None:
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
            _route_one(session, series, load_rules(session), settings, report)


def sweep(
    sessions: sessionmaker[Session], settings: Settings, *, now: datetime | None = None
) -> SweepReport:
    """Complete idle series and route complete ones (safe to run concurrently and repeatedly)."""
    report = SweepReport()
    _complete(sessions, settings, now or utcnow(), report)
    _route(sessions, settings, report)
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
