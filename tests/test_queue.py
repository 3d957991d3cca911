"""The durable job queue on SQLite: leases, heartbeats, lost workers, retries, release."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from node import queue
from node.db import Job, JobState, Series, Study, create_engine_for, session_factory, utcnow
from node.errors import QueueError
from node.migrate import upgrade


@pytest.fixture()
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    upgrade(url)
    return session_factory(create_engine_for(url))


def add_jobs(sessions: sessionmaker[Session], n: int, max_attempts: int = 3) -> list[int]:
    with sessions.begin() as s:
        study = Study(study_instance_uid="1.2.3")
        s.add(study)
        s.flush()
        series = Series(series_instance_uid="1.2.3.4", study_id=study.id)
        s.add(series)
        s.flush()
        return [
            queue.enqueue(
                s,
                series_id=series.id,
                rule_name="r",
                pipeline="p",
                destinations=[],
                max_attempts=max_attempts,
            ).id
            for _ in range(n)
        ]


def state(sessions: sessionmaker[Session], job_id: int) -> Job:
    with sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def test_claim_succeed_and_no_double_claim(sessions: sessionmaker[Session]) -> None:
    ids = add_jobs(sessions, 2)
    a = queue.claim(sessions, "w1", 60)
    b = queue.claim(sessions, "w2", 60)
    assert a is not None and b is not None
    assert {a.job_id, b.job_id} == set(ids)
    assert queue.claim(sessions, "w3", 60) is None
    with sessions.begin() as s:
        queue.succeed(s, a, "done", {"k": 1})
    job = state(sessions, a.job_id)
    assert (job.state, job.outcome, job.attempts, job.lease_owner) == (
        JobState.SUCCEEDED,
        "done",
        1,
        None,
    )


def test_concurrent_claims_take_each_job_once(sessions: sessionmaker[Session]) -> None:
    add_jobs(sessions, 30)
    taken: list[int] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        while (c := queue.claim(sessions, name, 60)) is not None:
            with lock:
                taken.append(c.job_id)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == sorted(set(taken)) and len(taken) == 30


def test_expired_lease_is_taken_again_and_old_owner_is_locked_out(
    sessions: sessionmaker[Session],
) -> None:
    (job_id,) = add_jobs(sessions, 1)
    first = queue.claim(sessions, "dead", 60)
    assert first is not None
    assert queue.claim(sessions, "w2", 60) is None  # lease still valid
    later = utcnow() + timedelta(seconds=61)
    second = queue.claim(sessions, "w2", 60, now=later)
    assert second is not None and second.job_id == job_id and second.attempt == 2
    with pytest.raises(QueueError, match="lease lost"):
        queue.heartbeat(sessions, first, 60)
    with pytest.raises(QueueError, match="lease lost"), sessions.begin() as s:
        queue.succeed(s, first, "stale result")
    queue.heartbeat(sessions, second, 60)


def test_worker_lost_on_last_attempt_is_dead_lettered(sessions: sessionmaker[Session]) -> None:
    (job_id,) = add_jobs(sessions, 1, max_attempts=1)
    assert queue.claim(sessions, "dead", 10) is not None
    assert queue.claim(sessions, "w2", 10, now=utcnow() + timedelta(seconds=11)) is None
    job = state(sessions, job_id)
    assert job.state == JobState.FAILED
    assert "stopped responding 1 time(s)" in job.last_error


def test_retry_with_backoff_then_failed_with_reason(sessions: sessionmaker[Session]) -> None:
    (job_id,) = add_jobs(sessions, 1, max_attempts=2)
    c = queue.claim(sessions, "w", 60)
    assert c is not None
    assert queue.fail(sessions, c, "disk full", retryable=True, backoff_s=30) == JobState.QUEUED
    job = state(sessions, job_id)
    assert job.not_before > utcnow() + timedelta(seconds=25)
    assert queue.claim(sessions, "w", 60) is None  # not yet due
    c = queue.claim(sessions, "w", 60, now=utcnow() + timedelta(seconds=31))
    assert c is not None and c.attempt == 2
    assert queue.fail(sessions, c, "disk full", retryable=True, backoff_s=30) == JobState.FAILED
    job = state(sessions, job_id)
    assert job.last_error == "failed 2 time(s), giving up; last error: disk full"
    assert queue.claim(sessions, "w", 60, now=utcnow() + timedelta(days=1)) is None


def test_permanent_error_fails_at_once(sessions: sessionmaker[Session]) -> None:
    (job_id,) = add_jobs(sessions, 1)
    c = queue.claim(sessions, "w", 60)
    assert c is not None
    assert (
        queue.fail(sessions, c, "model bundle not found at /x", retryable=False, backoff_s=1)
        == JobState.FAILED
    )
    assert state(sessions, job_id).last_error == "model bundle not found at /x"


def test_release_returns_the_job_without_burning_an_attempt(
    sessions: sessionmaker[Session],
) -> None:
    (job_id,) = add_jobs(sessions, 1)
    c = queue.claim(sessions, "w", 60)
    assert c is not None
    assert queue.release(sessions, c)
    job = state(sessions, job_id)
    assert (job.state, job.attempts, job.lease_owner) == (JobState.QUEUED, 0, None)
    again = queue.claim(sessions, "w2", 60)
    assert again is not None and again.attempt == 1
