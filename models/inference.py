"""Inference: a ``Volume`` and a bundle in, organ and lesion masks and ``Findings`` out.

Steps of :func:`segment`:

1. refuse modalities the bundle has no model for (:class:`NoModelForModality`,
   e.g. "no model for US");
2. reorient by the affine: the index axes are permuted and flipped (no
   interpolation, exactly invertible) so that they run towards superior,
   posterior and patient-left;
3. resample (trilinear) to the bundle's spacing;
4. intensity normalisation: a fixed window for CT (HU), percentiles for MR;
5. sliding-window inference (``monai.inferers.sliding_window_inference``,
   Gaussian blending) on CPU or GPU; softmax; labels from the probabilities
   (:func:`labels_from_probs`) as the bundle's declared post-processing says
   (:class:`models.bundle.PostProcess`): the argmax, with optional thresholds
   below it for the lesion channel and for chosen organs;
6. post-processing on the network grid: the largest connected component of
   each organ; lesions split into 3-D connected components, those smaller than
   the bundle's ``min_lesion_ml`` dropped, those whose highest lesion
   probability stays under ``lesion_seed_threshold`` dropped, those touching no
   organ dropped; each lesion assigned to the organ it touches most, and its
   voxels added to that organ's mask (an organ's volume includes its lesions);
7. labels back to the source grid (nearest neighbour), masks on the source grid;
8. with ``lesion_refine`` declared, each lesion's outline redrawn on the source grid
   at half its contrast with the organ around it (:func:`refine_lesion`): the
   network's outline is coarse at its 2.5-4 mm voxels, and sizes are read from it.
   The edge level travels with the segmentation (``Segmentation.lesion_edges``), and
   the measurements take each refined lesion's diameters from the image's sub-voxel
   contour at that level (:class:`models.measure.LesionEdge`). Touching lesions one
   redrawn outline holds are split (``split_mm``), and the lesions are numbered
   again 1..n by decreasing size (:func:`number_by_size`): lesion 1 is the largest
   in the SEG, the SR and the report.

:func:`analyse` adds the measurements (:mod:`models.measure`) and provenance and
returns ``Findings`` with no diagnoses and no report; :func:`with_interpretation`
is the seam where the multimodal classifier and report generator add theirs.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from monai.inferers import sliding_window_inference
from scipy import ndimage

from models.bundle import Bundle, FocalSearch, IntensityNorm, LesionRefine
from models.findings import (
    ClinicalValue,
    Diagnosis,
    Findings,
    OrganFinding,
    Provenance,
    ReportSentence,
)
from models.measure import (
    LesionEdge,
    lesion_boxes,
    mask_box,
    measure_lesions,
    measure_organ,
    padded_box,
)
from models.phase import estimate_phase
from models.vocab import ContrastPhase, Organ
from models.volume import Volume

log = logging.getLogger(__name__)

PIPELINE_VERSION = "hpb-node-inference/1"
_STRUCT26 = np.ones((3, 3, 3), dtype=bool)
_STRUCT8 = np.ones((3, 3), dtype=bool)


class InferenceError(ValueError):
    """Inference could not run on this volume; the message is for an admin."""


class NoModelForModality(InferenceError):
    """The bundle has no model for the series' modality (e.g. ultrasound)."""

    def __init__(self, modality: str, available: Sequence[str]) -> None:
        self.modality = modality
        super().__init__(
            f"no model for {modality or 'an unknown modality'}: "
            f"the model covers {', '.join(available)} only"
        )


# ---------------------------------------------------------------------------
# orientation and resampling


@dataclass(frozen=True)
class Reorientation:
    """Axis permutation and flips taking ``array[k, r, c]`` to the canonical
    (superior, posterior, left) index order."""

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]

    @classmethod
    def from_affine(cls, affine: npt.NDArray[np.float64]) -> Reorientation:
        cols = np.asarray(affine, dtype=np.float64)[:3, :3]
        unit = cols / np.linalg.norm(cols, axis=0)
        targets = (2, 1, 0)  # canonical axis 0 -> z (S), 1 -> y (P), 2 -> x (L)
        best: tuple[float, tuple[int, int, int]] = (-1.0, (0, 1, 2))
        for perm in itertools.permutations(range(3)):
            score = sum(abs(unit[targets[j], perm[j]]) for j in range(3))
            if score > best[0]:
                best = (score, (perm[0], perm[1], perm[2]))
        perm = best[1]
        flip = tuple(bool(unit[targets[j], perm[j]] < 0) for j in range(3))
        return cls(perm=perm, flip=(flip[0], flip[1], flip[2]))

    def apply(self, array: npt.NDArray[Any]) -> npt.NDArray[Any]:
        out = np.transpose(array, self.perm)
        for axis, f in enumerate(self.flip):
            if f:
                out = np.flip(out, axis=axis)
        return out

    def invert(self, array: npt.NDArray[Any]) -> npt.NDArray[Any]:
        out = array
        for axis, f in enumerate(self.flip):
            if f:
                out = np.flip(out, axis=axis)
        return np.transpose(out, np.argsort(self.perm))

    def spacing(self, affine: npt.NDArray[np.float64]) -> tuple[float, float, float]:
        norms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
        return (float(norms[self.perm[0]]), float(norms[self.perm[1]]), float(norms[self.perm[2]]))


def target_shape(
    shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]
) -> tuple[int, int, int]:
    out = [max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target_spacing, strict=True)]
    return (out[0], out[1], out[2])


def nearest_indices(n_src: int, n_dst: int) -> npt.NDArray[np.intp]:
    """For each destination voxel, the nearest source voxel (centres aligned, as
    ``interpolate(align_corners=False)`` places them)."""
    pos = (np.arange(n_dst) + 0.5) * (n_src / n_dst) - 0.5
    return np.clip(np.rint(pos), 0, n_src - 1).astype(np.intp)


def resample_labels(labels: npt.NDArray[Any], shape: Sequence[int]) -> npt.NDArray[Any]:
    """Nearest-neighbour resampling of a label map to ``shape`` (same field of view):
    one axis at a time, the slice axis last, so that the full-size result is written
    once as whole slices (about three times faster than one ``np.ix_`` gather)."""
    idx = [nearest_indices(n, m) for n, m in zip(labels.shape, shape, strict=True)]
    out = np.take(labels, idx[2], axis=2)
    out = np.take(out, idx[1], axis=1)
    return np.take(out, idx[0], axis=0)


def normalise_intensity(array: npt.NDArray[Any], norm: IntensityNorm) -> npt.NDArray[np.float32]:
    """Scale voxels to [0, 1]: a fixed window (CT) or the image's percentiles (MR)."""
    a = np.asarray(array, dtype=np.float32)
    if norm.kind == "window":
        lo, hi = norm.lower, norm.upper
    else:
        sample = a[:: max(1, a.shape[0] // 64), ::2, ::2]
        lo, hi = (float(v) for v in np.percentile(sample, [norm.lower, norm.upper]))
        if hi <= lo:
            hi = lo + 1.0
    out = (a - np.float32(lo)) / np.float32(hi - lo)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def check_modality(modality: str, bundle: Bundle) -> str:
    mod = (modality or "").upper()
    if mod not in bundle.modalities:
        raise NoModelForModality(mod, bundle.modalities)
    return mod


def prepare_input(
    array: npt.NDArray[Any], affine: npt.NDArray[np.float64], modality: str, bundle: Bundle
) -> tuple[torch.Tensor, Reorientation, tuple[int, int, int]]:
    """Reoriented, resampled, normalised network input ``(1, 1, D, H, W)``; the
    reorientation and the canonical source shape to map results back."""
    mod = check_modality(modality, bundle)
    reo = Reorientation.from_affine(affine)
    canon = reo.apply(array)
    shape = (int(canon.shape[0]), int(canon.shape[1]), int(canon.shape[2]))
    norm = normalise_intensity(canon, bundle.intensity[mod])
    net_shape = target_shape(shape, reo.spacing(affine), bundle.spacing_mm)
    x = torch.from_numpy(np.ascontiguousarray(norm))[None, None]
    del norm
    if net_shape != shape:
        x = torch.nn.functional.interpolate(
            x, size=net_shape, mode="trilinear", align_corners=False
        )
    return x, reo, shape


# ---------------------------------------------------------------------------
# segmentation


@dataclass(frozen=True)
class Segmentation:
    """Masks on the source grid, ready for ``Findings``."""

    organ_masks: dict[Organ, npt.NDArray[np.bool_]]
    lesion_instances: npt.NDArray[np.int32]  # 0 = none, 1..n lesion numbers
    lesion_organs: dict[int, Organ]
    lesion_confidence: dict[int, float]
    organ_confidence: dict[Organ, float]
    # where the image shows a refined lesion's edge (sub-voxel measurement)
    lesion_edges: dict[int, LesionEdge] = field(default_factory=dict)
    # lesions the network marked that the image does not show (LesionRefine.min_conspicuity)
    lesions_not_distinct: int = 0
    # lesions the focal search (PostProcess.focal_search) added where the network saw none
    lesions_found_by_search: tuple[int, ...] = ()


def _largest_component(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    labels, n = ndimage.label(mask, structure=_STRUCT26)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    out: npt.NDArray[np.bool_] = labels == int(np.argmax(sizes))
    return out


def labels_from_probs(probs: torch.Tensor, bundle: Bundle) -> npt.NDArray[np.uint8]:
    """Channel labels from softmax probabilities ``(C, D, H, W)``: the argmax, then the
    bundle's thresholds (:class:`models.bundle.PostProcess`). A voxel left as background
    whose probability of an organ in ``organ_thresholds`` reaches that threshold joins
    the organ (the most probable such organ); with a ``lesion_threshold`` a voxel is
    lesion exactly when its lesion probability reaches it (a voxel the argmax called
    lesion below the threshold gets its most probable other channel)."""
    post = bundle.postprocess
    labels = probs.argmax(dim=0).numpy().astype(np.uint8)
    organ_ch = {o.value: ch for o, ch in bundle.organ_channels.items()}
    best = np.zeros(labels.shape, dtype=np.float32)
    for name, threshold in post.organ_thresholds.items():
        ch = organ_ch[name]
        p = probs[ch].numpy()
        sel = (labels == 0) & (p >= threshold) & (p > best)
        labels[sel] = ch
        best[sel] = p[sel]
    les = bundle.lesion_channel
    if les >= 0 and post.lesion_threshold is not None:
        p_les = probs[les].numpy()
        below = (labels == les) & (p_les < post.lesion_threshold)
        if below.any():
            others = probs.clone()
            others[les] = -1.0
            labels[below] = others.argmax(dim=0).numpy().astype(np.uint8)[below]
        labels[p_les >= post.lesion_threshold] = les
    return labels


def _fill_holes(out: npt.NDArray[np.uint8], ch: int) -> None:
    """Background enclosed by organ ``ch`` joins it: in 3-D, then in each axial slice."""
    m = out == ch
    box = mask_box(m)
    if box is None:
        return
    sub, mb = out[box], m[box]
    filled = ndimage.binary_fill_holes(mb)
    for k in range(filled.shape[0]):
        filled[k] = ndimage.binary_fill_holes(filled[k])
    sub[filled & (sub == 0)] = ch


def split_lesion_component(
    mask: npt.NDArray[np.bool_], spacing_mm: Sequence[float], h_mm: float
) -> tuple[npt.NDArray[np.int32], int]:
    """Split one lesion component into touching lesions: markers are the maxima of its
    distance map (mm) that rise at least ``h_mm`` above the saddle to any other, regions
    by watershed on the distance map. Returns labels 1..n within ``mask`` and n."""
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    dist = ndimage.distance_transform_edt(mask, sampling=tuple(spacing_mm))
    peaks = h_maxima(dist, h_mm) & mask
    markers, n = ndimage.label(peaks, structure=_STRUCT26)
    if n <= 1:
        return mask.astype(np.int32), 1
    parts = watershed(-dist, markers, mask=mask)
    return np.asarray(parts, dtype=np.int32), n


def postprocess(
    labels: npt.NDArray[Any],
    lesion_prob: npt.NDArray[np.float32],
    bundle: Bundle,
    voxel_ml: float,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int32], dict[int, Organ], dict[int, float]]:
    """Clean a network-grid label map (see the module docstring, step 6).

    Returns the organ label map (channel numbers, lesions folded into their
    organ), lesion instances (numbered by decreasing size), their organs and
    their mean lesion probability."""
    organ_ch = bundle.organ_channels
    out = np.zeros(labels.shape, dtype=np.uint8)
    for ch in organ_ch.values():
        m = labels == ch
        if m.any():
            out[_largest_component(m)] = ch
    lesion = (
        labels == bundle.lesion_channel
        if bundle.lesion_channel >= 0
        else np.zeros(labels.shape, dtype=bool)
    )
    comp, n = ndimage.label(lesion, structure=_STRUCT26)
    split = bundle.postprocess.lesion_split_mm
    if split is not None and n:
        comp, n = _split_components(comp, n, bundle.spacing_mm, split)
    instances = np.zeros(labels.shape, dtype=np.int32)
    organs: dict[int, Organ] = {}
    conf: dict[int, float] = {}
    if n:
        seed = bundle.postprocess.lesion_seed_threshold
        min_voxels = max(1, int(np.ceil(bundle.min_lesion_ml / voxel_ml)))
        sizes = np.bincount(comp.ravel(), minlength=n + 1)
        boxes = ndimage.find_objects(comp)
        by_channel = {ch: o for o, ch in organ_ch.items()}
        number = 0
        for idx in np.argsort(-sizes[1:], kind="stable"):
            lab = int(idx) + 1
            found = boxes[idx]
            if sizes[lab] < min_voxels or found is None:
                continue
            box = padded_box(found, comp.shape, 2)
            m = comp[box] == lab
            if seed is not None and float(lesion_prob[box][m].max()) < seed:
                continue  # no voxel the network is confident about: not reported
            shell = ndimage.binary_dilation(m, structure=_STRUCT26, iterations=2) & ~m
            touching = out[box][shell]
            touching = touching[touching > 0]
            if touching.size == 0:
                continue  # a "lesion" outside every organ: discard as a false positive
            ch = int(np.bincount(touching).argmax())
            number += 1
            instances[box][m] = number
            out[box][m] = ch
            organs[number] = by_channel[ch]
            conf[number] = float(lesion_prob[box][m].mean())
    for name in bundle.postprocess.fill_holes:
        _fill_holes(out, next(ch for o, ch in organ_ch.items() if o.value == name))
    return out, instances, organs, conf


def _split_each(
    labels: npt.NDArray[np.int32], spacing_mm: Sequence[float], h_mm: float
) -> Iterator[tuple[int, tuple[slice, ...], npt.NDArray[np.bool_], npt.NDArray[np.int32], int]]:
    """For each label of ``labels`` in order: its number, box, mask in the box and its
    split (:func:`split_lesion_component`: parts and their count)."""
    for number, box in lesion_boxes(labels).items():
        m = labels[box] == number
        parts, k = split_lesion_component(m, spacing_mm, h_mm)
        yield number, box, m, parts, k


def _split_components(
    comp: npt.NDArray[np.int32], n: int, spacing_mm: Sequence[float], h_mm: float
) -> tuple[npt.NDArray[np.int32], int]:
    """Relabel lesion components with touching lesions split (:func:`split_lesion_component`)."""
    out = np.zeros_like(comp)
    total = 0
    for _, box, m, parts, k in _split_each(comp, spacing_mm, h_mm):
        out[box][m] = parts[m] + total
        total += k
    return out, total


def robust_stats(values: npt.NDArray[Any]) -> tuple[float, float]:
    """Median and robust standard deviation (1.4826 x the median absolute deviation)."""
    median = float(np.median(values))
    return median, 1.4826 * float(np.median(np.abs(values - median)))


def smooth_inside(
    image: npt.NDArray[Any], inside: npt.NDArray[np.bool_], sigma: Any
) -> npt.NDArray[np.float32]:
    """``image`` smoothed by a Gaussian of ``sigma`` voxels from the voxels of ``inside``
    only (normalised convolution: what lies outside does not bleed in); 0 where almost
    no ``inside`` voxel is near."""
    weight = ndimage.gaussian_filter(inside.astype(np.float32), sigma)
    smooth = ndimage.gaussian_filter(np.where(inside, image, 0.0).astype(np.float32), sigma)
    out: npt.NDArray[np.float32] = np.divide(
        smooth, weight, out=np.zeros_like(smooth), where=weight > 0.05
    )
    return out


def _edge_levels(
    img: npt.NDArray[np.float32],
    mask: npt.NDArray[np.bool_],
    core: npt.NDArray[np.bool_],
    organ: npt.NDArray[np.bool_],
    sampling: tuple[float, ...],
    params: LesionRefine,
) -> tuple[float, float, float] | None:
    """(lesion level, background level, sign of the contrast) of a lesion ``mask``
    (:class:`LesionRefine`); None with too little organ around it or too little contrast."""
    d_out = ndimage.distance_transform_edt(~mask, sampling=sampling)
    ring = (d_out > params.grow_voxels) & (d_out <= params.grow_voxels + 3) & organ
    if ring.sum() < 10:
        return None
    bg, noise = robust_stats(img[ring])
    sign = 1.0 if float(np.median(img[core])) >= bg else -1.0
    fg = float(np.percentile(img[mask], 75 if sign > 0 else 25))
    if abs(fg - bg) <= params.min_contrast * noise or fg == bg:
        return None
    return fg, bg, sign


def _open_slice(
    outline: npt.NDArray[np.bool_], network: npt.NDArray[np.bool_]
) -> npt.NDArray[np.bool_]:
    """One slice's outline opened by a 3 x 3 square, keeping the opened pieces that
    overlap the network's outline ``network`` (all of them if none does), with the
    outline's voxels next to them given back; an outline that opening would empty is
    kept as it is (:class:`LesionRefine` ``open_slices``)."""
    opened = ndimage.binary_opening(outline, structure=_STRUCT8)
    if not opened.any():
        return outline
    pieces, _ = ndimage.label(opened, structure=_STRUCT8)
    on = np.unique(pieces[network & opened])
    on = on[on > 0]
    kept = np.isin(pieces, on) if on.size else opened
    # the opening also rounds the outline's own corners: voxels of the outline next to
    # what it kept come back, so only the strand beyond its first voxel is lost
    out: npt.NDArray[np.bool_] = kept | (
        outline & ndimage.binary_dilation(kept, structure=_STRUCT8)
    )
    return out


def refine_lesion(
    image: npt.NDArray[Any],
    instances: npt.NDArray[np.int32],
    number: int,
    organ: npt.NDArray[np.bool_],
    spacing_mm: Sequence[float],
    params: LesionRefine,
) -> tuple[npt.NDArray[np.bool_], LesionEdge] | None:
    """Lesion ``number``'s outline redrawn at half contrast (:class:`LesionRefine`), as a
    mask of ``instances``' shape, and the edge level it was drawn at (for sub-voxel
    measurement, :class:`models.measure.LesionEdge`); None where the image does not show
    it clearly enough (too little contrast or organ around it) and the network's
    outline should stay. The edge level is taken again from the redrawn outline's own
    core and ring, which places the measuring contour better than the first guess.

    ``organ`` marks the voxels of the lesion's organ that are no lesion; the new
    outline grows only into them, never takes another lesion's voxels and keeps only
    the parts connected to the lesion's core."""
    m = instances == number
    found = mask_box(m)
    if found is None:
        return None
    box = padded_box(found, m.shape, params.grow_voxels + 4)
    mb = m[box]
    img = np.asarray(image[box], dtype=np.float32)
    if params.smooth_voxels > 0:
        img = ndimage.gaussian_filter(img, params.smooth_voxels)
    other = (instances[box] > 0) & ~mb
    core = ndimage.binary_erosion(mb)
    if core.sum() < 3:
        core = mb
    sp = np.asarray(spacing_mm, dtype=np.float64)
    sampling = tuple(sp / sp.min())
    levels = _edge_levels(img, mb, core, organ[box] & ~other, sampling, params)
    if levels is None:
        return None
    fg, bg, sign = levels
    half = (fg + bg) / 2.0
    region = ndimage.binary_dilation(mb, structure=_STRUCT26, iterations=params.grow_voxels)
    # the outline grows only into its own organ, never into fat or bowel beyond it
    cand = region & ~other & (organ[box] | mb) & (sign * (img - half) > 0)
    comp, _ = ndimage.label(cand, structure=_STRUCT26)
    keep = np.unique(comp[core & cand])
    keep = keep[keep > 0]
    if not keep.size:
        return None
    r = np.isin(comp, keep)
    for k in range(r.shape[0]):
        if not r[k].any():
            continue
        # in each slice only the pieces that overlap the network's own outline there: a
        # chain of darker partial-volume voxels along the organ's edge can join the core
        # in 3-D and would otherwise add islands that lengthen the axial long axis
        pieces, _ = ndimage.label(r[k], structure=_STRUCT8)
        on = np.unique(pieces[mb[k] & r[k]])
        r[k] = ndimage.binary_fill_holes(np.isin(pieces, on[on > 0]))
        if params.open_slices:
            r[k] = _open_slice(r[k], mb[k])
    if not r.any():
        return None
    out = np.zeros(m.shape, dtype=bool)
    out[box] = r
    # the edge level for measurement, from the redrawn outline (its own ring and core)
    core2 = ndimage.binary_erosion(r)
    again = _edge_levels(
        img, r, core2 if core2.sum() >= 3 else r, (organ[box] | mb) & ~other & ~r, sampling, params
    )
    if again is not None and again[2] == sign:
        fg, bg, _ = again
        half = (fg + bg) / 2.0
    return out, LesionEdge(level=half, outside=bg, smooth_voxels=params.smooth_voxels)


def refine_lesions(
    image: npt.NDArray[Any],
    instances: npt.NDArray[np.int32],
    organ_labels: npt.NDArray[Any],
    spacing_mm: Sequence[float],
    params: LesionRefine,
    *,
    only: Collection[int] | None = None,
    in_place: bool = False,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[Any], dict[int, LesionEdge]]:
    """Every lesion of ``instances`` (or those numbered in ``only``) refined
    (:func:`refine_lesion`) within the organ it was folded into, in order of number;
    voxels a lesion gains join its organ in ``organ_labels`` (channel numbers) and
    voxels it gives up return to the organ around it. Returns both, updated copies
    (with ``in_place``, the arrays given, changed: a caller that owns them saves two
    whole-volume copies, over 780 MB at 600 slices of 512 x 512), and the edge level
    of each refined lesion by number."""
    inst = instances if in_place else instances.copy()
    labels = organ_labels if in_place else organ_labels.copy()
    edges: dict[int, LesionEdge] = {}
    pad = params.grow_voxels + 4  # refine_lesion's own margin: the same box inside
    for number, found in lesion_boxes(inst).items():
        if only is not None and number not in only:
            continue
        # each lesion is worked on in its box, never over the whole volume
        box = padded_box(found, inst.shape, pad)
        inst_b, labels_b = inst[box], labels[box]
        old = inst_b == number
        ch = np.bincount(labels_b[old].ravel()).argmax()
        # the lesion's own organ: its background level, and where its outline may grow
        organ = (labels_b == ch) & (inst_b == 0)
        refined = refine_lesion(image[box], inst_b, number, organ, spacing_mm, params)
        if refined is None or not refined[0].any():
            continue
        new, edges[number] = refined
        inst_b[old & ~new] = 0
        inst_b[new] = number
        labels_b[new] = ch
    return inst, labels, edges


def split_refined_lesions(
    instances: npt.NDArray[np.int32],
    spacing_mm: Sequence[float],
    split_mm: float,
    min_diameter_mm: float,
) -> tuple[npt.NDArray[np.int32], dict[int, int]]:
    """Touching lesions that one outline still holds, split after refinement
    (:class:`models.bundle.LesionRefine` ``split_mm``): each lesion is split by
    :func:`split_lesion_component`; pieces whose equivalent-sphere diameter reaches
    ``min_diameter_mm`` become lesions of their own (new numbers after the highest),
    the largest keeps the number and smaller pieces stay with it. Returns the new
    instances and, for each new number, the lesion it came from. Where nothing is
    split, ``instances`` itself comes back (a copy of a whole 600-slice volume costs
    over 600 MB); it is never changed."""
    out = instances
    parent: dict[int, int] = {}
    total = int(instances.max()) if instances.size else 0
    voxel_mm3 = float(np.prod(spacing_mm))
    for number, box, m, parts, k in _split_each(instances, spacing_mm, split_mm):
        if k <= 1:
            continue
        sizes = np.bincount(parts[m], minlength=k + 1)
        diameters = (6.0 * sizes * voxel_mm3 / np.pi) ** (1.0 / 3.0)
        big = [j for j in range(1, k + 1) if diameters[j] >= min_diameter_mm]
        if len(big) <= 1:
            continue
        largest = max(big, key=lambda j: int(sizes[j]))
        if out is instances:
            out = instances.copy()
        for j in big:
            if j == largest:
                continue
            total += 1
            out[box][parts == j] = total
            parent[total] = number
    return out, parent


def drop_inconspicuous(
    image: npt.NDArray[Any],
    instances: npt.NDArray[np.int32],
    organ_labels: npt.NDArray[Any],
    min_conspicuity: float,
    channels: Collection[int] | None = None,
) -> list[int]:
    """Remove **in place** from ``instances`` the lesions the image does not show
    (:class:`models.bundle.LesionRefine` ``min_conspicuity``): those whose median
    differs from the median of a ring of their organ 2-3 voxels around them by less
    than ``min_conspicuity`` robust standard deviations (1.4826 x the median absolute
    deviation) of that ring (:func:`conspicuity`). A lesion with fewer than 5 ring
    voxels, or a ring without spread, is kept (nothing to compare with), and so is a
    lesion of an organ whose channel is not in ``channels`` (None: every organ). Their
    voxels stay in the organ ``organ_labels`` folded them into. Returns the numbers
    removed."""
    dropped: list[int] = []
    for number, found in lesion_boxes(instances).items():
        box = padded_box(found, instances.shape, 4)
        inst_b = instances[box]
        m = inst_b == number
        labels_b = np.asarray(organ_labels[box])
        ch = np.bincount(labels_b[m].ravel()).argmax()
        if channels is not None and int(ch) not in channels:
            continue
        organ = (labels_b == ch) & (inst_b == 0)
        z = conspicuity(image[box], m, organ)
        if z is not None and abs(z) < min_conspicuity:
            inst_b[m] = 0
            dropped.append(number)
    return dropped


def conspicuity(
    image: npt.NDArray[Any], lesion: npt.NDArray[np.bool_], organ: npt.NDArray[np.bool_]
) -> float | None:
    """How far a lesion stands out from its organ: the median of ``image`` in ``lesion``
    minus the median of a ring of ``organ`` voxels 2-3 voxels around it, in robust
    standard deviations of that ring (1.4826 x the median absolute deviation; signed:
    negative for a darker lesion). None with fewer than 5 ring voxels or a ring
    without spread (nothing to compare with). The arrays are one box; ``organ`` should
    exclude every lesion."""
    ring = (
        ndimage.binary_dilation(lesion, iterations=3)
        & ~ndimage.binary_dilation(lesion, iterations=1)
        & organ
    )
    if ring.sum() < 5:
        return None
    img = np.asarray(image, dtype=np.float32)
    bg, noise = robust_stats(img[ring])
    if noise == 0.0:
        return None
    return (float(np.median(img[lesion])) - bg) / noise


#: Confidence given to a lesion the focal search found: the rule has no probability,
#: and this puts such lesions below the network's confident ones in a FROC sweep.
FOCAL_SEARCH_CONFIDENCE = 0.5


def _block_mean(a: npt.NDArray[Any], stride: Sequence[int]) -> npt.NDArray[np.float32]:
    """``a`` averaged over blocks of ``stride`` voxels (edges padded by repetition)."""
    pad = [(0, (-n) % s) for n, s in zip(a.shape, stride, strict=True)]
    b = np.pad(np.asarray(a, dtype=np.float32), pad, mode="edge")
    k, r, c = (n // s for n, s in zip(b.shape, stride, strict=True))
    blocks = b.reshape(k, stride[0], r, stride[1], c, stride[2])
    out: npt.NDArray[np.float32] = blocks.mean(axis=(1, 3, 5))
    return out


def _explained_by_lesion(
    pieces: npt.NDArray[np.int32],
    i: int,
    piece_box: tuple[slice, ...],
    stride: Sequence[int],
    inst_b: npt.NDArray[np.int32],
    lesions_b: dict[int, tuple[int, bool]],
    signed: npt.NDArray[np.float32],
) -> bool:
    """Whether piece ``i`` of the focal search (grid ``pieces``) is the unmarked part of
    a lesion in ``inst_b`` (source grid; ``lesions_b``: each lesion's voxel count and
    whether it is brighter than the organ): a lesion of the same sign as the piece's
    mean difference from the organ (``signed``), at least half of whose voxels lie
    within two grid voxels of the piece."""
    win = tuple(slice(max(b.start - 3, 0), b.stop + 3) for b in piece_box)
    within = pieces[win] == i
    brighter = bool(signed[win][within].mean() > 0)
    reach = ndimage.binary_dilation(within, iterations=2)
    src = tuple(
        slice(w.start * s, min(w.stop * s, n))
        for w, s, n in zip(win, stride, inst_b.shape, strict=True)
    )
    index = np.ix_(
        *(
            np.arange(b.start, b.stop) // s - w.start
            for b, s, w in zip(src, stride, win, strict=True)
        )
    )
    inst_w = inst_b[src]
    near = inst_w[reach[index] & (inst_w > 0)]
    numbers, counts = np.unique(near, return_counts=True)
    return any(
        lesions_b[int(n)][1] is brighter and c >= 0.5 * lesions_b[int(n)][0]
        for n, c in zip(numbers, counts, strict=True)
    )


def find_focal_lesions(
    image: npt.NDArray[Any],
    instances: npt.NDArray[np.int32],
    organ_labels: npt.NDArray[Any],
    spacing_mm: Sequence[float],
    rule: FocalSearch,
    channel: int,
) -> list[int]:
    """Add **in place** to ``instances`` (and to ``organ_labels``, as ``channel``) the
    distinct focal areas inside organ ``channel`` that no lesion covers
    (:class:`models.bundle.FocalSearch`); an area that is the unmarked part of a lesion
    (:func:`_explained_by_lesion`) is left to it. New lesions are numbered after the highest;
    returns their numbers. Everything is done in the organ's box, on a grid of about
    ``rule.grid_mm`` (block means); each area's outline is where its smoothed difference
    from the organ falls to half its peak, drawn back on the source grid only where the
    network left background or the organ."""
    organ = organ_labels == channel
    found = mask_box(organ)
    if found is None:
        return []
    box = padded_box(found, organ.shape, 1)
    sp = np.asarray(spacing_mm, dtype=np.float64)
    stride = [max(1, int(np.floor(rule.grid_mm / d + 0.5))) for d in sp]
    sp_c = sp * np.asarray(stride)
    labels_b = np.asarray(organ_labels[box])
    inst_b = instances[box]
    organ_c = ndimage.binary_fill_holes(_block_mean(organ[box], stride) >= 0.5)
    lesion_c = _block_mean(inst_b > 0, stride) > 0
    other_c = _block_mean((labels_b != channel) & (labels_b != 0), stride) >= 0.5
    img_c = _block_mean(image[box], stride)
    near_lesion = ndimage.binary_dilation(lesion_c, iterations=2)
    tissue = organ_c & ~near_lesion
    inner = ndimage.distance_transform_edt(organ_c, sampling=sp_c) > rule.edge_mm
    # the organ's own smoothing: what lies outside it does not bleed in
    smooth = smooth_inside(img_c, organ_c, rule.smooth_mm / sp_c)
    ref = smooth[tissue & inner]
    if ref.size < 50:
        return []
    median, spread = robust_stats(ref)
    if spread == 0.0:
        return []
    signed = smooth - median
    diff = np.abs(signed)
    out_c = (diff >= rule.min_z * spread) & organ_c & ~lesion_c & ~other_c
    if rule.open_mm > 0 and out_c.any():
        core = ndimage.distance_transform_edt(out_c, sampling=sp_c) > rule.open_mm
        out_c &= ndimage.distance_transform_edt(~core, sampling=sp_c) <= rule.open_mm + 1e-6
    pieces, n = ndimage.label(out_c)
    if n == 0:
        return []
    # a lesion explains an area beside it (the area is its unmarked part) only when it
    # stands out the same way (both brighter or both darker than the organ) and lies
    # mostly within two grid voxels of the area: a bright mass beside a dark lesion, or
    # beside another lesion that merely touches it, is a lesion of its own. Each
    # lesion's voxel count and side, taken only once some area stands out
    img_b = image[box]
    lesions_b: dict[int, tuple[int, bool]] = {}
    for n_les, b in lesion_boxes(inst_b).items():
        m = inst_b[b] == n_les
        lesions_b[n_les] = (int(np.count_nonzero(m)), float(np.median(img_b[b][m])) >= median)
    # back to the source grid: each source voxel reads the block it fell in
    index = np.ix_(
        *(np.arange(length) // s for length, s in zip(inst_b.shape, stride, strict=True))
    )
    free = (inst_b == 0) & ((labels_b == channel) | (labels_b == 0))
    number = int(instances.max()) + 1
    added: list[int] = []
    for i, piece_box in enumerate(ndimage.find_objects(pieces), start=1):
        if piece_box is None:
            continue
        piece = np.pad(pieces[piece_box] == i, 1)
        # the cheap shape tests first: most pieces are specks that fail them
        if ndimage.distance_transform_edt(piece, sampling=sp_c).max() < rule.min_inscribed_mm:
            continue
        widest = max((b.stop - b.start) * d for b, d in zip(piece_box, sp_c, strict=True))
        if np.count_nonzero(piece) * float(np.prod(sp_c)) < rule.min_fill * np.pi / 6 * widest**3:
            continue
        if _explained_by_lesion(pieces, i, piece_box, stride, inst_b, lesions_b, signed):
            continue  # part of a lesion the network marked: that lesion is reported
        # the outline at half the area's peak difference from the organ (the smoothing
        # widens it); lesion_refine then redraws it on the source grid
        within = pieces == i
        within &= diff >= 0.5 * float(np.percentile(diff[within], 95))
        full = within[index] & free
        if not full.any():
            continue
        inst_b[full] = number
        labels_b[full] = channel
        lesions_b[number] = (int(np.count_nonzero(full)), bool(signed[within].mean() > 0))
        added.append(number)
        number += 1
    return added


def number_by_size(instances: npt.NDArray[np.int32]) -> dict[int, int]:
    """Renumber lesion ``instances`` **in place** 1..n by decreasing voxel count (ties:
    the lower number first), as :func:`postprocess` numbers them before refinement
    and splitting moved voxels, dropped lesions or added pieces after the highest
    number. Returns old number -> new number for every lesion present; where the
    numbers are already so, nothing is written. Each lesion is counted and relabelled
    in its own box: no pass over the whole volume but the one that finds the boxes
    (a bincount of a 600-slice volume takes seconds), no second volume-sized array."""
    boxes = lesion_boxes(instances)
    sizes = {n: int(np.count_nonzero(instances[box] == n)) for n, box in boxes.items()}
    order = sorted(sizes, key=lambda n: (-sizes[n], n))
    mapping = {old: new for new, old in enumerate(order, start=1)}
    moved = [old for old, new in mapping.items() if old != new]
    # every mask is taken before any is written: a box may hold another lesion's voxels
    masks = [(mapping[old], boxes[old], instances[boxes[old]] == old) for old in moved]
    for new, box, m in masks:
        instances[box][m] = new
    return mapping


def _bundle_axes(bundle: Bundle) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]] | None:
    """Permutation/flips from the canonical (S, P, L) axes to the bundle's array axes
    (``extra["axcodes"]``, e.g. "RAS" for MONAI Model Zoo bundles); None for the node's own."""
    codes = str(bundle.extra.get("axcodes", "SPL")).upper()
    if codes == "SPL":
        return None
    canonical = ("S", "P", "L")
    opposite = {"S": "I", "P": "A", "L": "R", "I": "S", "A": "P", "R": "L"}
    perm = [next(i for i, c in enumerate(canonical) if ch in (c, opposite[c])) for ch in codes]
    flips = [ch not in canonical for ch in codes]
    return (perm[0], perm[1], perm[2]), (flips[0], flips[1], flips[2])


def _predict(x: torch.Tensor, net: torch.nn.Module, bundle: Bundle, device: str) -> torch.Tensor:
    axes = _bundle_axes(bundle)
    if axes is not None:
        perm, flips = axes
        x = x.permute(0, 1, *(2 + p for p in perm))
        dims = [2 + i for i, f in enumerate(flips) if f]
        if dims:
            x = torch.flip(x, dims)
    with torch.inference_mode():
        logits = sliding_window_inference(
            x.to(device),
            roi_size=bundle.roi_size,
            sw_batch_size=2,
            predictor=net,
            overlap=bundle.overlap,
            mode="gaussian",
            sw_device=device,
            device="cpu",
        )
    assert isinstance(logits, torch.Tensor)
    if axes is not None:
        perm, flips = axes
        dims = [2 + i for i, f in enumerate(flips) if f]
        if dims:
            logits = torch.flip(logits, dims)
        inverse = [perm.index(i) for i in range(3)]
        logits = logits.permute(0, 1, *(2 + p for p in inverse))
    return torch.softmax(logits[0].float(), dim=0)


def segment_array(
    array: npt.NDArray[Any],
    affine: npt.NDArray[np.float64],
    modality: str,
    bundle: Bundle,
    *,
    device: str = "cpu",
    network: torch.nn.Module | None = None,
) -> Segmentation:
    """Segment organs and lesions on a bare ``array[k, r, c]`` with its LPS affine."""
    x, reo, canon_shape = prepare_input(array, affine, modality, bundle)
    net = network if network is not None else bundle.network(device)
    try:
        probs = _predict(x, net, bundle, device)
    except RuntimeError as exc:  # torch out-of-memory, device errors
        raise InferenceError(f"the network failed on device {device}: {exc}") from exc
    del x
    conf_max = probs.max(dim=0).values
    labels = labels_from_probs(probs, bundle)
    lesion_prob = (
        probs[bundle.lesion_channel].numpy().astype(np.float32)
        if bundle.lesion_channel >= 0
        else np.zeros(labels.shape, dtype=np.float32)
    )
    organ_conf_all = conf_max.numpy()
    del probs
    voxel_ml = float(np.prod(bundle.spacing_mm)) / 1000.0
    organ_map, inst, lesion_organs, lesion_conf = postprocess(labels, lesion_prob, bundle, voxel_ml)
    organ_conf: dict[Organ, float] = {}
    for organ, ch in bundle.organ_channels.items():
        sel = organ_map == ch
        organ_conf[organ] = float(organ_conf_all[sel].mean()) if sel.any() else 0.0
    # back to the canonical source grid (nearest), then to the source index order
    organ_canon = resample_labels(organ_map, canon_shape)
    inst_canon = resample_labels(inst, canon_shape)
    refine = bundle.postprocess.lesion_refine
    focal = bundle.postprocess.focal_search
    edges: dict[int, LesionEdge] = {}
    inconspicuous = 0
    searched: list[int] = []  # lesions the focal search added, not the network
    if focal is not None or (refine is not None and inst_canon.any()):
        canon_spacing = reo.spacing(affine)
        canon_image = reo.apply(array)
    if refine is not None and inst_canon.any():
        # segment_array owns both maps (resampled above): refined where they lie
        inst_canon, organ_canon, edges = refine_lesions(
            canon_image, inst_canon, organ_canon, canon_spacing, refine, in_place=True
        )
        if refine.split_mm is not None:
            inst_canon, parent = split_refined_lesions(
                inst_canon, canon_spacing, refine.split_mm, refine.split_min_mm
            )
            for new, old in parent.items():
                lesion_organs[new] = lesion_organs[old]
                lesion_conf[new] = lesion_conf[old]
                if old in edges:
                    edges[new] = edges[old]
        if refine.min_conspicuity is not None:
            checked = refine.conspicuity_organs
            channels = (
                {ch for o, ch in bundle.organ_channels.items() if o.value in checked}
                if checked
                else None
            )
            dropped = drop_inconspicuous(
                canon_image, inst_canon, organ_canon, refine.min_conspicuity, channels
            )
            inconspicuous = len(dropped)
    if focal is not None:
        # after the network's lesions are settled: one the image does not show must not
        # hide a distinct area beside it
        for organ, ch in bundle.organ_channels.items():
            if organ.value not in focal.organs:
                continue
            for number in find_focal_lesions(
                canon_image, inst_canon, organ_canon, canon_spacing, focal, ch
            ):
                lesion_organs[number] = organ
                lesion_conf[number] = FOCAL_SEARCH_CONFIDENCE
                searched.append(number)
        if refine is not None and searched:
            inst_canon, organ_canon, found_edges = refine_lesions(
                canon_image,
                inst_canon,
                organ_canon,
                canon_spacing,
                refine,
                only=searched,
                in_place=True,
            )
            edges.update(found_edges)
    if searched or (refine is not None and inst_canon.any()):
        # refinement changed sizes and dropped lesions, splitting and the focal search
        # added numbers after the highest: lesion 1 is again the largest, and the numbers
        # run without gaps
        renumber = number_by_size(inst_canon)
        lesion_organs = {renumber[n]: o for n, o in lesion_organs.items() if n in renumber}
        lesion_conf = {renumber[n]: c for n, c in lesion_conf.items() if n in renumber}
        edges = {renumber[n]: e for n, e in edges.items() if n in renumber}
        searched = [renumber[n] for n in searched if n in renumber]
    organ_src = reo.invert(organ_canon)
    inst_src = np.ascontiguousarray(reo.invert(inst_canon))
    masks = {
        organ: np.ascontiguousarray(organ_src == ch) for organ, ch in bundle.organ_channels.items()
    }
    present = set(lesion_boxes(inst_src))  # the lesions the nearest-neighbour resampling kept
    lesion_organs = {n: o for n, o in lesion_organs.items() if n in present}
    lesion_conf = {n: c for n, c in lesion_conf.items() if n in present}
    return Segmentation(
        organ_masks=masks,
        lesion_instances=inst_src.astype(np.int32),
        lesion_organs=lesion_organs,
        lesion_confidence=lesion_conf,
        organ_confidence=organ_conf,
        lesion_edges={n: e for n, e in edges.items() if n in present},
        lesions_not_distinct=inconspicuous,
        lesions_found_by_search=tuple(sorted(n for n in searched if n in present)),
    )


def segment(
    volume: Volume,
    bundle: Bundle,
    device: str = "cpu",
    *,
    network: torch.nn.Module | None = None,
) -> Segmentation:
    """Segment organs and lesions of a ``Volume`` (masks on the volume's grid)."""
    if volume.modality.upper() == "US":
        raise NoModelForModality("US", bundle.modalities)
    return segment_array(
        volume.array, volume.affine, volume.modality, bundle, device=device, network=network
    )


# ---------------------------------------------------------------------------
# findings


def provenance(
    volume: Volume,
    bundle: Bundle,
    clinical: Sequence[ClinicalValue] | None = None,
    *,
    phase: ContrastPhase = ContrastPhase.UNKNOWN,
    notes: Sequence[str] = (),
) -> Provenance:
    return Provenance(
        model_name=bundle.name,
        model_version=bundle.version,
        weights_sha256=bundle.weights_sha256,
        pipeline_version=PIPELINE_VERSION,
        input_series_uid=volume.series_instance_uid,
        input_sop_uids=tuple(volume.sop_instance_uids),
        clinical_used=tuple(clinical or ()),
        contrast_phase=phase,
        notes=tuple(notes),
        created_at=datetime.now(UTC),
    )


def findings_from_segmentation(
    volume: Volume,
    seg: Segmentation,
    bundle: Bundle,
    clinical: Sequence[ClinicalValue] | None = None,
) -> Findings:
    """Measure a segmentation: organ findings (volume includes lesions, intensity
    of the parenchyma without them) and lesion findings."""
    lesion_any = seg.lesion_instances > 0
    organs: list[OrganFinding] = []
    for organ, mask in seg.organ_masks.items():
        if not mask.any():
            continue
        f = measure_organ(volume, mask, organ, confidence=seg.organ_confidence.get(organ, 1.0))
        parenchyma = mask & ~lesion_any
        if lesion_any.any() and parenchyma.any():
            vals = np.asarray(volume.array[parenchyma], dtype=np.float64)
            f = replace(f, mean_intensity=float(vals.mean()), std_intensity=float(vals.std()))
        organs.append(f)
    lesions = measure_lesions(
        volume,
        seg.lesion_instances,
        {o: m for o, m in seg.organ_masks.items() if m.any()},
        modality=volume.modality,
        confidences=seg.lesion_confidence,
        edges=seg.lesion_edges,
    )
    phase = estimate_phase(
        volume.modality, volume.headers, {f.organ: f.mean_intensity for f in organs}
    )
    notes: tuple[str, ...] = (
        "model output; not for clinical use",
        f"lesions below {bundle.min_lesion_ml} ml are not reported",
        phase.reason,
    )
    refine = bundle.postprocess.lesion_refine
    if seg.lesions_not_distinct and refine is not None:
        notes += (
            f"{seg.lesions_not_distinct} lesion(s) the network marked are not reported: "
            "their median differs from the organ around them by less than "
            f"{refine.min_conspicuity} robust standard deviations",
        )
    if seg.lesions_found_by_search:
        numbers = ", ".join(str(n) for n in seg.lesions_found_by_search)
        notes += (
            f"lesion(s) {numbers} found by the focal search, not the network: areas of the "
            "organ that stand out from it and that the network did not mark "
            f"(confidence {FOCAL_SEARCH_CONFIDENCE} is a fixed value, not a probability)",
        )
    return Findings(
        organs=tuple(organs),
        lesions=lesions,
        diagnoses=(),
        report=(),
        provenance=provenance(volume, bundle, clinical, phase=phase.phase, notes=notes),
    )


def analyse(
    volume: Volume,
    bundle: Bundle,
    clinical: Sequence[ClinicalValue] | None = None,
    *,
    device: str = "cpu",
    network: torch.nn.Module | None = None,
) -> Findings:
    """Segment and measure: ``Findings`` with organs, lesions and provenance;
    diagnoses and report are left empty for :func:`with_interpretation`."""
    seg = segment(volume, bundle, device, network=network)
    return findings_from_segmentation(volume, seg, bundle, clinical)


def with_interpretation(
    findings: Findings,
    diagnoses: Sequence[Diagnosis] = (),
    report: Sequence[ReportSentence] = (),
    **extra: Any,
) -> Findings:
    """The seam for the multimodal classifier and report generator: a copy of
    ``findings`` with their diagnoses and report sentences (validated again)."""
    return replace(
        findings,
        diagnoses=tuple(diagnoses),
        report=tuple(report),
        extra={**findings.extra, **extra},
    )
