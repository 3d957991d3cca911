"""C-MOVE from real PACSs (Orthanc, and DCMTK's dcmqrscp, which reports sub-operation
counts and 0xA801 as the standard says) into the evaluator's own temporary Storage
SCP (:mod:`models.evaluation.pacs`): instances arrive as the PACS holds them, and
every way a move can fail is a clear :class:`PacsFetchError` naming the study.

The end-to-end ``hpb-node evaluate`` run over C-MOVE is the ``cmove`` case of
``tests/test_evaluation_orthanc.py``.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from models.evaluation.pacs import (
    DimsePeer,
    MoveDestination,
    MoveReceiver,
    PacsFetchError,
    cmove_results,
)
from tests.conftest import free_port
from tests.support.dcmqrscp import dcmqrscp
from tests.support.orthanc import OrthancProcess, orthanc_factory  # noqa: F401

MOVE_AET = "HPBEVALTEST"
STUDY_FILES = ("01.dcm", "02.dcm", "03.dcm", "liver_seg.dcm")


def dataset_bytes(path: Path) -> bytes:
    """A Part 10 file's bytes after its File Meta Information (the dataset as encoded)."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM", path
    # (0002,0000) UL, explicit VR little endian: tag 4 + VR 2 + length 2 + value 4
    group_length = int.from_bytes(raw[140:144], "little")
    return raw[144 + group_length :]


@pytest.fixture()
def pacs(orthanc_factory: Callable[..., OrthancProcess], shared_data: Path) -> OrthancProcess:  # noqa: F811
    """Orthanc holding the 3-slice liver CT study with its SEG and TID 1500 SR."""
    server = orthanc_factory(aet="CMOVEPACS", dicomweb=False)
    src = shared_data / "ct_liver_3slice"
    for f in (
        *[src / n for n in STUDY_FILES],
        shared_data / "interop/tid1500/dcmqi_liver_result.dcm",
    ):
        assert server.upload(f)["Status"] == "Success"
    return server


def peer_of(server: OrthancProcess) -> DimsePeer:
    return DimsePeer("127.0.0.1", server.dicom_port, server.aet)


def study_uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


@pytest.mark.orthanc
def test_cmove_instances_arrive_identical(
    pacs: OrthancProcess, shared_data: Path, tmp_path: Path
) -> None:
    """Port 0: the SCP takes a free port, Orthanc learns it over REST, then the study is
    moved; every instance arrives with its UIDs and elements unchanged, the CT slices
    byte for byte, and nothing else is left in the folders."""
    src = shared_data / "ct_liver_3slice"
    sr_file = shared_data / "interop/tid1500/dcmqi_liver_result.dcm"
    study_uid = study_uid_of(src / "01.dcm")
    dest = tmp_path / "fetched"
    with MoveReceiver(MoveDestination(MOVE_AET), dest) as rx:
        assert rx.port != 0
        pacs.add_modality("evaluator", MOVE_AET, "127.0.0.1", rx.port)
        fetched = rx.move(peer_of(pacs), "liver3", study_uid)
    with pytest.raises(ConnectionRefusedError):  # the SCP stopped with the block
        socket.create_connection(("127.0.0.1", rx.port), timeout=5).close()
    assert (fetched.n_seg, fetched.n_sr, fetched.n_image, fetched.n_other) == (1, 1, 3, 0)
    expected = {
        dest / "images/liver3": [src / n for n in STUDY_FILES[:3]],
        dest / "masks/liver3": [src / "liver_seg.dcm"],
        dest / "sr/liver3": [sr_file],
    }
    for folder, originals in expected.items():
        got = sorted(folder.iterdir())
        assert [p.name for p in got] == sorted(
            f"{pydicom.dcmread(o, stop_before_pixels=True).SOPInstanceUID}.dcm" for o in originals
        ), folder  # no temporary file left behind either
        for original in originals:
            ds = pydicom.dcmread(original)
            arrived = folder / f"{ds.SOPInstanceUID}.dcm"
            back = pydicom.dcmread(arrived)
            assert (back.SOPClassUID, back.StudyInstanceUID, back.SeriesInstanceUID) == (
                ds.SOPClassUID,
                ds.StudyInstanceUID,
                ds.SeriesInstanceUID,
            )
            assert back.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
            assert back == ds, original.name  # every element: sequences, pixel data
    # The CT slices (no sequences) arrive byte for byte. Orthanc's sender (DCMTK)
    # re-encodes undefined-length sequences with explicit lengths, so the SEG and SR
    # are equal element for element but not byte for byte.
    for name in STUDY_FILES[:3]:
        uid = pydicom.dcmread(src / name, stop_before_pixels=True).SOPInstanceUID
        assert dataset_bytes(dest / "images/liver3" / f"{uid}.dcm") == dataset_bytes(src / name)


@pytest.mark.orthanc
def test_cmove_unknown_study_is_a_clear_error(pacs: OrthancProcess, tmp_path: Path) -> None:
    port = free_port()
    pacs.add_modality("evaluator", MOVE_AET, "127.0.0.1", port)
    unknown = generate_uid()
    with pytest.raises(PacsFetchError) as err:
        cmove_results(
            peer_of(pacs),
            {"ghost": unknown},
            tmp_path / "fetched",
            destination=MoveDestination(MOVE_AET, "127.0.0.1", port),
        )
    assert unknown in str(err.value) and "case ghost" in str(err.value)
    assert not (tmp_path / "fetched").exists()


class MovePermissiveOrthanc(OrthancProcess):
    """Orthanc that accepts C-MOVE requests from any calling AE (``DicomAlwaysAllowMove``),
    so that a move to a destination it does not know reaches the destination check."""

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "DicomAlwaysAllowMove": True}


@pytest.mark.orthanc
def test_cmove_unknown_destination_is_a_clear_error(shared_data: Path, tmp_path: Path) -> None:
    """The PACS does not know our AE title as a move destination. dcmqrscp answers the
    standard's 0xA801, Orthanc 1.10 a plain 0xC000: both errors name the study and say
    what to declare on the PACS."""
    src = shared_data / "ct_liver_3slice/01.dcm"
    study_uid = study_uid_of(src)
    port = free_port()
    destination = MoveDestination(MOVE_AET, "127.0.0.1", port)
    with dcmqrscp(tmp_path / "qr", [src]) as qr, pytest.raises(PacsFetchError) as err:
        cmove_results(
            DimsePeer("127.0.0.1", qr.port, qr.aet),
            {"liver3": study_uid},
            tmp_path / "fetched",
            destination=destination,
        )
    msg = str(err.value)
    assert study_uid in msg
    assert f"does not know the move destination {MOVE_AET!r}" in msg
    assert f"(AE title {MOVE_AET}, host 127.0.0.1, port {port})" in msg

    server = MovePermissiveOrthanc(tmp_path / "orthanc", aet="CMOVEPACS", dicomweb=False)
    server.start()
    try:
        assert server.upload(src)["Status"] == "Success"
        with pytest.raises(PacsFetchError) as err:
            cmove_results(
                peer_of(server),
                {"liver3": study_uid},
                tmp_path / "fetched",
                destination=destination,
            )
    finally:
        server.stop()
    msg = str(err.value)
    assert study_uid in msg and "status 0xC000" in msg
    assert f"declare AE title {MOVE_AET}, host 127.0.0.1, port {port} as a DICOM modality" in msg
    assert not (tmp_path / "fetched").exists()


@pytest.mark.orthanc
def test_cmove_from_an_undeclared_ae_is_a_clear_error(
    pacs: OrthancProcess, shared_data: Path, tmp_path: Path
) -> None:
    """Orthanc (default settings) refuses C-MOVE from a calling AE it does not know by
    aborting the association: the error names the study and what to declare."""
    study_uid = study_uid_of(shared_data / "ct_liver_3slice/01.dcm")
    port = free_port()
    with pytest.raises(PacsFetchError) as err:
        cmove_results(
            peer_of(pacs),
            {"liver3": study_uid},
            tmp_path / "fetched",
            destination=MoveDestination(MOVE_AET, "127.0.0.1", port),
        )
    msg = str(err.value)
    assert study_uid in msg and "no final answer from CMOVEPACS" in msg
    assert f"know AE title {MOVE_AET} as a DICOM modality" in msg and f"port {port}" in msg


def test_cmove_failed_suboperation_is_a_clear_error(shared_data: Path, tmp_path: Path) -> None:
    """One instance of the study is of a storage class the SCP does not accept: the PACS
    (dcmqrscp) sends the others and reports one failed sub-operation (0xB000); the move
    is an error naming the study, not a success with an instance missing."""
    src = shared_data / "ct_liver_3slice"
    study_uid = study_uid_of(src / "01.dcm")
    sc = pydicom.dcmread(src / "01.dcm")
    sc.SOPClassUID = sc.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    sc.SOPInstanceUID = sc.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    sc.SeriesInstanceUID = generate_uid()
    sc.save_as(tmp_path / "sc.dcm", enforce_file_format=True)
    port = free_port()
    files = [src / "01.dcm", src / "02.dcm", tmp_path / "sc.dcm"]
    known = {MOVE_AET: ("127.0.0.1", port)}
    with (
        dcmqrscp(tmp_path / "qr", files, move_destinations=known) as qr,
        pytest.raises(PacsFetchError) as err,
    ):
        cmove_results(
            DimsePeer("127.0.0.1", qr.port, qr.aet),
            {"liver3": study_uid},
            tmp_path / "fetched",
            destination=MoveDestination(MOVE_AET, "127.0.0.1", port),
        )
    msg = str(err.value)
    assert f"C-MOVE of study {study_uid} (case liver3) incomplete" in msg
    assert "status 0xB000" in msg
    assert "2 sub-operations completed, 1 failed" in msg
    # the two CT slices did arrive (a partial study is not passed on as the study)
    assert len(list((tmp_path / "fetched/images/liver3").glob("*.dcm"))) == 2


def test_cmove_instance_not_written_is_a_clear_error(shared_data: Path, tmp_path: Path) -> None:
    """The SCP cannot write what arrives (``images`` is a file, not a folder): it answers
    "out of resources", the PACS counts failed sub-operations, and the error says why."""
    files = [shared_data / "ct_liver_3slice" / n for n in STUDY_FILES[:2]]
    dest = tmp_path / "fetched"
    dest.mkdir()
    (dest / "images").write_text("in the way")
    port = free_port()
    known = {MOVE_AET: ("127.0.0.1", port)}
    with (
        dcmqrscp(tmp_path / "qr", files, move_destinations=known) as qr,
        pytest.raises(PacsFetchError) as err,
    ):
        cmove_results(
            DimsePeer("127.0.0.1", qr.port, qr.aet),
            {"liver3": study_uid_of(files[0])},
            dest,
            destination=MoveDestination(MOVE_AET, "127.0.0.1", port),
        )
    msg = str(err.value)
    assert f"C-MOVE of study {study_uid_of(files[0])} (case liver3)" in msg
    assert "0 sub-operations completed, 2 failed" in msg
    assert "not written here: instance " in msg
    assert not [p for p in dest.rglob("*") if p.name.endswith(".part")]


def pdf_in_study_of(image: Path, out: Path) -> Path:
    """An Encapsulated PDF instance (modality DOC) in the study of ``image``."""
    from pydicom.dataset import FileMetaDataset

    src = pydicom.dcmread(image, stop_before_pixels=True)
    ds = pydicom.Dataset()
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "StudyDate", "StudyID"):
        if keyword in src:
            setattr(ds, keyword, src[keyword].value)
    ds.SOPClassUID = pydicom.uid.EncapsulatedPDFStorage
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DOC"
    ds.SeriesNumber = ds.InstanceNumber = 1
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(out, enforce_file_format=True)
    return out


def test_cmove_with_dcmqrscp(shared_data: Path, tmp_path: Path) -> None:
    """The same move against a second, independent PACS implementation; the study also
    holds a PDF, which lands under ``other/``."""
    src = shared_data / "ct_liver_3slice"
    files = [src / n for n in STUDY_FILES]
    files.append(pdf_in_study_of(files[0], tmp_path / "report.dcm"))
    port = free_port()
    with dcmqrscp(tmp_path / "qr", files, move_destinations={MOVE_AET: ("127.0.0.1", port)}) as qr:
        (fetched,) = cmove_results(
            DimsePeer("127.0.0.1", qr.port, qr.aet),
            {"liver3": study_uid_of(files[0])},
            tmp_path / "fetched",
            destination=MoveDestination(MOVE_AET, "127.0.0.1", port),
        )
    assert (fetched.n_seg, fetched.n_sr, fetched.n_image, fetched.n_other) == (1, 0, 3, 1)
    uids = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
    folders = {"SEG": "masks", "CT": "images", "DOC": "other"}
    for f in files:
        ds = pydicom.dcmread(f)
        back = pydicom.dcmread(
            tmp_path / "fetched" / folders[ds.Modality] / "liver3" / f"{ds.SOPInstanceUID}.dcm"
        )
        # dcmqrscp may send in another transfer syntax (the SEG arrives implicit VR)
        assert [back[k].value for k in uids] == [ds[k].value for k in uids]
        bulk = "EncapsulatedDocument" if ds.Modality == "DOC" else "PixelData"
        assert back[bulk].value == ds[bulk].value


def test_cmove_port_in_use_and_bad_destination(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(PacsFetchError, match=f"cannot listen at 127.0.0.1:{port}"):
            cmove_results(
                DimsePeer("127.0.0.1", free_port(), "NOBODY"),
                {"c": "1.2.3"},
                tmp_path,
                destination=MoveDestination(MOVE_AET, "127.0.0.1", port),
            )
    with pytest.raises(PacsFetchError, match="AE title"):
        MoveDestination("A" * 17)
    with pytest.raises(PacsFetchError, match="port"):
        MoveDestination(MOVE_AET, port=70000)


def test_cmove_pacs_unreachable(tmp_path: Path) -> None:
    nobody = DimsePeer("127.0.0.1", free_port(), "NOBODY")
    with pytest.raises(PacsFetchError, match=r"study 1\.2\.3 \(case c\): cannot connect to NOBODY"):
        cmove_results(nobody, {"c": "1.2.3"}, tmp_path, destination=MoveDestination(MOVE_AET))


@pytest.mark.orthanc
def test_evaluate_cli_cmove_errors(
    pacs: OrthancProcess, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``hpb-node evaluate --retrieve move``: a missing option or a move the PACS
    refuses exits 2 with the reason on stderr."""
    from node.cli import main

    study_uid = study_uid_of(shared_data / "ct_liver_3slice/01.dcm")
    ref = tmp_path / "reference"
    ref.mkdir()
    base = ["evaluate", "--reference", str(ref), "--out", str(tmp_path / "out"),
            "--study", f"liver3={study_uid}", "--retrieve", "move"]  # fmt: skip
    dimse = ["--pacs-dimse", f"127.0.0.1:{pacs.dicom_port}:{pacs.aet}"]
    assert main([*base, "--move-port", "11113"]) == 2
    assert "--retrieve move needs --pacs-dimse" in capsys.readouterr().err
    assert main([*base, *dimse]) == 2
    assert "--retrieve move needs --move-port" in capsys.readouterr().err
    # Orthanc does not know our AE title: the C-MOVE is refused
    assert main([*base, *dimse, "--calling-aet", MOVE_AET, "--move-port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert f"fetching from the PACS failed: C-MOVE of study {study_uid} (case liver3)" in err
