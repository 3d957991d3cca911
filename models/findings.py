"""The ``Findings`` contract: everything the model says about one series.

Produced by ``models`` (inference, fusion, report generation), consumed by
``dicom_sr`` (SEG, SR, PDF, key images) and ``node`` (storage, admin views).
Masks live on the source ``Volume`` grid: ``mask[k, r, c]`` is voxel
``(k, r, c)`` of the volume the findings were computed on.

Identifiers: organ findings are ``"organ:<Organ value>"``, lesions
``"lesion:<n>"`` (1-based), diagnoses ``"dx:<Disease value>"``, clinical
values ``"lab:<LOINC code>"``. Report sentences cite these ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from models.phase import NOTE_PREFIX
from models.vocab import ContrastPhase, Disease, LesionKind, Organ, SubSite

Point3 = tuple[float, float, float]


class FindingsError(ValueError):
    """A finding that breaks the contract; the message names the field."""


def organ_id(organ: Organ) -> str:
    return f"organ:{organ.value}"


def lesion_id(number: int) -> str:
    return f"lesion:{number}"


def diagnosis_id(disease: Disease) -> str:
    return f"dx:{disease.value}"


def lab_id(loinc: str) -> str:
    return f"lab:{loinc}"


@dataclass(frozen=True)
class OrganFinding:
    organ: Organ
    mask: npt.NDArray[np.bool_]
    volume_ml: float
    mean_intensity: float | None = None
    std_intensity: float | None = None
    confidence: float = 1.0
    # Free-form qualitative observations measured on the organ
    # (e.g. {"steatosis_index_hu": -12.0, "contour_nodularity": 0.4}).
    qualities: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mask.ndim != 3:
            raise FindingsError(f"organ {self.organ}: mask must be 3-D")
        if self.volume_ml < 0:
            raise FindingsError(f"organ {self.organ}: volume_ml must be >= 0")

    @property
    def id(self) -> str:
        return organ_id(self.organ)


@dataclass(frozen=True)
class Axis:
    """A measured diameter on one slice: endpoints as (k, r, c) voxel indices."""

    start: Point3
    end: Point3
    length_mm: float


@dataclass(frozen=True)
class LesionFinding:
    number: int
    organ: Organ
    kind: LesionKind
    mask: npt.NDArray[np.bool_]
    volume_ml: float
    long_axis: Axis
    short_axis: Axis
    key_slice: int
    centroid_lps: Point3
    sub_site: SubSite | None = None
    mean_intensity: float | None = None
    std_intensity: float | None = None
    confidence: float = 1.0
    # Optional outline on the key slice, (k, r, c) points, closed polygon.
    outline: tuple[Point3, ...] = ()
    tracking_uid: str | None = None

    def __post_init__(self) -> None:
        if self.number < 1:
            raise FindingsError("lesion number must be >= 1")
        if self.mask.ndim != 3:
            raise FindingsError(f"lesion {self.number}: mask must be 3-D")
        if self.long_axis.length_mm + 1e-6 < self.short_axis.length_mm:
            raise FindingsError(f"lesion {self.number}: short axis longer than long axis")
        if not 0.0 <= self.confidence <= 1.0:
            raise FindingsError(f"lesion {self.number}: confidence must be in [0, 1]")

    @property
    def id(self) -> str:
        return lesion_id(self.number)


@dataclass(frozen=True)
class Diagnosis:
    disease: Disease
    probability: float
    evidence: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise FindingsError(f"diagnosis {self.disease}: probability must be in [0, 1]")

    @property
    def id(self) -> str:
        return diagnosis_id(self.disease)


@dataclass(frozen=True)
class ClinicalValue:
    """One clinical input (a lab value, age, sex, history item) the model used."""

    name: str  # short panel name, e.g. "AFP"
    code: str  # LOINC code, or "" for non-lab items
    value: float | str
    unit: str = ""  # UCUM
    observed_at: datetime | None = None
    source: str = ""  # "fhir", "hl7", "csv", "dicom", "synthetic"

    @property
    def id(self) -> str:
        return lab_id(self.code or self.name)


@dataclass(frozen=True)
class ReportSentence:
    section: str  # "findings" or "impression"
    text: str
    finding_ids: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.section not in ("findings", "impression"):
            raise FindingsError(
                f"report section must be findings or impression, got {self.section!r}"
            )
        if not self.finding_ids:
            raise FindingsError(f"report sentence cites no finding: {self.text!r}")


@dataclass(frozen=True)
class Provenance:
    model_name: str
    model_version: str
    weights_sha256: str
    pipeline_version: str
    input_series_uid: str
    input_sop_uids: tuple[str, ...]
    clinical_used: tuple[ClinicalValue, ...] = ()
    clinical_missing: tuple[str, ...] = ()  # panel names with no usable value
    contrast_phase: ContrastPhase = ContrastPhase.UNKNOWN
    notes: tuple[str, ...] = ()
    created_at: datetime | None = None

    @property
    def phase_statement(self) -> str:
        """The contrast phase and how it was found (``models.phase``'s note), for the
        outputs; without such a note, just the phase."""
        note = next((n for n in self.notes if n.startswith(NOTE_PREFIX)), None)
        return note or f"{NOTE_PREFIX}{self.contrast_phase.value}"


@dataclass(frozen=True)
class Findings:
    organs: tuple[OrganFinding, ...]
    lesions: tuple[LesionFinding, ...]
    diagnoses: tuple[Diagnosis, ...]
    report: tuple[ReportSentence, ...]
    provenance: Provenance
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shapes = {f.mask.shape for f in self.organs} | {les.mask.shape for les in self.lesions}
        if len(shapes) > 1:
            raise FindingsError(f"masks are on different grids: {sorted(shapes)}")
        numbers = [les.number for les in self.lesions]
        if len(set(numbers)) != len(numbers):
            raise FindingsError("lesion numbers must be unique")
        known = self.ids()
        for s in self.report:
            missing = [i for i in s.finding_ids if i not in known]
            if missing:
                raise FindingsError(f"report sentence cites unknown findings {missing}: {s.text!r}")

    def ids(self) -> set[str]:
        out = {f.id for f in self.organs} | {les.id for les in self.lesions}
        out |= {d.id for d in self.diagnoses}
        out |= {c.id for c in self.provenance.clinical_used}
        return out

    def organ(self, organ: Organ) -> OrganFinding | None:
        return next((f for f in self.organs if f.organ == organ), None)

    def report_text(self, section: str) -> str:
        return " ".join(s.text for s in self.report if s.section == section)
