"""Malformed and hostile input: each gets a defined status or a recorded reason, and the
node keeps serving (a C-ECHO and a valid C-STORE succeed afterwards).

Peers: DCMTK /usr/bin/storescu and echoscu (independent implementation) and pynetdicom;
raw sends (file bytes as they are, no re-encoding) use pynetdicom's chunked file sending.
"""

from __future__ import annotations

import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from node.db import Rejection, Series
from node.registry import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DOES_NOT_MATCH_SOP_CLASS,
    STATUS_DUPLICATE_CONFLICT,
    STATUS_INVALID_UID,
    STATUS_OUT_OF_RESOURCES,
    STATUS_TOO_LARGE,
    STATUS_TRUNCATED,
)
from tests.support.dcmtk import echoscu, storescu
from tests.support.ingest_node import IngestNode, ct_series, running_node

ALLOWED = ["STORESCU", "PYSCU", "ECHOSCU"]


@pytest.fixture()
def node(tmp_path: Path) -> Iterator[IngestNode]:
    with running_node(tmp_path, max_associations=4) as n:
        yield n


@pytest.fixture(autouse=True)
def _raw_file_sending(monkeypatch: pytest.MonkeyPatch) -> None:
    # send_c_store(path) then sends the bytes after the file meta exactly as they are
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def assert_still_serving(node: IngestNode, tmp: Path) -> None:
    assert echoscu(node.port).returncode == 0
    valid = ct_series(tmp / uuid.uuid4().hex, n=1, seed=uuid.uuid4().hex)
    before = node.instance_count()
    result = storescu(node.port, valid)
    assert result.returncode == 0, result.stderr
    assert node.instance_count() == before + 1


def raw_send(port: int, path: Path, ae_title: str = "PYSCU") -> int:
    """C-STORE the file's data set bytes unchanged over the context its meta names."""
    meta = read_file_meta_info(path)
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="HPBNODE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


def one_ct(tmp: Path, name: str, **kw: object) -> Path:
    return ct_series(tmp / name, n=1, seed=name, **kw)[0]  # type: ignore[arg-type]


def rewrite(src: Path, dst: Path, **changes: object) -> Path:
    ds = dcmread(src)
    with warnings.catch_warnings():  # hostile values are the point here
        warnings.simplefilter("ignore")
        for key, value in changes.items():
            if value is None:
                delattr(ds, key)
            elif key.startswith("meta_"):
                setattr(ds.file_meta, key[5:], value)
            else:
                setattr(ds, key, value)
        ds.save_as(dst)
    return dst


def last_rejection(node: IngestNode, timeout: float = 10.0) -> Rejection:
    """The newest Rejection row; association-level rows are written by the SCP's thread
    after the answer went out, so wait for one to appear."""
    deadline = time.monotonic() + timeout
    while not (rejections := node.rejections()):
        assert time.monotonic() < deadline, "no rejection recorded"
        time.sleep(0.02)
    return rejections[-1]


def test_truncated_native_file(node: IngestNode, tmp_path: Path) -> None:
    src = one_ct(tmp_path, "trunc")
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(src.read_bytes()[:-100])
    assert raw_send(node.port, cut) == STATUS_TRUNCATED
    assert "truncated" in last_rejection(node).reason
    assert node.spool_files() == []
    assert_still_serving(node, tmp_path)


def test_truncated_large_pixel_data_is_measured_not_read(node: IngestNode, tmp_path: Path) -> None:
    # 64x64x16 bit: pixel data above the parser's defer size, so its length is
    # checked against the bytes present instead of reading the value
    data = ct_series(tmp_path / "big", n=1, size=64, seed="big")[0].read_bytes()
    for cut in (2, 4000, 8000):
        outcome = node.store.accept(data[:-cut], calling_ae="TEST", channel="stow")
        assert outcome.status == STATUS_TRUNCATED, (cut, outcome)
        assert "truncated" in outcome.reason
    assert node.spool_files() == []
    assert node.store.accept(data, calling_ae="TEST", channel="stow").ok
    assert len(node.spool_files()) == 1


def test_truncated_encapsulated_file(node: IngestNode, tmp_path: Path) -> None:
    src = ct_series(tmp_path / "j2k", n=1, size=64, seed="j2k", transfer_syntax=JPEG2000Lossless)[0]
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(src.read_bytes()[:-6])
    assert raw_send(node.port, cut) == STATUS_TRUNCATED
    assert_still_serving(node, tmp_path)


def test_missing_pixel_data_with_storescu(node: IngestNode, tmp_path: Path) -> None:
    bad = rewrite(one_ct(tmp_path, "nopix"), tmp_path / "nopix.dcm", PixelData=None)
    storescu(node.port, [bad])
    rejection = last_rejection(node)
    assert rejection.status == STATUS_DOES_NOT_MATCH_SOP_CLASS
    assert "without Pixel Data" in rejection.reason and rejection.calling_ae == "STORESCU"
    assert_still_serving(node, tmp_path)


def test_uid_with_path_characters_is_never_used_as_a_name(node: IngestNode, tmp_path: Path) -> None:
    bad = rewrite(
        one_ct(tmp_path, "path"),
        tmp_path / "path.dcm",
        SOPInstanceUID="../../etc/x",
        meta_MediaStorageSOPInstanceUID="../../etc/x",
        StudyInstanceUID="../../tmp",
    )
    with warnings.catch_warnings():  # pynetdicom (the sender) warns about the UID
        warnings.simplefilter("ignore")
        status = raw_send(node.port, bad)
    assert status == STATUS_INVALID_UID
    assert "not a valid DICOM UID" in last_rejection(node).reason
    assert list(node.spool_root.rglob("*")) == []
    assert not (node.spool_root.parent.parent / "etc").exists()
    assert_still_serving(node, tmp_path)


def test_invalid_uid_grammar_leading_zero(node: IngestNode, tmp_path: Path) -> None:
    bad = rewrite(one_ct(tmp_path, "lead"), tmp_path / "lead.dcm", SeriesInstanceUID="1.2.03.4")
    assert raw_send(node.port, bad) == STATUS_INVALID_UID
    assert "SeriesInstanceUID" in last_rejection(node).reason
    assert_still_serving(node, tmp_path)


def test_wrong_sop_class_context_rejected_with_storescu(node: IngestNode, tmp_path: Path) -> None:
    ds = dcmread(one_ct(tmp_path, "sc"))
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.ConversionType = "WSD"
    ds.save_as(tmp_path / "sc.dcm")
    result = storescu(node.port, [tmp_path / "sc.dcm"])
    assert result.returncode != 0
    rejection = last_rejection(node)
    assert rejection.channel == "association"
    assert str(SecondaryCaptureImageStorage) in rejection.reason
    assert node.instance_count() == 0
    assert_still_serving(node, tmp_path)


def test_rows_columns_differ_within_series_is_stored_and_flagged(
    node: IngestNode, tmp_path: Path
) -> None:
    small = ct_series(tmp_path / "s", n=2, size=16, seed="mix")
    large = ct_series(tmp_path / "l", n=3, size=24, seed="mix")[2]  # same series UID
    assert storescu(node.port, [*small, large]).returncode == 0
    with node.sessions() as s:
        series = s.scalars(select(Series)).one()
    assert series.instance_count == 3
    assert "is 24x24, the series 16x16" in series.ingest_issues
    assert_still_serving(node, tmp_path)


def test_missing_image_position_is_stored_and_flagged(node: IngestNode, tmp_path: Path) -> None:
    bad = rewrite(one_ct(tmp_path, "nopos"), tmp_path / "nopos.dcm", ImagePositionPatient=None)
    assert storescu(node.port, [bad]).returncode == 0
    with node.sessions() as s:
        series = s.scalars(select(Series)).one()
    assert "lacks ImagePositionPatient" in series.ingest_issues
    assert node.rejections() == []
    assert_still_serving(node, tmp_path)


def test_duplicate_identical_is_success_without_second_copy(
    node: IngestNode, tmp_path: Path
) -> None:
    src = one_ct(tmp_path, "dup")
    assert raw_send(node.port, src) == 0
    assert storescu(node.port, [src]).returncode == 0
    assert raw_send(node.port, src) == 0
    assert node.instance_count() == 1 and len(node.spool_files()) == 1
    assert node.rejections() == []
    assert_still_serving(node, tmp_path)


def test_duplicate_with_other_content_keeps_the_first(node: IngestNode, tmp_path: Path) -> None:
    src = one_ct(tmp_path, "dupc")
    changed = rewrite(src, tmp_path / "changed.dcm", SeriesDescription="CHANGED")
    assert raw_send(node.port, src) == 0
    first = node.spool_files()[0].read_bytes()
    assert raw_send(node.port, changed) == STATUS_DUPLICATE_CONFLICT
    assert node.spool_files()[0].read_bytes() == first
    assert "different content" in last_rejection(node).reason
    assert_still_serving(node, tmp_path)


def test_unknown_calling_ae_rejected(tmp_path: Path) -> None:
    with running_node(tmp_path, allowed_calling_aes=ALLOWED) as node:
        result = storescu(node.port, [one_ct(tmp_path, "evil")], calling_ae="EVIL")
        assert result.returncode != 0
        rejection = last_rejection(node)
        assert rejection.channel == "association" and rejection.calling_ae == "EVIL"
        assert "allowed_calling_aes" in rejection.reason
        assert node.instance_count() == 0
        assert_still_serving(node, tmp_path)


def test_more_associations_than_the_limit(tmp_path: Path) -> None:
    with running_node(tmp_path, max_associations=1) as node:
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(Verification)
        held = ae.associate("127.0.0.1", node.port, ae_title="HPBNODE")
        assert held.is_established
        try:
            assert echoscu(node.port).returncode != 0
            assert "association limit" in last_rejection(node).reason
        finally:
            held.release()
        assert_still_serving(node, tmp_path)


def test_disk_guard_answers_out_of_resources(tmp_path: Path) -> None:
    free = {"bytes": 10 * 2**20}
    with running_node(tmp_path, free_bytes=lambda: free["bytes"], min_free_mb=64) as node:
        src = one_ct(tmp_path, "disk")
        assert raw_send(node.port, src) == STATUS_OUT_OF_RESOURCES
        assert "min_free_mb" in last_rejection(node).reason
        assert node.spool_files() == []
        free["bytes"] = 10 * 2**30
        assert raw_send(node.port, src) == 0
        assert_still_serving(node, tmp_path)


def test_missing_sop_instance_uid(node: IngestNode, tmp_path: Path) -> None:
    bad = rewrite(one_ct(tmp_path, "nosop"), tmp_path / "nosop.dcm", SOPInstanceUID=None)
    assert raw_send(node.port, bad) == STATUS_INVALID_UID
    assert "SOPInstanceUID is missing" in last_rejection(node).reason
    assert_still_serving(node, tmp_path)


def test_missing_study_instance_uid(node: IngestNode, tmp_path: Path) -> None:
    bad = rewrite(one_ct(tmp_path, "nostudy"), tmp_path / "nost.dcm", StudyInstanceUID=None)
    assert raw_send(node.port, bad) == STATUS_INVALID_UID
    assert "StudyInstanceUID is missing" in last_rejection(node).reason
    assert_still_serving(node, tmp_path)


def test_sop_class_in_data_set_differs_from_context(node: IngestNode, tmp_path: Path) -> None:
    bad = rewrite(one_ct(tmp_path, "mrct"), tmp_path / "mrct.dcm", SOPClassUID=MRImageStorage)
    assert dcmread(bad).file_meta.MediaStorageSOPClassUID == CTImageStorage
    assert raw_send(node.port, bad) == STATUS_DOES_NOT_MATCH_SOP_CLASS
    assert "differs from" in last_rejection(node).reason
    assert_still_serving(node, tmp_path)


def test_oversize_instance(tmp_path: Path) -> None:
    with running_node(tmp_path, max_instance_mb=1) as node:
        big = ct_series(tmp_path / "big", n=1, size=768, seed="big")[0]
        assert big.stat().st_size > 2**20
        assert raw_send(node.port, big) == STATUS_TOO_LARGE
        assert "max_instance_mb" in last_rejection(node).reason
        assert_still_serving(node, tmp_path)


def test_garbage_bytes_after_a_valid_file_meta(node: IngestNode, tmp_path: Path) -> None:
    src = one_ct(tmp_path, "garbage").read_bytes()
    meta_end = 144 + int.from_bytes(src[140:144], "little")
    rng = np.random.default_rng(3)
    bad = tmp_path / "garbage.dcm"
    bad.write_bytes(src[:meta_end] + rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    status = raw_send(node.port, bad)
    assert status in (STATUS_CANNOT_UNDERSTAND, STATUS_INVALID_UID)
    assert last_rejection(node).status == status
    assert_still_serving(node, tmp_path)


def test_transfer_syntax_mismatch_implicit_bytes_on_explicit_context(
    node: IngestNode, tmp_path: Path
) -> None:
    src = dcmread(one_ct(tmp_path, "tsx"))
    body = tmp_path / "implicit.dcm"
    src.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    dcmwrite(body, src, enforce_file_format=True)
    data = body.read_bytes()
    meta_end = 144 + int.from_bytes(data[140:144], "little")
    labelled = dcmread(one_ct(tmp_path, "tsx"))  # same meta, but says explicit VR
    explicit_meta = tmp_path / "meta.dcm"
    dcmwrite(explicit_meta, labelled, enforce_file_format=True)
    meta_bytes = explicit_meta.read_bytes()
    meta_len = 144 + int.from_bytes(meta_bytes[140:144], "little")
    bad = tmp_path / "mismatch.dcm"
    bad.write_bytes(meta_bytes[:meta_len] + data[meta_end:])
    assert read_file_meta_info(bad).TransferSyntaxUID == ExplicitVRLittleEndian
    assert raw_send(node.port, bad) == STATUS_CANNOT_UNDERSTAND
    assert "not encoded as its transfer syntax" in last_rejection(node).reason
    assert node.spool_files() == []
    assert_still_serving(node, tmp_path)


def test_not_dicom_at_all(node: IngestNode, tmp_path: Path) -> None:
    outcome = node.store.accept(b"GIF89a" + bytes(500), calling_ae="TEST", channel="stow")
    assert outcome.status == STATUS_CANNOT_UNDERSTAND
    assert "not a DICOM Part 10 stream" in last_rejection(node).reason
    assert_still_serving(node, tmp_path)


def test_stow_non_dicom_part_and_wrong_content_type(node: IngestNode, tmp_path: Path) -> None:
    from tests.test_stow import post, serve_app

    with serve_app(node) as client:
        r = post(client, [b"%PDF-1.4 not dicom"], part_type="application/pdf")
        assert r.status_code == 409
        assert r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [STATUS_CANNOT_UNDERSTAND]
        r = post(client, [b"\x00" * 300])
        assert r.status_code == 409
        r = client.post(
            "/dicom-web/studies", content=b"{}", headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 415
        r = client.post(
            "/dicom-web/studies",
            content=b"--x\r\n\r\nabc",
            headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=x'},
        )
        assert r.status_code == 400
    reasons = [r.reason for r in node.rejections()]
    assert any("application/pdf" in r for r in reasons)
    assert any("not a DICOM Part 10 stream" in r for r in reasons)
    assert any("application/json" in r for r in reasons)
    assert any("closing boundary" in r for r in reasons)
    assert_still_serving(node, tmp_path)


def test_dataset_is_only_an_empty_object(node: IngestNode, tmp_path: Path) -> None:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta = dcmread(one_ct(tmp_path, "empty")).file_meta
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    dcmwrite(tmp_path / "empty.dcm", ds, enforce_file_format=True)
    assert raw_send(node.port, tmp_path / "empty.dcm") == STATUS_INVALID_UID  # no Study UID
    assert_still_serving(node, tmp_path)
