"""Ground truth of one (synthetic or curated) case, shared by the generator,
the clinical-data synthesiser, training, fusion and evaluation.

Synthetic cases are labelled as such in ``source``; numbers computed on them
must be quoted as synthetic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from models.vocab import ContrastPhase, Disease, LesionKind, Organ, SubSite


@dataclass(frozen=True)
class LesionTruth:
    number: int  # 1-based; voxel value in the lesion instance mask
    organ: Organ
    kind: LesionKind
    disease: Disease | None
    diameter_mm: float  # longest axial diameter as generated
    centroid_krc: tuple[float, float, float]
    sub_site: SubSite | None = None
    mean_hu: float | None = None


@dataclass(frozen=True)
class CaseTruth:
    case_id: str
    seed: int
    modality: str  # "CT" or "MR"
    phase: ContrastPhase
    age: int
    sex: str  # "M", "F"
    diseases: tuple[Disease, ...]
    lesions: tuple[LesionTruth, ...] = ()
    # organ-level truths, e.g. {"liver_mean_hu": 35.0, "cirrhotic_contour": 1.0,
    # "pancreatic_duct_mm": 5.0}
    organ_qualities: dict[str, float] = field(default_factory=dict)
    source: str = "synthetic"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CaseTruth:
        lesions = tuple(
            LesionTruth(
                number=int(les["number"]),
                organ=Organ(les["organ"]),
                kind=LesionKind(les["kind"]),
                disease=Disease(les["disease"]) if les.get("disease") else None,
                diameter_mm=float(les["diameter_mm"]),
                centroid_krc=tuple(les["centroid_krc"]),  # type: ignore[arg-type]
                sub_site=SubSite(les["sub_site"]) if les.get("sub_site") else None,
                mean_hu=les.get("mean_hu"),
            )
            for les in data.get("lesions", ())
        )
        return cls(
            case_id=data["case_id"],
            seed=int(data["seed"]),
            modality=data["modality"],
            phase=ContrastPhase(data["phase"]),
            age=int(data["age"]),
            sex=data["sex"],
            diseases=tuple(Disease(d) for d in data["diseases"]),
            lesions=lesions,
            organ_qualities=dict(data.get("organ_qualities", {})),
            source=data.get("source", "synthetic"),
        )
