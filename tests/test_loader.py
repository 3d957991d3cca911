"""models.loader on real data written as DICOM in many geometries, and its refusals."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from models.loader import RefusalReason, SeriesRefused, load_series
from models.nifti import load_nifti_krc
from models.series_writer import SeriesInfo, write_series
from models.synthetic.geometry import rotation

Array = npt.NDArray[Any]
Affine = npt.NDArray[np.float64]


def canonical(array: Array, affine: Affine) -> tuple[Array, Affine]:
    """The same voxels/geometry with k running along +normal (as the loader returns them)."""
    row_cos = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
    col_cos = affine[:3, 1] / np.linalg.norm(affine[:3, 1])
    if affine[:3, 0] @ np.cross(row_cos, col_cos) >= 0:
        return array, affine
    out = affine.copy()
    out[:3, 3] = affine[:3, 3] + (array.shape[0] - 1) * affine[:3, 0]
    out[:3, 0] = -affine[:3, 0]
    return array[::-1], out


def flip_rows_cols(array: Array, affine: Affine) -> tuple[Array, Affine]:
    """Reverse row and column order (RAS-like in-plane ↔ LPS-like), same geometry."""
    out = affine.copy()
    out[:3, 3] = (
        affine[:3, 3] + (array.shape[1] - 1) * affine[:3, 1] + (array.shape[2] - 1) * affine[:3, 2]
    )
    out[:3, 1] = -affine[:3, 1]
    out[:3, 2] = -affine[:3, 2]
    return array[:, ::-1, ::-1], out


def rotated(affine: Affine, rot: npt.NDArray[np.float64]) -> Affine:
    out = affine.copy()
    out[:3, :3] = rot @ affine[:3, :3]
    out[:3, 3] = rot @ affine[:3, 3]
    return out


def assert_same(vol_array: Array, vol_affine: Affine, array: Array, affine: Affine) -> None:
    exp_a, exp_aff = canonical(array, affine)
    np.testing.assert_allclose(vol_affine[:3, :3], exp_aff[:3, :3], atol=1e-4)
    np.testing.assert_allclose(vol_affine[:3, 3], exp_aff[:3, 3], atol=1e-3)
    assert vol_array.shape == exp_a.shape
    assert np.array_equal(vol_array, exp_a.astype(np.float32))


@pytest.fixture(scope="module")
def ct(shared_data: Path) -> tuple[Array, Affine]:
    a, aff = load_nifti_krc(shared_data / "ct_abdomen_3mm" / "ct.nii.gz")
    return a, aff


@pytest.fixture(scope="module")
def ct_small(ct: tuple[Array, Affine]) -> tuple[Array, Affine]:
    """A 10-slice crop (slices 50..59) for the slower variants."""
    a, aff = ct
    out = aff.copy()
    out[:3, 3] = aff[:3, 3] + 50 * aff[:3, 0]
    return np.ascontiguousarray(a[50:60]), out


# ---------------------------------------------------------------- orientations


@pytest.mark.parametrize("variant", ["as_nifti_ras", "lps", "oblique", "reversed", "shuffled"])
def test_ct_abdomen_geometries(ct: tuple[Array, Affine], tmp_path: Path, variant: str) -> None:
    a, aff = ct
    order = None
    if variant == "lps":
        a, aff = flip_rows_cols(a, aff)
        assert aff[0, 2] > 0 and aff[1, 1] > 0  # columns to the left, rows posterior
    elif variant == "oblique":
        aff = rotated(aff, rotation(20.0, -12.0, 30.0))
    elif variant == "reversed":
        # slice axis pointing against the normal: files stored head to feet
        a, aff = a[::-1], aff.copy()
        aff[:3, 3] = ct[1][:3, 3] + (a.shape[0] - 1) * ct[1][:3, 0]
        aff[:3, 0] = -ct[1][:3, 0]
    elif variant == "shuffled":
        order = list(np.random.default_rng(3).permutation(a.shape[0]))
    paths = write_series(a, aff, tmp_path, slice_order=order, seed=variant)
    vol = load_series(tmp_path)
    assert_same(vol.array, vol.affine, a, aff)
    # slice k came from the file holding slice k
    expected_uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths]
    _, exp_aff = canonical(a, aff)
    if exp_aff is not aff:
        expected_uids = expected_uids[::-1]
    assert list(vol.sop_instance_uids) == expected_uids
    assert vol.modality == "CT" and vol.frame_numbers == ()
    # cross-check the affine with highdicom's own series reader
    hd_vol = hd.get_volume_from_series([pydicom.dcmread(p) for p in paths])
    assert_same(vol.array, vol.affine, hd_vol.array, hd_vol.affine)


def test_mr_abdomen(shared_data: Path, tmp_path: Path) -> None:
    a, aff = load_nifti_krc(shared_data / "mr_abdomen_3mm" / "mr.nii.gz")
    write_series(a, aff, tmp_path, modality="MR")
    vol = load_series(tmp_path)
    assert vol.modality == "MR"
    # MR is stored unsigned: the writer clips the few negative values to 0
    assert_same(vol.array, vol.affine, np.clip(a, 0, None), aff)


def test_ct_liver_3slice_real_ge_files(shared_data: Path) -> None:
    files = sorted((shared_data / "ct_liver_3slice").glob("0*.dcm"))
    vol = load_series(files[::-1])
    dss = sorted(
        (pydicom.dcmread(f) for f in files), key=lambda d: float(d.ImagePositionPatient[2])
    )
    expected = np.stack(
        [d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss]
    )
    assert np.array_equal(vol.array, expected.astype(np.float32))
    assert vol.sop_instance_uids == tuple(d.SOPInstanceUID for d in dss)
    ps = [float(v) for v in dss[0].PixelSpacing]
    assert vol.spacing[1:] == pytest.approx((ps[0], ps[1]))
    np.testing.assert_allclose(vol.affine[:3, 3], [float(v) for v in dss[0].ImagePositionPatient])
    hd_vol = hd.get_volume_from_series(dss)
    assert_same(vol.array, vol.affine, hd_vol.array, hd_vol.affine)
    assert vol.headers["Modality"] == "CT" and "PatientSex" in vol.headers
    assert vol.array.min() < -900  # HU (air), rescale applied


# ---------------------------------------------------------------- encodings


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless])
def test_compressed_series_load_identically(
    ct_small: tuple[Array, Affine], tmp_path: Path, syntax: str
) -> None:
    a, aff = ct_small
    write_series(a, aff, tmp_path, transfer_syntax=syntax, seed=str(syntax))
    assert pydicom.dcmread(next(tmp_path.iterdir())).file_meta.TransferSyntaxUID == syntax
    vol = load_series(tmp_path)
    assert_same(vol.array, vol.affine, a, aff)


def test_enhanced_multiframe_ct(ct_small: tuple[Array, Affine], tmp_path: Path) -> None:
    a, aff = ct_small
    aff = rotated(aff, rotation(0.0, 0.0, 15.0))
    paths = write_series(a, aff, tmp_path / "single", slice_order=list(range(10))[::-1])
    singles = [pydicom.dcmread(p) for p in paths]
    rng = np.random.default_rng(1)
    singles = [singles[i] for i in rng.permutation(len(singles))]  # frames in shuffled order
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(
        singles,
        series_instance_uid=generate_uid(),
        series_number=2,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    out = tmp_path / "mf"
    out.mkdir()
    mf.save_as(out / "mf.dcm")
    vol = load_series(out)
    assert_same(vol.array, vol.affine, a, aff)
    assert len(set(vol.sop_instance_uids)) == 1
    assert sorted(f for f in vol.frame_numbers if f is not None) == list(range(1, 11))
    assert vol.frame_numbers != tuple(range(1, 11))  # sorted by position, not frame order


# ---------------------------------------------------------------- refusals


def _small(tmp_path: Path, name: str = "s", **kw: Any) -> tuple[list[Path], Array, Affine]:
    a = np.arange(6 * 16 * 16, dtype=np.float32).reshape(6, 16, 16) % 300 - 100
    aff = np.array([[0, 0, 2.0, -10], [0, 2.0, 0, -20], [5.0, 0, 0, 30], [0, 0, 0, 1]])
    aff = np.asarray(kw.pop("affine", aff), dtype=np.float64)
    paths = write_series(a, aff, tmp_path / name, seed=name, **kw)
    return paths, a, aff


def _refused(source: Any, reason: RefusalReason, **kw: Any) -> SeriesRefused:
    with pytest.raises(SeriesRefused) as info:
        load_series(source, **kw)
    assert info.value.reason is reason, str(info.value)
    return info.value


def test_small_series_loads(tmp_path: Path) -> None:
    paths, a, aff = _small(tmp_path)
    vol = load_series(paths)
    assert_same(vol.array, vol.affine, a, aff)


def test_refuses_localizer(tmp_path: Path) -> None:
    info = SeriesInfo(image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    paths, _, _ = _small(tmp_path, info=info)
    err = _refused(paths, RefusalReason.LOCALIZER)
    assert "localizer" in str(err)


def test_refuses_mixed_orientation(tmp_path: Path) -> None:
    paths, _, _ = _small(tmp_path)
    ds = pydicom.dcmread(paths[2])
    c, s = np.cos(0.3), np.sin(0.3)
    ds.ImageOrientationPatient = [c, s, 0.0, -s, c, 0.0]
    ds.save_as(paths[2])
    _refused(tmp_path / "s", RefusalReason.MIXED_ORIENTATION)


def test_refuses_missing_position(tmp_path: Path) -> None:
    paths, _, _ = _small(tmp_path)
    ds = pydicom.dcmread(paths[3])
    del ds.ImagePositionPatient
    ds.save_as(paths[3])
    err = _refused(paths, RefusalReason.MISSING_GEOMETRY)
    assert "ImagePositionPatient" in str(err)


def test_uneven_spacing_refused_or_resampled(tmp_path: Path) -> None:
    paths, a, aff = _small(tmp_path)
    paths[2].unlink()  # a missing slice
    err = _refused(tmp_path / "s", RefusalReason.UNEVEN_SPACING)
    assert "10.00" in str(err)
    vol = load_series(tmp_path / "s", uneven="resample")
    assert vol.shape == a.shape
    np.testing.assert_allclose(vol.affine, aff, atol=1e-4)
    assert vol.headers["loader"]["resampled"] is True
    np.testing.assert_allclose(vol.array[2], (a[1] + a[3]) / 2, atol=1e-4)  # interpolated
    assert np.array_equal(vol.array[4], a[4])


def test_gantry_tilt_refused_or_sheared(tmp_path: Path) -> None:
    tilted = np.array([[0, 0, 2.0, -10], [0.9, 2.0, 0, -20], [5.0, 0, 0, 30], [0, 0, 0, 1]])
    paths, a, _ = _small(tmp_path, affine=tilted)
    err = _refused(paths, RefusalReason.GANTRY_TILT)
    assert "10.2 degrees" in str(err)
    vol = load_series(paths, tilt="shear")
    np.testing.assert_allclose(vol.affine, tilted, atol=1e-4)
    assert np.array_equal(vol.array, a)


def test_refuses_duplicate_positions_and_mixed_series(tmp_path: Path) -> None:
    paths, _, _ = _small(tmp_path)
    ds = pydicom.dcmread(paths[1])
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "s" / "dup.dcm")
    _refused(tmp_path / "s", RefusalReason.DUPLICATE_POSITION)
    (tmp_path / "s" / "dup.dcm").unlink()
    other, _, _ = _small(tmp_path, name="other")
    shutil.copy(other[0], tmp_path / "s" / "other.dcm")
    _refused(tmp_path / "s", RefusalReason.MIXED_SERIES)


def test_refuses_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not dicom")
    _refused(tmp_path, RefusalReason.EMPTY)


def test_refuses_undecodable_pixels(tmp_path: Path) -> None:
    paths, _, _ = _small(tmp_path, transfer_syntax=RLELossless)
    ds = pydicom.dcmread(paths[0])
    ds.PixelData = encapsulate([b"\x00" * 64])  # a corrupt RLE stream (no valid header)
    ds.save_as(paths[0])
    err = _refused(paths, RefusalReason.UNREADABLE)
    assert "RLE Lossless" in str(err)


def test_refuses_mixed_frame_of_reference_sop_class_and_size(tmp_path: Path) -> None:
    paths, _, _ = _small(tmp_path)
    ds = pydicom.dcmread(paths[4])
    ds.FrameOfReferenceUID = generate_uid()
    ds.save_as(paths[4])
    _refused(paths, RefusalReason.MIXED_FRAME_OF_REFERENCE)

    paths, _, _ = _small(tmp_path, name="sop")
    ds = pydicom.dcmread(paths[4])
    ds.SOPClassUID = pydicom.uid.MRImageStorage
    ds.save_as(paths[4])
    _refused(paths, RefusalReason.MIXED_SOP_CLASS)

    # same series and frame of reference, a 16x20 matrix further up
    paths, _, _ = _small(tmp_path, name="size")
    wide = np.zeros((2, 16, 20), dtype=np.float32)
    aff = np.array([[0, 0, 2.0, -10], [0, 2.0, 0, -20], [5.0, 0, 0, 60], [0, 0, 0, 1]])
    more = write_series(wide, aff, tmp_path / "size2", seed="size")
    for p in more:  # distinct instances (the writer derives UIDs from the slice index)
        ds = pydicom.dcmread(p)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(p)
    _refused([*paths, *more], RefusalReason.MIXED_SIZE)


def test_repeated_copies_of_an_instance_are_ignored(tmp_path: Path) -> None:
    paths, a, aff = _small(tmp_path)
    shutil.copy(paths[2], tmp_path / "s" / "copy.dcm")
    vol = load_series(tmp_path / "s")
    assert_same(vol.array, vol.affine, a, aff)


def test_enhanced_multiframe_mr(shared_data: Path, tmp_path: Path) -> None:
    a, aff = load_nifti_krc(shared_data / "mr_abdomen_3mm" / "mr.nii.gz")
    a = np.clip(a, 0, None)
    paths = write_series(a, aff, tmp_path / "single", modality="MR", seed="mr-mf")
    mf = hd.legacy.LegacyConvertedEnhancedMRImage(
        [pydicom.dcmread(p) for p in paths],
        series_instance_uid=generate_uid(),
        series_number=3,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    (tmp_path / "mf").mkdir()
    mf.save_as(tmp_path / "mf" / "mr.dcm")
    vol = load_series(tmp_path / "mf")
    assert vol.modality == "MR" and len(vol.frame_numbers) == a.shape[0]
    assert_same(vol.array, vol.affine, a, aff)


def test_multiframe_per_frame_rescale(tmp_path: Path) -> None:
    """A per-frame Pixel Value Transformation overrides the shared one, frame by frame."""
    a = np.random.default_rng(0).integers(-500, 500, (4, 8, 8)).astype(np.float32) * 2
    aff = np.array([[0, 0, 2.0, 0], [0, 2.0, 0, 0], [5.0, 0, 0, 0], [0, 0, 0, 1]])
    paths = write_series(a, aff, tmp_path / "single")
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in paths],
        series_instance_uid=generate_uid(),
        series_number=1,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    stored = np.zeros((4, 8, 8), dtype=np.int16)
    for i, group in enumerate(mf.PerFrameFunctionalGroupsSequence):
        k = round(float(group.PlanePositionSequence[0].ImagePositionPatient[2]) / 5.0)
        item = pydicom.Dataset()
        item.RescaleSlope = 2
        item.RescaleIntercept = -1000 + 10 * i
        item.RescaleType = "HU"
        group.PixelValueTransformationSequence = [item]
        stored[i] = (a[k] + 1000 - 10 * i) / 2  # exact: a and the intercepts are even
    mf.PixelData = stored.tobytes()
    (tmp_path / "mf").mkdir()
    mf.save_as(tmp_path / "mf" / "mf.dcm")
    vol = load_series(tmp_path / "mf")
    assert_same(vol.array, vol.affine, a, aff)
