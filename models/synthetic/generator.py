"""``generate_case``: one seeded synthetic abdominal CT or MR case with its truth."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from models.anatomy import (
    AnatomyError,
    couinaud_map,
    couinaud_segment,
    pancreas_part,
)
from models.case import CaseTruth, LesionTruth
from models.synthetic import labels as L
from models.synthetic.diseases import sample_demographics, sample_diseases, sample_phase
from models.synthetic.geometry import Deformation, Grid, rotation
from models.synthetic.lesions import PlacedLesion, place_lesions
from models.synthetic.phantom import Canvas, DiffuseState, build_anatomy
from models.vocab import ContrastPhase, Disease, Organ, SubSite

DEFAULT_SHAPE: tuple[int, int, int] = (64, 96, 96)
DEFAULT_SPACING: tuple[float, float, float] = (5.0, 4.0, 4.0)
#: Benchmark-size grid: 512 x 512 at 0.75 mm in-plane, 2.5 mm slices.
LARGE_SHAPE: tuple[int, int, int] = (128, 512, 512)
LARGE_SPACING: tuple[float, float, float] = (2.5, 0.75, 0.75)

MAX_DISPLACEMENT_MM = 15.0


@dataclass(frozen=True)
class SyntheticCase:
    """A generated case. ``image[k, r, c]`` is HU (CT) or signal (MR); affine is LPS."""

    image: npt.NDArray[np.float32]
    affine: npt.NDArray[np.float64]
    organ_labels: npt.NDArray[np.uint8]
    lesion_labels: npt.NDArray[np.uint16]
    truth: CaseTruth
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def modality(self) -> str:
        return self.truth.modality


def _streams(seed: int) -> dict[str, np.random.Generator]:
    names = ("disease", "phase", "anatomy", "fields", "lesions", "noise")
    children = np.random.SeedSequence(seed).spawn(len(names))
    return {n: np.random.default_rng(s) for n, s in zip(names, children, strict=True)}


def generate_case(
    seed: int,
    *,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    modality: str = "CT",
    phase: ContrastPhase | None = None,
    diseases: tuple[Disease, ...] | None = None,
    case_id: str | None = None,
) -> SyntheticCase:
    """Generate one case; the same ``seed`` (and arguments) gives the same case.

    Random streams are separate, so forcing ``phase`` or ``modality`` keeps the
    anatomy and lesions of the seed (the same patient scanned in another phase).
    """
    if modality not in ("CT", "MR"):
        raise ValueError(f"modality must be CT or MR, got {modality!r}")
    rs = _streams(seed)
    drng = rs["disease"]
    sampled = sample_diseases(drng)
    dz = tuple(sampled if diseases is None else diseases)
    age, sex = sample_demographics(drng, dz)
    phase = sample_phase(rs["phase"]) if phase is None else phase

    state = DiffuseState(
        cirrhosis=Disease.CIRRHOSIS in dz,
        steatosis_fat_percent=float(drng.uniform(8, 30)) if Disease.STEATOSIS in dz else 0.0,
        pancreatitis=Disease.PANCREATITIS in dz,
        ascites=Disease.CIRRHOSIS in dz and drng.random() < 0.4,
    )
    if Disease.PDAC in dz:
        u = drng.random()
        state.pdac_t = float(
            drng.uniform(0.06, 0.25)
            if u < 0.65
            else drng.uniform(0.4, 0.6)
            if u < 0.85
            else drng.uniform(0.75, 0.88)
        )

    arng = rs["anatomy"]
    centre = (
        float(arng.uniform(-25, 25)),
        float(arng.uniform(-40, 20)),
        float(arng.uniform(-450, 150)),
    )
    grid = Grid.centred(shape, spacing, centre)
    scale = np.diag(arng.uniform(0.92, 1.08, 3))
    rot = rotation(arng.uniform(-3, 3), arng.uniform(-3, 3), arng.uniform(-7, 7))
    shift = np.asarray(centre) + np.array([0.0, 0.0, 40.0]) + arng.uniform(-10, 10, 3)
    frng = rs["fields"]
    disp = grid.lattice_field(frng, 60.0, 3, centre=shift)
    disp_t = (
        np.clip(5.0 * disp[0], -MAX_DISPLACEMENT_MM, MAX_DISPLACEMENT_MM),
        np.clip(5.0 * disp[1], -MAX_DISPLACEMENT_MM, MAX_DISPLACEMENT_MM),
        np.clip(5.0 * disp[2], -MAX_DISPLACEMENT_MM, MAX_DISPLACEMENT_MM),
    )
    deform = Deformation(grid, rot @ scale, shift, disp_t, MAX_DISPLACEMENT_MM)
    texture, nodular = grid.lattice_field(frng, 9.0, 2, centre=shift)
    canvas = Canvas(grid, deform, modality, phase, texture)
    info = build_anatomy(canvas, arng, state, sex=sex, nodular=nodular)

    pdac_centre = None
    if state.pdac_t is not None:
        i = round(state.pdac_t * (len(info.pancreas_curve) - 1))
        k = deform.locate(info.pancreas_curve[i])
        pdac_centre = grid.affine[:3, :3] @ np.asarray(k, dtype=np.float64) + grid.affine[:3, 3]
    lesion_map = np.zeros(grid.shape, dtype=np.uint16)
    placed = place_lesions(canvas, rs["lesions"], dz, lesion_map, nodular, pdac_centre)

    image = _acquire(canvas.image, grid, modality, rs["noise"], frng)
    affine = grid.affine
    organ_labels = canvas.labels
    truth_lesions = _lesion_truths(placed, lesion_map, organ_labels, image, affine, modality)
    qualities = _qualities(image, organ_labels, lesion_map, affine, modality, state, info.qualities)
    qualities["gallstones"] = float(sum(1 for p in placed if p.disease is Disease.CHOLELITHIASIS))
    # a disease whose lesions could not be drawn is not claimed
    focal = {p.disease for p in placed}
    lesion_diseases = {
        Disease.HCC,
        Disease.LIVER_METASTASIS,
        Disease.HAEMANGIOMA,
        Disease.SIMPLE_CYST,
        Disease.PDAC,
        Disease.PANCREATIC_CYSTIC_LESION,
        Disease.CHOLELITHIASIS,
    }
    final = tuple(d for d in dz if d not in lesion_diseases or d in focal)
    truth = CaseTruth(
        case_id=case_id or f"synth-{seed:06d}",
        seed=int(seed),
        modality=modality,
        phase=phase,
        age=age,
        sex=sex,
        diseases=final,
        lesions=truth_lesions,
        organ_qualities=qualities,
        source="synthetic",
    )
    return SyntheticCase(
        image=image,
        affine=affine,
        organ_labels=organ_labels,
        lesion_labels=lesion_map,
        truth=truth,
    )


def _acquire(
    ideal: npt.NDArray[np.float32],
    grid: Grid,
    modality: str,
    rng: np.random.Generator,
    frng: np.random.Generator,
) -> npt.NDArray[np.float32]:
    """Scanner point-spread function, noise (CT Gaussian, MR Rician) and MR coil shading."""
    psf_mm = 0.6
    sigma = [float(np.sqrt((psf_mm / s) ** 2 + 0.35**2)) for s in grid.spacing]
    img = ndimage.gaussian_filter(ideal, sigma).astype(np.float32)
    noise_sigma = float(rng.uniform(10, 20)) if modality == "CT" else float(rng.uniform(8, 18))
    grain = 0.8 if min(grid.spacing[1:]) < 1.5 else 0.0

    def noise() -> npt.NDArray[np.float32]:
        n = rng.standard_normal(grid.shape).astype(np.float32)
        if grain:
            n = ndimage.gaussian_filter(n, (0.0, grain, grain))
            n /= float(n.std()) + 1e-6
        return n

    # stored as integers, as scanners do (CT: whole HU), so DICOM round-trips exactly
    if modality == "CT":
        out = img + noise_sigma * noise()
        return np.round(np.clip(out, -1024, 3071)).astype(np.float32)
    mid = grid.affine @ np.array([*((np.asarray(grid.shape) - 1) / 2.0), 1.0])
    (shade,) = grid.lattice_field(frng, 120.0, 1, centre=mid[:3])
    img = img * (1.0 + 0.12 * shade)
    out = np.sqrt((img + noise_sigma * noise()) ** 2 + (noise_sigma * noise()) ** 2)
    return np.round(np.clip(out, 0, 4095)).astype(np.float32)


def _lesion_truths(
    placed: list[PlacedLesion],
    lesion_map: npt.NDArray[np.uint16],
    organ_labels: npt.NDArray[np.uint8],
    image: npt.NDArray[np.float32],
    affine: npt.NDArray[np.float64],
    modality: str,
) -> tuple[LesionTruth, ...]:
    out = []
    liver = organ_labels == L.LIVER
    pancreas = organ_labels == L.PANCREAS
    for p in placed:
        mask = lesion_map == p.number
        if not mask.any():
            continue
        centroid = np.argwhere(mask).mean(axis=0)
        sub: SubSite | None = None
        try:
            if p.organ is Organ.LIVER:
                sub = couinaud_segment(mask, liver, affine)
            elif p.organ is Organ.PANCREAS:
                sub = pancreas_part(mask, pancreas, affine)
        except AnatomyError:
            sub = None
        out.append(
            LesionTruth(
                number=p.number,
                organ=p.organ,
                kind=p.kind,
                disease=p.disease,
                diameter_mm=p.diameter_mm,
                centroid_krc=(
                    round(float(centroid[0]), 2),
                    round(float(centroid[1]), 2),
                    round(float(centroid[2]), 2),
                ),
                sub_site=sub,
                mean_hu=round(float(image[mask].mean()), 1) if modality == "CT" else None,
            )
        )
    return tuple(out)


def _qualities(
    image: npt.NDArray[np.float32],
    organ_labels: npt.NDArray[np.uint8],
    lesion_map: npt.NDArray[np.uint16],
    affine: npt.NDArray[np.float64],
    modality: str,
    state: DiffuseState,
    drawn: dict[str, float],
) -> dict[str, float]:
    voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    unit = "hu" if modality == "CT" else "si"
    q: dict[str, float] = {}
    liver = organ_labels == L.LIVER
    spleen = organ_labels == L.SPLEEN
    parenchyma = liver & (lesion_map == 0)
    for name, mask in (("liver", parenchyma), ("spleen", spleen)):
        if mask.any():
            q[f"{name}_mean_{unit}"] = round(float(np.median(image[mask])), 1)
    if f"liver_mean_{unit}" in q and f"spleen_mean_{unit}" in q:
        q[f"liver_minus_spleen_{unit}"] = round(
            q[f"liver_mean_{unit}"] - q[f"spleen_mean_{unit}"], 1
        )
    for label, name in ((L.LIVER, "liver"), (L.SPLEEN, "spleen"), (L.PANCREAS, "pancreas")):
        q[f"{name}_volume_ml"] = round(float((organ_labels == label).sum()) * voxel_ml, 1)
    q["cirrhotic_contour"] = 1.0 if state.cirrhosis else 0.0
    q["steatosis_fat_percent"] = round(state.steatosis_fat_percent, 1)
    q["ascites"] = 1.0 if state.ascites else 0.0
    q["peripancreatic_stranding"] = 1.0 if state.pancreatitis else 0.0
    q.update({k: round(v, 1) for k, v in drawn.items()})
    if liver.sum() > 50:
        seg = couinaud_map(liver, affine)
        caudate = float((seg == 1).sum())
        right = float(((seg >= 6) & (seg <= 9)).sum())
        q["caudate_right_volume_ratio"] = round(caudate / max(right, 1.0), 3)
    return q
