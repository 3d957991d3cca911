"""Lesion-level detection: matching predicted to reference lesions, and FROC.

Matching rule (also in ``docs/evaluation.md``): lesions are instances (an
instance-label map, or the 26-connected components of a boolean mask). A
(predicted, reference) pair is *eligible* when their IoU is at least
``min_iou`` (default 0.1) **or** the predicted centroid lies within the
reference lesion's equivalent-sphere radius ``(3V/4π)^(1/3)`` (at least
``min_radius_mm``, default 5 mm) of the reference centroid. Eligible pairs are
assigned one-to-one, greedily, by decreasing IoU and then increasing centroid
distance. A matched reference lesion is a true positive; an unmatched
reference lesion a false negative; an unmatched predicted lesion a false
positive. Each predicted lesion carries a confidence (1.0 when none is
given); the FROC curve sweeps a threshold over these confidences.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from models.evaluation.segmentation import centroid_lps, compare_masks
from models.measure import lesion_boxes, lesion_instances, long_axis_mm, padded_box

FROC_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def lesion_diameters_mm(
    labels: npt.NDArray[np.int32], affine: npt.NDArray[np.float64]
) -> list[float]:
    """:func:`longest_axial_diameter_mm` of each instance of ``labels`` in number order,
    each read in its box."""
    return [
        longest_axial_diameter_mm(labels[b] == i, affine) for i, b in lesion_boxes(labels).items()
    ]


def longest_axial_diameter_mm(
    mask: npt.NDArray[np.bool_], affine: npt.NDArray[np.float64]
) -> float:
    """The largest in-slice maximum Feret diameter over all slices (0 for an empty mask),
    measured with :func:`models.measure.long_axis_mm` (the model's own RECIST rule)."""
    best = 0.0
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        best = max(best, long_axis_mm(mask[k], affine))
    return best


@dataclass(frozen=True)
class LesionPair:
    pred: int  # predicted instance label (0 = none)
    ref: int  # reference instance label (0 = none)
    iou: float
    distance_mm: float
    confidence: float


@dataclass
class CaseDetection:
    case_id: str
    matches: list[LesionPair] = field(default_factory=list)
    false_negatives: list[int] = field(default_factory=list)  # reference labels
    false_positives: list[tuple[int, float]] = field(default_factory=list)  # (label, confidence)
    per_lesion: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n_ref(self) -> int:
        return len(self.matches) + len(self.false_negatives)


def match_lesions(
    case_id: str,
    pred_labels: npt.NDArray[Any],
    ref_labels: npt.NDArray[Any],
    affine: npt.NDArray[np.float64],
    *,
    confidences: Mapping[int, float] | None = None,
    min_iou: float = 0.1,
    min_radius_mm: float = 5.0,
    measure: bool = True,
) -> CaseDetection:
    """Match predicted to reference lesion instances and (``measure``) compute per-lesion
    figures for each matched pair."""
    pred = lesion_instances(np.asarray(pred_labels))
    ref = lesion_instances(np.asarray(ref_labels))
    if pred.shape != ref.shape:
        raise ValueError(f"lesion maps on different grids: {pred.shape} vs {ref.shape}")
    conf = dict(confidences or {})
    vox_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    # every lesion is looked at in its own box (whole-volume passes per lesion took
    # minutes on a 600-slice series with ten lesions)
    p_box = lesion_boxes(pred)
    r_box = lesion_boxes(ref)
    p_ids, r_ids = sorted(p_box), sorted(r_box)
    p_cent = {i: centroid_lps(pred[b] == i, _shifted(affine, b)) for i, b in p_box.items()}
    r_cent = {i: centroid_lps(ref[b] == i, _shifted(affine, b)) for i, b in r_box.items()}
    size_p = {i: int(np.count_nonzero(pred[b] == i)) for i, b in p_box.items()}
    size_r = {i: int(np.count_nonzero(ref[b] == i)) for i, b in r_box.items()}
    r_rad = {
        i: max(
            min_radius_mm,
            (3.0 * float(size_r[i]) * vox_ml * 1000.0 / (4 * np.pi)) ** (1 / 3),
        )
        for i in r_ids
    }
    # overlap counts by joint histogram on voxels where either is labelled
    both = (pred > 0) & (ref > 0)
    inter: dict[tuple[int, int], int] = {}
    if both.any():
        pairs, counts = np.unique(
            np.stack([pred[both], ref[both]], axis=1), axis=0, return_counts=True
        )
        inter = {(int(a), int(b)): int(n) for (a, b), n in zip(pairs, counts, strict=True)}
    candidates: list[tuple[float, float, int, int]] = []
    for pi in p_ids:
        for ri in r_ids:
            n = inter.get((pi, ri), 0)
            j = n / (size_p[pi] + size_r[ri] - n)
            pc, rc = p_cent[pi], r_cent[ri]
            d = float(np.linalg.norm(pc - rc)) if pc is not None and rc is not None else np.inf
            if j >= min_iou or d <= r_rad[ri]:
                candidates.append((-j, d, pi, ri))
    candidates.sort()
    out = CaseDetection(case_id)
    used_p: set[int] = set()
    used_r: set[int] = set()
    for neg_j, d, pi, ri in candidates:
        if pi in used_p or ri in used_r:
            continue
        used_p.add(pi)
        used_r.add(ri)
        out.matches.append(LesionPair(pi, ri, -neg_j, d, float(conf.get(pi, 1.0))))
    out.false_negatives = [ri for ri in r_ids if ri not in used_r]
    out.false_positives = [(pi, float(conf.get(pi, 1.0))) for pi in p_ids if pi not in used_p]
    if measure:
        for m in out.matches:
            # both lesions in one box with a voxel of margin (their surfaces are those of
            # the whole volume), on an affine whose origin is the box's corner
            box = _union_box(p_box[m.pred], r_box[m.ref], pred.shape, margin=1)
            pm, rm = pred[box] == m.pred, ref[box] == m.ref
            at = _shifted(affine, box)
            figures: dict[str, Any] = dict(compare_masks(pm, rm, at))
            d_p = longest_axial_diameter_mm(pm, at)
            d_r = longest_axial_diameter_mm(rm, at)
            figures.update(
                {
                    "case_id": case_id,
                    "pred_label": m.pred,
                    "ref_label": m.ref,
                    "confidence": m.confidence,
                    "diameter_pred_mm": d_p,
                    "diameter_ref_mm": d_r,
                    "diameter_error_mm": d_p - d_r,
                }
            )
            out.per_lesion.append(figures)
    return out


def _union_box(
    a: tuple[slice, ...], b: tuple[slice, ...], shape: Sequence[int], margin: int
) -> tuple[slice, ...]:
    """The smallest box holding ``a`` and ``b``, ``margin`` voxels wider, within ``shape``."""
    union = tuple(
        slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b, strict=True)
    )
    return padded_box(union, shape, margin)


def _shifted(affine: npt.NDArray[np.float64], box: tuple[slice, ...]) -> npt.NDArray[np.float64]:
    """The affine of the sub-array ``box`` (its voxel (0, 0, 0) is the box's corner)."""
    out = np.array(affine, dtype=np.float64)
    out[:3, 3] = out[:3, :3] @ np.array([s.start for s in box], dtype=np.float64) + out[:3, 3]
    return out


def froc(cases: Sequence[CaseDetection]) -> dict[str, Any]:
    """Lesion sensitivity against mean false positives per case, sweeping the confidence
    threshold; plus sensitivity at the standard FP rates (1/8 ... 8) where reached,
    their mean (a CPM-like score, over the rates reached), and the operating point with
    every predicted lesion kept."""
    n_cases = len(cases)
    n_ref = sum(c.n_ref for c in cases)
    tps = np.array([m.confidence for c in cases for m in c.matches], dtype=np.float64)
    fps = np.array([f[1] for c in cases for f in c.false_positives], dtype=np.float64)
    thresholds = np.unique(np.concatenate([tps, fps]))[::-1]
    sens: list[float] = []
    fppc: list[float] = []
    for t in thresholds:
        sens.append(float((tps >= t).sum()) / n_ref if n_ref else float("nan"))
        fppc.append(float((fps >= t).sum()) / n_cases if n_cases else float("nan"))
    at_rate: dict[str, float] = {}
    for rate in FROC_FP_RATES:
        ok = [s for s, f in zip(sens, fppc, strict=True) if f <= rate]
        at_rate[str(rate)] = max(ok) if ok else 0.0
    n_tp = int(tps.size)
    n_fp = int(fps.size)
    return {
        "n_cases": n_cases,
        "n_reference_lesions": n_ref,
        "n_predicted_lesions": n_tp + n_fp,
        "true_positives": n_tp,
        "false_positives": n_fp,
        "false_negatives": n_ref - n_tp,
        "sensitivity": n_tp / n_ref if n_ref else float("nan"),
        "precision": n_tp / (n_tp + n_fp) if (n_tp + n_fp) else float("nan"),
        "fp_per_case": n_fp / n_cases if n_cases else float("nan"),
        "curve": {"thresholds": thresholds.tolist(), "sensitivity": sens, "fp_per_case": fppc},
        "sensitivity_at_fp_rate": at_rate,
        "cpm": float(np.mean(list(at_rate.values()))) if n_ref else float("nan"),
    }
