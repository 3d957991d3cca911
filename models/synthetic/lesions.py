"""Focal lesions of the target diseases: where they go, their shape and enhancement.

Lesions are defined in physical (LPS mm) space so their generated size is
exact: ellipsoids rotated about the patient's z axis only, so the longest axial
diameter is ``2 * max(semi_x, semi_y)``. Appearance per phase comes from the
tissue tables in ``appearance``:

* HCC: arterial hyperenhancement, washout in portal venous / delayed phases,
  enhancing capsule, mosaic texture;
* metastasis: hypoattenuating with an enhancing rim, slightly lobulated;
* haemangioma: peripheral nodular enhancement following the blood pool,
  progressive centripetal fill-in;
* simple cyst: fluid, no enhancement;
* PDAC: ill-defined hypoattenuating mass (upstream duct effects are drawn by
  ``phantom``);
* pancreatic cystic lesion: unilocular or lobulated fluid cluster;
* gallstones: hyperdense (CT), signal void (MR), in the dependent gallbladder.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.synthetic import labels as L
from models.synthetic.geometry import F32, F64, Box, ellipsoid_sdf, rotation
from models.synthetic.phantom import Canvas
from models.vocab import Disease, LesionKind, Organ


@dataclass(frozen=True)
class PlacedLesion:
    number: int
    organ: Organ
    kind: LesionKind
    disease: Disease
    diameter_mm: float
    centre_lps: tuple[float, float, float]


@dataclass(frozen=True)
class _Plan:
    disease: Disease
    organ: Organ
    kind: LesionKind
    style: str
    diameter_mm: float


def plan_lesions(rng: np.random.Generator, diseases: tuple[Disease, ...]) -> list[_Plan]:
    """How many lesions of which kind and size each disease brings."""
    plans: list[_Plan] = []

    def add(
        d: Disease, organ: Organ, kind: LesionKind, style: str, n: int, lo: float, hi: float
    ) -> None:
        for _ in range(n):
            plans.append(_Plan(d, organ, kind, style, float(rng.uniform(lo, hi))))

    for d in diseases:
        if d is Disease.HCC:
            add(d, Organ.LIVER, LesionKind.MASS, "hcc", 1 if rng.random() < 0.7 else 2, 15, 60)
        elif d is Disease.LIVER_METASTASIS:
            add(d, Organ.LIVER, LesionKind.MASS, "metastasis", int(rng.integers(1, 7)), 8, 35)
        elif d is Disease.HAEMANGIOMA:
            add(d, Organ.LIVER, LesionKind.MASS, "haemangioma", int(rng.integers(1, 3)), 10, 45)
        elif d is Disease.SIMPLE_CYST:
            add(d, Organ.LIVER, LesionKind.CYST, "cyst", int(rng.integers(1, 4)), 8, 35)
        elif d is Disease.PDAC:
            add(d, Organ.PANCREAS, LesionKind.MASS, "pdac", 1, 15, 40)
        elif d is Disease.PANCREATIC_CYSTIC_LESION:
            add(
                d,
                Organ.PANCREAS,
                LesionKind.CYST,
                "pancreatic_cyst",
                int(rng.integers(1, 3)),
                8,
                28,
            )
        elif d is Disease.CHOLELITHIASIS:
            add(
                d,
                Organ.GALLBLADDER,
                LesionKind.CALCULUS,
                "gallstone",
                int(rng.integers(1, 4)),
                6,
                18,
            )
    # large lesions first, so small ones fill the gaps
    return sorted(plans, key=lambda p: -p.diameter_mm)


def _physical(canvas: Canvas, box: Box) -> tuple[F32, F32, F32]:
    z, y, x = canvas.grid.axes_mm
    return (
        x[box[2]][None, None, :].astype(np.float32),
        y[box[1]][None, :, None].astype(np.float32),
        z[box[0]][:, None, None].astype(np.float32),
    )


_DIRS = np.array(
    [[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]]
    + [[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)],
    dtype=np.float64,
)
_DIRS = _DIRS / np.linalg.norm(_DIRS, axis=1, keepdims=True)


def _fits(canvas: Canvas, centre: F64, radius: float, allowed: set[int]) -> bool:
    inv = np.linalg.inv(canvas.grid.affine)
    pts = centre[None, :] + _DIRS * radius
    idx = np.rint(pts @ inv[:3, :3].T + inv[:3, 3]).astype(int)
    shape = np.asarray(canvas.grid.shape)
    if np.any(idx < 0) or np.any(idx >= shape[None, :]):
        return False
    return all(int(canvas.labels[tuple(i)]) in allowed for i in idx)


def _candidate(
    canvas: Canvas,
    rng: np.random.Generator,
    label: int,
    radius: float,
    taken: list[tuple[F64, float]],
    *,
    fit: float,
    posterior_only: bool = False,
) -> F64 | None:
    vox = np.argwhere(canvas.labels == label)
    if len(vox) == 0:
        return None
    if posterior_only:
        keep = vox[:, 1] >= np.percentile(vox[:, 1], 60)
        vox = vox[keep]
    aff = canvas.grid.affine
    for _ in range(80):
        k = vox[int(rng.integers(0, len(vox)))]
        centre = aff[:3, :3] @ k.astype(np.float64) + aff[:3, 3]
        centre = centre + rng.uniform(-0.5, 0.5, 3) * np.asarray(canvas.grid.spacing)[::-1]
        if any(np.linalg.norm(centre - c) < radius + r + 2.0 for c, r in taken):
            continue
        if _fits(canvas, centre, radius * fit, {label}):
            return np.asarray(centre, dtype=np.float64)
    return None


def place_lesions(
    canvas: Canvas,
    rng: np.random.Generator,
    diseases: tuple[Disease, ...],
    lesion_map: np.ndarray,
    nodular: F32,
    pdac_centre: F64 | None,
) -> list[PlacedLesion]:
    """Paint the lesions of ``diseases``; write instance numbers into ``lesion_map``."""
    placed: list[PlacedLesion] = []
    taken: list[tuple[F64, float]] = []
    min_d = 1.75 * max(canvas.grid.spacing)
    for plan in plan_lesions(rng, diseases):
        diameter = max(plan.diameter_mm, min_d)
        a = diameter / 2.0
        semi = np.array([a, a * rng.uniform(0.75, 1.0), a * rng.uniform(0.8, 1.1)])
        organ_label = L.LABEL_OF_ORGAN[plan.organ]
        if plan.style == "pdac" and pdac_centre is not None:
            centre: F64 | None = pdac_centre
        else:
            fit = {"gallstone": 1.0, "pancreatic_cyst": 0.5}.get(plan.style, 0.9)
            centre = None
            for shrink in (1.0, 0.8, 0.65):
                centre = _candidate(
                    canvas,
                    rng,
                    organ_label,
                    a * shrink,
                    taken,
                    fit=fit,
                    posterior_only=plan.style == "gallstone",
                )
                if centre is not None:
                    semi = semi * shrink
                    diameter = diameter * shrink
                    break
        if centre is None:
            continue
        number = len(placed) + 1
        covered = _paint(canvas, rng, plan.style, centre, semi, nodular, organ_label)
        if covered is None:
            continue
        box, mask = covered
        lesion_map[box][mask] = number
        placed.append(
            PlacedLesion(
                number=number,
                organ=plan.organ,
                kind=plan.kind,
                disease=plan.disease,
                diameter_mm=round(float(diameter), 1),
                centre_lps=(float(centre[0]), float(centre[1]), float(centre[2])),
            )
        )
        taken.append((centre, float(max(semi))))
    return placed


def _paint(
    canvas: Canvas,
    rng: np.random.Generator,
    style: str,
    centre: F64,
    semi: F64,
    nodular: F32,
    organ_label: int,
) -> tuple[Box, np.ndarray] | None:
    """Paint one lesion; returns its box and voxel mask, or None if too small to draw."""
    rot = rotation(0.0, 0.0, float(rng.uniform(0, 180)))
    reach = float(max(semi)) * (1.6 if style == "pancreatic_cyst" else 1.0)
    box = canvas.grid.box_from_physical(centre - reach, centre + reach, 2 * canvas.grid.voxel_mm)
    x, y, z = _physical(canvas, box)
    sdf = ellipsoid_sdf(x, y, z, centre, semi, rot)
    if style == "metastasis":
        sdf = sdf + 1.5 * canvas.texture[box]
    elif style == "pdac":
        sdf = sdf + 2.5 * nodular[box]
    elif style == "pancreatic_cyst" and rng.random() < 0.5:
        for _ in range(int(rng.integers(1, 4))):
            off = rng.normal(0, 1, 3)
            off = off / (np.linalg.norm(off) + 1e-9) * semi[0] * 0.9
            sub = semi * rng.uniform(0.45, 0.7)
            sdf = np.minimum(sdf, ellipsoid_sdf(x, y, z, centre + off, sub, rot))
    occ_mask = np.clip(0.5 - sdf / canvas.grid.voxel_mm, 0, 1) > 0.5
    labels_here = canvas.labels[box]
    if style in ("pdac", "pancreatic_cyst"):
        mask = occ_mask & np.isin(labels_here, (L.BACKGROUND, L.PANCREAS))
    else:
        mask = occ_mask & (labels_here == organ_label)
    if int(mask.sum()) < 2:
        return None
    restrict = np.where(mask | ~occ_mask, -np.inf, np.inf).astype(np.float32)
    sdf = np.maximum(sdf, restrict)  # never paint over a neighbouring structure
    if style == "hcc":
        canvas.paint(box, sdf, "hcc_capsule")
        canvas.paint(box, sdf + 1.5, "hcc", texture=12.0)
    elif style == "metastasis":
        canvas.paint(box, sdf, "metastasis_rim")
        canvas.paint(box, sdf + 2.0, "metastasis", texture=5.0)
    elif style == "haemangioma":
        canvas.paint(box, sdf, "haemangioma_core", texture=4.0)
        for _ in range(int(rng.integers(4, 8))):
            ang = rng.uniform(0, 2 * np.pi)
            zz = rng.uniform(-0.5, 0.5)
            d = np.array([np.cos(ang), np.sin(ang), zz])
            c = centre + (rot @ (d / np.linalg.norm(d))) * semi * 0.78
            nod = ellipsoid_sdf(x, y, z, c, np.full(3, max(semi[0] * 0.24, 2.5)))
            canvas.paint(box, np.maximum(nod, sdf), "haemangioma_nodule")
    elif style == "cyst":
        canvas.paint(box, sdf, "cyst")
    elif style == "pdac":
        canvas.paint(box, sdf, "pdac", texture=5.0)
    elif style == "pancreatic_cyst":
        canvas.paint(box, sdf, "pancreatic_cyst")
    elif style == "gallstone":
        canvas.paint(box, sdf, "gallstone")
    else:  # pragma: no cover - plan_lesions only makes the styles above
        raise ValueError(f"unknown lesion style {style!r}")
    if style in ("pdac", "pancreatic_cyst"):
        canvas.labels[box][mask] = L.PANCREAS
    return box, mask
