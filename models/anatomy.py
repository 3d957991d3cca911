"""Geometric sub-site definitions shared by the synthetic generator and the measurements.

Both functions work in patient coordinates (DICOM LPS: +x towards the patient's
left, +y posterior, +z superior), so they give the same answer whatever the
slice order, flips or in-plane orientation of the grid the masks live on.

Simplified Couinaud segmentation (an approximation, documented honestly)
-----------------------------------------------------------------------
Real Couinaud segments are bounded by the hepatic veins (vertical planes) and
the portal bifurcation (a transverse plane). Neither vessel is reliably
segmented here, so the planes are placed from the liver mask alone:

* ``u`` is the normalised left-right position inside the liver (0 at the
  liver's right edge, 1 at its left edge; 2nd/98th percentiles of the mask's
  x coordinates), ``v`` the normalised anterior-posterior position (0 anterior,
  1 posterior), ``w`` the height relative to the *portal level* (in mm).
* The *portal level* is the liver centroid's z unless ``portal_z_mm`` is given
  (e.g. from a segmented portal vein).
* Cantlie's line (middle hepatic vein plane), right vs. left liver:
  ``u = 0.50 + 0.10 * (v - 0.5)`` (slightly oblique: anteriorly further right,
  as the line from the gallbladder fossa to the IVC runs).
* Umbilical fissure (falciform ligament), segment IV vs. II/III: ``u = 0.74``.
* Right hepatic vein plane, anterior (V/VIII) vs. posterior (VI/VII) sector of
  the right liver: posterior when ``v > 0.35 + 0.7 * u``.
* Portal plane: segments above it are II, IVa, VII, VIII; below it III, IVb, V, VI
  (for the left lateral section the portal plane stands in for the left hepatic vein).
* Caudate lobe (I): the posterior third (``v > 0.68``) of the medial band
  ``0.42 <= u <= 0.74`` between 15 % of the liver height below and 30 % above the
  portal level.

This reproduces the usual textbook layout on a normally shaped liver; it is
not a vessel-based Couinaud segmentation and can be one segment off near the
boundaries, particularly in distorted (cirrhotic, resected) livers. Reports
should say "segment (approximate)" where that matters.

Pancreatic parts
----------------
The pancreas is split along its principal axis (first principal component of
its voxel coordinates, oriented towards the patient's left): normalised
position ``t`` (2nd/98th percentiles) below 0.35 is the head (including the
uncinate process), up to 0.70 the body (neck included), beyond it the tail.
The anatomical boundaries (left border of the SMV for head/neck, left border
of the aorta for body/tail) are not used, as those vessels are not segmented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from models.vocab import SubSite

#: Order of the Couinaud sub-sites; ``couinaud_map`` stores index + 1.
COUINAUD_ORDER: tuple[SubSite, ...] = (
    SubSite.COUINAUD_I,
    SubSite.COUINAUD_II,
    SubSite.COUINAUD_III,
    SubSite.COUINAUD_IVA,
    SubSite.COUINAUD_IVB,
    SubSite.COUINAUD_V,
    SubSite.COUINAUD_VI,
    SubSite.COUINAUD_VII,
    SubSite.COUINAUD_VIII,
)
#: Order of the pancreatic parts; ``pancreas_part_map`` stores index + 1.
PANCREAS_ORDER: tuple[SubSite, ...] = (
    SubSite.PANCREAS_HEAD,
    SubSite.PANCREAS_BODY,
    SubSite.PANCREAS_TAIL,
)

CANTLIE_U = 0.50
CANTLIE_TILT = 0.10
UMBILICAL_U = 0.74
CAUDATE_U_MIN = 0.42
CAUDATE_V_MIN = 0.68
PANCREAS_HEAD_MAX_T = 0.35
PANCREAS_BODY_MAX_T = 0.70


class AnatomyError(ValueError):
    """An organ mask is unusable for sub-site assignment (empty, wrong shape)."""


def _lps_of_mask(
    mask: npt.NDArray[Any], affine: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    idx = np.argwhere(np.asarray(mask, dtype=bool)).astype(np.float64)
    return idx @ np.asarray(affine, dtype=np.float64)[:3, :3].T + affine[:3, 3]


def _points_lps(
    where: npt.ArrayLike, shape: tuple[int, ...], affine: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """(N, 3) LPS points from one (k, r, c) point, an (N, 3) array, or a boolean mask."""
    arr = np.asarray(where)
    if arr.ndim == 3:
        if arr.shape != shape:
            raise AnatomyError(f"mask shape {arr.shape} differs from organ mask shape {shape}")
        pts = _lps_of_mask(arr, affine)
        if pts.shape[0] == 0:
            raise AnatomyError("the query mask is empty")
        return pts
    pts_krc = np.atleast_2d(arr.astype(np.float64))
    if pts_krc.shape[-1] != 3:
        raise AnatomyError(f"points must be (k, r, c) triples, got shape {arr.shape}")
    return pts_krc @ np.asarray(affine, dtype=np.float64)[:3, :3].T + affine[:3, 3]


def _majority(labels: npt.NDArray[np.int_], order: tuple[SubSite, ...]) -> SubSite:
    counts = np.bincount(labels, minlength=len(order))
    return order[int(np.argmax(counts))]


@dataclass(frozen=True)
class LiverFrame:
    """The liver's own normalised coordinate frame (see the module docstring)."""

    x_right: float  # LPS x of the liver's right edge (smaller x)
    x_left: float
    y_anterior: float
    y_posterior: float
    z_low: float
    z_high: float
    portal_z: float

    @classmethod
    def from_mask(
        cls,
        liver_mask: npt.NDArray[Any],
        affine: npt.NDArray[np.float64],
        *,
        portal_z_mm: float | None = None,
    ) -> LiverFrame:
        pts = _lps_of_mask(liver_mask, affine)
        if pts.shape[0] < 8:
            raise AnatomyError("liver mask is empty (or has fewer than 8 voxels)")
        lo = np.percentile(pts, 2.0, axis=0)
        hi = np.percentile(pts, 98.0, axis=0)
        portal = float(pts[:, 2].mean()) if portal_z_mm is None else float(portal_z_mm)
        return cls(
            x_right=float(lo[0]),
            x_left=float(max(hi[0], lo[0] + 1.0)),
            y_anterior=float(lo[1]),
            y_posterior=float(max(hi[1], lo[1] + 1.0)),
            z_low=float(lo[2]),
            z_high=float(max(hi[2], lo[2] + 1.0)),
            portal_z=portal,
        )

    def classify(self, points_lps: npt.NDArray[np.float64]) -> npt.NDArray[np.int_]:
        """Index into ``COUINAUD_ORDER`` for each (N, 3) LPS point."""
        p = np.atleast_2d(points_lps)
        u = (p[:, 0] - self.x_right) / (self.x_left - self.x_right)
        v = (p[:, 1] - self.y_anterior) / (self.y_posterior - self.y_anterior)
        w = p[:, 2] - self.portal_z
        height = self.z_high - self.z_low
        above = w >= 0.0
        cantlie = CANTLIE_U + CANTLIE_TILT * (v - 0.5)
        right = u < cantlie
        lateral_left = u >= UMBILICAL_U
        posterior_sector = v > 0.35 + 0.7 * u
        out = np.empty(p.shape[0], dtype=np.int_)
        # right liver
        out[right & posterior_sector & above] = 7  # VII
        out[right & posterior_sector & ~above] = 6  # VI
        out[right & ~posterior_sector & above] = 8  # VIII
        out[right & ~posterior_sector & ~above] = 5  # V
        # left medial (IV) and left lateral (II/III)
        medial = ~right & ~lateral_left
        out[medial & above] = 3  # IVa
        out[medial & ~above] = 4  # IVb
        out[lateral_left & above] = 1  # II
        out[lateral_left & ~above] = 2  # III
        caudate = (
            (u >= CAUDATE_U_MIN)
            & (u <= UMBILICAL_U)
            & (v > CAUDATE_V_MIN)
            & (w >= -0.15 * height)
            & (w <= 0.30 * height)
        )
        out[caudate] = 0  # I
        return out


def couinaud_map(
    liver_mask: npt.NDArray[Any],
    affine: npt.NDArray[np.float64],
    *,
    portal_z_mm: float | None = None,
) -> npt.NDArray[np.uint8]:
    """Label map on the liver mask's grid: 0 outside the liver, else ``COUINAUD_ORDER`` index + 1."""
    mask = np.asarray(liver_mask, dtype=bool)
    frame = LiverFrame.from_mask(mask, affine, portal_z_mm=portal_z_mm)
    out = np.zeros(mask.shape, dtype=np.uint8)
    out[mask] = (frame.classify(_lps_of_mask(mask, affine)) + 1).astype(np.uint8)
    return out


def couinaud_segment(
    where: npt.ArrayLike,
    liver_mask: npt.NDArray[Any],
    affine: npt.NDArray[np.float64],
    *,
    portal_z_mm: float | None = None,
    frame: LiverFrame | None = None,
) -> SubSite:
    """Approximate Couinaud segment of a point or a region.

    ``where`` is one ``(k, r, c)`` index (fractional allowed), an ``(N, 3)``
    array of them (majority vote), or a boolean mask on the liver mask's grid
    (majority vote over its voxels; a lesion mask, typically). ``frame``: the liver
    mask's frame when the caller already has it (building it reads every liver voxel).
    """
    mask = np.asarray(liver_mask, dtype=bool)
    if frame is None:
        frame = LiverFrame.from_mask(mask, affine, portal_z_mm=portal_z_mm)
    labels = frame.classify(_points_lps(where, mask.shape, affine))
    return _majority(labels, COUINAUD_ORDER)


@dataclass(frozen=True)
class PancreasFrame:
    """The pancreas's principal axis, oriented to the patient's left, with its extent."""

    origin: tuple[float, float, float]
    axis: tuple[float, float, float]
    t_low: float
    t_high: float

    @classmethod
    def from_mask(
        cls, pancreas_mask: npt.NDArray[Any], affine: npt.NDArray[np.float64]
    ) -> PancreasFrame:
        pts = _lps_of_mask(pancreas_mask, affine)
        if pts.shape[0] < 4:
            raise AnatomyError("pancreas mask is empty (or has fewer than 4 voxels)")
        centre = pts.mean(axis=0)
        cov = np.cov((pts - centre).T)
        _, vecs = np.linalg.eigh(cov)
        axis = vecs[:, -1]
        if axis[0] < 0:  # orient towards the patient's left (+x)
            axis = -axis
        t = (pts - centre) @ axis
        lo, hi = float(np.percentile(t, 2.0)), float(np.percentile(t, 98.0))
        return cls(
            origin=(float(centre[0]), float(centre[1]), float(centre[2])),
            axis=(float(axis[0]), float(axis[1]), float(axis[2])),
            t_low=lo,
            t_high=max(hi, lo + 1.0),
        )

    def classify(self, points_lps: npt.NDArray[np.float64]) -> npt.NDArray[np.int_]:
        """Index into ``PANCREAS_ORDER`` for each (N, 3) LPS point."""
        p = np.atleast_2d(points_lps)
        t = ((p - np.asarray(self.origin)) @ np.asarray(self.axis) - self.t_low) / (
            self.t_high - self.t_low
        )
        out = np.full(p.shape[0], 1, dtype=np.int_)
        out[t < PANCREAS_HEAD_MAX_T] = 0
        out[t >= PANCREAS_BODY_MAX_T] = 2
        return out


def pancreas_part_map(
    pancreas_mask: npt.NDArray[Any], affine: npt.NDArray[np.float64]
) -> npt.NDArray[np.uint8]:
    """Label map: 0 outside the pancreas, else ``PANCREAS_ORDER`` index + 1."""
    mask = np.asarray(pancreas_mask, dtype=bool)
    frame = PancreasFrame.from_mask(mask, affine)
    out = np.zeros(mask.shape, dtype=np.uint8)
    out[mask] = (frame.classify(_lps_of_mask(mask, affine)) + 1).astype(np.uint8)
    return out


def pancreas_part(
    where: npt.ArrayLike,
    pancreas_mask: npt.NDArray[Any],
    affine: npt.NDArray[np.float64],
    *,
    frame: PancreasFrame | None = None,
) -> SubSite:
    """Head, body or tail of a point, an (N, 3) array of points, or a boolean mask
    (``frame``: the pancreas mask's frame, when the caller already has it)."""
    mask = np.asarray(pancreas_mask, dtype=bool)
    if frame is None:
        frame = PancreasFrame.from_mask(mask, affine)
    labels = frame.classify(_points_lps(where, mask.shape, affine))
    return _majority(labels, PANCREAS_ORDER)
