"""Two worker processes share 20 jobs on PostgreSQL (FOR UPDATE SKIP LOCKED): none lost, none twice."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from node import queue
from node.db import Instance, JobState, Series, Study, create_engine_for, session_factory
from node.migrate import upgrade
from tests.support.node_proc import NodeProcess, all_jobs, wait_for, write_config

pytestmark = pytest.mark.postgres


def test_two_worker_processes_share_twenty_jobs(tmp_path: Path, pg_url: str) -> None:
    upgrade(pg_url)
    engine = create_engine_for(pg_url)
    sessions = session_factory(engine)
    config = write_config(tmp_path / "node", rules={"rules": []}, database_url=pg_url, lease_s=10)
    spool = tmp_path / "node" / "spool"
    rel = Path("1.2.3") / "1.2.3.4" / "1.2.3.4.5.dcm"
    (spool / rel).parent.mkdir(parents=True)
    (spool / rel).write_bytes(b"not read by the count pipeline")
    counts = tmp_path / "runs.txt"
    env = {"HPB_TEST_COUNT_FILE": str(counts), "HPB_TEST_PIPELINE_SLEEP": "0.3"}
    workers = [NodeProcess(config, "worker", workers=2, env=env, name=f"w{i}") for i in range(2)]
    try:
        for w in workers:
            w.start()  # both listening before any job exists, so both get work
        with sessions.begin() as s:
            study = Study(study_instance_uid="1.2.3")
            s.add(study)
            s.flush()
            series = Series(
                series_instance_uid="1.2.3.4", study_id=study.id, modality="CT", instance_count=1
            )
            s.add(series)
            s.flush()
            s.add(
                Instance(
                    sop_instance_uid="1.2.3.4.5",
                    series_id=series.id,
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    path=str(rel),
                    size_bytes=1,
                )
            )
            for _ in range(20):
                queue.enqueue(
                    s, series_id=series.id, rule_name="r", pipeline="count-test", destinations=[]
                )
        wait_for(
            lambda: all(j.state == JobState.SUCCEEDED for j in all_jobs(sessions)),
            120,
            "all 20 jobs done",
        )
    finally:
        codes = [w.terminate() for w in workers]
        engine.dispose()
    assert codes == [0, 0]
    runs = [line.split() for line in counts.read_text().splitlines()]
    per_job = Counter(job for job, _ in runs)
    assert len(per_job) == 20 and set(per_job.values()) == {1}  # none lost, none twice
    pids = {pid for _, pid in runs}
    assert pids == {str(w.pid) for w in workers}  # both processes took work


@pytest.mark.orthanc
def test_serve_on_postgresql_end_to_end(tmp_path: Path, pg_url: str, shared_data: Path) -> None:
    """The whole node (SCP, sweep, routing, worker, outbox) on PostgreSQL, result in Orthanc."""
    from dicom_sr.uids import output_uid
    from node.serve import NodeService
    from tests.support.dcmtk import storescu
    from tests.support.node_proc import all_outbox
    from tests.support.orthanc import OrthancProcess
    from tests.test_e2e_orthanc import ct_series, node_settings

    files, series_uid = ct_series(shared_data, tmp_path / "ct", "pg-e2e")
    pacs = OrthancProcess(tmp_path / "orthanc")
    pacs.start()
    service = None
    try:
        settings = node_settings(tmp_path, pacs, ["pacs"])
        settings.database.url = pg_url
        service = NodeService(settings)
        service.start()
        assert service.sessions is not None
        sessions = service.sessions
        assert storescu(service.dicom_port, files).returncode == 0
        wait_for(
            lambda: (o := all_outbox(sessions)) and o[0].state.value == "sent", 120, "delivery"
        )
        (job,) = all_jobs(sessions)
        assert job.state == JobState.SUCCEEDED
        seg = output_uid(series_uid, "t1", "seg", "1")
        assert len(pacs.find_instances(SOPInstanceUID=seg)) == 1
    finally:
        if service is not None:
            service.stop(timeout=10)
            if service.sessions is not None:
                service.sessions.kw["bind"].dispose()
        pacs.stop()
