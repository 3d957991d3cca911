"""End to end with real peers: DCMTK storescu → node → threshold pipeline → Orthanc.

The node runs in-process (NodeService: SCP, HTTP, scheduler, one worker) on a
temporary SQLite database; Orthanc is Debian's binary (tests/support/pacs.py).
The CT series is written from ../shared/data/ct_abdomen_3mm. The threshold
pipeline (tests/support/threshold_pipeline.py) stands in for the model where the
test is about transport; one test runs the product pipeline with the shipped bundle.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from pydicom import dcmread
from sqlalchemy.orm import Session, sessionmaker

import tests.support.threshold_pipeline as threshold
from dicom_sr.uids import output_uid
from models.nifti import load_nifti_krc
from models.series_writer import SeriesInfo, write_series
from node.db import JobState, OutboxState
from node.serve import NodeService
from node.settings import Settings
from tests.conftest import free_port
from tests.support.dcmtk import storescu
from tests.support.node_proc import all_jobs, all_outbox, wait_for
from tests.support.orthanc import OrthancProcess

pytestmark = pytest.mark.orthanc

SLICES = slice(76, 100)  # 24 slices through the liver


def ct_series(shared: Path, out: Path, seed: str) -> tuple[list[Path], str]:
    array, affine = load_nifti_krc(shared / "ct_abdomen_3mm" / "ct.nii.gz")
    sub = array[SLICES].astype(np.int16)
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, 3] + affine[:3, 0] * SLICES.start
    info = SeriesInfo(series_description="PORTAL VENOUS 3mm", body_part="ABDOMEN")
    paths = write_series(sub, shifted, out, info=info, seed=seed)
    return paths, str(dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)


@pytest.fixture(scope="module")
def series_a(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], str]:
    return ct_series(shared_data, tmp_path_factory.mktemp("ct_a"), "e2e-a")


@pytest.fixture(scope="module")
def series_b(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], str]:
    return ct_series(shared_data, tmp_path_factory.mktemp("ct_b"), "e2e-b")


def node_settings(
    tmp: Path, pacs: OrthancProcess, destinations: list[str], **export: Any
) -> Settings:
    rules = {
        "destinations": [
            {
                "name": "pacs",
                "kind": "dimse",
                "ae_title": pacs.aet,
                "host": "127.0.0.1",
                "port": pacs.dicom_port,
            },
            {"name": "pacs-web", "kind": "dicomweb", "url": pacs.dicomweb_url},
        ],
        "rules": [
            {
                "name": "ct-threshold",
                "match": {"modality": "CT", "series_description": "(?i)portal"},
                "pipeline": threshold.NAME,
                "destinations": destinations,
            }
        ],
    }
    (tmp / "rules.yaml").write_text(yaml.safe_dump(rules))
    return Settings.model_validate(
        {
            "rules_file": str(tmp / "rules.yaml"),
            "ingest": {"ae_title": "HPBNODE", "port": free_port()},
            "http": {"port": free_port()},
            "spool": {"root": str(tmp / "spool"), "min_free_mb": 0},
            "database": {"url": f"sqlite:///{tmp / 'node.db'}"},
            "scheduler": {"stable_after_s": 1.0, "sweep_interval_s": 0.3},
            "workers": {"count": 1, "lease_s": 30, "heartbeat_s": 2, "backoff_s": 0.2},
            "export": {"max_attempts": 3, "backoff_s": 0.3, **export},
        }
    )


@pytest.fixture()
def pacs(tmp_path: Path) -> Iterator[OrthancProcess]:
    server = OrthancProcess(tmp_path / "orthanc")
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def running(tmp_path: Path) -> Iterator[list[NodeService]]:
    started: list[NodeService] = []
    yield started
    for service in started:
        service.stop(timeout=10)


def start_node(settings: Settings, running: list[NodeService]) -> NodeService:
    service = NodeService(settings)
    service.start()
    running.append(service)
    return service


def delivered(sessions: sessionmaker[Session], n: int = 1) -> bool:
    items = all_outbox(sessions)
    return len(items) >= n and all(i.state == OutboxState.SENT for i in items)


def test_storescu_to_node_to_orthanc(
    tmp_path: Path,
    pacs: OrthancProcess,
    series_a: tuple[list[Path], str],
    running: list[NodeService],
) -> None:
    files, series_uid = series_a
    node = start_node(node_settings(tmp_path, pacs, ["pacs"]), running)
    health = httpx.get(f"http://127.0.0.1:{node.http_port}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert httpx.get(f"http://127.0.0.1:{node.http_port}/api/health", timeout=10).status_code == 200
    done = storescu(node.dicom_port, files)
    assert done.returncode == 0, done.stderr
    assert node.sessions is not None
    wait_for(lambda: delivered(node.sessions), 120, "the SEG delivered to Orthanc")
    (job,) = all_jobs(node.sessions)
    assert job.state == JobState.SUCCEEDED, job.last_error
    assert job.outcome == "1 object (seg); sent to pacs"
    seg_uid = output_uid(series_uid, threshold.VERSION, "seg", "1")
    found = pacs.find_instances(SOPInstanceUID=seg_uid)
    assert len(found) == 1
    # read it back through DICOMweb (WADO-RS metadata) and check what it references
    meta = httpx.get(
        f"{pacs.dicomweb_url}/instances", params={"SOPInstanceUID": seg_uid}, timeout=30
    ).json()
    assert meta[0]["00080060"]["Value"] == ["SEG"]
    raw = httpx.get(f"{pacs.url}/instances/{found[0]['ID']}/file", timeout=30).content
    seg = dcmread(io.BytesIO(raw))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert seg.SegmentSequence[0].SegmentLabel == "HU above 100 (test)"
    assert int(seg.NumberOfFrames) >= 1
    # the source series was not sent anywhere: only the SEG is in Orthanc
    assert pacs.instance_count() == 1


def test_orthanc_forwards_to_node_and_result_returns_by_stow(
    tmp_path: Path,
    pacs: OrthancProcess,
    series_b: tuple[list[Path], str],
    running: list[NodeService],
) -> None:
    files, series_uid = series_b
    node = start_node(node_settings(tmp_path, pacs, ["pacs-web"]), running)
    assert node.sessions is not None
    pacs.add_modality("hpbnode", "HPBNODE", "127.0.0.1", node.dicom_port)
    ids = [pacs.upload(p)["ParentSeries"] for p in files]
    answer = pacs.store_to_modality("hpbnode", [ids[0]])
    assert answer is None or answer.get("FailedInstancesCount", 0) == 0
    wait_for(lambda: delivered(node.sessions), 120, "the SEG delivered by STOW-RS")
    (job,) = all_jobs(node.sessions)
    assert job.state == JobState.SUCCEEDED and job.outcome.endswith("sent to pacs-web")
    with node.sessions() as s:
        from node.db import Instance

        assert s.query(Instance).count() == len(files)
    seg_uid = output_uid(series_uid, threshold.VERSION, "seg", "1")
    assert len(pacs.find_instances(SOPInstanceUID=seg_uid)) == 1
    assert pacs.instance_count() == len(files) + 1


def test_pacs_outage_waits_then_delivers_and_finally_fails_clearly(
    tmp_path: Path,
    pacs: OrthancProcess,
    series_a: tuple[list[Path], str],
    series_b: tuple[list[Path], str],
    running: list[NodeService],
) -> None:
    node = start_node(
        node_settings(tmp_path, pacs, ["pacs"], max_attempts=4, backoff_s=1.0), running
    )
    assert node.sessions is not None
    sessions = node.sessions
    # 1. Orthanc down while the result is ready: it waits, then goes out when Orthanc returns
    pacs.stop()
    assert storescu(node.dicom_port, series_a[0]).returncode == 0
    wait_for(
        lambda: any(
            i.attempts >= 1 and i.state == OutboxState.PENDING for i in all_outbox(sessions)
        ),
        120,
        "a failed first delivery attempt",
    )
    (item,) = all_outbox(sessions)
    assert "cannot connect to ORTHANC at 127.0.0.1" in item.last_error
    pacs.start()
    wait_for(lambda: delivered(sessions), 60, "delivery after Orthanc returned")
    seg_a = output_uid(series_a[1], threshold.VERSION, "seg", "1")
    assert len(pacs.find_instances(SOPInstanceUID=seg_a)) == 1
    # 2. Orthanc gone for good: bounded retries, then the job fails with the reason
    pacs.stop()
    assert storescu(node.dicom_port, series_b[0]).returncode == 0
    wait_for(
        lambda: len(all_jobs(sessions)) == 2 and all_jobs(sessions)[1].state == JobState.FAILED,
        120,
        "the second job to fail after the retry limit",
    )
    job = all_jobs(sessions)[1]
    assert job.last_error.startswith(
        "delivery of 1 object(s) to pacs failed: gave up after 4 attempt(s):"
    )
    assert "cannot connect to ORTHANC" in job.last_error
    item = all_outbox(sessions)[1]
    attempts = item.attempts
    assert (item.state, attempts) == (OutboxState.FAILED, 4)
    time.sleep(3)  # nothing loops: no further attempt is made
    assert all_outbox(sessions)[1].attempts == attempts


def test_product_pipeline_on_real_ct_results_in_orthanc(
    tmp_path: Path,
    pacs: OrthancProcess,
    series_a: tuple[list[Path], str],
    running: list[NodeService],
) -> None:
    """storescu → node → hpb-ct-mr (shipped bundle) → SEG, SR, PDF, ... in Orthanc, each once."""
    files, series_uid = series_a
    settings = node_settings(tmp_path, pacs, ["pacs"])
    rules = yaml.safe_load((tmp_path / "rules.yaml").read_text())
    rules["rules"][0]["pipeline"] = "hpb-ct-mr"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    node = start_node(settings, running)
    assert node.sessions is not None
    sessions = node.sessions
    assert storescu(node.dicom_port, files).returncode == 0
    wait_for(
        lambda: (
            (jobs := all_jobs(sessions))
            and jobs[0].state in (JobState.SUCCEEDED, JobState.FAILED)
            and all(o.state == OutboxState.SENT for o in all_outbox(sessions))
        ),
        240,
        "the product pipeline's results delivered",
    )
    (job,) = all_jobs(sessions)
    assert job.state == JobState.SUCCEEDED, job.last_error
    objects = job.result["objects"]
    kinds = [o["kind"] for o in objects]
    assert kinds[:2] == ["seg", "sr"] and "pdf" in kinds
    modality = {"seg": "SEG", "sr": "SR", "pdf": "DOC", "sc": "OT", "ko": "KO"}
    for o in objects:
        assert len(pacs.find_instances(SOPInstanceUID=o["sop_instance_uid"])) == 1
        meta = httpx.get(
            f"{pacs.dicomweb_url}/instances",
            params={"SOPInstanceUID": o["sop_instance_uid"]},
            timeout=30,
        ).json()
        assert meta[0]["00080060"]["Value"] == [modality[o["kind"]]]
    assert pacs.instance_count() == len(objects)
    assert "liver" in job.result["organs"]
    assert job.outcome.endswith("sent to pacs")
    assert series_uid  # the source series itself never leaves the node
