"""models.loader on true Enhanced CT / Enhanced MR multi-frame objects (not Legacy Converted).

The objects come from models.enhanced_writer on the shared NIfTI volumes; each must load to
the same voxels and LPS affine as its source, as the single-frame series of the same data
and as highdicom's own reader of the object, whatever the frame order and encoding.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)
from sqlalchemy import select

from models.enhanced_writer import enhanced_image, write_enhanced
from models.loader import RefusalReason, SeriesRefused, load_series
from models.nifti import load_nifti_krc
from models.series_writer import write_series
from models.synthetic.geometry import rotation
from node.db import Instance, Series
from node.rules import SeriesAttributes
from tests.support.dcmtk import storescu
from tests.support.ingest_node import running_node
from tests.test_loader import assert_same, canonical, flip_rows_cols, rotated

Array = npt.NDArray[Any]
Affine = npt.NDArray[np.float64]


@pytest.fixture(scope="module")
def ct(shared_data: Path) -> tuple[Array, Affine]:
    return load_nifti_krc(shared_data / "ct_abdomen_3mm" / "ct.nii.gz")


@pytest.fixture(scope="module")
def ct_small(ct: tuple[Array, Affine]) -> tuple[Array, Affine]:
    """A 12-slice crop (slices 50..61) for the encoding and refusal variants."""
    a, aff = ct
    out = aff.copy()
    out[:3, 3] = aff[:3, 3] + 50 * aff[:3, 0]
    return np.ascontiguousarray(a[50:62]), out


@pytest.fixture(scope="module")
def mr(shared_data: Path) -> tuple[Array, Affine]:
    a, aff = load_nifti_krc(shared_data / "mr_abdomen_3mm" / "mr.nii.gz")
    return np.clip(a, 0, None), aff  # MR is stored unsigned


def dciodvfy_errors(path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in (res.stdout + res.stderr).splitlines() if "Error" in line]


def expected_frames(order: list[int], affine: Affine, n: int) -> list[int]:
    """Frame numbers in the loader's slice order (k along +normal) for frames holding ``order``."""
    frame_of_slice = {k: i + 1 for i, k in enumerate(order)}
    frames = [frame_of_slice[k] for k in range(n)]
    _, canon = canonical(np.zeros((n, 1, 1)), affine)
    return frames if canon is affine else frames[::-1]


# ---------------------------------------------------------------- CT geometries


@pytest.mark.parametrize(
    "variant", ["as_nifti_ras", "lps", "oblique", "reversed", "frames_reversed", "shuffled"]
)
def test_enhanced_ct_geometries(ct: tuple[Array, Affine], tmp_path: Path, variant: str) -> None:
    a, aff = ct
    n = a.shape[0]
    order = list(range(n))
    if variant == "lps":
        a, aff = flip_rows_cols(a, aff)
    elif variant == "oblique":
        aff = rotated(aff, rotation(20.0, -12.0, 30.0))
    elif variant == "reversed":  # slice axis against the normal
        a, aff = a[::-1], aff.copy()
        aff[:3, 3] = ct[1][:3, 3] + (n - 1) * ct[1][:3, 0]
        aff[:3, 0] = -ct[1][:3, 0]
    elif variant == "frames_reversed":  # frame 1 holds the last slice
        order = order[::-1]
    elif variant == "shuffled":
        order = [int(k) for k in np.random.default_rng(7).permutation(n)]
    path = write_enhanced(a, aff, tmp_path / "ct.dcm", frame_order=order, seed=variant)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == EnhancedCTImageStorage and int(ds.NumberOfFrames) == n

    vol = load_series(path)
    assert_same(vol.array, vol.affine, a, aff)
    assert vol.modality == "CT" and vol.sop_instance_uids == (ds.SOPInstanceUID,) * n
    assert list(vol.frame_numbers) == expected_frames(order, aff, n)
    # highdicom's reader of the same object agrees
    hd_vol = hd.imread(path).get_volume()
    assert_same(vol.array, vol.affine, hd_vol.array, hd_vol.affine)


def test_enhanced_ct_matches_single_frame_series(ct: tuple[Array, Affine], tmp_path: Path) -> None:
    a, aff = ct
    single = load_series(write_series(a, aff, tmp_path / "single", seed="pair"))
    multi = load_series(write_enhanced(a, aff, tmp_path / "mf" / "ct.dcm", seed="pair"))
    assert np.array_equal(single.array, multi.array)
    np.testing.assert_allclose(multi.affine, single.affine, atol=1e-5)
    assert single.frame_numbers == () and list(multi.frame_numbers) == list(range(1, len(a) + 1))
    assert multi.array.min() < -1000 and multi.array.max() > 2000  # HU, rescale applied
    # acquisition headers that Enhanced objects keep in functional groups, not at the top
    for key in ("SliceThickness", "KVP", "Modality", "PatientSex", "StudyDate"):
        assert multi.headers[key] == single.headers[key], key
    assert multi.headers["ConvolutionKernel"] == "STANDARD"
    assert multi.headers["AcquisitionDate"] == "20260101"


# ---------------------------------------------------------------- MR


@pytest.mark.parametrize("frames", ["in_order", "reversed"])
def test_enhanced_mr(mr: tuple[Array, Affine], tmp_path: Path, frames: str) -> None:
    a, aff = mr
    n = a.shape[0]
    order = list(range(n)) if frames == "in_order" else list(range(n))[::-1]
    path = write_enhanced(a, aff, tmp_path / "mr.dcm", modality="MR", frame_order=order)
    assert pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID == EnhancedMRImageStorage
    vol = load_series(path)
    assert vol.modality == "MR"
    assert_same(vol.array, vol.affine, a, aff)
    assert list(vol.frame_numbers) == expected_frames(order, aff, n)
    single = load_series(write_series(a, aff, tmp_path / "single", modality="MR"))
    assert np.array_equal(single.array, vol.array)
    np.testing.assert_allclose(vol.affine, single.affine, atol=1e-5)
    for key in ("EchoTime", "RepetitionTime", "MagneticFieldStrength", "SliceThickness"):
        assert vol.headers[key] == single.headers[key], key


# ---------------------------------------------------------------- validity, encodings


def test_enhanced_ct_and_mr_pass_dciodvfy(
    ct_small: tuple[Array, Affine], mr: tuple[Array, Affine], tmp_path: Path
) -> None:
    ct_path = write_enhanced(*ct_small, tmp_path / "ct.dcm")
    mr_path = write_enhanced(*mr, tmp_path / "mr.dcm", modality="MR")
    rle_path = write_enhanced(*ct_small, tmp_path / "rle.dcm", transfer_syntax=RLELossless)
    for path in (ct_path, mr_path, rle_path):
        assert dciodvfy_errors(path) == [], path.name


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless])
def test_compressed_enhanced_ct(
    ct_small: tuple[Array, Affine], tmp_path: Path, syntax: str
) -> None:
    a, aff = ct_small
    order = list(range(len(a)))[::-1]
    path = write_enhanced(a, aff, tmp_path / "ct.dcm", transfer_syntax=syntax, frame_order=order)
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    vol = load_series(path)
    assert_same(vol.array, vol.affine, a, aff)


# ---------------------------------------------------------------- refusals


def _small_enhanced() -> tuple[Dataset, Array, Affine]:
    a = (np.arange(8 * 16 * 16, dtype=np.float32).reshape(8, 16, 16) % 300) - 100
    aff = np.array([[0, 0, 2.0, -10], [0, 2.0, 0, -20], [5.0, 0, 0, 30], [0, 0, 0, 1]])
    return enhanced_image(a, aff, seed="refusals"), a, aff


def _refused(ds: Dataset, reason: RefusalReason, **kw: Any) -> SeriesRefused:
    with pytest.raises(SeriesRefused) as info:
        load_series([ds], **kw)
    assert info.value.reason is reason, str(info.value)
    return info.value


def test_small_enhanced_loads(tmp_path: Path) -> None:
    ds, a, aff = _small_enhanced()
    vol = load_series([ds])
    assert_same(vol.array, vol.affine, a, aff)


def test_refuses_inconsistent_per_frame_orientation() -> None:
    ds, _, _ = _small_enhanced()
    shared = ds.SharedFunctionalGroupsSequence[0]
    orientation = shared.PlaneOrientationSequence
    del shared.PlaneOrientationSequence
    c, s = np.cos(0.3), np.sin(0.3)
    for i, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        item = Dataset()
        item.ImageOrientationPatient = (
            [c, s, 0.0, -s, c, 0.0] if i == 5 else orientation[0].ImageOrientationPatient
        )
        group.PlaneOrientationSequence = [item]
    err = _refused(ds, RefusalReason.MIXED_ORIENTATION)
    assert "orientation" in str(err)


def test_uneven_frame_spacing_refused_or_resampled() -> None:
    ds, a, aff = _small_enhanced()
    for group in ds.PerFrameFunctionalGroupsSequence:  # a gap of one slice after slice 3
        if int(group.FrameContentSequence[0].InStackPositionNumber) > 4:
            item = group.PlanePositionSequence[0]
            moved = np.asarray(item.ImagePositionPatient, dtype=np.float64) + aff[:3, 0]
            item.ImagePositionPatient = [float(v) for v in moved]
    err = _refused(ds, RefusalReason.UNEVEN_SPACING)
    assert "5.00 to 10.00" in str(err)
    vol = load_series([ds], uneven="resample")
    assert vol.shape == (9, 16, 16) and vol.headers["loader"]["resampled"] is True
    np.testing.assert_allclose(vol.affine, aff, atol=1e-4)
    np.testing.assert_allclose(vol.array[4], (a[3] + a[4]) / 2, atol=1e-4)
    assert np.array_equal(vol.array[5], a[4])


def test_refuses_frame_without_position() -> None:
    ds, _, _ = _small_enhanced()
    del ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence
    err = _refused(ds, RefusalReason.MISSING_GEOMETRY)
    assert "frame 3" in str(err)


def test_refuses_two_phases_in_one_object() -> None:
    """Two frames at one position (e.g. arterial and venous phase stacked in one object)."""
    ds, _, _ = _small_enhanced()
    groups = ds.PerFrameFunctionalGroupsSequence
    position = groups[1].PlanePositionSequence[0].ImagePositionPatient
    groups[2].PlanePositionSequence[0].ImagePositionPatient = list(position)
    err = _refused(ds, RefusalReason.DUPLICATE_POSITION)
    assert "several phases" in str(err)


def test_refuses_localizer_frame() -> None:
    ds, _, _ = _small_enhanced()
    item = Dataset()
    item.FrameType = ["ORIGINAL", "PRIMARY", "LOCALIZER", "NONE"]
    ds.PerFrameFunctionalGroupsSequence[0].CTImageFrameTypeSequence = [item]
    _refused(ds, RefusalReason.LOCALIZER)


# ---------------------------------------------------------------- through the node


def test_enhanced_ct_through_ingest_loads_as_sent(
    ct_small: tuple[Array, Affine], tmp_path: Path
) -> None:
    a, aff = ct_small
    path = write_enhanced(a, aff, tmp_path / "in" / "ct.dcm", transfer_syntax=JPEG2000Lossless)
    with running_node(tmp_path) as node:
        result = storescu(node.port, [path], args=("-R", "-xv"))
        assert result.returncode == 0, result.stderr
        assert node.rejections() == []
        [spooled] = node.spool_files()
        with node.sessions() as s:
            assert s.scalars(select(Instance.sop_class_uid)).one() == EnhancedCTImageStorage
            # routing rules on slice thickness need it: Enhanced objects keep it in the
            # Pixel Measures functional group, not at the top level
            thickness = s.scalars(select(Series.slice_thickness)).one()
    expected = float(
        pydicom.dcmread(path)
        .SharedFunctionalGroupsSequence[0]
        .PixelMeasuresSequence[0]
        .SliceThickness
    )
    assert thickness == pytest.approx(expected)
    assert SeriesAttributes.from_folder(path.parent).slice_thickness == pytest.approx(expected)
    vol = load_series(spooled)
    assert_same(vol.array, vol.affine, a, aff)
    assert len(vol.frame_numbers) == len(a)


def test_ct_liver_3slice_as_enhanced(shared_data: Path, tmp_path: Path) -> None:
    """The real GE slices, rewritten as one Enhanced CT, load to the same voxels and affine."""
    files = sorted((shared_data / "ct_liver_3slice").glob("0*.dcm"))
    single = load_series(files)
    path = write_enhanced(single.array, single.affine, tmp_path / "ct.dcm", frame_order=[2, 0, 1])
    vol = load_series(path)
    assert vol.shape == (3, 512, 512)
    assert np.array_equal(vol.array, single.array)
    np.testing.assert_allclose(vol.affine, single.affine, atol=1e-4)
    assert vol.frame_numbers == (2, 3, 1)
