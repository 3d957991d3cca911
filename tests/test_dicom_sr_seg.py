"""SEG round trips on real data: masks -> SEG -> masks, voxel-identical on the source grid.

Series are written as real DICOM from the shared NIfTI data (models.series_writer)
in several geometries; each SEG is checked with dciodvfy and read back both
with our reader and with highdicom.
"""

from __future__ import annotations

import logging
import random
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID, JPEGLSLossless, RLELossless

from dicom_sr import BuildError, OutputOptions, build_seg, read_seg
from dicom_sr.testing import findings_from_masks, flip_axes, rotate_affine, sphere
from models.findings import Findings
from models.nifti import load_nifti_krc
from models.series_writer import SeriesInfo, write_series
from models.vocab import LesionKind, Organ, SubSite

Masks = dict[str, npt.NDArray[np.bool_]]


LABELMAP_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.7"
SEGMENTATION_SOP_CLASS = UID("1.2.840.10008.5.1.4.1.1.66.4")
SEGMENT_ZERO = (
    "Error - SegmentNumber not monotonically increasing from one by one - have "
    "SegmentSequence item number 1 (from one) with SegmentNumber of 0"
)
# dicom3tools 2022 (Debian 12) predates the Label Map Segmentation SOP class
# (2024): on a LABELMAP SEG it can only say that it knows no IOD for it, and it
# objects to the background segment 0. Nothing else is checked that way.
LABELMAP_AS_IS = {"Error - Information Object Not found", SEGMENT_ZERO}
# So a LABELMAP SEG is checked a second time as a Segmentation Storage instance
# (a copy with the SOP class swapped): every module the two IODs share is
# validated, and only what the Label Map IOD changes may remain: no per-frame
# Segment Identification (a label-map frame holds all segments), Segmentation
# Type LABELMAP, and the background segment 0 (docs/dicom-outputs.md).
LABELMAP_AS_SEGMENTATION = {
    "Error - Missing attribute Type 1 Required Element=<SegmentIdentificationSequence> "
    "Module=<SegmentationMacro>",
    "Error - Unrecognized enumerated value <LABELMAP> for value 1 of attribute <Segmentation Type>",
    "Error - Value is zero for value 1 of attribute <Segment Number>",
    SEGMENT_ZERO,
}


def _dciodvfy(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in (out.stdout + out.stderr).splitlines() if "Error" in line]


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's errors; a LABELMAP SEG is also validated as a Segmentation (see above)."""
    errors = _dciodvfy(path)
    ds = pydicom.dcmread(path)
    if str(ds.SOPClassUID) != LABELMAP_SOP_CLASS:
        return errors
    unexpected = [e for e in errors if e not in LABELMAP_AS_IS]
    ds.SOPClassUID = SEGMENTATION_SOP_CLASS
    ds.file_meta.MediaStorageSOPClassUID = SEGMENTATION_SOP_CLASS
    as_seg = path.with_name(path.stem + "-as-segmentation.dcm")
    ds.save_as(as_seg, enforce_file_format=True)
    return unexpected + [e for e in _dciodvfy(as_seg) if e not in LABELMAP_AS_SEGMENTATION]


@pytest.fixture(scope="session")
def ct_case(shared_data: Path) -> tuple[npt.NDArray[Any], npt.NDArray[np.float64], Masks]:
    d = shared_data / "ct_abdomen_3mm"
    ct, aff = load_nifti_krc(d / "ct.nii.gz")
    masks: Masks = {}
    for name in ("liver", "pancreas", "gallbladder"):
        m, _ = load_nifti_krc(d / "labels" / f"{name}.nii.gz")
        masks[name] = m > 0
    liver_idx = np.argwhere(masks["liver"])
    centre = liver_idx[len(liver_idx) // 2]
    masks["lesion1"] = sphere(ct.shape, centre, 3.2) & masks["liver"]
    panc_idx = np.argwhere(masks["pancreas"])
    masks["lesion2"] = sphere(ct.shape, panc_idx[len(panc_idx) // 2], 1.6) & masks["pancreas"]
    return ct, aff, masks


def make_findings(
    masks: Masks, affine: npt.NDArray[np.float64], dss: Sequence[Dataset], image: Any = None
) -> Findings:
    organs = {Organ.LIVER: masks["liver"], Organ.PANCREAS: masks["pancreas"]}
    if "gallbladder" in masks:
        organs[Organ.GALLBLADDER] = masks["gallbladder"]
    lesions = [(Organ.LIVER, LesionKind.MASS, masks["lesion1"], SubSite.COUINAUD_VI)]
    if "lesion2" in masks and masks["lesion2"].any():
        lesions.append((Organ.PANCREAS, LesionKind.CYST, masks["lesion2"], SubSite.PANCREAS_HEAD))
    return findings_from_masks(
        organs,
        lesions,
        affine,
        [str(d.SOPInstanceUID) for d in dss],
        str(dss[0].SeriesInstanceUID),
        image=image,
    )


def expected_masks(findings: Findings) -> list[npt.NDArray[np.bool_]]:
    masks = [o.mask for o in findings.organs] + [les.mask for les in findings.lesions]
    return [m for m in masks if m.any()]  # empty masks get no segment


def write(
    array: npt.NDArray[Any],
    affine: npt.NDArray[np.float64],
    out: Path,
    seed: str,
    **kw: Any,
) -> list[Dataset]:
    paths = write_series(array, affine, out, info=SeriesInfo(), seed=seed, **kw)
    return [pydicom.dcmread(p) for p in paths]


def roundtrip(findings: Findings, dss: Sequence[Dataset], tmp: Path, **kw: Any) -> Path:
    shuffled = list(dss)
    random.Random(7).shuffle(shuffled)  # builders must not depend on the order given
    seg = build_seg(findings, shuffled, pipeline_version="0.1.0-test", **kw)
    path = tmp / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    uids = list(findings.provenance.input_sop_uids)
    fn = kw.get("frame_numbers")
    got = read_seg(path, uids, frame_numbers=fn)
    want = expected_masks(findings)
    assert len(got.segments) == len(want)
    if not kw.get("labelmap"):
        for n, m in zip(sorted(got.masks), want, strict=True):
            assert got.masks[n].shape == m.shape
            assert np.array_equal(got.masks[n], m), f"segment {n} differs"
    return path


Variant = Callable[
    [npt.NDArray[Any], npt.NDArray[np.float64], Masks],
    tuple[npt.NDArray[Any], npt.NDArray[np.float64], Masks, dict[str, Any]],
]


def _lps(
    ct: npt.NDArray[Any], aff: npt.NDArray[np.float64], m: Masks
) -> tuple[npt.NDArray[Any], npt.NDArray[np.float64], Masks, dict[str, Any]]:
    return ct, aff, m, {}


def _ras_flipped(
    ct: npt.NDArray[Any], aff: npt.NDArray[np.float64], m: Masks
) -> tuple[npt.NDArray[Any], npt.NDArray[np.float64], Masks, dict[str, Any]]:
    ct2, aff2 = flip_axes(ct, aff, (1, 2))
    return ct2, aff2, {k: flip_axes(v, aff, (1, 2))[0] for k, v in m.items()}, {}


def _reversed(
    ct: npt.NDArray[Any], aff: npt.NDArray[np.float64], m: Masks
) -> tuple[npt.NDArray[Any], npt.NDArray[np.float64], Masks, dict[str, Any]]:
    ct2, aff2 = flip_axes(ct, aff, (0,))
    n = ct.shape[0]
    return (
        ct2,
        aff2,
        {k: flip_axes(v, aff, (0,))[0] for k, v in m.items()},
        {"slice_order": list(range(n))[::-1]},
    )


def _oblique(
    ct: npt.NDArray[Any], aff: npt.NDArray[np.float64], m: Masks
) -> tuple[npt.NDArray[Any], npt.NDArray[np.float64], Masks, dict[str, Any]]:
    return ct, rotate_affine(aff, 23.0, (1.0, 0.4, 0.2)), m, {}


def _compressed(
    ct: npt.NDArray[Any], aff: npt.NDArray[np.float64], m: Masks
) -> tuple[npt.NDArray[Any], npt.NDArray[np.float64], Masks, dict[str, Any]]:
    return ct, aff, m, {"transfer_syntax": JPEGLSLossless}


@pytest.mark.parametrize(
    "variant",
    [_lps, _ras_flipped, _reversed, _oblique, _compressed],
    ids=["lps", "ras-flipped", "reversed-order", "oblique", "jpegls-source"],
)
def test_ct_roundtrip_binary(
    ct_case: tuple[npt.NDArray[Any], npt.NDArray[np.float64], Masks],
    variant: Variant,
    tmp_path: Path,
) -> None:
    ct, aff, masks = ct_case
    ct2, aff2, masks2, kw = variant(ct, aff, masks)
    dss = write(ct2, aff2, tmp_path / "ct", seed=variant.__name__, **kw)
    findings = make_findings(masks2, aff2, dss)
    path = roundtrip(findings, dss, tmp_path)
    seg = pydicom.dcmread(path)
    assert seg.SegmentationType == "BINARY"
    assert seg.SegmentsOverlap == "YES"  # organs include their lesions (documented policy)
    # frames with no segmented pixels are left out, the others keep their place
    assert int(seg.NumberOfFrames) < ct.shape[0] * len(seg.SegmentSequence)
    # highdicom agrees with our reader, by source instance
    hd_seg = hd.seg.Segmentation.from_dataset(seg)
    arr = hd_seg.get_pixels_by_source_instance(
        [str(d.SOPInstanceUID) for d in dss], assert_missing_frames_are_empty=True
    )
    assert np.array_equal(arr[..., 0] > 0, masks2["liver"])


def test_seg_coding_and_metadata(
    ct_case: tuple[npt.NDArray[Any], npt.NDArray[np.float64], Masks], tmp_path: Path
) -> None:
    ct, aff, masks = ct_case
    dss = write(ct, aff, tmp_path / "ct", seed="coding")
    findings = make_findings(masks, aff, dss)
    seg = build_seg(findings, dss, pipeline_version="0.1.0-test")
    by_label = {str(s.SegmentLabel): s for s in seg.SegmentSequence}
    liver = by_label["Liver"]
    assert liver.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert liver.SegmentAlgorithmType == "AUTOMATIC"
    alg = liver.SegmentationAlgorithmIdentificationSequence[0]
    assert alg.AlgorithmName == "hpb-test-model"
    assert alg.AlgorithmVersion == "0.0-test"
    assert alg.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
    assert len(liver.RecommendedDisplayCIELabValue) == 3
    lesion = by_label["Lesion 1 (mass, liver segment VI)"]
    assert lesion.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert lesion.SegmentedPropertyTypeCodeSequence[0].CodeValue == "4147007"
    assert lesion.AnatomicRegionSequence[0].CodeValue == "10200004"
    assert lesion.TrackingID == "lesion 1"
    # patient/study copied, new series, marking
    assert seg.StudyInstanceUID == dss[0].StudyInstanceUID
    assert seg.PatientID == dss[0].PatientID
    assert seg.SeriesInstanceUID != dss[0].SeriesInstanceUID
    assert "NOT FOR CLINICAL USE" in seg.SeriesDescription
    assert "NOT FOR CLINICAL USE" in seg.ContentDescription
    unmarked = build_seg(findings, dss, pipeline_version="0.1.0-test", not_for_clinical_use=False)
    assert "NOT FOR CLINICAL USE" not in unmarked.SeriesDescription


def test_labelmap_paints_lesions_over_organs(
    ct_case: tuple[npt.NDArray[Any], npt.NDArray[np.float64], Masks], tmp_path: Path
) -> None:
    ct, aff, masks = ct_case
    dss = write(ct, aff, tmp_path / "ct", seed="labelmap")
    findings = make_findings(masks, aff, dss)
    path = roundtrip(findings, dss, tmp_path, labelmap=True)
    seg = pydicom.dcmread(path)
    assert seg.SegmentationType == "LABELMAP"
    got = read_seg(path, list(findings.provenance.input_sop_uids))
    numbers = {s.label: s.number for s in got.segments}
    liver = got.masks[numbers["Liver"]]
    lesion = got.masks[numbers["Lesion 1 (mass, liver segment VI)"]]
    assert np.array_equal(lesion, masks["lesion1"])
    assert not (liver & lesion).any()  # no overlap in a label map
    assert np.array_equal(liver | lesion, masks["liver"])  # union restores the organ


def test_series_with_gaps(
    ct_case: tuple[npt.NDArray[Any], npt.NDArray[np.float64], Masks], tmp_path: Path
) -> None:
    ct, aff, masks = ct_case
    dss = write(ct, aff, tmp_path / "ct", seed="gaps")
    keep = [k for k in range(ct.shape[0]) if k % 7 != 3]  # drop every 7th slice
    sub = {name: m[keep] for name, m in masks.items()}
    sub_dss = [dss[k] for k in keep]
    findings = make_findings(sub, aff, sub_dss)
    roundtrip(findings, sub_dss, tmp_path)


def test_mr_roundtrip_from_label_map(shared_data: Path, tmp_path: Path) -> None:
    d = shared_data / "mr_abdomen_3mm"
    mr, aff = load_nifti_krc(d / "mr.nii.gz")
    labels, _ = load_nifti_krc(d / "labels.nii.gz")
    masks: Masks = {"liver": labels == 5, "pancreas": labels == 7, "gallbladder": labels == 4}
    idx = np.argwhere(masks["liver"])
    masks["lesion1"] = sphere(mr.shape, idx[len(idx) // 2], 2.5) & masks["liver"]
    dss = write(mr.astype(np.float64), aff, tmp_path / "mr", seed="mr", modality="MR")
    assert dss[0].Modality == "MR"
    findings = make_findings(masks, aff, dss, image=mr)
    roundtrip(findings, dss, tmp_path)


def test_real_ct_and_real_seg(shared_data: Path, tmp_path: Path) -> None:
    d = shared_data / "ct_liver_3slice"
    dss = [pydicom.dcmread(d / f"0{i}.dcm") for i in (1, 2, 3)]
    # order the volume by position along the slice normal
    normal = np.cross(
        np.array(dss[0].ImageOrientationPatient[:3], dtype=float),
        np.array(dss[0].ImageOrientationPatient[3:], dtype=float),
    )
    dss.sort(key=lambda ds: float(np.dot(normal, np.array(ds.ImagePositionPatient, float))))
    uids = [str(ds.SOPInstanceUID) for ds in dss]
    theirs = read_seg(d / "liver_seg.dcm", uids)
    assert [s.label for s in theirs.segments] == ["Liver"]
    liver = theirs.masks[1]
    assert liver.shape == (3, 512, 512)
    assert int(liver.sum()) == 107098  # 3 frames of the dcmqi/RSNA liver SEG
    ipp0 = np.array(dss[0].ImagePositionPatient, float)
    step = np.array(dss[1].ImagePositionPatient, float) - ipp0
    ps = [float(v) for v in dss[0].PixelSpacing]
    iop = [float(v) for v in dss[0].ImageOrientationPatient]
    aff = np.eye(4)
    aff[:3, 0] = step
    aff[:3, 1] = np.array(iop[3:]) * ps[0]
    aff[:3, 2] = np.array(iop[:3]) * ps[1]
    aff[:3, 3] = ipp0
    lesion = sphere(liver.shape, tuple(np.argwhere(liver)[len(np.argwhere(liver)) // 2]), 6)
    masks: Masks = {"liver": liver, "pancreas": np.zeros_like(liver), "lesion1": lesion & liver}
    findings = make_findings(masks, aff, dss)
    path = roundtrip(findings, dss, tmp_path)
    ours = read_seg(path, uids)
    assert np.array_equal(ours.masks[ours.segment("Liver").number], liver)


def test_enhanced_multiframe_source(
    ct_case: tuple[npt.NDArray[Any], npt.NDArray[np.float64], Masks],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ct, aff, masks = ct_case
    dss = write(ct, aff, tmp_path / "ct", seed="enhanced")
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        dss,
        series_instance_uid=hd.UID(),
        series_number=77,
        sop_instance_uid=hd.UID(),
        instance_number=1,
    )
    assert int(enhanced.NumberOfFrames) == ct.shape[0]
    # map volume slice k -> frame by position
    frame_of: dict[tuple[float, ...], int] = {}
    for i, item in enumerate(enhanced.PerFrameFunctionalGroupsSequence, start=1):
        ipp = item.PlanePositionSequence[0].ImagePositionPatient
        frame_of[tuple(round(float(v), 3) for v in ipp)] = i
    frames = [frame_of[tuple(round(float(v), 3) for v in ds.ImagePositionPatient)] for ds in dss]
    uid = str(enhanced.SOPInstanceUID)
    caplog.set_level(logging.INFO, logger="dicom_sr.seg")
    findings = findings_from_masks(
        {Organ.LIVER: masks["liver"], Organ.PANCREAS: masks["pancreas"]},
        [(Organ.LIVER, LesionKind.MASS, masks["lesion1"], None)],
        aff,
        [uid] * ct.shape[0],
        str(enhanced.SeriesInstanceUID),
    )
    path = roundtrip(findings, [enhanced], tmp_path, frame_numbers=frames)
    seg = pydicom.dcmread(path)
    assert "dense" not in caplog.text  # overlap restored frame by frame
    ref = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert ref.SourceImageSequence[0].ReferencedSOPInstanceUID == uid
    with pytest.raises(BuildError, match="frame_numbers are required"):
        build_seg(findings, [enhanced], pipeline_version="0.1.0-test")


def test_rle_source_and_missing_instances(
    ct_case: tuple[npt.NDArray[Any], npt.NDArray[np.float64], Masks], tmp_path: Path
) -> None:
    ct, aff, masks = ct_case
    dss = write(ct, aff, tmp_path / "ct", seed="rle", transfer_syntax=RLELossless)
    findings = make_findings(masks, aff, dss)
    roundtrip(findings, dss, tmp_path)
    with pytest.raises(BuildError, match="not supplied"):
        build_seg(findings, dss[:-3], options=OutputOptions(pipeline_version="1"))


def test_lesion_covering_a_whole_organ_plane(
    ct_case: tuple[npt.NDArray[Any], npt.NDArray[np.float64], Masks],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An organ plane hidden entirely under a lesion still gets its own frame."""
    ct, aff, masks = ct_case
    dss = write(ct, aff, tmp_path / "ct", seed="covered")
    top = int(np.flatnonzero(masks["liver"].any(axis=(1, 2)))[0])
    covering = np.zeros_like(masks["liver"])
    covering[top : top + 2] = masks["liver"][top : top + 2]
    findings = make_findings({**masks, "lesion1": covering}, aff, dss)
    with caplog.at_level(logging.INFO, logger="dicom_sr.seg"):
        roundtrip(findings, dss, tmp_path)
    assert "dense SEG encoding used" in caplog.text


def test_kidney_segments_carry_laterality(
    ct_case: tuple[npt.NDArray[Any], npt.NDArray[np.float64], Masks],
    shared_data: Path,
    tmp_path: Path,
) -> None:
    ct, aff, _ = ct_case
    dss = write(ct, aff, tmp_path / "ct", seed="kidney")
    kidneys = {}
    for organ in (Organ.KIDNEY_LEFT, Organ.KIDNEY_RIGHT):
        m, _ = load_nifti_krc(shared_data / "ct_abdomen_3mm" / "labels" / f"{organ.value}.nii.gz")
        kidneys[organ] = m > 0
    findings = findings_from_masks(
        kidneys, [], aff, [str(d.SOPInstanceUID) for d in dss], str(dss[0].SeriesInstanceUID)
    )
    seg = build_seg(findings, dss, pipeline_version="0.1.0-test")
    mods = [
        s.SegmentedPropertyTypeCodeSequence[0]
        .SegmentedPropertyTypeModifierCodeSequence[0]
        .CodeValue
        for s in seg.SegmentSequence
    ]
    assert mods == ["7771000", "24028007"]  # left, right


@pytest.mark.parametrize("enhanced", [False, True], ids=["single-frame", "enhanced"])
def test_with_the_node_volume_loader(
    ct_case: tuple[npt.NDArray[Any], npt.NDArray[np.float64], Masks],
    tmp_path: Path,
    enhanced: bool,
) -> None:
    """The worker's path: models.loader Volume -> Findings on its grid -> SEG -> same masks."""
    from models.loader import load_series

    ct, aff, masks = ct_case
    ct2, aff2, masks2, kw = _reversed(ct, aff, masks)
    dss = write(ct2, aff2, tmp_path / "ct", seed=f"loader-{enhanced}", **kw)
    k_of = {str(ds.SOPInstanceUID): k for k, ds in enumerate(dss)}
    sources: list[Dataset] = dss
    if enhanced:
        sources = [
            hd.legacy.LegacyConvertedEnhancedCTImage(
                dss,
                series_instance_uid=hd.UID(),
                series_number=5,
                sop_instance_uid=hd.UID(),
                instance_number=1,
            )
        ]
    volume = load_series(sources)
    if enhanced:
        per = sources[0].PerFrameFunctionalGroupsSequence
        pos = {
            tuple(round(float(v), 3) for v in ds.ImagePositionPatient): k
            for k, ds in enumerate(dss)
        }
        order = [
            pos[
                tuple(
                    round(float(v), 3)
                    for v in per[int(fn) - 1].PlanePositionSequence[0].ImagePositionPatient
                )
            ]
            for fn in volume.frame_numbers
        ]
    else:
        order = [k_of[u] for u in volume.sop_instance_uids]
    on_grid = {name: m[order] for name, m in masks2.items()}
    assert np.allclose(volume.array, ct2[order], atol=0.5)
    findings = findings_from_masks(
        {Organ.LIVER: on_grid["liver"], Organ.PANCREAS: on_grid["pancreas"]},
        [(Organ.LIVER, LesionKind.MASS, on_grid["lesion1"], None)],
        volume.affine,
        volume.sop_instance_uids,
        volume.series_instance_uid,
    )
    frames = list(volume.frame_numbers) or None
    seg = build_seg(findings, sources, pipeline_version="0.1.0-test", frame_numbers=frames)
    got = read_seg(seg, list(volume.sop_instance_uids), frame_numbers=frames)
    assert np.array_equal(got.masks[1], on_grid["liver"])
    assert np.array_equal(got.masks[3], on_grid["lesion1"])


def test_resampled_grid_is_refused(
    ct_case: tuple[npt.NDArray[Any], npt.NDArray[np.float64], Masks], tmp_path: Path
) -> None:
    ct, aff, masks = ct_case
    dss = write(ct[:20], aff, tmp_path / "ct", seed="resampled")
    uids = [str(d.SOPInstanceUID) for d in dss]
    uids[5] = uids[4]  # two volume slices from one source image (nearest-slice resampling)
    findings = findings_from_masks(
        {Organ.LIVER: masks["liver"][:20] | masks["pancreas"][:20]},
        [],
        aff,
        uids,
        str(dss[0].SeriesInstanceUID),
    )
    with pytest.raises(BuildError, match="resampled grid"):
        build_seg(findings, dss, pipeline_version="1")
