"""Stability sweep and routing: completion, per-rule wait, best series, late instances, US."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.orm import Session, sessionmaker

from node import queue
from node.db import (
    AuditEvent,
    Job,
    JobState,
    Series,
    SeriesState,
    create_engine_for,
    session_factory,
    utcnow,
)
from node.migrate import upgrade
from node.registry import InstanceHeader, record_instance
from node.rules import parse_rules_document, sync_to_database
from node.settings import Settings
from node.stability import sweep
from node.worker import run_one

STUDY = "1.2.826.0.1.3680043.10.1451.9.1"


def settings_for(tmp: Path, **scheduler: Any) -> Settings:
    return Settings.model_validate(
        {
            "spool": {"root": str(tmp / "spool")},
            "database": {"url": f"sqlite:///{tmp / 'n.db'}"},
            "scheduler": {"stable_after_s": 30, **scheduler},
        }
    )


@pytest.fixture()
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    url = f"sqlite:///{tmp_path / 'n.db'}"
    upgrade(url)
    return session_factory(create_engine_for(url))


def receive(
    sessions: sessionmaker[Session],
    series: str,
    n: int,
    *,
    start: int = 0,
    when: Any = None,
    **attrs: Any,
) -> None:
    fields = {
        "modality": "CT",
        "series_description": "PORTAL VENOUS",
        "slice_thickness": 1.0,
        **attrs,
    }
    with sessions.begin() as s:
        for i in range(start, start + n):
            header = InstanceHeader(
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                sop_instance_uid=f"{series}.{i + 1}",
                study_uid=STUDY,
                series_uid=series,
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                size=1,
                sha256=str(i),
                **fields,
            )
            record_instance(s, header, f"{STUDY}/{series}/{series}.{i + 1}.dcm", "PACS", now=when)


def load(sessions: sessionmaker[Session], doc: dict[str, Any]) -> None:
    with sessions.begin() as s:
        sync_to_database(s, parse_rules_document(doc))


def series_row(sessions: sessionmaker[Session], uid: str) -> Series:
    with sessions() as s:
        row = s.scalars(select(Series).where(Series.series_instance_uid == uid)).one()
        return row


def jobs(sessions: sessionmaker[Session]) -> list[Job]:
    with sessions() as s:
        return list(s.scalars(select(Job).order_by(Job.id)))


def test_idle_series_completes_and_is_routed(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    settings = settings_for(tmp_path)
    load(
        sessions,
        {
            "rules": [
                {
                    "name": "ct",
                    "pipeline": "hpb-ct-mr",
                    "match": {"modality": "CT"},
                    "destinations": ["pacs"],
                }
            ]
        },
    )
    receive(sessions, f"{STUDY}.1", 3)
    receive(sessions, f"{STUDY}.2", 2, modality="MR")
    assert sweep(sessions, settings).completed == []  # not idle yet
    report = sweep(sessions, settings, now=utcnow() + timedelta(seconds=31))
    assert len(report.completed) == 2 and len(report.jobs) == 1 and len(report.unrouted) == 1
    ct = series_row(sessions, f"{STUDY}.1")
    assert ct.state == SeriesState.COMPLETE
    assert "rule ct: matched, job" in ct.routing_note
    mr = series_row(sessions, f"{STUDY}.2")
    assert mr.routing_note.startswith("no rule matched")
    assert "modality: 'MR' not in ['CT']" in mr.routing_note
    (job,) = jobs(sessions)
    assert (job.rule_name, job.pipeline, job.destinations, job.pipeline_version) == (
        "ct",
        "hpb-ct-mr",
        ["pacs"],
        "1.0",
    )
    again = sweep(sessions, settings, now=utcnow() + timedelta(seconds=60))
    assert again.completed == [] and again.jobs == []  # idempotent


def test_rule_sets_its_own_stable_time(tmp_path: Path, sessions: sessionmaker[Session]) -> None:
    settings = settings_for(tmp_path)
    load(
        sessions,
        {
            "rules": [
                {"name": "fast", "pipeline": "p", "match": {"modality": "CT"}, "stable_after_s": 5}
            ]
        },
    )
    receive(sessions, f"{STUDY}.1", 1)
    receive(sessions, f"{STUDY}.2", 1, modality="MR")
    report = sweep(sessions, settings, now=utcnow() + timedelta(seconds=6))
    assert [series_row(sessions, f"{STUDY}.1").id] == report.completed


def test_best_series_per_study_waits_for_the_study(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    settings = settings_for(tmp_path)
    load(
        sessions,
        {
            "rules": [
                {
                    "name": "thinnest",
                    "pipeline": "p",
                    "match": {"modality": "CT"},
                    "selection": {
                        "policy": "best_per_study",
                        "order_by": [{"attribute": "slice_thickness"}],
                    },
                }
            ]
        },
    )
    t0 = utcnow()
    receive(sessions, f"{STUDY}.1", 2, slice_thickness=3.0, when=t0)
    receive(sessions, f"{STUDY}.2", 2, slice_thickness=1.0, when=t0 + timedelta(seconds=20))
    first = sweep(sessions, settings, now=t0 + timedelta(seconds=35))
    assert len(first.completed) == 1 and first.deferred and not first.jobs
    second = sweep(sessions, settings, now=t0 + timedelta(seconds=55))
    assert len(second.jobs) == 1
    (job,) = jobs(sessions)
    assert job.series_id == series_row(sessions, f"{STUDY}.2").id
    assert (
        f"series {STUDY}.2 is the best of the study"
        in series_row(sessions, f"{STUDY}.1").routing_note
    )


@pytest.mark.parametrize("policy", ["reopen", "new_job"])
def test_late_instances_reopen_or_start_a_new_job(
    tmp_path: Path, sessions: sessionmaker[Session], policy: str
) -> None:
    settings = settings_for(tmp_path, late_instances=policy)
    load(
        sessions, {"rules": [{"name": "ct", "pipeline": "hpb-ct-mr", "match": {"modality": "CT"}}]}
    )
    t0 = utcnow()
    receive(sessions, f"{STUDY}.1", 3, when=t0)
    assert len(sweep(sessions, settings, now=t0 + timedelta(seconds=31)).jobs) == 1
    receive(sessions, f"{STUDY}.1", 1, start=3, when=t0 + timedelta(seconds=40))  # late
    row = series_row(sessions, f"{STUDY}.1")
    assert (row.state, row.generation, row.instance_count) == (SeriesState.RECEIVING, 2, 4)
    assert sweep(sessions, settings, now=t0 + timedelta(seconds=71)).jobs
    first, second = jobs(sessions)
    assert second.series_generation == 2
    if policy == "reopen":
        assert first.state == JobState.CANCELLED and "superseded by generation 2" in first.outcome
        assert second.pipeline_version == "1.0"  # same output UIDs: the PACS copy is replaced
    else:
        assert first.state == JobState.QUEUED
        assert second.pipeline_version == "1.0+g2"  # new objects beside the first results


def test_ultrasound_is_routed_and_ends_with_no_model_for_us(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    settings = settings_for(tmp_path)
    load(
        sessions, {"rules": [{"name": "us", "pipeline": "hpb-ct-mr", "match": {"modality": "US"}}]}
    )
    with sessions.begin() as s:
        header = InstanceHeader(
            sop_class_uid="1.2.840.10008.5.1.4.1.1.6.1",
            sop_instance_uid=f"{STUDY}.7.1",
            study_uid=STUDY,
            series_uid=f"{STUDY}.7",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            size=1,
            sha256="x",
            modality="US",
        )
        record_instance(s, header, f"{STUDY}/{STUDY}.7/{STUDY}.7.1.dcm", "PACS")
    spool_file = tmp_path / "spool" / STUDY / f"{STUDY}.7" / f"{STUDY}.7.1.dcm"
    spool_file.parent.mkdir(parents=True)
    spool_file.write_bytes(b"placeholder: the US path never reads pixels")
    assert sweep(sessions, settings, now=utcnow() + timedelta(seconds=31)).jobs
    claim = queue.claim(sessions, "w", 60)
    assert claim is not None
    assert run_one(sessions, settings, claim) == "succeeded"
    (job,) = jobs(sessions)
    assert job.state == JobState.SUCCEEDED
    assert job.outcome == "no model for US"


THINNEST = {
    "rules": [
        {
            "name": "thinnest",
            "pipeline": "p",
            "match": {"modality": "CT"},
            "selection": {
                "policy": "best_per_study",
                "order_by": [{"attribute": "slice_thickness"}],
            },
        }
    ]
}


def audit_rows(sessions: sessionmaker[Session], action: str) -> list[AuditEvent]:
    with sessions() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.action == action)))


def test_better_series_later_supersedes_a_queued_job(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    settings = settings_for(tmp_path)
    load(sessions, THINNEST)
    t0 = utcnow()
    receive(sessions, f"{STUDY}.1", 2, slice_thickness=3.0, when=t0)
    assert len(sweep(sessions, settings, now=t0 + timedelta(seconds=35)).jobs) == 1
    # a thinner series of the same study arrives after the first was chosen
    receive(sessions, f"{STUDY}.2", 2, slice_thickness=1.0, when=t0 + timedelta(seconds=100))
    report = sweep(sessions, settings, now=t0 + timedelta(seconds=131))
    first, second = jobs(sessions)
    a, b = series_row(sessions, f"{STUDY}.1"), series_row(sessions, f"{STUDY}.2")
    assert report.jobs == [second.id] and second.series_id == b.id
    assert first.series_id == a.id and first.state == JobState.CANCELLED
    assert first.outcome == f"superseded by series {STUDY}.2, better for rule thinnest"
    assert f"rule thinnest: job {first.id} cancelled, series {STUDY}.2 is better" in a.routing_note
    assert f"queued job {first.id} of series {STUDY}.1 cancelled" in b.routing_note
    (event,) = audit_rows(sessions, "job.superseded")
    assert event.target == f"job:{first.id}" and event.detail["by_series"] == b.id
    # one live job for the study and rule
    assert [j.state for j in jobs(sessions)] == [JobState.CANCELLED, JobState.QUEUED]


@pytest.mark.parametrize("taken", ["running", "succeeded"])
def test_better_series_after_the_job_was_taken_is_noted_not_run(
    tmp_path: Path, sessions: sessionmaker[Session], taken: str
) -> None:
    settings = settings_for(tmp_path)
    load(sessions, THINNEST)
    t0 = utcnow()
    receive(sessions, f"{STUDY}.1", 2, slice_thickness=3.0, when=t0)
    assert len(sweep(sessions, settings, now=t0 + timedelta(seconds=35)).jobs) == 1
    claim = queue.claim(sessions, "w", 600)
    assert claim is not None
    if taken == "succeeded":
        queue.finish_without_result(sessions, claim, "3 objects")
    receive(sessions, f"{STUDY}.2", 2, slice_thickness=1.0, when=t0 + timedelta(seconds=100))
    report = sweep(sessions, settings, now=t0 + timedelta(seconds=131))
    b = series_row(sessions, f"{STUDY}.2")
    assert report.jobs == [] and report.not_selected == [b.id] and report.unrouted == []
    (job,) = jobs(sessions)  # never a second result set for the study and rule
    assert job.state == JobState(taken)
    assert b.routing_note == (
        f"rule thinnest: matched, better by order_by, but not selected:"
        f" job {job.id} already {taken} for series {STUDY}.1"
    )
    (event,) = audit_rows(sessions, "series.not_selected")
    assert event.target == f"series:{b.id}"
    assert event.detail == {
        "rule": "thinnest",
        "job": job.id,
        "job_state": taken,
        "selected_series": job.series_id,
        "better": True,
    }
    # the selected series stays selected: late instances re-open it and it runs again
    receive(
        sessions, f"{STUDY}.1", 1, start=2, slice_thickness=3.0, when=t0 + timedelta(seconds=140)
    )
    again = sweep(sessions, settings, now=t0 + timedelta(seconds=171))
    assert len(again.jobs) == 1
    assert jobs(sessions)[-1].series_id == job.series_id
    assert jobs(sessions)[-1].series_generation == 2


def test_best_series_waits_for_a_quiet_study(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    settings = settings_for(tmp_path)
    doc = {"rules": [dict(THINNEST["rules"][0])]}
    doc["rules"][0]["selection"] = {
        "policy": "best_per_study",
        "order_by": [{"attribute": "slice_thickness"}],
        "study_quiet_s": 120,
    }
    load(sessions, doc)
    t0 = utcnow()
    receive(sessions, f"{STUDY}.1", 2, slice_thickness=3.0, when=t0)
    first = sweep(sessions, settings, now=t0 + timedelta(seconds=35))
    assert first.completed and first.deferred and not first.jobs
    assert series_row(sessions, f"{STUDY}.1").routing_note == ""  # routed again next sweep
    receive(sessions, f"{STUDY}.2", 2, slice_thickness=1.0, when=t0 + timedelta(seconds=60))
    assert not sweep(sessions, settings, now=t0 + timedelta(seconds=179)).jobs
    last = sweep(sessions, settings, now=t0 + timedelta(seconds=181))
    (job,) = jobs(sessions)
    assert last.jobs == [job.id] and job.series_id == series_row(sessions, f"{STUDY}.2").id
    assert "is the best of the study" in series_row(sessions, f"{STUDY}.1").routing_note


def test_a_job_taken_while_the_better_series_is_routed_stands(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    """The race: a worker claims the queued job between the sweep's read and its cancel."""
    settings = settings_for(tmp_path)
    load(sessions, THINNEST)
    t0 = utcnow()
    receive(sessions, f"{STUDY}.1", 2, slice_thickness=3.0, when=t0)
    assert len(sweep(sessions, settings, now=t0 + timedelta(seconds=35)).jobs) == 1
    receive(sessions, f"{STUDY}.2", 2, slice_thickness=1.0, when=t0 + timedelta(seconds=100))
    worker_engine = create_engine_for(f"sqlite:///{tmp_path / 'n.db'}")
    worker = session_factory(worker_engine)
    claims: list[queue.Claim | None] = []

    def claim_first(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("UPDATE jobs SET state") and not claims:
            claims.append(queue.claim(worker, "w", 600))  # another process, its own connection

    engine = sessions.kw["bind"]
    event.listen(engine, "before_cursor_execute", claim_first)
    try:
        report = sweep(sessions, settings, now=t0 + timedelta(seconds=131))
    finally:
        event.remove(engine, "before_cursor_execute", claim_first)
        worker_engine.dispose()
    assert claims and claims[0] is not None
    (job,) = jobs(sessions)
    assert job.state == JobState.RUNNING and job.lease_owner == "w"
    b = series_row(sessions, f"{STUDY}.2")
    assert report.jobs == [] and report.not_selected == [b.id]
    assert f"not selected: job {job.id} already running for series {STUDY}.1" in b.routing_note
    assert audit_rows(sessions, "job.superseded") == []
