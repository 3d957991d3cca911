"""Reading a reference set and a model's results from simple files.

Layout (documented in ``docs/evaluation.md``); every part is optional::

    <dir>/diagnoses.csv        reference: case_id,disease,truth[,<reader>...]  (0/1)
                               results:   case_id,disease,probability
    <dir>/masks/<case>/<structure>.nii.gz   one binary mask per organ
    <dir>/masks/<case>/lesions.nii.gz       lesion instance labels (or a binary mask)
    <dir>/masks/<case>/*.dcm                DICOM SEG (segments named by organ;
                                            "lesion"/"tumor"/"mass"/"cyst" = one lesion each)
    <dir>/lesions.csv          results: case_id,lesion,confidence (for FROC)
    <dir>/reports/<case>.txt   report text
    <dir>/sr/<case>/*.dcm      results: TID 1500 SR (lesion diameters read back)
    <dir>/images/<case>.nii.gz or <dir>/images/<case>/   the study (overlays, running the model)

A reference folder holding ``manifest.jsonl`` (``docs/dataset-manifest.md``, as
``hpb-node synth`` writes) is read as a dataset instead (:func:`load_manifest_reference`).

Masks are held as ``[k, r, c]`` arrays with an affine to LPS (:mod:`models.nifti`
convention). Results on a different grid are resampled onto the reference grid
(nearest neighbour through both affines).
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from models.evaluation.text import StructuredResult
from models.labs import ClinicalContext
from models.nifti import load_nifti_krc
from models.vocab import Disease, Organ

log = logging.getLogger(__name__)

LESION_WORDS = ("lesion", "tumor", "tumour", "mass", "cyst", "nodule", "metasta", "carcinoma")
_ORGAN_ALIASES = {
    "portal_vein": Organ.PORTAL_SPLENIC_VEIN,
    "portal_and_splenic_vein": Organ.PORTAL_SPLENIC_VEIN,
    "gall_bladder": Organ.GALLBLADDER,
    "kidney_l": Organ.KIDNEY_LEFT,
    "kidney_r": Organ.KIDNEY_RIGHT,
    "left_kidney": Organ.KIDNEY_LEFT,
    "right_kidney": Organ.KIDNEY_RIGHT,
    "bile_duct_structure": Organ.BILE_DUCT,
    "common_bile_duct": Organ.BILE_DUCT,
    "portal_vein_and_splenic_vein": Organ.PORTAL_SPLENIC_VEIN,
}
_ORGAN_VALUES = frozenset(o.value for o in Organ)


class DatasetError(ValueError):
    """A reference set or result file that cannot be used; the message names the file."""


def structure_name(label: str) -> str:
    """Normalise a segment label or file stem to a structure name (organ value when known)."""
    key = re.sub(r"[^a-z0-9]+", "_", label.strip().lower()).strip("_")
    if key in _ORGAN_ALIASES:
        return str(_ORGAN_ALIASES[key])
    for organ in Organ:
        if key == organ.value:
            return str(organ)
    return key


def is_lesion_label(label: str) -> bool:
    low = label.lower()
    return any(w in low for w in LESION_WORDS)


@dataclass
class CaseMasks:
    affine: npt.NDArray[np.float64]
    shape: tuple[int, int, int]
    structures: dict[str, npt.NDArray[np.bool_]] = field(default_factory=dict)
    lesions: npt.NDArray[np.int32] | None = None
    lesion_confidence: dict[int, float] = field(default_factory=dict)

    def on_grid(self, shape: tuple[int, int, int], affine: npt.NDArray[np.float64]) -> CaseMasks:
        """These masks resampled onto another grid (returned unchanged when equal)."""
        if shape == self.shape and np.allclose(affine, self.affine, atol=1e-4):
            return self
        out = CaseMasks(
            np.asarray(affine, dtype=np.float64),
            shape,
            lesion_confidence=dict(self.lesion_confidence),
        )
        for name, m in self.structures.items():
            out.structures[name] = resample_nearest(m, self.affine, shape, affine).astype(bool)
        if self.lesions is not None:
            out.lesions = resample_nearest(self.lesions, self.affine, shape, affine).astype(
                np.int32
            )
        return out


def resample_nearest(
    array: npt.NDArray[Any],
    src_affine: npt.NDArray[np.float64],
    dst_shape: tuple[int, int, int],
    dst_affine: npt.NDArray[np.float64],
) -> npt.NDArray[Any]:
    """Nearest-neighbour resampling of a label array between two (k, r, c) -> LPS grids.

    A destination voxel takes the value of the source voxel whose extent holds its
    centre (``grid-constant``: a centre up to half a voxel beyond the first or last
    source centre still belongs to that voxel; float noise in the affines cannot
    drop an edge slice), and 0 outside the source."""
    m = np.linalg.inv(np.asarray(src_affine, dtype=np.float64)) @ np.asarray(
        dst_affine, dtype=np.float64
    )
    src = np.asarray(array)
    dtype = np.uint8 if src.dtype == np.bool_ else src.dtype
    out = ndimage.affine_transform(
        src.astype(dtype),
        m[:3, :3],
        offset=m[:3, 3],
        output_shape=dst_shape,
        order=0,
        cval=0,
        mode="grid-constant",
    )
    return np.asarray(out, dtype=dtype)


# ---------------------------------------------------------------------------
# masks


def read_seg(path: Path) -> CaseMasks:
    """A DICOM SEG as masks on its own grid (highdicom), organ segments by label,
    lesion-like segments as lesion instances 1..n in segment order."""
    import highdicom as hd

    try:
        seg = hd.seg.segread(str(path))
        vol = seg.get_volume(combine_segments=False, allow_missing_positions=True)
    except Exception as exc:  # highdicom raises several types for unusable SEGs
        raise DatasetError(f"{path}: cannot read the SEG as a volume: {exc}") from exc
    arr = np.asarray(vol.array)
    if arr.ndim == 3:
        arr = arr[..., None]
    shape = (int(arr.shape[0]), int(arr.shape[1]), int(arr.shape[2]))
    out = CaseMasks(np.asarray(vol.affine, dtype=np.float64), shape)
    lesion_n = 0
    for i, item in enumerate(seg.SegmentSequence):
        label = str(getattr(item, "SegmentLabel", f"segment_{item.SegmentNumber}"))
        mask = arr[..., i] > 0
        if is_lesion_label(label):
            if out.lesions is None:
                out.lesions = np.zeros(shape, dtype=np.int32)
            lesion_n += 1
            out.lesions[mask & (out.lesions == 0)] = lesion_n
        else:
            name = structure_name(label)
            out.structures[name] = out.structures.get(name, np.zeros(shape, bool)) | mask
    return out


def read_mask_dir(folder: Path, seg_reader: SegReader | None = None) -> CaseMasks:
    """All masks of one case: NIfTI files and DICOM SEGs in ``folder``, merged onto the
    grid of the first file read (names sorted)."""
    seg_reader = seg_reader or read_seg
    files = sorted(p for p in folder.iterdir() if p.is_file())
    result: CaseMasks | None = None
    for f in files:
        name = f.name
        if name.endswith((".nii", ".nii.gz")):
            arr, affine = load_nifti_krc(f)
            stem = re.sub(r"\.nii(\.gz)?$", "", name)
            part = CaseMasks(affine, (int(arr.shape[0]), int(arr.shape[1]), int(arr.shape[2])))
            if stem in ("lesions", "lesion"):
                part.lesions = np.asarray(arr).astype(np.int32)
            else:
                part.structures[structure_name(stem)] = np.asarray(arr) > 0
        elif name.endswith(".dcm"):
            part = seg_reader(f)
        else:
            continue
        if result is None:
            result = part
            continue
        part = part.on_grid(result.shape, result.affine)
        result.structures.update(part.structures)
        if part.lesions is not None:
            result.lesions = (
                part.lesions if result.lesions is None else np.maximum(result.lesions, part.lesions)
            )
    if result is None:
        raise DatasetError(f"{folder}: no NIfTI mask or DICOM SEG found")
    return result


# ---------------------------------------------------------------------------
# SR (TID 1500) measurements


@dataclass(frozen=True)
class SRMeasurement:
    name: str
    value: float
    unit: str
    group: str  # tracking identifier of the measurement group ("" if none)
    uid: str = ""  # tracking unique identifier of the group ("" if none)
    site: str = ""  # finding site of the group (code meaning, "" if none)


def _meaning(item: Any) -> str:
    seq = getattr(item, "ConceptNameCodeSequence", None)
    return str(seq[0].CodeMeaning) if seq else ""


def read_sr_measurements(path: Path | Any) -> list[SRMeasurement]:
    """Every NUM content item of an SR (path or pydicom Dataset), with the tracking
    identifier, tracking UID and finding site of the group it sits in."""
    import pydicom

    ds = pydicom.dcmread(str(path)) if isinstance(path, str | Path) else path
    out: list[SRMeasurement] = []

    def walk(items: Iterable[Any], ctx: tuple[str, str, str]) -> None:
        items = list(items)
        group, uid, site = ctx
        for it in items:
            name = _meaning(it).lower()
            if it.ValueType == "TEXT" and name.startswith("tracking identifier"):
                group = str(it.TextValue)
            elif it.ValueType == "UIDREF" and name.startswith("tracking unique identifier"):
                uid = str(it.UID)
            elif it.ValueType == "CODE" and name == "finding site" and "ConceptCodeSequence" in it:
                site = str(it.ConceptCodeSequence[0].CodeMeaning)
        for it in items:
            if it.ValueType == "NUM" and "MeasuredValueSequence" in it and it.MeasuredValueSequence:
                mv = it.MeasuredValueSequence[0]
                unit = str(mv.MeasurementUnitsCodeSequence[0].CodeValue)
                out.append(
                    SRMeasurement(_meaning(it), float(mv.NumericValue), unit, group, uid, site)
                )
            if "ContentSequence" in it:
                walk(it.ContentSequence, (group, uid, site))

    walk(getattr(ds, "ContentSequence", []), ("", "", ""))
    return out


@dataclass(frozen=True)
class SRContent:
    """What the evaluation uses from a results SR: lesion diameters and report text."""

    lesion_diameters_mm: tuple[float, ...] = ()
    text: str = ""
    # (structure name, volume in ml) of measurement groups that state a volume
    volumes_ml: tuple[tuple[str, float], ...] = ()


SegReader = Callable[[Path], CaseMasks]
SrReader = Callable[[Path], SRContent]


def read_sr_content(path: Path) -> SRContent:
    """The default SR reader: lesion diameters and volumes from NUM items (no report text)."""
    ms = read_sr_measurements(path)
    return SRContent(tuple(sr_lesion_diameters_mm(ms)), "", sr_volumes_ml(ms))


VOLUME_UNITS_ML = {"ml": 1.0, "mL": 1.0, "cm3": 1.0, "mm3": 0.001, "l": 1000.0}


def group_structure(tracking_id: str, site: str) -> str:
    """The structure a measurement group is about: the organ its tracking identifier or
    finding site names, else the finding site, else the tracking identifier."""
    names = [structure_name(x) for x in (tracking_id, site) if x]
    organ = next((n for n in names if n in _ORGAN_VALUES), None)
    return organ or (names[-1] if names else "volume")


def sr_volumes_ml(measurements: Iterable[SRMeasurement]) -> tuple[tuple[str, float], ...]:
    """One volume (ml) per measurement group, named by the organ its tracking identifier
    or finding site names, else by the finding site or tracking identifier."""
    found: dict[str, float] = {}
    for m in measurements:
        factor = VOLUME_UNITS_ML.get(m.unit)
        if is_lesion_label(m.group):  # a lesion's finding site is not its volume's name
            continue
        if m.name.lower() == "volume" and factor is not None:
            found.setdefault(group_structure(m.group, m.site), m.value * factor)
    return tuple(found.items())


def sr_lesion_diameters_mm(measurements: Iterable[SRMeasurement]) -> list[float]:
    """Long-axis / diameter measurements in mm (cm converted); one per lesion (groups
    sharing a tracking UID, e.g. a volumetric and a key-slice group, count once)."""
    best: dict[str, float] = {}
    for i, m in enumerate(measurements):
        low = m.name.lower()
        if not ("diameter" in low or "long axis" in low or low == "length"):
            continue
        factor = {"mm": 1.0, "cm": 10.0}.get(m.unit)
        if factor is None:
            continue
        key = m.uid or m.group or f"#{i}"
        best[key] = max(best.get(key, 0.0), m.value * factor)
    return list(best.values())


# ---------------------------------------------------------------------------
# tables and reports


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise DatasetError(f"{path}: no rows")
    return rows


def _disease(value: str, path: Path) -> Disease:
    try:
        return Disease(value.strip())
    except ValueError:
        for d in Disease:
            if d.name.lower() == value.strip().lower():
                return d
        raise DatasetError(
            f"{path}: unknown disease {value!r} (use one of {[d.value for d in Disease]})"
        ) from None


@dataclass
class DiagnosisTable:
    truth: dict[tuple[str, Disease], int] = field(default_factory=dict)
    readers: dict[str, dict[tuple[str, Disease], int]] = field(default_factory=dict)


def read_reference_diagnoses(path: Path) -> DiagnosisTable:
    rows = _read_csv(path)
    cols = list(rows[0].keys())
    for need in ("case_id", "disease"):
        if need not in cols:
            raise DatasetError(f"{path}: column {need!r} missing")
    reader_cols = [c for c in cols if c not in ("case_id", "disease", "truth")]
    table = DiagnosisTable(readers={c: {} for c in reader_cols})
    for i, row in enumerate(rows, start=2):
        key = (row["case_id"].strip(), _disease(row["disease"], path))
        for col in (["truth"] if "truth" in cols else []) + reader_cols:
            raw = (row.get(col) or "").strip()
            if raw == "":
                continue
            if raw not in ("0", "1"):
                raise DatasetError(f"{path} line {i}: {col} must be 0 or 1, got {raw!r}")
            if col == "truth":
                table.truth[key] = int(raw)
            else:
                table.readers[col][key] = int(raw)
    if "truth" not in cols:
        if not reader_cols:
            raise DatasetError(f"{path}: needs a 'truth' column or reader columns")
        # majority of readers; ties count as positive
        keys = {k for r in table.readers.values() for k in r}
        for k in keys:
            votes = [r[k] for r in table.readers.values() if k in r]
            table.truth[k] = int(2 * sum(votes) >= len(votes))
    return table


def read_probabilities(path: Path) -> dict[tuple[str, Disease], float]:
    rows = _read_csv(path)
    out: dict[tuple[str, Disease], float] = {}
    for i, row in enumerate(rows, start=2):
        try:
            p = float(row["probability"])
        except (KeyError, ValueError) as exc:
            raise DatasetError(f"{path} line {i}: needs a numeric 'probability'") from exc
        if not 0.0 <= p <= 1.0:
            raise DatasetError(f"{path} line {i}: probability {p} outside [0, 1]")
        out[(row["case_id"].strip(), _disease(row["disease"], path))] = p
    return out


def read_lesion_confidences(path: Path) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for row in _read_csv(path):
        out.setdefault(row["case_id"].strip(), {})[int(row["lesion"])] = float(row["confidence"])
    return out


def read_reports(folder: Path) -> dict[str, str]:
    return {
        p.name[: -len(".txt")]: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))
    }


# ---------------------------------------------------------------------------
# whole sets


@dataclass
class EvaluationSet:
    """Either side of an evaluation: the reference, or the model's results."""

    truth: DiagnosisTable | None = None  # reference only
    probabilities: dict[tuple[str, Disease], float] = field(default_factory=dict)  # results only
    masks: dict[str, CaseMasks] = field(default_factory=dict)
    reports: dict[str, str] = field(default_factory=dict)
    structured: dict[str, StructuredResult] = field(default_factory=dict)  # results only
    sr_volumes_ml: dict[str, dict[str, float]] = field(default_factory=dict)  # results only
    images: dict[str, Path] = field(default_factory=dict)
    # clinical context per case (labs, history) for running the model now
    clinical: dict[str, ClinicalContext] = field(default_factory=dict)
    source: str = ""

    def case_ids(self) -> list[str]:
        ids = set(self.masks) | set(self.reports) | {c for c, _ in self.probabilities}
        if self.truth is not None:
            ids |= {c for c, _ in self.truth.truth}
        return sorted(ids)


def load_set(
    folder: Path,
    *,
    reference: bool,
    seg_reader: SegReader | None = None,
    sr_reader: SrReader | None = None,
) -> EvaluationSet:
    """Read a reference set (``reference=True``) or a model's results from ``folder``.

    ``seg_reader``/``sr_reader`` replace the built-in DICOM readers (the node passes
    ``dicom_sr.readers``-based ones; ``models`` cannot import ``dicom_sr``)."""
    folder = Path(folder)
    if reference and (folder / "manifest.jsonl").is_file():
        return load_manifest_reference(folder / "manifest.jsonl")
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder")
    out = EvaluationSet(source=str(folder))
    dx = folder / "diagnoses.csv"
    if dx.is_file():
        if reference:
            out.truth = read_reference_diagnoses(dx)
        else:
            out.probabilities = read_probabilities(dx)
    masks = folder / "masks"
    if masks.is_dir():
        for case in sorted(p for p in masks.iterdir() if p.is_dir()):
            out.masks[case.name] = read_mask_dir(case, seg_reader)
    conf = folder / "lesions.csv"
    if conf.is_file():
        for case_id, values in read_lesion_confidences(conf).items():
            if case_id in out.masks:
                out.masks[case_id].lesion_confidence.update(values)
    if (folder / "reports").is_dir():
        out.reports = read_reports(folder / "reports")
    sr = folder / "sr"
    if sr.is_dir():
        for case in sorted(p for p in sr.iterdir() if p.is_dir()):
            diam: list[float] = []
            texts: list[str] = []
            for f in sorted(case.glob("*.dcm")):
                content = (sr_reader or read_sr_content)(f)
                diam += content.lesion_diameters_mm
                out.sr_volumes_ml.setdefault(case.name, {}).update(dict(content.volumes_ml))
                if content.text:
                    texts.append(content.text)
            probs = {d: p for (c, d), p in out.probabilities.items() if c == case.name}
            out.structured[case.name] = StructuredResult(
                frozenset(d for d, p in probs.items() if p >= 0.5), tuple(diam)
            )
            if texts and case.name not in out.reports:
                out.reports[case.name] = "\n".join(texts)
    images = folder / "images"
    if images.is_dir():
        for p in sorted(images.iterdir()):
            out.images[re.sub(r"\.nii(\.gz)?$", "", p.name)] = p
    return out


# ---------------------------------------------------------------------------
# dataset manifests (docs/dataset-manifest.md), e.g. written by ``hpb-node synth``


def _manifest_rows(path: Path) -> list[dict[str, Any]]:
    import json

    rows: list[dict[str, Any]] = []
    for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path} line {n}: not JSON: {exc}") from exc
        if not isinstance(data, dict) or "case_id" not in data:
            raise DatasetError(f"{path} line {n}: must be a JSON object with a case_id")
        rows.append(data)
    if not rows:
        raise DatasetError(f"{path}: lists no cases")
    return rows


def load_manifest_reference(manifest: Path, *, split: str | None = None) -> EvaluationSet:
    """A reference set from a dataset manifest: organ masks (``label`` + ``label_table``
    or ``label_masks``), lesion instances, diagnoses from ``truth`` (every target
    disease 0/1), the study (``dicom`` folder when present, else ``image``), and, for
    synthetic cases, the reference report and clinical context that
    :func:`models.synthetic_clinical.synthesize_clinical` derives from the truth."""
    from models.case import CaseTruth

    base = manifest.parent
    out = EvaluationSet(truth=DiagnosisTable(), source=str(manifest))

    def p(value: Any) -> Path:
        q = Path(str(value))
        return q if q.is_absolute() else base / q

    for row in _manifest_rows(manifest):
        if split is not None and row.get("split", "train") != split:
            continue
        cid = str(row["case_id"])
        masks: CaseMasks | None = None
        if row.get("label"):
            arr, affine = load_nifti_krc(p(row["label"]))
            table = row.get("label_table") or {}
            if not table:
                from models.synthetic.labels import ORGAN_LABELS

                table = {str(k): str(v) for k, v in ORGAN_LABELS.items()}
            shape = (int(arr.shape[0]), int(arr.shape[1]), int(arr.shape[2]))
            masks = CaseMasks(affine, shape)
            for value, name in table.items():
                masks.structures[structure_name(str(name))] = np.asarray(arr) == int(value)
        for name, mpath in (row.get("label_masks") or {}).items():
            arr, affine = load_nifti_krc(p(mpath))
            if masks is None:
                masks = CaseMasks(affine, (int(arr.shape[0]), int(arr.shape[1]), int(arr.shape[2])))
            masks.structures[structure_name(str(name))] = np.asarray(arr) > 0
        if masks is not None:
            if row.get("lesions"):
                lab, _ = load_nifti_krc(p(row["lesions"]))
                masks.lesions = np.asarray(lab).astype(np.int32)
            out.masks[cid] = masks
        if row.get("dicom") and p(row["dicom"]).is_dir():
            out.images[cid] = p(row["dicom"])
        elif row.get("image"):
            out.images[cid] = p(row["image"])
        if row.get("truth"):
            import json

            truth = CaseTruth.from_json(json.loads(p(row["truth"]).read_text(encoding="utf-8")))
            assert out.truth is not None
            for d in Disease:
                out.truth.truth[(cid, d)] = int(d in truth.diseases)
            if truth.source == "synthetic":
                from models.labs import context_from_labs
                from models.synthetic_clinical import synthesize_clinical

                clin = synthesize_clinical(truth)
                out.reports[cid] = clin.reference_report
                out.clinical[cid] = context_from_labs(
                    clin.labs, history=clin.history, age=truth.age, sex=truth.sex
                )
    return out
