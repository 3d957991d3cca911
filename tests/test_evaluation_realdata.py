"""The harness on the shared real CT and MR with their TotalSegmentator reference labels.

Until the trained weights are in the repository the "results" here are a named
stand-in for a model's output (the reference masks perturbed, or resampled to a
coarser grid); the figures are checked against MONAI and SimpleITK computed
independently on the same files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.metrics import HausdorffDistanceMetric, SurfaceDistanceMetric
from scipy import ndimage

from models.evaluation.dataset import resample_nearest
from models.nifti import load_nifti_krc, save_nifti_krc
from node.cli import main

CT_ORGANS = (
    "liver",
    "pancreas",
    "gallbladder",
    "spleen",
    "portal_vein_and_splenic_vein",
    "kidney_left",
)
MR_LABELS = {"spleen": 1, "kidney_right": 2, "gallbladder": 4, "liver": 5, "pancreas": 7}


def _fake_model_output(mask: np.ndarray) -> np.ndarray:
    """Stand-in for a model's mask: eroded by one voxel and shifted one column."""
    return np.roll(ndimage.binary_erosion(mask), 1, axis=2)


def test_ct_against_totalsegmentator_labels(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "ct_abdomen_3mm"
    ref, res = tmp_path / "reference", tmp_path / "results"
    (ref / "masks" / "ct").mkdir(parents=True)
    (res / "masks" / "ct").mkdir(parents=True)
    (ref / "images").mkdir()
    shutil.copy(src / "ct.nii.gz", ref / "images" / "ct.nii.gz")
    expected: dict[str, tuple[float, float]] = {}
    for organ in CT_ORGANS:
        shutil.copy(src / "labels" / f"{organ}.nii.gz", ref / "masks" / "ct" / f"{organ}.nii.gz")
        arr, affine = load_nifti_krc(src / "labels" / f"{organ}.nii.gz")
        pred = _fake_model_output(arr > 0)
        save_nifti_krc(pred.astype(np.uint8), affine, res / "masks" / "ct" / f"{organ}.nii.gz")
        spacing = tuple(float(x) for x in np.linalg.norm(affine[:3, :3], axis=0))
        p_t = torch.from_numpy(pred[None, None].astype(np.float32))
        r_t = torch.from_numpy((arr > 0)[None, None].astype(np.float32))
        hd = HausdorffDistanceMetric(percentile=95)(p_t, r_t, spacing=spacing).item()
        asd = SurfaceDistanceMetric(symmetric=True)(p_t, r_t, spacing=spacing).item()
        expected[organ] = (hd, asd)
    out = tmp_path / "out"
    assert (
        main(
            [
                "evaluate",
                "--reference",
                str(ref),
                "--results",
                str(res),
                "--out",
                str(out),
                "--bootstrap",
                "50",
            ]
        )
        == 0
    )
    data = json.loads((out / "evaluation.json").read_text())
    rows = {r["structure"]: r for r in data["segmentation"]["per_case"]}
    assert set(rows) == set(CT_ORGANS)
    for organ, (hd, asd) in expected.items():
        assert rows[organ]["hd95_mm"] == pytest.approx(hd, rel=1e-5), organ
        assert rows[organ]["assd_mm"] == pytest.approx(asd, rel=1e-5), organ
    # liver: ~1.12 l in the reference (data README); the stand-in is smaller after erosion
    assert rows["liver"]["volume_ref_ml"] == pytest.approx(1120, rel=0.02)
    assert 0.8 < rows["liver"]["dice"] < 1.0
    assert rows["pancreas"]["dice"] < rows["liver"]["dice"]  # small organs suffer most
    assert "Worst cases" in (out / "evaluation.html").read_text()


def test_mr_results_on_another_grid_match_simpleitk(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "mr_abdomen_3mm"
    labels, affine = load_nifti_krc(src / "labels.nii.gz")
    # results on a coarser, anisotropic grid (3 x 6 x 6 mm), offset by a quarter voxel
    coarse = affine.copy()
    coarse[:3, 1:3] *= 2.0
    coarse[:3, 3] += affine[:3, 1:3].sum(axis=1) * 0.25
    cshape = (labels.shape[0], labels.shape[1] // 2, labels.shape[2] // 2)
    ref, res = tmp_path / "reference", tmp_path / "results"
    (ref / "masks" / "mr").mkdir(parents=True)
    (res / "masks" / "mr").mkdir(parents=True)
    for name, value in MR_LABELS.items():
        m = (labels == value).astype(np.uint8)
        save_nifti_krc(m, affine, ref / "masks" / "mr" / f"{name}.nii.gz")
        save_nifti_krc(
            resample_nearest(m, affine, cshape, coarse),
            coarse,
            res / "masks" / "mr" / f"{name}.nii.gz",
        )
    out = tmp_path / "out"
    assert (
        main(
            [
                "evaluate",
                "--reference",
                str(ref),
                "--results",
                str(res),
                "--out",
                str(out),
                "--bootstrap",
                "50",
            ]
        )
        == 0
    )
    data = json.loads((out / "evaluation.json").read_text())
    rows = {r["structure"]: r for r in data["segmentation"]["per_case"]}
    for name in MR_LABELS:
        # independent path: SimpleITK reads both NIfTI files with their own geometry,
        # resamples the coarse result onto the reference (nearest) and measures overlap
        r_img = sitk.ReadImage(str(ref / "masks" / "mr" / f"{name}.nii.gz"), sitk.sitkUInt8)
        p_img = sitk.ReadImage(str(res / "masks" / "mr" / f"{name}.nii.gz"), sitk.sitkUInt8)
        p_on_r = sitk.Resample(
            p_img, r_img, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8
        )
        f = sitk.LabelOverlapMeasuresImageFilter()
        f.Execute(r_img, p_on_r)
        assert rows[name]["dice"] == pytest.approx(f.GetDiceCoefficient(), abs=1e-3), name
        assert 0.5 < rows[name]["dice"] < 1.0


def test_builtin_seg_reader_matches_dicom_sr_reader(shared_data: Path) -> None:
    """The harness's own highdicom adapter (used where dicom_sr is not plugged in) reads
    the real dcmqi liver SEG exactly as ``dicom_sr.readers`` does."""
    from models.evaluation.dataset import read_seg
    from node.evaluate_command import seg_reader

    path = shared_data / "ct_liver_3slice" / "liver_seg.dcm"
    ours, theirs = read_seg(path), seg_reader(path)
    assert set(ours.structures) == set(theirs.structures) == {"liver"}
    assert np.array_equal(ours.structures["liver"], theirs.structures["liver"])
    assert np.allclose(ours.affine, theirs.affine)
    assert int(ours.structures["liver"].sum()) == 107098
