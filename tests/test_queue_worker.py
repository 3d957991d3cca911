"""The worker around the queue: permanent vs transient errors, outbox rows, superseded generations."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node import pipelines, queue
from node.db import (
    Instance,
    Job,
    JobState,
    OutboxItem,
    Series,
    Study,
    create_engine_for,
    session_factory,
    utcnow,
)
from node.errors import PipelineError
from node.migrate import upgrade
from node.settings import Settings
from node.worker import run_one

REL = Path("1.2.3") / "1.2.3.4" / "1.2.3.4.5.dcm"


@pytest.fixture()
def env(tmp_path: Path) -> tuple[Settings, sessionmaker[Session]]:
    settings = Settings.model_validate(
        {
            "spool": {"root": str(tmp_path / "spool")},
            "database": {"url": f"sqlite:///{tmp_path / 'n.db'}"},
            "workers": {"backoff_s": 10, "max_attempts": 2},
            "model": {"bundle": str(tmp_path / "no-such-bundle")},
        }
    )
    upgrade(settings.database.url)
    sessions = session_factory(create_engine_for(settings.database.url))
    (tmp_path / "spool" / REL).parent.mkdir(parents=True)
    (tmp_path / "spool" / REL).write_bytes(b"placeholder")
    with sessions.begin() as s:
        study = Study(study_instance_uid="1.2.3")
        s.add(study)
        s.flush()
        series = Series(series_instance_uid="1.2.3.4", study_id=study.id, modality="CT")
        s.add(series)
        s.flush()
        s.add(
            Instance(
                sop_instance_uid="1.2.3.4.5",
                series_id=series.id,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                path=str(REL),
                size_bytes=1,
            )
        )
    return settings, sessions


def enqueue(
    sessions: sessionmaker[Session], pipeline: str, destinations: list[str] | None = None
) -> int:
    with sessions.begin() as s:
        return queue.enqueue(
            s,
            series_id=1,
            rule_name="r",
            pipeline=pipeline,
            destinations=destinations or [],
            max_attempts=2,
        ).id


def job(sessions: sessionmaker[Session], job_id: int) -> Job:
    with sessions() as s:
        row = s.get(Job, job_id)
        assert row is not None
        return row


def run_next(settings: Settings, sessions: sessionmaker[Session], later_s: float = 0) -> str:
    claim = queue.claim(sessions, "w", 60, now=utcnow() + timedelta(seconds=later_s))
    assert claim is not None
    return run_one(sessions, settings, claim)


def test_missing_model_bundle_fails_at_once_with_its_path(
    env: tuple[Settings, sessionmaker[Session]],
) -> None:
    settings, sessions = env
    job_id = enqueue(sessions, "hpb-ct-mr")
    assert run_next(settings, sessions) == "failed"
    row = job(sessions, job_id)
    assert row.attempts == 1
    assert row.last_error.startswith("model bundle not found at ")
    assert "no-such-bundle" in row.last_error


def test_unknown_pipeline_is_a_clear_permanent_error(
    env: tuple[Settings, sessionmaker[Session]],
) -> None:
    settings, sessions = env
    job_id = enqueue(sessions, "nope")
    assert run_next(settings, sessions) == "failed"
    assert job(sessions, job_id).last_error.startswith("unknown pipeline 'nope' (registered: ")


def test_transient_errors_are_retried_then_dead_lettered(
    env: tuple[Settings, sessionmaker[Session]],
) -> None:
    settings, sessions = env
    calls: list[int] = []

    def flaky(ctx: pipelines.JobContext) -> pipelines.PipelineResult:
        calls.append(ctx.attempt)
        raise OSError("No space left on device")

    pipelines.register("flaky-test", "f1", flaky)
    try:
        job_id = enqueue(sessions, "flaky-test")
        assert run_next(settings, sessions) == "queued"
        assert queue.claim(sessions, "w", 60) is None  # backing off
        assert run_next(settings, sessions, later_s=11) == "failed"
    finally:
        pipelines.unregister("flaky-test")
    assert calls == [1, 2]
    row = job(sessions, job_id)
    assert (
        row.last_error
        == "failed 2 time(s), giving up; last error: OSError: No space left on device"
    )


def test_results_become_outbox_rows_and_a_rerun_replaces_them(
    env: tuple[Settings, sessionmaker[Session]],
) -> None:
    settings, sessions = env

    def one_object(ctx: pipelines.JobContext) -> pipelines.PipelineResult:
        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.1451.2.42"
        ds.Modality = "OT"
        return pipelines.PipelineResult([("sc", ds)], "1 object (sc)")

    pipelines.register("one-test", "o1", one_object)
    try:
        job_id = enqueue(sessions, "one-test", ["a", "b"])
        assert run_next(settings, sessions) == "succeeded"
        assert job(sessions, job_id).outcome == "1 object (sc); delivery to a, b pending"
        with sessions.begin() as s:
            queue.rerun(s, job_id, "test")
        assert run_next(settings, sessions) == "succeeded"
    finally:
        pipelines.unregister("one-test")
    with sessions() as s:
        rows = s.scalars(select(OutboxItem).order_by(OutboxItem.destination)).all()
        assert [(r.destination, r.sop_instance_uid) for r in rows] == [
            ("a", "1.2.826.0.1.3680043.10.1451.2.42"),
            ("b", "1.2.826.0.1.3680043.10.1451.2.42"),
        ]


def test_results_of_a_superseded_generation_are_not_sent(
    env: tuple[Settings, sessionmaker[Session]],
) -> None:
    settings, sessions = env

    def reopen_meanwhile(ctx: pipelines.JobContext) -> pipelines.PipelineResult:
        with sessions.begin() as s:
            series = s.scalars(select(Series)).one()
            series.generation += 1  # late instances arrived while this ran
        raise_if = ctx.generation != 1
        if raise_if:
            raise PipelineError("unexpected generation")
        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.1451.2.43"
        return pipelines.PipelineResult([("sc", ds)], "1 object (sc)")

    pipelines.register("reopen-test", "r1", reopen_meanwhile)
    try:
        job_id = enqueue(sessions, "reopen-test", ["a"])
        assert run_next(settings, sessions) == "succeeded"
    finally:
        pipelines.unregister("reopen-test")
    assert "superseded by generation 2 of the series, not sent" in job(sessions, job_id).outcome
    with sessions() as s:
        assert s.scalars(select(OutboxItem)).all() == []
    assert job(sessions, job_id).state == JobState.SUCCEEDED
