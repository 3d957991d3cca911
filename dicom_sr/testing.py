"""Findings from plain masks, for tests, benches and demos (not a measurement method).

Volumes are voxel counts times voxel volume; axes are measured on the slice with
the largest lesion area: the long axis is the longest distance between two mask
pixels, the short axis the mask's extent perpendicular to it, through the long
axis midpoint. ``models.measure`` holds the real measurement functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

import numpy as np
import numpy.typing as npt

from models.findings import (
    Axis,
    ClinicalValue,
    Diagnosis,
    Findings,
    LesionFinding,
    OrganFinding,
    Provenance,
    ReportSentence,
)
from models.vocab import Disease, LesionKind, Organ, SubSite


def _spacing(affine: npt.NDArray[np.float64]) -> tuple[float, float, float]:
    cols = np.linalg.norm(affine[:3, :3], axis=0)
    return float(cols[0]), float(cols[1]), float(cols[2])


def measure_axes(
    mask: npt.NDArray[np.bool_], affine: npt.NDArray[np.float64]
) -> tuple[int, Axis, Axis]:
    """Key slice (largest area), long axis and short axis of a 3-D mask."""
    areas = mask.sum(axis=(1, 2))
    k = int(np.argmax(areas))
    _, sr, sc = _spacing(affine)
    rr, cc = np.nonzero(mask[k])
    pts = np.stack([rr * sr, cc * sc], axis=1).astype(np.float64)
    if len(pts) > 1500:  # keep the pairwise search small; boundary points suffice
        pts_idx = np.linspace(0, len(pts) - 1, 1500).astype(int)
        sample = pts[pts_idx]
    else:
        sample = pts
    d = np.linalg.norm(sample[:, None, :] - sample[None, :, :], axis=-1)
    i, j = np.unravel_index(int(np.argmax(d)), d.shape)
    a, b = sample[i], sample[j]
    long_len = float(d[i, j])
    if long_len == 0.0:
        p = (float(k), float(rr[0]), float(cc[0]))
        zero = Axis(p, p, 0.0)
        return k, zero, zero
    u = (b - a) / long_len
    n = np.array([-u[1], u[0]])
    proj = (pts - (a + b) / 2) @ n
    lo, hi = float(proj.min()), float(proj.max())
    mid = (a + b) / 2
    s0, s1 = mid + lo * n, mid + hi * n
    short_len = min(hi - lo, long_len)

    def krc(p: npt.NDArray[np.float64]) -> tuple[float, float, float]:
        return (float(k), float(p[0] / sr), float(p[1] / sc))

    return k, Axis(krc(a), krc(b), long_len), Axis(krc(s0), krc(s1), short_len)


def _stats(
    image: npt.NDArray[np.generic] | None, mask: npt.NDArray[np.bool_]
) -> tuple[float | None, float | None]:
    if image is None or not mask.any():
        return None, None
    vals = np.asarray(image)[mask].astype(np.float64)
    return float(vals.mean()), float(vals.std())


def findings_from_masks(
    organs: Mapping[Organ, npt.NDArray[np.bool_]],
    lesions: Sequence[tuple[Organ, LesionKind, npt.NDArray[np.bool_], SubSite | None]],
    affine: npt.NDArray[np.float64],
    sop_uids: Sequence[str],
    series_uid: str,
    *,
    image: npt.NDArray[np.generic] | None = None,
    pipeline_version: str = "0.1.0-test",
    diagnoses: Sequence[tuple[Disease, float]] = (),
    clinical_used: Sequence[ClinicalValue] = (),
    clinical_missing: Sequence[str] = (),
) -> Findings:
    """Findings with simple measurements from organ and lesion masks on a Volume grid."""
    voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    organ_findings = []
    for organ, m in organs.items():
        mean, sd = _stats(image, m)
        organ_findings.append(
            OrganFinding(organ, m, float(m.sum()) * voxel_ml, mean_intensity=mean, std_intensity=sd)
        )
    lesion_findings = []
    for n, (organ, kind, m, site) in enumerate(lesions, start=1):
        k, long_axis, short_axis = measure_axes(m, affine)
        idx = np.argwhere(m).mean(axis=0)
        centroid = idx @ affine[:3, :3].T + affine[:3, 3]
        mean, sd = _stats(image, m)
        lesion_findings.append(
            LesionFinding(
                number=n,
                organ=organ,
                kind=kind,
                mask=m,
                volume_ml=float(m.sum()) * voxel_ml,
                long_axis=long_axis,
                short_axis=short_axis,
                key_slice=k,
                centroid_lps=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
                sub_site=site,
                mean_intensity=mean,
                std_intensity=sd,
                confidence=0.9,
            )
        )
    dx = tuple(Diagnosis(d, p, evidence=()) for d, p in diagnoses)
    sentences: list[ReportSentence] = []
    for o in organ_findings:
        sentences.append(
            ReportSentence("findings", f"{o.organ.value} volume {o.volume_ml:.0f} ml.", (o.id,))
        )
    for les in lesion_findings:
        sentences.append(
            ReportSentence(
                "findings",
                f"Lesion {les.number} in the {les.organ.value}, {les.long_axis.length_mm:.0f} x "
                f"{les.short_axis.length_mm:.0f} mm.",
                (les.id,),
            )
        )
    if dx:
        top = max(dx, key=lambda d: d.probability)
        sentences.append(
            ReportSentence(
                "impression",
                f"Most likely {top.disease.value.replace('_', ' ')} "
                f"(probability {top.probability:.0%}).",
                (top.id,),
            )
        )
    elif sentences:
        sentences.append(ReportSentence("impression", "See findings.", sentences[0].finding_ids))
    prov = Provenance(
        model_name="hpb-test-model",
        model_version="0.0-test",
        weights_sha256="0" * 64,
        pipeline_version=pipeline_version,
        input_series_uid=series_uid,
        input_sop_uids=tuple(sop_uids),
        clinical_used=tuple(clinical_used),
        clinical_missing=tuple(clinical_missing),
        created_at=datetime(2026, 1, 1, 12, 0, 0),
    )
    return Findings(tuple(organ_findings), tuple(lesion_findings), dx, tuple(sentences), prov)


def flip_axes(
    array: npt.NDArray[np.generic], affine: npt.NDArray[np.float64], axes: Sequence[int]
) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.float64]]:
    """The same voxels indexed backwards along ``axes`` (same patient geometry)."""
    out = array
    aff = affine.copy()
    for ax in axes:
        out = np.flip(out, axis=ax)
        n = array.shape[ax]
        aff[:3, 3] = aff[:3, 3] + (n - 1) * aff[:3, ax]
        aff[:3, ax] = -aff[:3, ax]
    return np.ascontiguousarray(out), aff


def rotate_affine(
    affine: npt.NDArray[np.float64], degrees: float, axis: Sequence[float]
) -> npt.NDArray[np.float64]:
    """The affine rotated about its origin (an oblique acquisition of the same voxels)."""
    u = np.asarray(axis, dtype=np.float64)
    u = u / np.linalg.norm(u)
    t = np.radians(degrees)
    k = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    rot = np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)
    out = affine.copy()
    out[:3, :3] = rot @ affine[:3, :3]
    return out


def sphere(
    shape: tuple[int, int, int], centre: Sequence[int], radius: float
) -> npt.NDArray[np.bool_]:
    kk, rr, cc = np.ogrid[: shape[0], : shape[1], : shape[2]]
    d2 = (kk - centre[0]) ** 2 + (rr - centre[1]) ** 2 + (cc - centre[2]) ** 2
    return np.asarray(d2 <= radius * radius)
