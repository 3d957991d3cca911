"""Storage SCP: real peers (DCMTK storescu/echoscu, pynetdicom SCU) against the node's SCP."""

from __future__ import annotations

import logging
import socket
import threading
import warnings
from dataclasses import replace
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    EnhancedCTImageStorage,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    Verification,
)
from sqlalchemy import select

from node.db import Instance, Series, SeriesState, Study, create_engine_for, session_factory
from node.ingest import ACCEPTED_TRANSFER_SYNTAXES, handle_store, received_part10
from node.migrate import upgrade
from node.registry import InstanceHeader, Recorded, body_offset, find_stored, record_instance
from tests.support.dcmtk import echoscu, storescu
from tests.support.ingest_node import ct_series, running_node


def _body(path: Path) -> bytes:
    data = path.read_bytes()
    offset = body_offset(data)
    assert offset is not None
    return data[offset:]


def _spooled(node_root: Path, path: Path) -> Path:
    ds = dcmread(path, stop_before_pixels=True)
    return node_root / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"


def test_echo_and_uncompressed_ct_and_mr_series_with_storescu(tmp_path: Path) -> None:
    files = ct_series(tmp_path / "in", n=4)
    mr = ct_series(tmp_path / "mr", n=2, modality="MR", seed="mr")
    with running_node(tmp_path) as node:
        assert echoscu(node.port).returncode == 0
        result = storescu(node.port, [*files, *mr])
        assert result.returncode == 0, result.stderr
        assert node.instance_count() == 6
        assert node.rejections() == []
        for f in [*files, *mr]:
            spooled = _spooled(node.spool_root, f)
            assert _body(spooled) == _body(f)
        with node.sessions() as s:
            modalities = {x.modality: x.instance_count for x in s.scalars(select(Series))}
            assert modalities == {"CT": 4, "MR": 2}
            series = s.scalars(select(Series).where(Series.modality == "CT")).one()
            assert series.instance_count == 4
            assert series.state == SeriesState.RECEIVING
            assert (series.rows, series.columns) == (16, 16)
            assert series.modality == "CT" and series.calling_ae == "STORESCU"
            assert series.ingest_issues == ""
            paths = sorted(s.scalars(select(Instance.path)))
        assert all(p.count("/") == 2 and p.endswith(".dcm") for p in paths)


@pytest.mark.parametrize(
    ("transfer_syntax", "flag"),
    [(JPEG2000Lossless, "-xv"), (JPEGLSLossless, "-xt"), (RLELossless, "-xr")],
    ids=["jpeg2000", "jpegls", "rle"],
)
def test_compressed_series_received_as_sent_and_decoded(
    tmp_path: Path, transfer_syntax: str, flag: str
) -> None:
    """Acceptance: a JPEG 2000 and a JPEG-LS / RLE series are received and load correctly."""
    plain = ct_series(tmp_path / "plain", n=3, size=64, seed=f"cx-{flag}")
    files = ct_series(
        tmp_path / "cx", n=3, size=64, seed=f"cx-{flag}", transfer_syntax=transfer_syntax
    )
    with running_node(tmp_path) as node:
        result = storescu(node.port, files, args=("-R", flag))
        assert result.returncode == 0, result.stderr
        assert node.rejections() == []
        for original, sent in zip(plain, files, strict=True):
            spooled = _spooled(node.spool_root, sent)
            assert _body(spooled) == _body(sent)  # stored as received, not transcoded
            ds = dcmread(spooled)
            assert ds.file_meta.TransferSyntaxUID == transfer_syntax
            np.testing.assert_array_equal(ds.pixel_array, dcmread(original).pixel_array)
        with node.sessions() as s:
            syntaxes = set(s.scalars(select(Instance.transfer_syntax_uid)))
        assert syntaxes == {transfer_syntax}


def test_deflated_transfer_syntax_with_storescu(tmp_path: Path) -> None:
    files = ct_series(tmp_path / "in", n=2, seed="deflate")
    with running_node(tmp_path) as node:
        result = storescu(node.port, files, args=("-R", "-xd"))
        assert result.returncode == 0, result.stderr
        for f in files:
            ds = dcmread(_spooled(node.spool_root, f))
            assert ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
            np.testing.assert_array_equal(ds.pixel_array, dcmread(f).pixel_array)


def _us_dataset(frames: int, transfer_syntax: str) -> Dataset:
    """An 8-bit ultrasound image (single or multi-frame), JPEG baseline or RLE encoded."""
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 255, size=(frames, 32, 48), dtype=np.uint8)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_class = UltrasoundMultiFrameImageStorage if frames > 1 else UltrasoundImageStorage
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "US"
    ds.PatientID = "US-1"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = 32, 48
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
        ds.FrameIncrementPointer = (0x0018, 0x1063)
        ds.FrameTime = 33.0
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if transfer_syntax == JPEGBaseline8Bit:
        frames_jpeg = []
        for frame in pixels:
            buf = BytesIO()
            Image.fromarray(frame).save(buf, format="JPEG", quality=90)
            frames_jpeg.append(buf.getvalue())
        ds.PixelData = encapsulate(frames_jpeg)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.LossyImageCompression = "01"
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = pixels.tobytes() if frames > 1 else pixels[0].tobytes()
        ds.compress(transfer_syntax)
    return ds


def _pynetdicom_send(port: int, datasets: list[Dataset], ae_title: str = "PYSCU") -> list[int]:
    ae = AE(ae_title=ae_title)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="HPBNODE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def test_ultrasound_single_and_multiframe_jpeg_baseline_and_rle(tmp_path: Path) -> None:
    datasets = [
        _us_dataset(1, JPEGBaseline8Bit),
        _us_dataset(4, JPEGBaseline8Bit),
        _us_dataset(3, RLELossless),
    ]
    with running_node(tmp_path) as node:
        assert _pynetdicom_send(node.port, datasets) == [0, 0, 0]
        with node.sessions() as s:
            rows = {i.sop_instance_uid: i for i in s.scalars(select(Instance))}
        for ds in datasets:
            stored = dcmread(node.spool_root / rows[ds.SOPInstanceUID].path)
            assert stored.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
            assert stored.PixelData == ds.PixelData
            frames = int(ds.get("NumberOfFrames", 1))
            assert stored.pixel_array.shape[0 if frames > 1 else 1] == (
                frames if frames > 1 else 48
            )


def test_enhanced_ct_and_all_transfer_syntaxes_negotiated(tmp_path: Path) -> None:
    ds = dcmread(ct_series(tmp_path / "in", n=1, seed="enh")[0])
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.NumberOfFrames = 1
    with running_node(tmp_path) as node:
        ae = AE(ae_title="PYSCU")
        for ts in ACCEPTED_TRANSFER_SYNTAXES:
            ae.add_requested_context(CTImageStorage, ts)
        ae.add_requested_context(EnhancedCTImageStorage, ExplicitVRLittleEndian)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="HPBNODE")
        try:
            accepted = {
                (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in assoc.accepted_contexts
            }
            assert {(str(CTImageStorage), ts) for ts in ACCEPTED_TRANSFER_SYNTAXES} <= accepted
            assert int(assoc.send_c_echo().Status) == 0
            assert int(assoc.send_c_store(ds).Status) == 0
        finally:
            assoc.release()
        with node.sessions() as s:
            assert s.scalars(select(Instance.sop_class_uid)).one() == EnhancedCTImageStorage


def test_late_instance_reopens_complete_series(tmp_path: Path) -> None:
    files = ct_series(tmp_path / "in", n=3, seed="late")
    with running_node(tmp_path) as node:
        assert storescu(node.port, files[:2]).returncode == 0
        with node.sessions.begin() as s:
            series = s.scalars(select(Series)).one()
            series.state = SeriesState.COMPLETE
            first_seen = series.last_received_at
        assert storescu(node.port, files[2:]).returncode == 0
        with node.sessions() as s:
            series = s.scalars(select(Series)).one()
            assert series.state == SeriesState.RECEIVING
            assert series.generation == 2
            assert series.instance_count == 3
            assert series.last_received_at >= first_seen


def test_stop_lets_association_in_flight_finish(tmp_path: Path) -> None:
    datasets = [dcmread(f) for f in ct_series(tmp_path / "in", n=4, seed="stop")]
    with running_node(tmp_path) as node:
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="HPBNODE")
        assert assoc.is_established
        assert int(assoc.send_c_store(datasets[0]).Status) == 0
        stopper = threading.Thread(target=node.scp.stop, kwargs={"timeout": 20})
        stopper.start()
        statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets[1:]]
        assoc.release()
        stopper.join(timeout=30)
        assert not stopper.is_alive()
        assert statuses == [0, 0, 0]
        assert node.instance_count() == 4
        with pytest.raises(ConnectionRefusedError):  # no longer listening
            socket.create_connection(("127.0.0.1", node.port), timeout=5).close()


def test_reconcile_records_orphan_files_after_crash(tmp_path: Path) -> None:
    files = ct_series(tmp_path / "in", n=2, seed="orphan")
    with running_node(tmp_path, start=False) as node:
        store = node.store
        for f in files:  # a crash after the fsync, before the commit, leaves these
            ds = dcmread(f, stop_before_pixels=True)
            rel = store.spool.relpath(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            store.spool.write_atomic(rel, [f.read_bytes()])
        (node.spool_root / rel.parent / ".tmp-deadbeef").write_bytes(b"partial")
        assert node.instance_count() == 0
        assert store.reconcile() == 2
        assert node.instance_count() == 2
        assert not (node.spool_root / rel.parent / ".tmp-deadbeef").exists()
        assert store.reconcile() == 0


def test_logs_carry_no_patient_identifiers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = ct_series(tmp_path / "in", n=3, seed="logs")
    bad = dcmread(files[1])
    del bad.PixelData  # an image without pixel data: refused and logged
    bad.save_as(tmp_path / "bad.dcm")
    odd = dcmread(files[2])
    with warnings.catch_warnings():  # an ID pydicom would quote in a validation warning
        warnings.simplefilter("ignore")
        odd.PatientID = "SECRET-ID-" + "7" * 70
        odd.save_as(tmp_path / "odd.dcm")
    caplog.set_level(logging.DEBUG)
    with running_node(tmp_path) as node:
        sent = [files[0], tmp_path / "bad.dcm", tmp_path / "odd.dcm"]
        assert storescu(node.port, sent).returncode == 0
        node.scp.stop(timeout=5)
        with node.sessions() as s:
            assert s.scalars(select(Study.patient_id)).one() == "HPB-TEST-0001"
    text = caplog.text
    assert "STORESCU" in text and "2 stored" in text and "1 refused" in text
    for identifier in ("Test^Synthetic", "HPB-TEST-0001", "19600101", "ACC0001", "SECRET"):
        assert identifier not in text


def _send_chunks(port: int, chunks: list[list[Dataset]]) -> list[int]:
    statuses: list[int] = []
    lock = threading.Lock()

    def worker(chunk: list[Dataset]) -> None:
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="HPBNODE")
        assert assoc.is_established
        try:
            for ds in chunk:
                status = int(assoc.send_c_store(ds).Status)
                with lock:
                    statuses.append(status)
        finally:
            assoc.release()

    threads = [threading.Thread(target=worker, args=(c,)) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return statuses


def test_concurrent_associations_into_one_series(tmp_path: Path) -> None:
    datasets: list[Dataset] = [
        dcmread(f) for f in ct_series(tmp_path / "in", n=24, seed="concurrent")
    ]
    with running_node(tmp_path) as node:
        statuses = _send_chunks(node.port, [datasets[i::4] for i in range(4)])
        assert statuses == [0] * 24
        with node.sessions.begin() as s:
            series = s.scalars(select(Series)).one()
            assert series.instance_count == 24  # no lost increments
            series.state = SeriesState.COMPLETE
        late: list[Dataset] = [
            dcmread(f) for f in ct_series(tmp_path / "late", n=28, seed="concurrent")[24:]
        ]
        assert _send_chunks(node.port, [late[:2], late[2:]]) == [0] * 4
        with node.sessions() as s:
            series = s.scalars(select(Series)).one()
            assert series.instance_count == 28
            assert series.generation == 2  # re-opened once, not once per instance


def test_received_part10_is_pynetdicoms_encoded_dataset(tmp_path: Path) -> None:
    """The handler's one-copy Part 10 stream has the bytes of ``encoded_dataset()``."""
    files = ct_series(tmp_path / "in", n=2, size=64, seed="part10")
    compared: list[bool] = []
    with running_node(tmp_path) as node:
        server = node.scp._server
        assert server is not None

        def comparing(event: evt.Event, *args: Any) -> int:
            compared.append(received_part10(event) == event.encoded_dataset(include_meta=True))
            return handle_store(event, *args)

        server.unbind(evt.EVT_C_STORE, handle_store)
        server.bind(evt.EVT_C_STORE, comparing, [node.store, node.scp.assoc_log])
        assert storescu(node.port, files).returncode == 0
        assert node.instance_count() == 2
    assert compared == [True, True]
    for sent in files:
        assert _body(_spooled(node.spool_root, sent)) == _body(sent)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_record_instance_counts_reopens_and_refreshes(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """The Core statements of record_instance on both database backends."""
    url = (
        f"sqlite:///{tmp_path / 'node.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    upgrade(url)
    engine = create_engine_for(url)
    sessions = session_factory(engine)
    study, series_uid = "1.2.826.0.1.3680043.10.9999.1", "1.2.826.0.1.3680043.10.9999.1.2"

    def header(n: int, rows: int = 16) -> InstanceHeader:
        return InstanceHeader(
            sop_class_uid=str(CTImageStorage),
            sop_instance_uid=f"{series_uid}.{n}",
            study_uid=study,
            series_uid=series_uid,
            transfer_syntax_uid=str(ExplicitVRLittleEndian),
            size=100 + n,
            sha256=f"{n:064d}",
            modality="CT",
            rows=rows,
            columns=16,
            has_pixel_data=True,
            has_position=True,
        )

    def record(h: InstanceHeader) -> Recorded:
        with sessions.begin() as s:
            existing = find_stored(s, h.sop_instance_uid)
            return record_instance(s, h, f"p/{h.sop_instance_uid}", "AE", existing=existing)

    try:
        first = record(header(1))
        assert first.new_series and not first.reopened
        assert not record(header(2)).new_series
        with sessions.begin() as s:
            row = s.scalars(select(Series)).one()
            assert (row.instance_count, row.generation, row.state) == (2, 1, SeriesState.RECEIVING)
            row.state = SeriesState.COMPLETE
        late = record(header(3, rows=32))  # late, and of other dimensions
        assert late.reopened and late.series_id == first.series_id
        assert not record(header(4)).reopened
        again = record(replace(header(2), sha256="f" * 64))  # re-sent after a purge
        assert not again.reopened
        with sessions() as s:
            row = s.scalars(select(Series)).one()
            assert (row.instance_count, row.generation, row.state) == (4, 2, SeriesState.RECEIVING)
            assert row.completed_at is None
            assert f"{series_uid}.3 is 32x16, the series 16x16" in row.ingest_issues
            assert s.scalars(select(Study)).one().study_instance_uid == study
            refreshed = s.scalars(
                select(Instance).where(Instance.sop_instance_uid == f"{series_uid}.2")
            ).one()
            assert refreshed.sha256 == "f" * 64
    finally:
        engine.dispose()
