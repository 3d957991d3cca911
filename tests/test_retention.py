"""Retention: files of delivered series are purged after retention_hours, nothing earlier."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from node.db import (
    AuditEvent,
    Job,
    JobState,
    OutboxItem,
    OutboxState,
    Series,
    SeriesState,
    utcnow,
)
from node.retention import purge_delivered
from tests.support.ingest_node import IngestNode, ct_series, running_node

LATER = timedelta(hours=80)  # beyond the default 72 h


@pytest.fixture()
def node(tmp_path: Path) -> Iterator[IngestNode]:
    with running_node(tmp_path, start=False) as n:
        yield n


def ingest_series(node: IngestNode, tmp: Path, seed: str, n: int = 2) -> int:
    for f in ct_series(tmp / seed, n=n, seed=seed):
        assert node.store.accept(f.read_bytes(), calling_ae="TEST", channel="dimse").ok
    with node.sessions.begin() as s:
        series = s.scalars(select(Series).order_by(Series.id.desc())).first()
        assert series is not None
        series.state = SeriesState.COMPLETE
        series.completed_at = utcnow()
        return series.id


def add_job(
    node: IngestNode,
    series_id: int,
    state: JobState,
    outbox: tuple[OutboxState, ...] = (),
) -> None:
    with node.sessions.begin() as s:
        job = Job(series_id=series_id, rule_name="r", pipeline="p", state=state)
        if state in (JobState.SUCCEEDED, JobState.FAILED):
            job.finished_at = utcnow()
        s.add(job)
        s.flush()
        for i, ostate in enumerate(outbox):
            s.add(
                OutboxItem(
                    job_id=job.id,
                    destination="pacs",
                    kind="seg",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
                    sop_instance_uid=f"1.2.3.{series_id}.{job.id}.{i}",
                    path=f"results/{job.id}/{i}.dcm",
                    state=ostate,
                    sent_at=utcnow() if ostate == OutboxState.SENT else None,
                )
            )


def purge(node: IngestNode, delta: timedelta = LATER) -> list[int]:
    return purge_delivered(
        node.sessions, node.store.spool, node.settings.spool.retention_hours, now=utcnow() + delta
    )


def files_of(node: IngestNode, series_id: int) -> list[Path]:
    with node.sessions() as s:
        uid = s.get(Series, series_id).series_instance_uid  # type: ignore[union-attr]
    return sorted(node.spool_root.glob(f"*/{uid}/*.dcm"))


def test_delivered_series_purged_after_retention_only(node: IngestNode, tmp_path: Path) -> None:
    sid = ingest_series(node, tmp_path, "delivered")
    add_job(node, sid, JobState.SUCCEEDED, (OutboxState.SENT, OutboxState.FAILED))
    assert purge(node, timedelta(hours=1)) == []
    assert len(files_of(node, sid)) == 2
    assert purge(node) == [sid]
    assert files_of(node, sid) == []
    assert list(node.spool_root.iterdir()) == []  # empty study/series folders removed
    with node.sessions() as s:
        series = s.get(Series, sid)
        assert series is not None and series.state == SeriesState.PURGED
        assert series.purged_at is not None
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == "series.purged")).one()
        assert event.target == f"series:{sid}" and event.detail["files"] == 2
    assert purge(node) == []  # idempotent


@pytest.mark.parametrize(
    ("job_state", "outbox"),
    [
        (JobState.RUNNING, ()),
        (JobState.QUEUED, ()),
        (JobState.SUCCEEDED, (OutboxState.SENT, OutboxState.PENDING)),
        (JobState.SUCCEEDED, (OutboxState.SENDING,)),
    ],
    ids=["running", "queued", "outbox-pending", "outbox-sending"],
)
def test_undelivered_series_kept(
    node: IngestNode, tmp_path: Path, job_state: JobState, outbox: tuple[OutboxState, ...]
) -> None:
    sid = ingest_series(node, tmp_path, "pending")
    add_job(node, sid, JobState.SUCCEEDED, (OutboxState.SENT,))
    add_job(node, sid, job_state, outbox)
    assert purge(node) == []
    assert len(files_of(node, sid)) == 2


def test_unrouted_and_receiving_series(node: IngestNode, tmp_path: Path) -> None:
    unrouted = ingest_series(node, tmp_path, "unrouted")
    receiving = ingest_series(node, tmp_path, "receiving")
    with node.sessions.begin() as s:
        s.get(Series, receiving).state = SeriesState.RECEIVING  # type: ignore[union-attr]
    assert purge(node) == [unrouted]
    assert len(files_of(node, receiving)) == 2


def test_instance_resent_after_purge_reopens_series(node: IngestNode, tmp_path: Path) -> None:
    sid = ingest_series(node, tmp_path, "resent")
    add_job(node, sid, JobState.SUCCEEDED, (OutboxState.SENT,))
    assert purge(node) == [sid]
    again = ct_series(tmp_path / "resent2", n=1, seed="resent")[0]
    assert node.store.accept(again.read_bytes(), calling_ae="TEST", channel="dimse").ok
    with node.sessions() as s:
        series = s.get(Series, sid)
        assert series is not None
        assert series.state == SeriesState.RECEIVING and series.generation == 2
        assert series.instance_count == 2  # the row of the re-sent instance is reused
    assert len(files_of(node, sid)) == 1
