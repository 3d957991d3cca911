"""Export of every output kind (SEG, SR, PDF, SC, KOS) to a real DICOM peer (DCMTK storescp).

The objects are the product builders' (dicom_sr.build_all) on a CT slab from
../shared/data; the outbox rows are sent by node.export.send_dimse-backed
send_due, and storescp (bit-preserving) must receive each file with its own
SOP class and transfer syntax.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy.orm import Session, sessionmaker

from dicom_sr import OutputOptions, build_all
from dicom_sr.testing import findings_from_masks, sphere
from models.nifti import load_nifti_krc
from models.series_writer import SeriesInfo, write_series
from models.vocab import LesionKind, Organ
from node.db import (
    Destination,
    Job,
    JobState,
    OutboxItem,
    OutboxState,
    Series,
    Study,
    create_engine_for,
    session_factory,
)
from node.export import send_due
from node.migrate import upgrade
from node.settings import Settings
from node.spool import Spool
from node.worker import dataset_bytes, results_root
from tests.conftest import free_port
from tests.support.dcmtk import storescp

SLAB = slice(80, 92)


@pytest.fixture()
def setup(
    tmp_path: Path, shared_data: Path
) -> tuple[Settings, sessionmaker[Session], list[tuple[str, str, str]]]:
    d = shared_data / "ct_abdomen_3mm"
    ct, aff = load_nifti_krc(d / "ct.nii.gz")
    liver, _ = load_nifti_krc(d / "labels" / "liver.nii.gz")
    ct, liver = ct[SLAB].astype(np.int16), liver[SLAB] > 0
    aff = aff.copy()
    aff[:3, 3] += aff[:3, 0] * SLAB.start
    paths = write_series(ct, aff, tmp_path / "ct", info=SeriesInfo(), seed="export")
    sources = [dcmread(p) for p in paths]
    centre = np.argwhere(liver)[len(np.argwhere(liver)) // 2]
    lesion = sphere(ct.shape, centre, 2.5) & liver
    findings = findings_from_masks(
        {Organ.LIVER: liver},
        [(Organ.LIVER, LesionKind.MASS, lesion, None)],
        aff,
        [str(s.SOPInstanceUID) for s in sources],
        str(sources[0].SeriesInstanceUID),
        image=ct,
        pipeline_version="export-test",
    )
    objects = build_all(findings, sources, OutputOptions(pipeline_version="export-test"))
    settings = Settings.model_validate(
        {
            "spool": {"root": str(tmp_path / "spool")},
            "database": {"url": f"sqlite:///{tmp_path / 'n.db'}"},
            "export": {"max_attempts": 2, "backoff_s": 0},
        }
    )
    upgrade(settings.database.url)
    sessions = session_factory(create_engine_for(settings.database.url))
    results = Spool(results_root(settings))
    written = []
    with sessions.begin() as s:
        study = Study(study_instance_uid=str(sources[0].StudyInstanceUID))
        s.add(study)
        s.flush()
        series = Series(series_instance_uid=str(sources[0].SeriesInstanceUID), study_id=study.id)
        s.add(series)
        s.flush()
        job = Job(
            series_id=series.id,
            rule_name="r",
            pipeline="p",
            state=JobState.SUCCEEDED,
            outcome="n objects",
        )
        s.add(job)
        s.flush()
        for kind, ds in objects:
            rel = f"x/{ds.SOPInstanceUID}.dcm"
            results.write_atomic(rel, [dataset_bytes(ds)])
            written.append((kind, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
            s.add(
                OutboxItem(
                    job_id=job.id,
                    destination="peer",
                    kind=kind,
                    sop_class_uid=str(ds.SOPClassUID),
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    path=rel,
                    max_attempts=2,
                )
            )
    return settings, sessions, written


def test_every_output_kind_reaches_a_dcmtk_peer_with_its_own_context(
    tmp_path: Path, setup: tuple[Settings, sessionmaker[Session], list[tuple[str, str, str]]]
) -> None:
    settings, sessions, written = setup
    kinds = {k for k, _, _ in written}
    assert {"seg", "sr", "pdf", "sc", "ko"} <= kinds
    port = free_port()
    with sessions.begin() as s:
        s.add(
            Destination(name="peer", kind="dimse", ae_title="STORESCP", host="127.0.0.1", port=port)
        )
    with storescp(port, tmp_path / "received") as peer:
        report = send_due(sessions, settings)
    if peer.stderr is not None:  # the helper leaves its stderr pipe open
        peer.stderr.close()
    assert len(report.sent) == len(written) and not report.failed
    received = {}
    for p in (tmp_path / "received").iterdir():
        ds = dcmread(p, stop_before_pixels=True)
        received[str(ds.SOPClassUID)] = str(ds.file_meta.TransferSyntaxUID)
    for _kind, sop_class, syntax in written:
        assert received[sop_class] == syntax
    with sessions() as s:
        job = s.get(Job, 1)
        assert job is not None and job.outcome == "n objects; sent to peer"


def test_unreachable_peer_ends_failed_with_the_reason(
    setup: tuple[Settings, sessionmaker[Session], list[tuple[str, str, str]]],
) -> None:
    settings, sessions, written = setup
    port = free_port()  # nobody listens here
    with sessions.begin() as s:
        s.add(Destination(name="peer", kind="dimse", ae_title="PACS", host="127.0.0.1", port=port))
    first = send_due(sessions, settings)
    assert len(first.retried) == len(written)
    second = send_due(sessions, settings)
    assert len(second.failed) == len(written)
    assert send_due(sessions, settings).sent == []  # nothing left to try
    with sessions() as s:
        item = s.get(OutboxItem, 1)
        job = s.get(Job, 1)
        assert item is not None and job is not None
        assert item.state == OutboxState.FAILED
        assert item.last_error.startswith(
            f"gave up after 2 attempt(s): cannot connect to PACS at 127.0.0.1:{port}"
        )
        assert job.state == JobState.FAILED
        assert job.last_error.startswith(f"delivery of {len(written)} object(s) to peer failed")


def test_the_demo_archive_accepts_every_output_kind(
    tmp_path: Path, setup: tuple[Settings, sessionmaker[Session], list[tuple[str, str, str]]]
) -> None:
    from node.demo import start_folder_archive

    settings, sessions, written = setup
    archive = start_folder_archive(tmp_path / "archive")
    try:
        with sessions.begin() as s:
            s.add(
                Destination(
                    name="peer",
                    kind="dimse",
                    ae_title=archive.ae_title,
                    host="127.0.0.1",
                    port=archive.port,
                )
            )
        report = send_due(sessions, settings)
    finally:
        archive.stop()
    assert len(report.sent) == len(written)
    with sessions() as s:
        uids = [i.sop_instance_uid for i in s.query(OutboxItem)]
    assert all(archive.holds(uid) for uid in uids)
