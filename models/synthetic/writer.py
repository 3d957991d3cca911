"""Write synthetic cases to disk: DICOM series, NIfTI masks, truth, dataset manifest.

Layout of one case (``out_dir``)::

    dicom/00001.dcm ...        CT or MR Image Storage, one slice per file
    image.nii.gz               the same voxels (float32; HU or MR signal)
    organ_labels.nii.gz        uint8, values of models.synthetic.labels.ORGAN_LABELS
    lesion_labels.nii.gz       uint16, values = LesionTruth.number
    truth.json                 models.case.CaseTruth.to_json()

The dataset manifest (``manifest.jsonl``) is described in docs/dataset-manifest.md.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian

from models.nifti import save_nifti_krc
from models.series_writer import SeriesInfo, derived_uid, write_series
from models.synthetic.generator import DEFAULT_SHAPE, DEFAULT_SPACING, SyntheticCase, generate_case
from models.synthetic.labels import ORGAN_LABELS
from models.vocab import ContrastPhase

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"
MANIFEST_VERSION = 1

_PHASE_TEXT = {
    ContrastPhase.NON_CONTRAST: "NON CONTRAST",
    ContrastPhase.ARTERIAL: "ARTERIAL",
    ContrastPhase.PORTAL_VENOUS: "PORTAL VENOUS",
    ContrastPhase.DELAYED: "DELAYED",
    ContrastPhase.UNKNOWN: "",
}


def series_info(case: SyntheticCase) -> SeriesInfo:
    """DICOM header values for a synthetic case (clearly marked synthetic)."""
    t = case.truth
    year = 2026 - t.age
    thickness = abs(float(case.affine[2, 0]))
    extra: dict[str, Any] = {"PatientAge": f"{t.age:03d}Y"}
    if t.phase is not ContrastPhase.NON_CONTRAST:
        extra["ContrastBolusAgent"] = "IOHEXOL 350" if t.modality == "CT" else "GADOTERATE"
        extra["ContrastBolusRoute"] = "IV"
    study = "CT ABDOMEN MULTIPHASE (SYNTHETIC)" if t.modality == "CT" else "MR LIVER (SYNTHETIC)"
    return SeriesInfo(
        patient_id=t.case_id.upper(),
        patient_name=f"Synthetic^{t.case_id}",
        patient_birth_date=f"{year:04d}0101",
        patient_sex=t.sex,
        study_uid=derived_uid(t.case_id, "study"),
        series_uid=derived_uid(t.case_id, "series", t.modality, t.phase.value),
        frame_of_reference_uid=derived_uid(t.case_id, "for"),
        accession_number=f"S{t.seed:08d}"[:16],
        study_description=study,
        series_description=f"{_PHASE_TEXT[t.phase]} {thickness:g}mm SYNTHETIC".strip(),
        manufacturer="hpb-node synthetic",
        extra=extra,
    )


def write_case(
    case: SyntheticCase,
    out_dir: Path | str,
    *,
    transfer_syntax: str = ExplicitVRLittleEndian,
    dicom: bool = True,
) -> dict[str, Path]:
    """Write one case; returns the paths by role (``dicom``, ``image``, ``label``, ``lesions``, ``truth``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if dicom:
        write_series(
            case.image,
            case.affine,
            out / "dicom",
            modality=case.truth.modality,
            info=series_info(case),
            transfer_syntax=transfer_syntax,
            seed=case.truth.case_id,
        )
        paths["dicom"] = out / "dicom"
    paths["image"] = out / "image.nii.gz"
    save_nifti_krc(case.image, case.affine, paths["image"])
    paths["label"] = out / "organ_labels.nii.gz"
    save_nifti_krc(case.organ_labels, case.affine, paths["label"])
    paths["lesions"] = out / "lesion_labels.nii.gz"
    save_nifti_krc(case.lesion_labels, case.affine, paths["lesions"])
    paths["truth"] = out / "truth.json"
    paths["truth"].write_text(json.dumps(case.truth.to_json(), indent=1))
    return paths


def split_of(seed: int, val_every: int = 10) -> str:
    """Deterministic split: every ``val_every``-th seed is validation."""
    return "val" if seed % val_every == val_every - 1 else "train"


def manifest_row(case: SyntheticCase, paths: dict[str, Path], root: Path) -> dict[str, Any]:
    t = case.truth
    row: dict[str, Any] = {
        "version": MANIFEST_VERSION,
        "case_id": t.case_id,
        "seed": t.seed,
        "split": split_of(t.seed),
        "modality": t.modality,
        "phase": t.phase.value,
        "synthetic": True,
        "source": "synthetic",
        "label_table": {str(v): organ.value for v, organ in ORGAN_LABELS.items()},
        "shape": list(case.image.shape),
        "diseases": [d.value for d in t.diseases],
    }
    for role in ("image", "dicom", "label", "lesions", "truth"):
        if role in paths:
            row[role] = paths[role].relative_to(root).as_posix()
    return row


def write_dataset(
    out_dir: Path | str,
    seeds: Iterable[int],
    *,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    modality: str = "CT",
    mr_share: float = 0.0,
    dicom: bool = True,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> Path:
    """Generate and write cases under ``out_dir/cases/`` and append them to the manifest.

    ``mr_share`` > 0 makes every case whose seed hashes below it an MR case
    (overrides ``modality``). Returns the manifest path. Existing rows for the
    same case id are replaced.
    """
    root = Path(out_dir)
    (root / "cases").mkdir(parents=True, exist_ok=True)
    manifest = root / MANIFEST_NAME
    rows: dict[str, dict[str, Any]] = {}
    if manifest.exists():
        for line in manifest.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["case_id"]] = row
    for seed in seeds:
        mod = modality
        if mr_share > 0:
            mod = "MR" if (seed * 2654435761 % 1000) / 1000.0 < mr_share else "CT"
        case = generate_case(seed, shape=shape, spacing=spacing, modality=mod)
        paths = write_case(
            case, root / "cases" / case.truth.case_id, transfer_syntax=transfer_syntax, dicom=dicom
        )
        rows[case.truth.case_id] = manifest_row(case, paths, root)
        log.info("wrote synthetic case %s (%s)", case.truth.case_id, mod)
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows.values()))
    tmp.replace(manifest)
    return manifest


def read_manifest(path: Path | str) -> list[dict[str, Any]]:
    """Rows of a manifest with paths made absolute (relative to the manifest's folder)."""
    p = Path(path)
    out = []
    for line in p.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        for role in ("image", "dicom", "label", "lesions", "truth"):
            if role in row:
                row[role] = str((p.parent / row[role]).resolve())
        out.append(row)
    return out
