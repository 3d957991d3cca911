"""Evaluation metrics against hand-computed cases and independent implementations
(scikit-learn, MONAI, SimpleITK, nltk), including the edge cases."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDistanceMetric
from sklearn.metrics import cohen_kappa_score, confusion_matrix, roc_auc_score

from models.evaluation.classification import (
    auroc,
    binary_summary,
    bootstrap,
    calibration,
    cohen_kappa,
    confusion,
    fleiss_kappa,
    roc_points,
)
from models.evaluation.detection import froc, longest_axial_diameter_mm, match_lesions
from models.evaluation.segmentation import (
    centroid_error_mm,
    compare_masks,
    dice,
    directed_surface_distances,
    iou,
    surface_metrics,
)

# --------------------------------------------------------------------------- diagnosis


def test_confusion_rates_hand_computed_and_sklearn() -> None:
    y = [1, 1, 1, 0, 0, 0, 0, 1]
    c = [1, 0, 1, 0, 1, 0, 0, 1]
    cm = confusion(y, c)
    assert (cm.tp, cm.fp, cm.tn, cm.fn) == (3, 1, 3, 1)
    assert cm.as_matrix() == confusion_matrix(y, c).tolist()
    assert cm.sensitivity == pytest.approx(3 / 4)
    assert cm.specificity == pytest.approx(3 / 4)
    assert cm.ppv == pytest.approx(3 / 4)
    assert cm.npv == pytest.approx(3 / 4)
    assert cm.accuracy == pytest.approx(6 / 8)


def test_rates_undefined_are_nan_not_zero() -> None:
    cm = confusion([0, 0, 0], [0, 1, 0])  # one class only: no positives
    assert math.isnan(cm.sensitivity)
    assert math.isnan(cm.npv) is False and cm.npv == 1.0
    assert cm.ppv == 0.0
    assert math.isnan(auroc([0, 0, 0], [0.1, 0.5, 0.9]))
    assert math.isnan(auroc([1, 1], [0.1, 0.9]))


def test_auroc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60)
    s = np.round(rng.random(60), 1)  # many ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    # hand case: positives 0.8, 0.4; negatives 0.4, 0.1 -> pairs 1, 1, 0.5, 1 -> 3.5/4
    assert auroc([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.1]) == pytest.approx(0.875)
    fpr, tpr = roc_points(y, s)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(y, s), abs=1e-12)


def test_bootstrap_interval_brackets_value_and_is_reproducible() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    s = np.clip(y * 0.3 + rng.random(80) * 0.7, 0, 1)
    a = bootstrap(auroc, y, s, n_resamples=300, seed=1)
    b = bootstrap(auroc, y, s, n_resamples=300, seed=1)
    assert a == b
    assert a.low <= a.value <= a.high
    assert 0.5 < a.low < a.high <= 1.0
    assert a.n_resamples == 300
    one_class = bootstrap(auroc, np.zeros(5, int), np.linspace(0, 1, 5), n_resamples=50)
    assert math.isnan(one_class.value) and one_class.n_resamples == 0


def test_calibration_ece_hand_computed() -> None:
    # bins of width 0.5: [0, .5) holds p=.2,.3 (y=0,1) ; [.5, 1] holds p=.8,.9,1.0 (y=1,1,0)
    y = [0, 1, 1, 1, 0]
    p = [0.2, 0.3, 0.8, 0.9, 1.0]
    cal = calibration(y, p, n_bins=2)
    assert cal.bin_count == (2, 3)
    expected = 2 / 5 * abs(0.5 - 0.25) + 3 / 5 * abs(2 / 3 - 0.9)
    assert cal.ece == pytest.approx(expected)
    perfect = calibration([0, 1], [0.0, 1.0], n_bins=10)
    assert perfect.ece == 0.0


def test_cohen_kappa_matches_sklearn_and_edge() -> None:
    rng = np.random.default_rng(5)
    a = rng.integers(0, 3, 50)
    b = np.where(rng.random(50) < 0.7, a, rng.integers(0, 3, 50))
    assert cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b))
    assert cohen_kappa([1, 0, 1, 0], [1, 0, 1, 0]) == 1.0
    assert math.isnan(cohen_kappa([1, 1, 1], [1, 1, 1]))  # chance agreement 1


def test_fleiss_kappa_textbook_example() -> None:
    # Fleiss (1971) style example as tabulated on the usual reference page:
    # 10 subjects, 14 raters, 5 categories; kappa = 0.210
    counts = [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
    ratings = np.array([[c for c, n in enumerate(row) for _ in range(n)] for row in counts])
    assert ratings.shape == (10, 14)
    assert fleiss_kappa(ratings) == pytest.approx(0.20993, abs=5e-4)
    assert fleiss_kappa([[1, 1, 1], [0, 0, 0]]) == pytest.approx(1.0)


def test_binary_summary_structure() -> None:
    y = np.array([1, 0, 1, 0, 1, 0, 0, 0])
    p = np.array([0.9, 0.2, 0.6, 0.4, 0.3, 0.1, 0.7, 0.05])
    s = binary_summary(y, p, n_resamples=200)
    assert s["confusion"] == {"tn": 4, "fp": 1, "fn": 1, "tp": 2}
    assert s["sensitivity"]["value"] == pytest.approx(2 / 3)
    assert s["auroc"]["value"] == pytest.approx(roc_auc_score(y, p))
    assert s["calibration"]["ece"] >= 0


# --------------------------------------------------------------------------- segmentation


def _blob(
    shape: tuple[int, int, int],
    centre: tuple[float, float, float],
    radii: tuple[float, float, float],
) -> np.ndarray:
    k, r, c = np.indices(shape)
    return (
        ((k - centre[0]) / radii[0]) ** 2
        + ((r - centre[1]) / radii[1]) ** 2
        + ((c - centre[2]) / radii[2]) ** 2
    ) <= 1.0


def test_dice_iou_hand_computed_and_edge_conventions() -> None:
    a = np.zeros((1, 4, 4), bool)
    b = np.zeros((1, 4, 4), bool)
    a[0, :2, :2] = True  # 4 voxels
    b[0, :2, :3] = True  # 6 voxels, 4 shared
    assert dice(a, b) == pytest.approx(8 / 10)
    assert iou(a, b) == pytest.approx(4 / 6)
    empty = np.zeros_like(a)
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0
    assert dice(empty, b) == 0.0 and dice(a, empty) == 0.0
    sm = surface_metrics(empty, b, (1, 1, 1))
    assert math.isinf(sm.hd95) and math.isinf(sm.assd)
    assert surface_metrics(empty, empty, (1, 1, 1)).hd95 == 0.0


def test_surface_distance_single_voxels_anisotropic() -> None:
    a = np.zeros((3, 3, 5), bool)
    b = np.zeros((3, 3, 5), bool)
    a[0, 0, 0] = True
    b[0, 0, 3] = True
    sm = surface_metrics(a, b, (2.0, 1.0, 0.5))
    assert sm.hd95 == pytest.approx(1.5) and sm.assd == pytest.approx(1.5)
    b2 = np.zeros_like(b)
    b2[2, 0, 0] = True
    assert surface_metrics(a, b2, (2.0, 1.0, 0.5)).hd95 == pytest.approx(4.0)
    affine = np.diag([2.0, 1.0, 0.5, 1.0])
    assert centroid_error_mm(a, b, affine) == pytest.approx(1.5)
    assert math.isnan(centroid_error_mm(a, np.zeros_like(a), affine))


def test_against_monai_on_anisotropic_blobs() -> None:
    shape = (20, 40, 36)
    spacing = (3.0, 0.8, 1.1)
    ref = _blob(shape, (10, 20, 18), (6, 12, 10))
    pred = _blob(shape, (11, 22, 17), (5, 13, 9))
    p_t = torch.from_numpy(pred[None, None].astype(np.float32))
    r_t = torch.from_numpy(ref[None, None].astype(np.float32))
    d = DiceMetric(include_background=True, reduction="none")(p_t, r_t).item()
    hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
        p_t, r_t, spacing=spacing
    ).item()
    asd = SurfaceDistanceMetric(include_background=True, symmetric=True, reduction="none")(
        p_t, r_t, spacing=spacing
    ).item()
    sm = surface_metrics(pred, ref, spacing)
    assert dice(pred, ref) == pytest.approx(d, abs=1e-6)
    assert sm.hd95 == pytest.approx(hd, rel=1e-5)
    assert sm.assd == pytest.approx(asd, rel=1e-5)
    # spacing matters: the isotropic answer differs
    assert surface_metrics(pred, ref, (1, 1, 1)).hd95 != pytest.approx(sm.hd95)


def _sitk(mask: np.ndarray, spacing: tuple[float, float, float]) -> sitk.Image:
    img = sitk.GetImageFromArray(mask.astype(np.uint8))  # array [k, r, c] -> image (x=c, y=r, z=k)
    img.SetSpacing((spacing[2], spacing[1], spacing[0]))
    return img


def test_against_simpleitk_overlap_and_hausdorff() -> None:
    shape = (12, 30, 30)
    spacing = (2.5, 0.7, 0.7)
    ref = _blob(shape, (6, 15, 15), (4, 9, 7))
    pred = _blob(shape, (6, 16, 13), (3, 10, 8))
    f = sitk.LabelOverlapMeasuresImageFilter()
    f.Execute(_sitk(ref, spacing), _sitk(pred, spacing))
    assert dice(pred, ref) == pytest.approx(f.GetDiceCoefficient(), abs=1e-9)
    assert iou(pred, ref) == pytest.approx(f.GetJaccardCoefficient(), abs=1e-9)
    # a cube shifted by 2 slices: the Hausdorff distance of voxel sets equals that of surfaces
    cube = np.zeros(shape, bool)
    cube[2:7, 10:20, 10:20] = True
    moved = np.roll(cube, 2, axis=0)
    h = sitk.HausdorffDistanceImageFilter()
    h.Execute(_sitk(cube, spacing), _sitk(moved, spacing))
    assert h.GetHausdorffDistance() == pytest.approx(5.0)
    assert surface_metrics(moved, cube, spacing).hd == pytest.approx(h.GetHausdorffDistance())


def test_directed_distances_empty_sides() -> None:
    a = np.zeros((2, 2, 2), bool)
    a[0, 0, 0] = True
    assert directed_surface_distances(np.zeros_like(a), a, (1, 1, 1)).size == 0
    assert np.isinf(directed_surface_distances(a, np.zeros_like(a), (1, 1, 1))).all()


def test_compare_masks_volumes() -> None:
    ref = np.zeros((4, 10, 10), bool)
    ref[1:3, 2:7, 2:7] = True  # 50 voxels
    pred = ref.copy()
    pred[3, 2:7, 2:7] = True  # 75 voxels
    affine = np.diag([2.0, 1.0, 1.0, 1.0])  # 2 mm^3 per voxel
    m = compare_masks(pred, ref, affine)
    assert m["volume_ref_ml"] == pytest.approx(0.1)
    assert m["volume_pred_ml"] == pytest.approx(0.15)
    assert m["volume_error_pct"] == pytest.approx(50.0)
    assert m["centroid_error_mm"] == pytest.approx(1.0)  # centroid moves half a slice (2 mm)


# --------------------------------------------------------------------------- lesions


def test_lesion_matching_rule_and_froc() -> None:
    shape = (6, 40, 40)
    affine = np.diag([2.0, 1.0, 1.0, 1.0])
    ref = np.zeros(shape, np.int32)
    pred = np.zeros(shape, np.int32)
    ref[2:4, 5:15, 5:15] = 1  # matched by overlap
    ref[2:4, 25:35, 5:15] = 2  # missed
    ref[2:4, 25:35, 25:35] = 3  # matched by centroid distance (no overlap)
    pred[2:4, 7:15, 5:15] = 1  # IoU 0.8 with ref 1
    pred[2:4, 29:31, 29:31] = (
        2  # tiny, inside ref 3 -> overlapping anyway (IoU 0.04 < 0.1) but central
    )
    pred[2:4, 5:10, 30:35] = 3  # false positive
    det = match_lesions("a", pred, ref, affine, confidences={1: 0.9, 2: 0.6, 3: 0.7})
    assert sorted((m.pred, m.ref) for m in det.matches) == [(1, 1), (2, 3)]
    assert det.false_negatives == [2]
    assert det.false_positives == [(3, 0.7)]
    m1 = next(m for m in det.matches if m.ref == 1)
    assert m1.iou == pytest.approx(0.8)
    fr = froc([det])
    assert fr["sensitivity"] == pytest.approx(2 / 3)
    assert fr["precision"] == pytest.approx(2 / 3)
    assert fr["fp_per_case"] == pytest.approx(1.0)
    # thresholds 0.9, 0.7, 0.6: (1/3, 0), (1/3, 1), (2/3, 1)
    assert fr["curve"]["sensitivity"] == pytest.approx([1 / 3, 1 / 3, 2 / 3])
    assert fr["curve"]["fp_per_case"] == pytest.approx([0.0, 1.0, 1.0])
    assert fr["sensitivity_at_fp_rate"]["0.5"] == pytest.approx(1 / 3)
    assert fr["sensitivity_at_fp_rate"]["1.0"] == pytest.approx(2 / 3)
    # a predicted lesion far from every reference lesion is never matched
    far = np.zeros(shape, np.int32)
    far[0, 0:2, 38:40] = 1
    assert match_lesions("b", far, ref, affine).matches == []


def test_lesion_diameter_and_empty_cases() -> None:
    affine = np.diag([1.0, 0.5, 0.5, 1.0])
    m = np.zeros((3, 20, 20), bool)
    m[1, 2:6, 2:12] = True  # 4 x 10 voxels -> 2 mm x 5 mm outline
    # the outline is the 0.5 iso-contour (models.measure): corners are cut by half a
    # voxel, so the longest chord joins (r, c) = (2, 1.5) and (5, 11.5): 3 x 10 voxels
    assert longest_axial_diameter_mm(m, affine) == pytest.approx(math.hypot(1.5, 5.0), rel=1e-6)
    empty = np.zeros((3, 20, 20), np.int32)
    det = match_lesions("e", empty, empty, affine)
    fr = froc([det])
    assert fr["n_reference_lesions"] == 0 and math.isnan(fr["sensitivity"])
    assert fr["fp_per_case"] == 0.0


def test_edge_conventions_against_monai() -> None:
    """Empty masks: our Dice equals MONAI's ``ignore_empty=False`` (1.0 for empty vs
    empty, 0.0 for one empty); where one side is empty MONAI's distances are
    non-finite (HD95 NaN, ASSD inf) and ours are ``inf``: reported, never a number."""
    empty = np.zeros((4, 5, 6), bool)
    some = empty.copy()
    some[1:3, 1:3, 1:3] = True
    t = {
        name: torch.from_numpy(m[None, None].astype(np.float32))
        for name, m in (("e", empty), ("a", some))
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about all-zero inputs
        assert dice(empty, empty) == DiceMetric(ignore_empty=False)(t["e"], t["e"]).item() == 1.0
        assert dice(empty, some) == DiceMetric(ignore_empty=False)(t["e"], t["a"]).item() == 0.0
        for p, r in (("e", "a"), ("a", "e")):
            theirs_hd = HausdorffDistanceMetric(percentile=95)(t[p], t[r], spacing=(2, 1, 1)).item()
            theirs_asd = SurfaceDistanceMetric(symmetric=True)(t[p], t[r], spacing=(2, 1, 1)).item()
            ours = surface_metrics(
                empty if p == "e" else some, empty if r == "e" else some, (2, 1, 1)
            )
            assert not math.isfinite(theirs_hd) and not math.isfinite(theirs_asd)
            assert math.isinf(ours.hd95) and math.isinf(ours.assd)


def test_lesion_figures_in_their_boxes_equal_the_whole_volume_figures() -> None:
    """match_lesions works on each lesion's box (whole-volume passes per lesion had taken
    150 s on a 600-slice series with ten lesions); every figure equals the one computed
    on the whole-volume masks, also for lesions at the volume's edge, where the surface
    of the box and of the volume coincide."""
    rng = np.random.default_rng(11)
    shape = (30, 64, 64)
    affine = np.array(
        [[0.0, 0.0, 0.8, -40.0], [0.0, 0.8, 0.0, 12.0], [2.5, 0.0, 0.0, 300.0], [0, 0, 0, 1]]
    )
    ref = np.zeros(shape, np.int32)
    pred = np.zeros(shape, np.int32)
    ref[10:16, 20:32, 20:30] = 1
    pred[11:17, 22:33, 19:29] = 4
    ref[0:4, 0:10, 50:64] = 2  # at three faces of the volume
    pred[0:3, 0:8, 52:64] = 2
    ref[20:26, 40:50, 5:15] = 3
    pred[20:26, 40:50, 5:15] = rng.random((6, 10, 10)) > 0.3  # ragged: 1 where kept
    det = match_lesions("c", pred, ref, affine)
    assert sorted((m.pred, m.ref) for m in det.matches) == [(1, 3), (2, 2), (4, 1)]
    for fig in det.per_lesion:
        pm, rm = pred == fig["pred_label"], ref == fig["ref_label"]
        whole = compare_masks(pm, rm, affine)
        whole["diameter_pred_mm"] = longest_axial_diameter_mm(pm, affine)
        whole["diameter_ref_mm"] = longest_axial_diameter_mm(rm, affine)
        for key, value in whole.items():
            assert fig[key] == pytest.approx(value, rel=1e-12, abs=1e-9), key
    centroid = np.argwhere(pred == 4).mean(axis=0)
    pair = next(m for m in det.matches if m.pred == 4)
    ref_c = np.argwhere(ref == 1).mean(axis=0)
    expected = np.linalg.norm(affine[:3, :3] @ (centroid - ref_c))
    assert pair.distance_mm == pytest.approx(expected, rel=1e-12)
    from models.evaluation.detection import lesion_diameters_mm

    assert lesion_diameters_mm(ref, affine) == pytest.approx(
        [longest_axial_diameter_mm(ref == i, affine) for i in (1, 2, 3)], rel=1e-12
    )


def test_compare_masks_reads_the_masks_box_with_the_same_figures() -> None:
    """compare_masks cuts both masks to the box that holds them (a 600-slice liver took
    12.6 s over the whole volume, 3.9 s so): the figures are those of the masks alone,
    the same when both lie in a larger volume, at its edge or not."""
    rng = np.random.default_rng(4)
    pred = rng.random((8, 12, 10)) > 0.4
    ref = rng.random((8, 12, 10)) > 0.5
    affine = np.diag([2.5, 0.7, 0.9, 1.0])
    alone = compare_masks(pred, ref, affine)
    for at in ((0, 0, 0), (5, 7, 3), (22, 28, 30)):  # the last one at the far edges
        big_p = np.zeros((30, 40, 40), dtype=bool)
        big_r = np.zeros((30, 40, 40), dtype=bool)
        box = tuple(slice(a, a + n) for a, n in zip(at, pred.shape, strict=True))
        big_p[box], big_r[box] = pred, ref
        moved = affine.copy()
        moved[:3, 3] -= affine[:3, :3] @ np.array(at, dtype=np.float64)
        for key, value in compare_masks(big_p, big_r, moved).items():
            assert value == pytest.approx(alone[key], rel=1e-12, abs=1e-12), (at, key)
