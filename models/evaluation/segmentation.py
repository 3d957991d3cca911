"""Overlap and surface metrics between a predicted and a reference mask.

Both masks are boolean arrays ``[k, r, c]`` on the same grid; ``spacing`` is
the voxel size in mm along (k, r, c), so anisotropic grids are measured in mm.

Conventions (also in ``docs/evaluation.md``):

* Dice and IoU of two empty masks are 1.0 (nothing to find, nothing found);
  with exactly one side empty they are 0.0.
* The *surface* of a mask is its voxels that have a face-neighbour outside the
  mask (the mask XOR its erosion with the 6-connected cross; voxels on the grid
  border count as surface), the same definition as MONAI's ``get_mask_edges``.
* Surface distances are Euclidean distances in mm from each surface voxel
  centre of one mask to the nearest surface voxel centre of the other.
* HD95 is the larger of the two directed 95th percentiles; the average surface
  distance (ASSD) is the mean over the distances of both directions together
  (MONAI's ``symmetric=True``). Both empty: 0.0. One side empty: ``inf``
  (written ``"inf"`` in JSON and left out of means; counted separately).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from scipy.spatial import cKDTree

from models.measure import mask_box

BoolMask = npt.NDArray[np.bool_]
Spacing = Sequence[float]


class SegmentationInputError(ValueError):
    """Masks that cannot be compared (different shapes, bad spacing)."""


def _pair(pred: npt.ArrayLike, ref: npt.ArrayLike) -> tuple[BoolMask, BoolMask]:
    p = np.asarray(pred, dtype=bool)  # no copy of a boolean mask
    r = np.asarray(ref, dtype=bool)
    if p.shape != r.shape:
        raise SegmentationInputError(f"prediction shape {p.shape} != reference shape {r.shape}")
    return p, r


def _cropped_pair(pred: npt.ArrayLike, ref: npt.ArrayLike) -> tuple[BoolMask, BoolMask]:
    """Both masks cut to the smallest box that holds either (unchanged when both are
    empty). Every figure of :func:`compare_masks` is the same on that box: outside it
    both masks are empty, surfaces are found by erosion with an empty border, and
    centroids enter only as their difference."""
    p, r = _pair(pred, ref)
    box = mask_box(p | r)
    if box is None:
        return p, r
    return p[box], r[box]


def dice(pred: npt.ArrayLike, ref: npt.ArrayLike) -> float:
    p, r = _pair(pred, ref)
    total = int(p.sum()) + int(r.sum())
    if total == 0:
        return 1.0
    return 2.0 * int((p & r).sum()) / total


def iou(pred: npt.ArrayLike, ref: npt.ArrayLike) -> float:
    p, r = _pair(pred, ref)
    union = int((p | r).sum())
    if union == 0:
        return 1.0
    return int((p & r).sum()) / union


def surface(mask: BoolMask) -> BoolMask:
    """Voxels of ``mask`` with a face-neighbour outside it (grid border counts as outside)."""
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return m.copy()
    return m & ~ndimage.binary_erosion(m, border_value=0)


def _spacing(spacing: Spacing, ndim: int) -> npt.NDArray[np.float64]:
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.shape != (ndim,) or (sp <= 0).any():
        raise SegmentationInputError(f"spacing must be {ndim} positive numbers, got {spacing}")
    return sp


def directed_surface_distances(
    from_mask: BoolMask, to_mask: BoolMask, spacing: Spacing
) -> npt.NDArray[np.float64]:
    """Distance (mm) from every surface voxel of ``from_mask`` to the surface of ``to_mask``.

    Empty ``from_mask``: an empty array. Empty ``to_mask`` (but not ``from``): all ``inf``.
    """
    a, b = _pair(from_mask, to_mask)
    sp = _spacing(spacing, a.ndim)
    sa = np.argwhere(surface(a)).astype(np.float64) * sp
    if sa.shape[0] == 0:
        return np.zeros(0, dtype=np.float64)
    sb = np.argwhere(surface(b)).astype(np.float64) * sp
    if sb.shape[0] == 0:
        return np.full(sa.shape[0], np.inf)
    dist, _ = cKDTree(sb).query(sa, k=1)
    return np.asarray(dist, dtype=np.float64)


@dataclass(frozen=True)
class SurfaceMetrics:
    hd95: float
    hd: float  # maximum (100th percentile) symmetric Hausdorff distance
    assd: float


def surface_metrics(pred: npt.ArrayLike, ref: npt.ArrayLike, spacing: Spacing) -> SurfaceMetrics:
    p, r = _pair(pred, ref)
    pe, re_ = bool(p.any()), bool(r.any())
    if not pe and not re_:
        return SurfaceMetrics(0.0, 0.0, 0.0)
    if pe != re_:
        return SurfaceMetrics(float("inf"), float("inf"), float("inf"))
    d_pr = directed_surface_distances(p, r, spacing)
    d_rp = directed_surface_distances(r, p, spacing)
    hd95 = max(float(np.percentile(d_pr, 95)), float(np.percentile(d_rp, 95)))
    hd = max(float(d_pr.max()), float(d_rp.max()))
    assd = float(np.concatenate([d_pr, d_rp]).mean())
    return SurfaceMetrics(hd95=hd95, hd=hd, assd=assd)


def hd95(pred: npt.ArrayLike, ref: npt.ArrayLike, spacing: Spacing) -> float:
    return surface_metrics(pred, ref, spacing).hd95


def assd(pred: npt.ArrayLike, ref: npt.ArrayLike, spacing: Spacing) -> float:
    return surface_metrics(pred, ref, spacing).assd


def centroid_lps(mask: BoolMask, affine: npt.NDArray[np.float64]) -> npt.NDArray[np.float64] | None:
    """Centroid of the mask's voxel centres in LPS mm (``None`` for an empty mask)."""
    idx = np.argwhere(np.asarray(mask, dtype=bool))
    if idx.shape[0] == 0:
        return None
    c = idx.mean(axis=0)
    return np.asarray(affine[:3, :3] @ c + affine[:3, 3], dtype=np.float64)


def centroid_error_mm(pred: BoolMask, ref: BoolMask, affine: npt.NDArray[np.float64]) -> float:
    """Distance between the two centroids in mm; ``nan`` if either mask is empty."""
    a = centroid_lps(pred, affine)
    b = centroid_lps(ref, affine)
    if a is None or b is None:
        return float("nan")
    return float(np.linalg.norm(a - b))


def spacing_of(affine: npt.NDArray[np.float64]) -> tuple[float, float, float]:
    cols = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return (float(cols[0]), float(cols[1]), float(cols[2]))


def compare_masks(
    pred: npt.ArrayLike, ref: npt.ArrayLike, affine: npt.NDArray[np.float64]
) -> dict[str, float]:
    """Every per-structure figure: Dice, IoU, HD95, HD, ASSD (mm), centroid error (mm),
    predicted and reference volume (ml) and the volume error (ml, and % of reference).
    Both masks are read in the box that holds them (:func:`_cropped_pair`)."""
    p, r = _cropped_pair(pred, ref)
    vox_ml = float(abs(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    sm = surface_metrics(p, r, spacing_of(affine))
    v_p = float(p.sum()) * vox_ml
    v_r = float(r.sum()) * vox_ml
    return {
        "dice": dice(p, r),
        "iou": iou(p, r),
        "hd95_mm": sm.hd95,
        "hd_mm": sm.hd,
        "assd_mm": sm.assd,
        "centroid_error_mm": centroid_error_mm(p, r, affine),
        "volume_pred_ml": v_p,
        "volume_ref_ml": v_r,
        "volume_error_ml": v_p - v_r,
        "volume_error_pct": (100.0 * (v_p - v_r) / v_r) if v_r > 0 else float("nan"),
    }
