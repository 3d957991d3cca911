"""Retention: delete a series' spooled files once its results are delivered.

A series is purged when

* it is COMPLETE (not receiving, not already purged),
* every job of the series is terminal (succeeded, failed or cancelled) and every
  outbox row of those jobs is SENT or FAILED (retries exhausted), and
* ``settings.spool.retention_hours`` have passed since the last of: the last
  instance received, a job finished, an object sent.

A series that no rule routed (no jobs) is purged after the same time. The
rows stay (state PURGED, ``purged_at``), the files go, and an audit event
``series.purged`` records how many files and bytes. The pipeline engineer's
scheduler calls :func:`purge_delivered` periodically.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.db import (
    TERMINAL_JOB_STATES,
    Instance,
    Job,
    OutboxItem,
    OutboxState,
    Series,
    SeriesState,
    audit,
    utcnow,
)
from node.errors import SpoolError
from node.spool import Spool

log = logging.getLogger(__name__)

_DELIVERED = frozenset({OutboxState.SENT, OutboxState.FAILED})


def _last_activity(session: Session, series: Series) -> datetime | None:
    """When the series last changed, or None while results are still pending."""
    latest = series.last_received_at
    jobs = list(session.scalars(select(Job).where(Job.series_id == series.id)))
    for job in jobs:
        if job.state not in TERMINAL_JOB_STATES:
            return None
        if job.finished_at is not None:
            latest = max(latest, job.finished_at)
    if jobs:
        items = session.scalars(
            select(OutboxItem).where(OutboxItem.job_id.in_([j.id for j in jobs]))
        )
        for item in items:
            if item.state not in _DELIVERED:
                return None
            if item.sent_at is not None:
                latest = max(latest, item.sent_at)
    return latest


def purge_series(session: Session, spool: Spool, series: Series, *, now: datetime) -> int:
    """Delete the files of ``series`` and mark it PURGED (caller commits); return bytes freed."""
    freed = 0
    files = 0
    dirs: set[Path] = set()
    for path in session.scalars(select(Instance.path).where(Instance.series_id == series.id)):
        freed += spool.remove(path)
        files += 1
        dirs.add(Path(path).parent)
    for directory in dirs:
        spool.prune_empty_dirs(directory)
    series.state = SeriesState.PURGED
    series.purged_at = now
    audit(session, "system", "series.purged", f"series:{series.id}", files=files, bytes=freed)
    log.info("purged series %d: %d files, %d bytes", series.id, files, freed)
    return freed


def purge_delivered(
    sessions: sessionmaker[Session],
    spool: Spool,
    retention_hours: float,
    *,
    now: datetime | None = None,
    limit: int = 100,
) -> list[int]:
    """Purge every COMPLETE series whose results are delivered and retention has passed.

    Returns the ids of the purged series. Each series is purged in its own
    transaction; a file that cannot be deleted leaves that series untouched
    (logged) and the others go ahead.
    """
    now = now or utcnow()
    cutoff = now - timedelta(hours=retention_hours)
    with sessions() as session:
        candidates = list(
            session.scalars(
                select(Series.id)
                .where(Series.state == SeriesState.COMPLETE, Series.last_received_at <= cutoff)
                .order_by(Series.last_received_at)
                .limit(limit)
            )
        )
    purged: list[int] = []
    for series_id in candidates:
        try:
            with sessions.begin() as session:
                series = session.get(Series, series_id, with_for_update=True)
                if series is None or series.state != SeriesState.COMPLETE:
                    continue  # re-opened or purged meanwhile
                last = _last_activity(session, series)
                if last is None or last > cutoff:
                    continue
                purge_series(session, spool, series, now=now)
        except SpoolError as exc:
            log.error("could not purge series %d: %s", series_id, exc)
            continue
        purged.append(series_id)
    return purged
