"""In-memory evaluation sets from the project's own objects: synthetic cases (the
reference) and ``Findings`` (the model's results), so an evaluation can run without
writing files."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from models.evaluation.dataset import CaseMasks, DiagnosisTable, EvaluationSet
from models.evaluation.text import StructuredResult
from models.findings import Findings
from models.nifti import load_nifti_krc, save_nifti_krc
from models.vocab import Disease
from models.volume import Volume


def reference_from_truth(
    case_id: str,
    affine: npt.NDArray[np.float64],
    organ_labels: npt.NDArray[np.integer],
    lesion_labels: npt.NDArray[np.integer] | None,
    label_names: Mapping[int, str],
) -> CaseMasks:
    """Reference masks from an organ label map (``label_names``: value -> structure)
    and a lesion instance map."""
    shape = (int(organ_labels.shape[0]), int(organ_labels.shape[1]), int(organ_labels.shape[2]))
    out = CaseMasks(np.asarray(affine, dtype=np.float64), shape)
    for value, name in label_names.items():
        out.structures[str(name)] = np.asarray(organ_labels) == value
    if lesion_labels is not None:
        out.lesions = np.asarray(lesion_labels).astype(np.int32)
    return out


def add_diagnosis_truth(
    table: DiagnosisTable,
    case_id: str,
    positive: Sequence[Disease],
    diseases: Sequence[Disease] = tuple(Disease),
) -> None:
    for d in diseases:
        table.truth[(case_id, d)] = int(d in positive)


def masks_from_findings(findings: Findings, affine: npt.NDArray[np.float64]) -> CaseMasks:
    shapes = {f.mask.shape for f in findings.organs} | {les.mask.shape for les in findings.lesions}
    if not shapes:
        raise ValueError("findings hold no masks")
    shape = next(iter(shapes))
    out = CaseMasks(
        np.asarray(affine, dtype=np.float64), (int(shape[0]), int(shape[1]), int(shape[2]))
    )
    for organ in findings.organs:
        out.structures[str(organ.organ)] = organ.mask.astype(bool)
    lesions = np.zeros(out.shape, dtype=np.int32)
    for les in findings.lesions:
        lesions[les.mask.astype(bool) & (lesions == 0)] = les.number
        out.lesion_confidence[les.number] = float(les.confidence)
    out.lesions = lesions
    return out


def add_findings(
    results: EvaluationSet,
    case_id: str,
    findings: Findings,
    affine: npt.NDArray[np.float64],
    *,
    threshold: float = 0.5,
) -> None:
    """Add one case's ``Findings`` to a results set: masks, lesion confidences,
    diagnosis probabilities, report text and the structured result it must agree with."""
    results.masks[case_id] = masks_from_findings(findings, affine)
    for dx in findings.diagnoses:
        results.probabilities[(case_id, dx.disease)] = float(dx.probability)
    text = " ".join(s.text for s in findings.report)
    if text:
        results.reports[case_id] = text
    results.structured[case_id] = StructuredResult(
        frozenset(dx.disease for dx in findings.diagnoses if dx.probability >= threshold),
        tuple(float(les.long_axis.length_mm) for les in findings.lesions),
    )


def write_masks(masks: CaseMasks, folder: Path) -> None:
    """Write a case's masks as the NIfTI layout :func:`models.evaluation.load_set` reads."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, m in masks.structures.items():
        save_nifti_krc(m.astype(np.uint8), masks.affine, folder / f"{name}.nii.gz")
    if masks.lesions is not None:
        save_nifti_krc(masks.lesions.astype(np.int16), masks.affine, folder / "lesions.nii.gz")


def volume_from_image(path: Path, modality: str = "CT") -> Volume:
    """A ``Volume`` from a study of a reference set for running the model: a DICOM
    series folder (:func:`models.loader.load_series`, UIDs and modality from the
    headers) or a NIfTI file (UIDs derived from the path, ``modality`` as given)."""
    from models.series_writer import derived_uid

    if path.is_dir():
        from models.loader import load_series

        return load_series(path)
    arr, affine = load_nifti_krc(path)
    uid = derived_uid("evaluation", str(path))
    return Volume(
        array=np.asarray(arr, dtype=np.float32),
        affine=affine,
        sop_instance_uids=tuple(derived_uid(uid, str(k)) for k in range(arr.shape[0])),
        modality=modality,
        series_instance_uid=uid,
        study_instance_uid=derived_uid(uid, "study"),
        frame_of_reference_uid=derived_uid(uid, "for"),
    )
