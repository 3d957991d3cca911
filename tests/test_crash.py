"""Crashes: kill -9 of a worker mid-job and of the serve process mid-receive.

The node runs as real subprocesses (``python -m node.cli_serve``) on SQLite,
results go to a real Orthanc. After restarts every acknowledged instance is
present, every job reaches a terminal state, and Orthanc holds exactly one copy
of each result (deterministic SOP Instance UIDs: a re-run overwrites).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

import tests.support.threshold_pipeline as threshold
from dicom_sr.uids import output_uid
from node.db import TERMINAL_JOB_STATES, Instance, JobState, OutboxState
from node.queue import rerun
from tests.support.dcmtk import STORESCU, dcmtk_env, storescu
from tests.support.node_proc import (
    NodeProcess,
    all_jobs,
    all_outbox,
    sessions_for,
    wait_for,
    write_config,
)
from tests.support.orthanc import OrthancProcess
from tests.test_e2e_orthanc import ct_series

pytestmark = pytest.mark.orthanc


@pytest.fixture()
def pacs(tmp_path: Path) -> Iterator[OrthancProcess]:
    server = OrthancProcess(tmp_path / "orthanc")
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def procs() -> Iterator[list[NodeProcess]]:
    made: list[NodeProcess] = []
    yield made
    for p in made:
        p.kill()


def rules(pacs: OrthancProcess) -> dict[str, object]:
    return {
        "destinations": [
            {
                "name": "pacs",
                "kind": "dimse",
                "ae_title": pacs.aet,
                "host": "127.0.0.1",
                "port": pacs.dicom_port,
            }
        ],
        "rules": [
            {
                "name": "ct",
                "match": {"modality": "CT"},
                "pipeline": threshold.NAME,
                "destinations": ["pacs"],
            }
        ],
    }


def copies_in_pacs(pacs: OrthancProcess, series_uid: str) -> int:
    return len(
        pacs.find_instances(SOPInstanceUID=output_uid(series_uid, threshold.VERSION, "seg", "1"))
    )


def test_worker_killed_mid_job_is_taken_again_and_result_stored_once(
    tmp_path: Path, shared_data: Path, pacs: OrthancProcess, procs: list[NodeProcess]
) -> None:
    files, series_uid = ct_series(shared_data, tmp_path / "ct", "crash-worker")
    config = write_config(tmp_path / "node", rules=rules(pacs), lease_s=3.0)
    sessions = sessions_for(config)
    serve = NodeProcess(config, "serve", workers=0, name="serve")
    procs.append(serve.start())
    doomed = NodeProcess(
        config, "worker", workers=1, env={"HPB_TEST_PIPELINE_SLEEP": "60"}, name="worker1"
    )
    procs.append(doomed.start())
    assert storescu(serve.dicom_port, files).returncode == 0
    wait_for(
        lambda: any(
            j.state == JobState.RUNNING and f":{doomed.pid}:" in (j.lease_owner or "")
            for j in all_jobs(sessions)
        ),
        60,
        "worker 1 to run the job",
    )
    doomed.kill()
    rescuer = NodeProcess(config, "worker", workers=1, name="worker2")
    procs.append(rescuer.start())
    wait_for(
        lambda: (o := all_outbox(sessions)) and o[0].state == OutboxState.SENT,
        90,
        "the result delivered",
    )
    (job,) = all_jobs(sessions)
    assert job.state == JobState.SUCCEEDED and job.attempts == 2, (
        job.state,
        job.attempts,
        job.last_error,
    )
    assert copies_in_pacs(pacs, series_uid) == 1
    # an idempotent re-run (admin retry) replaces rather than duplicates the result
    with sessions.begin() as s:
        rerun(s, job.id, "test")
    wait_for(
        lambda: (
            all_jobs(sessions)[0].state == JobState.SUCCEEDED
            and all_outbox(sessions)[0].state == OutboxState.SENT
        ),
        60,
        "the re-run delivered",
    )
    assert len(all_outbox(sessions)) == 1
    assert copies_in_pacs(pacs, series_uid) == 1
    assert pacs.instance_count() == 1
    assert serve.terminate() == 0 and rescuer.terminate() == 0


def test_serve_killed_mid_receive_loses_no_acknowledged_instance(
    tmp_path: Path, shared_data: Path, pacs: OrthancProcess, procs: list[NodeProcess]
) -> None:
    files, series_uid = ct_series(shared_data, tmp_path / "ct", "crash-serve")
    config = write_config(tmp_path / "node", rules=rules(pacs), stable_after_s=3.0)
    sessions = sessions_for(config)
    serve = NodeProcess(config, "serve", name="serve1")
    procs.append(serve.start())

    def stored() -> int:
        with sessions() as s:
            return len(s.scalars(select(Instance.sop_instance_uid)).all())

    sender = subprocess.Popen(
        [
            STORESCU,
            "-v",
            "-aet",
            "PACS",
            "-aec",
            "HPBNODE",
            "-nh",
            "-R",
            "127.0.0.1",
            str(serve.dicom_port),
            *map(str, files * 4),  # re-sent copies are answered Success: a longer transfer
        ],
        env=dcmtk_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for(lambda: stored() >= 4, 60, "some instances received", interval=0.02)
    serve.kill()
    out, _ = sender.communicate(timeout=60)
    # which files storescu saw acknowledged before the crash
    acked: list[str] = []
    current = None
    for line in out.splitlines():
        if m := re.search(r"Sending file: (\S+)", line):
            current = m.group(1)
        elif "Received Store Response (Success)" in line and current:
            acked.append(current)
    assert 0 < len(acked) < 4 * len(files), out[-2000:]
    acked_uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in acked}
    serve2 = NodeProcess(config, "serve", name="serve2")
    procs.append(serve2.start())
    with sessions() as s:
        present = set(s.scalars(select(Instance.sop_instance_uid)))
    assert acked_uids <= present
    # the PACS sends the series again (as a real sender retries)
    assert storescu(serve2.dicom_port, files).returncode == 0
    wait_for(
        lambda: (
            (jobs := all_jobs(sessions))
            and all(j.state in TERMINAL_JOB_STATES for j in jobs)
            and any(j.result.get("slices") == len(files) for j in jobs)
            and all(o.state == OutboxState.SENT for o in all_outbox(sessions))
        ),
        120,
        "every job terminal and the full-series result delivered",
    )
    assert stored() == len(files)
    assert copies_in_pacs(pacs, series_uid) == 1
    assert pacs.instance_count() == 1
    assert serve2.terminate() == 0


def test_sigterm_returns_the_running_job_without_burning_an_attempt(
    tmp_path: Path, shared_data: Path, pacs: OrthancProcess, procs: list[NodeProcess]
) -> None:
    files, _ = ct_series(shared_data, tmp_path / "ct", "sigterm")
    config = write_config(tmp_path / "node", rules=rules(pacs), lease_s=30.0)
    sessions = sessions_for(config)
    serve = NodeProcess(
        config, "serve", workers=1, env={"HPB_TEST_PIPELINE_SLEEP": "120"}, name="serve"
    )
    procs.append(serve.start())
    assert storescu(serve.dicom_port, files).returncode == 0
    wait_for(
        lambda: any(j.state == JobState.RUNNING for j in all_jobs(sessions)), 60, "the job running"
    )
    assert serve.terminate(timeout=60) == 0
    (job,) = all_jobs(sessions)
    assert (job.state, job.attempts, job.lease_owner) == (JobState.QUEUED, 0, None)
    assert "stopped" in serve.log_tail() and "returned to the queue" in serve.log_tail()
