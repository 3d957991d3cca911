"""Measurements on masks: organ volumes and attenuation, lesion diameters.

Plain functions on a voxel grid (a :class:`models.volume.Volume`, or anything with
``array[k, r, c]`` and an ``affine`` from ``(k, r, c, 1)`` to LPS mm) and boolean
or instance-label masks on that grid; they return :mod:`models.findings` types.

Lesion diameters follow RECIST-style practice in the slice plane:

* the *key slice* is the slice on which the lesion's long axis is largest;
* the *long axis* is the maximum Feret diameter of the lesion's outline on that
  slice (the outline is the 0.5 iso-contour of the mask, i.e. the voxel edges);
* the *short axis* is the longest chord perpendicular to the long axis.

Where the segmentation knows the image level at the lesion's edge
(:class:`LesionEdge`, from ``models.inference.refine_lesion``), the outline is
instead the sub-voxel iso-contour of the lightly smoothed image at that level,
within one voxel of the mask: a caliper placed between voxels, as a reader's is.

Distances are computed in millimetres through the affine, so anisotropic pixels
and oblique (even sheared) in-plane axes are handled exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from skimage import measure as skmeasure

from models.anatomy import (
    AnatomyError,
    LiverFrame,
    PancreasFrame,
    couinaud_segment,
    pancreas_part,
)
from models.findings import Axis, LesionFinding, OrganFinding
from models.vocab import LesionKind, Organ, SubSite

log = logging.getLogger(__name__)

BoolMask = npt.NDArray[np.bool_]
#: ``(organ, lesion mask, organ masks, affine) -> sub-site or None``
SubSiteFn = Callable[
    [Organ, BoolMask, Mapping[Organ, npt.NDArray[Any]], npt.NDArray[np.float64]], SubSite | None
]


class MeasureError(ValueError):
    """A mask cannot be measured on the given grid; the message says why."""


class Grid(Protocol):
    """Anything with voxels ``array[k, r, c]`` and a ``(k, r, c, 1) -> LPS`` affine."""

    @property
    def array(self) -> npt.NDArray[Any]: ...

    @property
    def affine(self) -> npt.NDArray[np.float64]: ...


@dataclass(frozen=True)
class ArrayGrid:
    """A bare array plus affine, for measuring without a full ``Volume``."""

    array: npt.NDArray[Any]
    affine: npt.NDArray[np.float64]


@dataclass(frozen=True)
class LesionEdge:
    """Where a lesion's edge lies in the image: the smoothed image (Gaussian of
    ``smooth_voxels``) crosses ``level`` there, and ``outside`` is the level of the
    tissue around the lesion (so the inside is the side of ``level`` away from it)."""

    level: float
    outside: float
    smooth_voxels: float = 0.0

    def __post_init__(self) -> None:
        if not np.isfinite(self.level) or not np.isfinite(self.outside):
            raise MeasureError("lesion edge levels must be finite")
        if self.level == self.outside:
            raise MeasureError("lesion edge level equals the outside level")


def _edge_contours(
    image2d: npt.NDArray[Any], mask2d: BoolMask, edge: LesionEdge
) -> list[npt.NDArray[np.float64]]:
    """Sub-voxel contours (r, c) of ``image2d`` (already smoothed) at ``edge.level``,
    within one voxel of ``mask2d``; outside that band the image counts as outside."""
    band = ndimage.binary_dilation(mask2d, iterations=1)
    sign = 1.0 if edge.level > edge.outside else -1.0
    inside = sign * (
        np.where(band, np.asarray(image2d, dtype=np.float64), edge.outside) - edge.level
    )
    padded = np.pad(inside, 1, constant_values=sign * (edge.outside - edge.level))
    return [np.asarray(c, dtype=np.float64) - 1.0 for c in skmeasure.find_contours(padded, 0.0)]


def _check_mask(grid: Grid, mask: npt.NDArray[Any], what: str) -> None:
    if mask.shape != grid.array.shape:
        raise MeasureError(f"{what}: mask shape {mask.shape} != volume shape {grid.array.shape}")


def voxel_volume_ml(affine: npt.NDArray[np.float64]) -> float:
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def _intensity(
    grid: Grid, mask: BoolMask, box: tuple[slice, ...] | None = None
) -> tuple[float | None, float | None]:
    """Mean and SD of the image under ``mask``; with ``box`` (holding all of the mask),
    only that box is read."""
    inside = box if box is not None else tuple(slice(None) for _ in mask.shape)
    sub = mask[inside]
    if not sub.any():
        return None, None
    values = np.asarray(grid.array[inside][sub], dtype=np.float64)
    return float(values.mean()), float(values.std())


def lesion_boxes(labels: npt.NDArray[Any]) -> dict[int, tuple[slice, ...]]:
    """Each instance present in ``labels`` (integer instance numbers, 0 = none) and its
    box, in the order of the numbers (one pass over the volume)."""
    return {i + 1: box for i, box in enumerate(ndimage.find_objects(labels)) if box is not None}


def mask_box(mask: BoolMask) -> tuple[slice, ...] | None:
    """The smallest box that holds every voxel of ``mask``; None for an empty mask."""
    found = ndimage.find_objects(np.asarray(mask, dtype=bool).view(np.uint8))
    return found[0] if found else None


def padded_box(found: tuple[slice, ...], shape: Sequence[int], pad: int) -> tuple[slice, ...]:
    """``found`` (a :func:`scipy.ndimage.find_objects` box) widened by ``pad`` voxels on
    each side, within an array of ``shape``."""
    return tuple(
        slice(max(s.start - pad, 0), min(s.stop + pad, n))
        for s, n in zip(found, shape, strict=True)
    )


# ---------------------------------------------------------------------------
# organs


def measure_organ(
    grid: Grid, mask: npt.NDArray[Any], organ: Organ, *, confidence: float = 1.0
) -> OrganFinding:
    """Volume (ml) and mean / SD intensity (HU for CT) of one organ mask."""
    _check_mask(grid, mask, f"organ {organ}")
    m = np.asarray(mask, dtype=bool)
    mean, std = _intensity(grid, m)
    return OrganFinding(
        organ=organ,
        mask=m,
        volume_ml=float(m.sum()) * voxel_volume_ml(grid.affine),
        mean_intensity=mean,
        std_intensity=std,
        confidence=confidence,
    )


# ---------------------------------------------------------------------------
# in-plane diameters


def _plane_basis(affine: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """2x2 matrix R with ``y = R @ (r, c)`` orthonormal in-plane mm coordinates."""
    a2 = np.asarray(affine, dtype=np.float64)[:3, 1:3]
    _, r = np.linalg.qr(a2)
    return np.asarray(r, dtype=np.float64)


def _outline_points(mask2d: BoolMask) -> list[npt.NDArray[np.float64]]:
    """Contours (r, c) of a 2-D mask at the voxel edges (0.5 iso-level)."""
    padded = np.pad(mask2d.astype(np.float32), 1)
    contours = skmeasure.find_contours(padded, 0.5)
    return [np.asarray(c, dtype=np.float64) - 1.0 for c in contours]


def _hull(points: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    if len(points) <= 3:
        return points
    try:
        return points[ConvexHull(points).vertices]
    except QhullError:  # collinear points (a one-voxel-wide line)
        return points


@dataclass(frozen=True)
class SliceDiameters:
    """Long and short axes on one slice, endpoints in (r, c) and lengths in mm."""

    long_rc: tuple[tuple[float, float], tuple[float, float]]
    long_mm: float
    short_rc: tuple[tuple[float, float], tuple[float, float]]
    short_mm: float
    outline_rc: tuple[tuple[float, float], ...]


def _feret(
    contours: list[npt.NDArray[np.float64]], rmat: npt.NDArray[np.float64]
) -> tuple[float, npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Maximum Feret diameter (mm) of contour points and its two endpoints (in-plane mm)."""
    pts = np.concatenate(contours, axis=0) @ rmat.T
    hull = _hull(pts)
    diff = hull[:, None, :] - hull[None, :, :]
    dist = np.sqrt((diff**2).sum(axis=-1))
    i, j = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return float(dist[i, j]), hull[i], hull[j]


def long_axis_mm(mask2d: npt.NDArray[Any], affine: npt.NDArray[np.float64]) -> float:
    """The maximum Feret diameter (mm) of a 2-D mask on a slice of ``affine``'s grid."""
    m = np.asarray(mask2d, dtype=bool)
    if not m.any():
        return 0.0
    return _feret(_outline_points(m), _plane_basis(affine))[0]


def slice_diameters(
    mask2d: npt.NDArray[Any],
    affine: npt.NDArray[np.float64],
    contours: list[npt.NDArray[np.float64]] | None = None,
) -> SliceDiameters:
    """Long axis (max Feret) and longest perpendicular chord of a 2-D mask, in mm;
    of ``contours`` (r, c) instead of the mask's outline when they are given."""
    m = np.asarray(mask2d, dtype=bool)
    if not m.any():
        raise MeasureError("empty mask on slice")
    if not contours:
        contours = _outline_points(m)
    rmat = _plane_basis(affine)
    rinv = np.linalg.inv(rmat)
    long_mm, p1, p2 = _feret(contours, rmat)

    # Short axis: longest chord perpendicular to the long axis, over all offsets
    # along the long axis (intersections of each line with every contour edge).
    along = (p2 - p1) / max(long_mm, 1e-12)
    perp = np.array([-along[1], along[0]])
    best = (0.0, p1, p1)
    edges_a = np.concatenate([c[:-1] for c in contours if len(c) > 1], axis=0) @ rmat.T
    edges_b = np.concatenate([c[1:] for c in contours if len(c) > 1], axis=0) @ rmat.T
    ta, tb = edges_a @ along, edges_b @ along
    t_min, t_max = float(min(ta.min(), tb.min())), float(max(ta.max(), tb.max()))
    offsets = np.unique(np.concatenate([np.linspace(t_min, t_max, 257), ta]))
    for t in offsets:
        cross = (ta - t) * (tb - t) <= 0
        if not cross.any():
            continue
        a, b = edges_a[cross], edges_b[cross]
        dt = tb[cross] - ta[cross]
        frac = np.where(np.abs(dt) > 1e-12, (t - ta[cross]) / np.where(dt == 0, 1, dt), 0.0)
        hits = a + (b - a) * frac[:, None]
        s = hits @ perp
        length = float(s.max() - s.min())
        if length > best[0]:
            best = (length, hits[int(np.argmin(s))], hits[int(np.argmax(s))])
    short_mm, q1, q2 = best

    def to_rc(p: npt.NDArray[np.float64]) -> tuple[float, float]:
        rc = rinv @ p
        return (float(rc[0]), float(rc[1]))

    outline = max(contours, key=len)
    return SliceDiameters(
        long_rc=(to_rc(p1), to_rc(p2)),
        long_mm=long_mm,
        short_rc=(to_rc(q1), to_rc(q2)),
        short_mm=min(short_mm, long_mm),
        outline_rc=tuple((float(r), float(c)) for r, c in outline),
    )


# ---------------------------------------------------------------------------
# lesions


def lesion_instances(
    lesion_mask: npt.NDArray[Any], *, min_voxels: int = 1
) -> npt.NDArray[np.int32]:
    """Instance labels 1..n: kept as given for an integer mask; for a boolean
    mask, 3-D connected components (26-connectivity) numbered by decreasing size.
    Instances smaller than ``min_voxels`` are dropped (their numbers not reused)."""
    arr = np.asarray(lesion_mask)
    if arr.dtype == np.bool_:
        labels, n = ndimage.label(arr, structure=np.ones((3, 3, 3), dtype=bool))
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        order = np.argsort(-sizes, kind="stable")
        remap = np.zeros(n + 1, dtype=np.int32)
        number = 0
        for idx in order:
            if sizes[idx] >= min_voxels:
                number += 1
                remap[idx + 1] = number
        return remap[labels]
    if arr.min(initial=0) < 0:
        raise MeasureError("lesion instance labels must be >= 0")
    # an int32 instance volume comes back as it is (a copy of 600 slices is 629 MB)
    out = arr.astype(np.int32, copy=False)
    if min_voxels > 1:
        sizes = np.bincount(out.ravel())
        small = np.flatnonzero(sizes < min_voxels)
        small = small[small > 0]
        if small.size:
            out = out.copy()
            out[np.isin(out, small)] = 0
    return out


def assign_organ(
    mask: BoolMask,
    organ_masks: Mapping[Organ, npt.NDArray[Any]],
    default: Organ,
    box: tuple[slice, ...] | None = None,
) -> Organ:
    """The organ whose mask holds most of the lesion; if none overlaps it, the
    organ touching the lesion's 3-voxel neighbourhood most; else the organ whose
    voxels lie nearest to the lesion centroid (index space); else ``default``.
    ``box``: a box that holds the whole lesion (the overlaps are counted in it)."""
    inside = box if box is not None else tuple(slice(None) for _ in mask.shape)
    best: tuple[int, Organ | None] = (0, None)
    for organ, om in organ_masks.items():
        overlap = int(np.count_nonzero(mask[inside] & np.asarray(om[inside], dtype=bool)))
        if overlap > best[0]:
            best = (overlap, organ)
    if best[1] is not None:
        return best[1]
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - 3, 0)
    hi = idx.max(axis=0) + 4
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    shell = ndimage.binary_dilation(mask[box], iterations=3)
    for organ, om in organ_masks.items():
        touch = int(np.count_nonzero(shell & np.asarray(om, dtype=bool)[box]))
        if touch > best[0]:
            best = (touch, organ)
    if best[1] is not None:
        return best[1]
    centroid = idx.mean(axis=0)
    nearest: tuple[float, Organ] = (np.inf, default)
    for organ, om in organ_masks.items():
        oidx = np.argwhere(np.asarray(om, dtype=bool))
        if oidx.size == 0:
            continue
        d = float(np.min(((oidx - centroid) ** 2).sum(axis=1)))
        if d < nearest[0]:
            nearest = (d, organ)
    return nearest[1]


def anatomical_sub_site(
    organ: Organ,
    lesion_mask: BoolMask,
    organ_masks: Mapping[Organ, npt.NDArray[Any]],
    affine: npt.NDArray[np.float64],
    *,
    frames: dict[Organ, LiverFrame | PancreasFrame | AnatomyError] | None = None,
    box: tuple[slice, ...] | None = None,
) -> SubSite | None:
    """Approximate Couinaud segment (liver) or head/body/tail (pancreas) of a
    lesion by majority vote over its voxels (see :mod:`models.anatomy`); ``None``
    for other organs or when the organ mask is too small to define the frame.
    ``frames`` keeps each organ's frame (or why it has none) for the next lesion
    of the same masks: :func:`measure_lesions` passes one per call. ``box``: a box
    that holds the whole lesion (its voxels are read there, not over the volume)."""
    om = organ_masks.get(organ)
    if om is None or organ not in (Organ.LIVER, Organ.PANCREAS):
        return None
    cache: dict[Organ, LiverFrame | PancreasFrame | AnatomyError] = (
        frames if frames is not None else {}
    )
    if organ not in cache:
        mask = np.asarray(om, dtype=bool)
        try:
            cache[organ] = (
                LiverFrame.from_mask(mask, affine)
                if organ == Organ.LIVER
                else PancreasFrame.from_mask(mask, affine)
            )
        except AnatomyError as exc:
            cache[organ] = exc
    frame = cache[organ]
    where: npt.NDArray[Any] = lesion_mask
    if box is not None:  # the lesion's (k, r, c) voxels, found in its box
        where = np.argwhere(lesion_mask[box]) + [s.start for s in box]
        if where.shape[0] == 0:
            log.info("no sub-site for a %s lesion: the query mask is empty", organ)
            return None
    try:
        if isinstance(frame, LiverFrame):
            return couinaud_segment(where, om, affine, frame=frame)
        if isinstance(frame, PancreasFrame):
            return pancreas_part(where, om, affine, frame=frame)
        log.info("no sub-site for a %s lesion: %s", organ, frame)
    except AnatomyError as exc:
        log.info("no sub-site for a %s lesion: %s", organ, exc)
    return None


def default_lesion_kind(organ: Organ, mean_intensity: float | None, modality: str) -> LesionKind:
    """A simple morphological guess when the caller has no better one:
    gallbladder lesions are calculi; CT lesions near water density (< 20 HU) are
    cysts; everything else is a mass."""
    if organ == Organ.GALLBLADDER:
        return LesionKind.CALCULUS
    if modality.upper() == "CT" and mean_intensity is not None and mean_intensity < 20.0:
        return LesionKind.CYST
    return LesionKind.MASS


def measure_lesion(
    grid: Grid,
    mask: npt.NDArray[Any],
    number: int,
    organ: Organ,
    kind: LesionKind,
    *,
    sub_site: SubSite | None = None,
    confidence: float = 1.0,
    edge: LesionEdge | None = None,
    box: tuple[slice, ...] | None = None,
) -> LesionFinding:
    """Measure one lesion (a boolean mask of a single instance); with ``edge``, its
    diameters come from the image's sub-voxel contour at the edge level. ``box``: the
    lesion's box (:func:`mask_box`, found when not given); every measurement reads
    that box, never the whole volume."""
    _check_mask(grid, mask, f"lesion {number}")
    m = np.asarray(mask, dtype=bool)
    if box is None:
        box = mask_box(m)
    if box is None:
        raise MeasureError(f"lesion {number}: empty mask")
    sub = m[box]
    origin = np.array([s.start for s in box])
    ks = np.flatnonzero(sub.any(axis=(1, 2))) + origin[0]
    if ks.size == 0:
        raise MeasureError(f"lesion {number}: empty mask")
    affine = np.asarray(grid.affine, dtype=np.float64)
    rows = np.flatnonzero(sub.any(axis=(0, 2))) + origin[1]
    cols = np.flatnonzero(sub.any(axis=(0, 1))) + origin[2]
    r0, c0 = int(rows[0]), int(cols[0])
    if edge is not None:
        # one voxel of margin for the contour band, three more for the smoothing
        r0, c0 = max(r0 - 4, 0), max(c0 - 4, 0)
        r1, c1 = int(rows[-1]) + 5, int(cols[-1]) + 5
        k0, k1 = max(int(ks[0]) - 3, 0), int(ks[-1]) + 4
        img = np.asarray(grid.array[k0:k1, r0:r1, c0:c1], dtype=np.float32)
        if edge.smooth_voxels > 0:
            img = ndimage.gaussian_filter(img, edge.smooth_voxels)
        crop = m[:, r0:r1, c0:c1]
        lines = {int(k): _edge_contours(img[int(k) - k0], crop[int(k)], edge) for k in ks}
    else:
        crop = m[:, r0 : int(rows[-1]) + 1, c0 : int(cols[-1]) + 1]
        lines = {}
    rmat = _plane_basis(affine)

    def long_mm(k: int) -> float:
        if lines.get(k):
            return _feret(lines[k], rmat)[0]
        return long_axis_mm(crop[k], affine)

    key = max((int(k) for k in ks), key=long_mm)
    d = slice_diameters(crop[key], affine, lines.get(key))

    centroid_krc = np.argwhere(sub).mean(axis=0) + origin
    centroid = centroid_krc @ affine[:3, :3].T + affine[:3, 3]
    mean, std = _intensity(grid, m, box)

    def krc(rc: tuple[float, float]) -> tuple[float, float, float]:
        return (float(key), rc[0] + r0, rc[1] + c0)

    return LesionFinding(
        number=number,
        organ=organ,
        kind=kind,
        mask=m,
        volume_ml=float(np.count_nonzero(sub)) * voxel_volume_ml(affine),
        long_axis=Axis(start=krc(d.long_rc[0]), end=krc(d.long_rc[1]), length_mm=d.long_mm),
        short_axis=Axis(start=krc(d.short_rc[0]), end=krc(d.short_rc[1]), length_mm=d.short_mm),
        key_slice=key,
        centroid_lps=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
        sub_site=sub_site,
        mean_intensity=mean,
        std_intensity=std,
        confidence=confidence,
        outline=tuple(krc(p) for p in d.outline_rc),
    )


def measure_lesions(
    grid: Grid,
    lesions: npt.NDArray[Any],
    organ_masks: Mapping[Organ, npt.NDArray[Any]],
    *,
    min_voxels: int = 1,
    modality: str | None = None,
    default_organ: Organ = Organ.LIVER,
    kinds: Mapping[int, LesionKind] | None = None,
    confidences: Mapping[int, float] | None = None,
    sub_site_fn: SubSiteFn | None = anatomical_sub_site,
    edges: Mapping[int, LesionEdge] | None = None,
) -> tuple[LesionFinding, ...]:
    """Measure every lesion instance.

    ``lesions`` is a boolean mask (split into 3-D connected components, numbered
    by decreasing volume) or an integer instance mask (numbers kept). Each lesion
    is assigned to the organ mask that holds most of it (nearest organ if none),
    gets a sub-site from ``sub_site_fn`` (Couinaud segment / pancreatic part) and
    a kind from ``kinds`` or :func:`default_lesion_kind`. ``edges`` gives, by lesion
    number, where the image shows a lesion's edge (:class:`LesionEdge`).
    """
    _check_mask(grid, lesions, "lesions")
    for organ, om in organ_masks.items():
        _check_mask(grid, om, f"organ {organ}")
    instances = lesion_instances(lesions, min_voxels=min_voxels)
    mod = modality if modality is not None else str(getattr(grid, "modality", ""))
    out: list[LesionFinding] = []
    # the default sub-site finder builds each organ's frame once for all the lesions
    frames: dict[Organ, LiverFrame | PancreasFrame | AnatomyError] = {}
    affine = np.asarray(grid.affine, dtype=np.float64)
    for number, box in lesion_boxes(instances).items():
        # the lesion's full-size mask (it travels in the findings), filled in its box
        m = np.zeros(instances.shape, dtype=bool)
        m[box] = instances[box] == number
        organ = assign_organ(m, organ_masks, default_organ, box)
        if kinds is not None and number in kinds:
            kind = kinds[number]
        else:
            kind = default_lesion_kind(organ, _intensity(grid, m, box)[0], mod)
        if sub_site_fn is anatomical_sub_site:
            sub_site = anatomical_sub_site(organ, m, organ_masks, affine, frames=frames, box=box)
        else:
            sub_site = sub_site_fn(organ, m, organ_masks, affine) if sub_site_fn else None
        conf = 1.0 if confidences is None else float(confidences.get(number, 1.0))
        edge = edges.get(number) if edges is not None else None
        out.append(
            measure_lesion(
                grid, m, number, organ, kind, sub_site=sub_site, confidence=conf, edge=edge, box=box
            )
        )
    return tuple(out)
