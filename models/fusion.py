"""Fusion classifier: image measurements + labs + history -> calibrated disease probabilities.

Inputs
------
* **Image features** (:func:`image_features`) from a :class:`models.findings.Findings`:
  organ volumes and mean attenuation, liver contour nodularity, spleen size,
  pancreatic duct and common bile duct calibre, peripancreatic stranding,
  gallbladder wall; per organ (liver, pancreas, gallbladder) and lesion class
  (solid = mass/nodule, cyst, calculus) the count, the largest long axis and the
  largest lesion's attenuation relative to its organ; the contrast phase
  (``Findings.provenance.contrast_phase``) as indicators, so attenuation is
  read against its phase.
* **Lab features** (:func:`lab_features`): each panel test in its canonical
  unit, log-transformed where skewed and scaled by its reference interval,
  with a **missingness indicator** per test (a missing value is imputed as the
  middle of the reference interval, and the indicator says so).
* **History** (:func:`history_features`): a documented bag-of-concepts keyword
  encoder (no model download): each concept is a set of regular expressions;
  a concept is present when a pattern matches a sentence and no negation cue
  ("no", "denies", "without", "negative for") precedes it in that sentence.
  Plus age and sex.

Model
-----
Per disease, an L2-regularised logistic regression on standardised features,
then Platt / temperature-style calibration (``sigmoid(a * logit + b)`` fitted
on a separate calibration split), which keeps the ranking (AUROC) and fixes
the probability scale. Three variants are kept per disease: ``fused``,
``image`` (image features only) and ``labs`` (lab values + missingness
indicators only), so the ablation can be reproduced from the shipped weights.
Weights are plain JSON (``models/fusion_weights/fusion.json``, a few tens of kB).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from models.findings import Findings, LesionFinding, lab_id, lesion_id, organ_id
from models.labs import LAB_PANEL, ClinicalContext
from models.vocab import ContrastPhase, Disease, LesionKind, Organ

__all__ = [
    "DEFAULT_WEIGHTS",
    "HISTORY_CONCEPTS",
    "FusionModel",
    "feature_vector",
    "history_features",
    "image_features",
    "lab_features",
]

FloatArray = npt.NDArray[np.float64]
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "fusion_weights" / "fusion.json"
VARIANTS = ("fused", "image", "labs")


class FusionError(ValueError):
    """Fusion weights or inputs that cannot be used; the message says which."""


# ---------------------------------------------------------------------------
# image features

_CLASSES: dict[str, tuple[LesionKind, ...]] = {
    "solid": (LesionKind.MASS, LesionKind.NODULE),
    "cyst": (LesionKind.CYST,),
    "calculus": (LesionKind.CALCULUS,),
}
_LESION_CLASSES = (
    (Organ.LIVER, "solid"),
    (Organ.LIVER, "cyst"),
    (Organ.PANCREAS, "solid"),
    (Organ.PANCREAS, "cyst"),
    (Organ.GALLBLADDER, "calculus"),
)

IMAGE_FEATURES: tuple[str, ...] = (
    "img.liver_volume_l",
    "img.liver_hu",
    "img.liver_minus_spleen_hu",
    "img.liver_nodularity",
    "img.spleen_volume_l",
    "img.pancreas_volume_ml",
    "img.pancreas_hu",
    "img.pancreatic_duct_mm",
    "img.peripancreatic_stranding",
    "img.cbd_mm",
    "img.gallbladder_wall_mm",
    *(
        f"img.{o.value}_{c}_{stat}"
        for o, c in _LESION_CLASSES
        for stat in ("count", "max_mm", "rel_hu")
    ),
    "img.liver_solid_hyper_count",
    "img.phase_non_contrast",
    "img.phase_arterial",
    "img.phase_delayed",
)


def _q(findings: Findings, organ: Organ, key: str, default: float) -> float:
    f = findings.organ(organ)
    if f is None:
        return default
    return float(f.qualities.get(key, default))


def _mean(findings: Findings, organ: Organ, default: float) -> float:
    f = findings.organ(organ)
    return default if f is None or f.mean_intensity is None else float(f.mean_intensity)


def _vol(findings: Findings, organ: Organ, default: float) -> float:
    f = findings.organ(organ)
    return default if f is None else float(f.volume_ml)


def lesions_of(findings: Findings, organ: Organ, cls: str) -> list[LesionFinding]:
    kinds = _CLASSES[cls]
    return [les for les in findings.lesions if les.organ == organ and les.kind in kinds]


def image_features(findings: Findings) -> FloatArray:
    """The image feature vector (order: :data:`IMAGE_FEATURES`) from measured findings.

    On MR (``findings.extra["modality"] == "MR"``) signal intensities are not
    HU: every attenuation feature takes its neutral default, so sizes, counts,
    shapes and the clinical data decide. Absent organs take population-typical
    defaults (so a missing spleen does
    not look like splenomegaly); CT attenuation is assumed (HU), read with
    the contrast phase indicators.
    """
    ct = str(findings.extra.get("modality", "CT")).upper() == "CT"
    # MR signal is not HU: attenuation features take their neutral CT defaults
    liver_hu = _mean(findings, Organ.LIVER, 105.0) if ct else 105.0
    spleen_hu = _mean(findings, Organ.SPLEEN, 110.0) if ct else 110.0
    panc_hu = _mean(findings, Organ.PANCREAS, 100.0) if ct else 100.0
    organ_hu = {Organ.LIVER: liver_hu, Organ.PANCREAS: panc_hu, Organ.GALLBLADDER: 10.0}
    v: list[float] = [
        _vol(findings, Organ.LIVER, 1600.0) / 1000.0,
        liver_hu / 100.0,
        (liver_hu - spleen_hu) / 10.0,
        _q(findings, Organ.LIVER, "contour_nodularity", 0.2),
        math.log(max(_vol(findings, Organ.SPLEEN, 200.0), 1.0) / 200.0),
        _vol(findings, Organ.PANCREAS, 70.0) / 10.0,
        panc_hu / 10.0,
        _q(findings, Organ.PANCREAS, "duct_diameter_mm", 2.0),
        _q(findings, Organ.PANCREAS, "peripancreatic_stranding", 0.0),
        _q(findings, Organ.BILE_DUCT, "cbd_mm", 5.0),
        _q(findings, Organ.GALLBLADDER, "wall_mm", 2.0),
    ]
    for organ, cls in _LESION_CLASSES:
        found = lesions_of(findings, organ, cls)
        if not found:
            v += [0.0, 0.0, 0.0]
            continue
        largest = max(found, key=lambda les: les.long_axis.length_mm)
        rel = ((largest.mean_intensity or organ_hu[organ]) - organ_hu[organ]) if ct else 0.0
        v += [
            math.log1p(len(found)),
            math.log1p(largest.long_axis.length_mm),
            rel / 50.0,
        ]
    hyper = [
        les
        for les in lesions_of(findings, Organ.LIVER, "solid")
        if ct and (les.mean_intensity or 0.0) > liver_hu + 10.0
    ]
    v.append(math.log1p(len(hyper)))
    # contrast phase (portal venous / unknown is the baseline): attenuation offsets per phase
    phase = findings.provenance.contrast_phase if ct else ContrastPhase.UNKNOWN
    v += [
        float(phase == ContrastPhase.NON_CONTRAST),
        float(phase == ContrastPhase.ARTERIAL),
        float(phase == ContrastPhase.DELAYED),
    ]
    return np.asarray(v, dtype=np.float64)


# ---------------------------------------------------------------------------
# lab features

_LOG_TESTS = {
    "AFP",
    "CA19-9",
    "CEA",
    "BILI_T",
    "BILI_D",
    "ALT",
    "AST",
    "ALP",
    "GGT",
    "LIPASE",
    "AMYLASE",
}
LAB_FEATURES: tuple[str, ...] = tuple(f"lab.{t.name}" for t in LAB_PANEL) + tuple(
    f"miss.{t.name}" for t in LAB_PANEL
)


def _scaled(name: str, value: float) -> float:
    test = next(t for t in LAB_PANEL if t.name == name)
    lo, hi = test.reference
    if test.qualitative:
        return value
    if name in _LOG_TESTS:
        # log of the value relative to the upper reference limit
        return math.log(max(value, 1e-3) / hi)
    mid, half = (lo + hi) / 2.0, max((hi - lo) / 2.0, 1e-6)
    return (value - mid) / half


def lab_features(labs: Mapping[str, float]) -> FloatArray:
    """Scaled lab values then missingness indicators (order: :data:`LAB_FEATURES`)."""
    vals: list[float] = []
    miss: list[float] = []
    for t in LAB_PANEL:
        if t.name in labs and math.isfinite(labs[t.name]):
            vals.append(_scaled(t.name, float(labs[t.name])))
            miss.append(0.0)
        else:
            lo, hi = t.reference
            vals.append(
                0.0 if t.qualitative or t.name in _LOG_TESTS else _scaled(t.name, (lo + hi) / 2)
            )
            miss.append(1.0)
    return np.asarray(vals + miss, dtype=np.float64)


# ---------------------------------------------------------------------------
# history: bag of concepts

HISTORY_CONCEPTS: dict[str, tuple[str, ...]] = {
    "hepatitis_b": (r"hepatitis b\b", r"\bhbv\b", r"hbsag"),
    "hepatitis_c": (r"hepatitis c\b", r"\bhcv\b"),
    "cirrhosis": (r"cirrho", r"varices", r"ascites"),
    "surveillance": (r"surveillance",),
    "alcohol": (r"alcohol",),
    "colorectal_cancer": (
        r"colorectal",
        r"colon (?:cancer|carcinoma)",
        r"rectal (?:cancer|carcinoma)",
    ),
    "other_cancer": (
        r"breast cancer",
        r"known malignancy",
        r"staging",
        r"melanoma",
        r"lung cancer",
    ),
    "afp": (r"alpha-fetoprotein", r"\bafp\b"),
    "weight_loss": (r"weight loss",),
    "jaundice": (r"jaundice", r"icter"),
    "diabetes": (r"diabet",),
    "obesity": (r"obes",),
    "enzymes": (r"liver enzymes", r"transaminase"),
    "biliary_colic": (r"biliary colic", r"right upper quadrant", r"fatty meals"),
    "gallstones": (r"gall ?stones?",),
    "epigastric_back": (r"epigastric", r"radiating to the back"),
    "vomiting": (r"vomit",),
    "incidental": (r"incidental",),
    "pancreatic_cyst": (r"pancreatic cyst",),
    "liver_lesion": (r"liver lesion", r"new lesion"),
    "smoker": (r"smok",),
    "malignancy_any": (r"malignan", r"cancer", r"carcinoma"),
}
_NEG = re.compile(r"\b(?:no|not|denies|without|negative for)\b")
_COMPILED = {k: tuple(re.compile(p) for p in pats) for k, pats in HISTORY_CONCEPTS.items()}
HISTORY_FEATURES: tuple[str, ...] = (
    *(f"hx.{k}" for k in HISTORY_CONCEPTS),
    "demo.age",
    "demo.male",
)


def history_concepts(text: str) -> set[str]:
    """Concepts asserted (not negated) in ``text``."""
    found: set[str] = set()
    for sentence in re.split(r"(?<=[.;!?])\s+|\n+", text.lower()):
        for concept, pats in _COMPILED.items():
            for pat in pats:
                m = pat.search(sentence)
                if m and not _NEG.search(sentence[: m.start()]):
                    found.add(concept)
                    break
    return found


def history_features(text: str, age: int | None, sex: str | None) -> FloatArray:
    found = history_concepts(text)
    v = [1.0 if k in found else 0.0 for k in HISTORY_CONCEPTS]
    v.append(((age if age is not None else 60) - 60) / 15.0)
    v.append(1.0 if sex == "M" else 0.0 if sex == "F" else 0.5)
    return np.asarray(v, dtype=np.float64)


FEATURES: tuple[str, ...] = IMAGE_FEATURES + LAB_FEATURES + HISTORY_FEATURES


def feature_vector(findings: Findings, clinical: ClinicalContext) -> FloatArray:
    """All features (order: :data:`FEATURES`)."""
    return np.concatenate(
        [
            image_features(findings),
            lab_features(clinical.lab_values()),
            history_features(clinical.history, clinical.age, clinical.sex),
        ]
    )


def variant_columns(variant: str) -> npt.NDArray[np.int64]:
    if variant == "fused":
        keep = FEATURES
    elif variant == "image":
        keep = IMAGE_FEATURES
    elif variant == "labs":
        keep = LAB_FEATURES
    else:
        raise FusionError(f"unknown variant {variant!r} (one of {', '.join(VARIANTS)})")
    return np.asarray([FEATURES.index(f) for f in keep], dtype=np.int64)


# ---------------------------------------------------------------------------
# model


def _sigmoid(z: FloatArray) -> FloatArray:
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(z, -40, 40))), dtype=np.float64)


@dataclass(frozen=True)
class Head:
    """One calibrated logistic head: p = sigmoid(a * (w . (x - mean)/scale + b0) + b)."""

    features: tuple[str, ...]
    mean: FloatArray
    scale: FloatArray
    coef: FloatArray
    intercept: float
    cal_a: float
    cal_b: float

    def logit(self, x: FloatArray) -> FloatArray:
        z = (x - self.mean) / self.scale
        return np.asarray(z @ self.coef + self.intercept, dtype=np.float64)

    def predict(self, x: FloatArray) -> FloatArray:
        return _sigmoid(self.cal_a * self.logit(x) + self.cal_b)

    def contributions(self, x: FloatArray) -> dict[str, float]:
        z = (x - self.mean) / self.scale
        return {f: float(c) for f, c in zip(self.features, z * self.coef, strict=True)}

    def to_json(self) -> dict[str, Any]:
        return {
            "features": list(self.features),
            "mean": [round(float(v), 6) for v in self.mean],
            "scale": [round(float(v), 6) for v in self.scale],
            "coef": [round(float(v), 6) for v in self.coef],
            "intercept": float(self.intercept),
            "cal_a": float(self.cal_a),
            "cal_b": float(self.cal_b),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Head:
        return cls(
            tuple(d["features"]),
            np.asarray(d["mean"], dtype=np.float64),
            np.asarray(d["scale"], dtype=np.float64),
            np.asarray(d["coef"], dtype=np.float64),
            float(d["intercept"]),
            float(d["cal_a"]),
            float(d["cal_b"]),
        )


def _fit_head(
    x: FloatArray,
    y: npt.NDArray[np.int64],
    xc: FloatArray,
    yc: npt.NDArray[np.int64],
    names: Sequence[str],
    c: float,
) -> Head:
    from sklearn.linear_model import LogisticRegression

    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-9] = 1.0
    lr = LogisticRegression(C=c, max_iter=2000)
    lr.fit((x - mean) / scale, y)
    head = Head(
        tuple(names), mean, scale, lr.coef_[0].astype(np.float64), float(lr.intercept_[0]), 1.0, 0.0
    )
    # Platt / temperature calibration on the held-out calibration split
    cal = LogisticRegression(C=1e4, max_iter=1000)
    cal.fit(head.logit(xc).reshape(-1, 1), yc)
    return Head(
        head.features,
        mean,
        scale,
        head.coef,
        head.intercept,
        float(cal.coef_[0, 0]),
        float(cal.intercept_[0]),
    )


class FusionModel:
    """Per-disease calibrated heads for each variant (``fused``, ``image``, ``labs``)."""

    def __init__(
        self, heads: Mapping[str, Mapping[Disease, Head]], meta: Mapping[str, Any]
    ) -> None:
        for variant in heads:
            if variant not in VARIANTS:
                raise FusionError(f"unknown variant {variant!r}")
        if "fused" not in heads:
            raise FusionError("fusion weights lack the 'fused' variant")
        for variant, per in heads.items():
            cols = variant_columns(variant)
            for disease, head in per.items():
                if head.features != tuple(FEATURES[i] for i in cols):
                    raise FusionError(
                        f"weights for {disease}/{variant} were trained on other features "
                        "(feature list changed: retrain with bench/fusion_ablation.py)"
                    )
        self.heads = {v: dict(per) for v, per in heads.items()}
        self.meta = dict(meta)

    @property
    def diseases(self) -> tuple[Disease, ...]:
        return tuple(d for d in Disease if d in self.heads["fused"])

    def predict_matrix(self, x: FloatArray, variant: str = "fused") -> dict[Disease, FloatArray]:
        cols = variant_columns(variant)
        xs = np.atleast_2d(x)[:, cols]
        return {d: self.heads[variant][d].predict(xs) for d in self.diseases}

    def predict(self, findings: Findings, clinical: ClinicalContext) -> dict[Disease, float]:
        x = feature_vector(findings, clinical)
        return {d: float(p[0]) for d, p in self.predict_matrix(x).items()}

    def evidence(
        self, findings: Findings, clinical: ClinicalContext, disease: Disease, top: int = 4
    ) -> tuple[str, ...]:
        """Finding ids behind the strongest positive contributions to ``disease``."""
        x = feature_vector(findings, clinical)
        contrib = self.heads["fused"][disease].contributions(x)
        ranked = sorted(((c, f) for f, c in contrib.items() if c > 0.25), reverse=True)
        known = findings.ids()
        ids: list[str] = []
        for _, feat in ranked:
            for fid in _feature_ids(feat, findings, clinical):
                if fid in known and fid not in ids:
                    ids.append(fid)
            if len(ids) >= top:
                break
        return tuple(ids[:top])

    # -- persistence ----------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "hpb-fusion/1",
            "meta": self.meta,
            "features": list(FEATURES),
            "heads": {
                v: {d.value: h.to_json() for d, h in per.items()} for v, per in self.heads.items()
            },
        }

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path = DEFAULT_WEIGHTS) -> FusionModel:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise FusionError(f"cannot read fusion weights {path}: {exc}") from exc
        if data.get("format") != "hpb-fusion/1":
            raise FusionError(f"{path}: not hpb-fusion/1 weights")
        heads = {
            v: {Disease(d): Head.from_json(h) for d, h in per.items()}
            for v, per in data["heads"].items()
        }
        return cls(heads, data.get("meta", {}))

    @classmethod
    def train(
        cls,
        x: FloatArray,
        y: Mapping[Disease, npt.NDArray[np.int64]],
        x_cal: FloatArray,
        y_cal: Mapping[Disease, npt.NDArray[np.int64]],
        meta: Mapping[str, Any],
        c: float = 0.3,
    ) -> FusionModel:
        """Fit every variant's head per disease on ``x`` and calibrate on ``x_cal``."""
        heads: dict[str, dict[Disease, Head]] = {}
        for variant in VARIANTS:
            cols = variant_columns(variant)
            names = [FEATURES[i] for i in cols]
            heads[variant] = {
                d: _fit_head(x[:, cols], y[d], x_cal[:, cols], y_cal[d], names, c) for d in y
            }
        return cls(heads, meta)


def _feature_ids(feature: str, findings: Findings, clinical: ClinicalContext) -> list[str]:
    """Finding ids a feature was computed from."""
    if feature.startswith("lab."):
        name = feature[4:]
        v = clinical.value(name)
        return [lab_id(v.code or v.name)] if v is not None else []
    if not feature.startswith("img."):
        return []
    body = feature[4:]
    for organ, cls in _LESION_CLASSES:
        if body.startswith(f"{organ.value}_{cls}_"):
            return [lesion_id(les.number) for les in lesions_of(findings, organ, cls)]
    if body.startswith("liver_solid_hyper"):
        return [lesion_id(les.number) for les in lesions_of(findings, Organ.LIVER, "solid")]
    for organ, prefixes in (
        (Organ.LIVER, ("liver_",)),
        (Organ.SPLEEN, ("spleen_",)),
        (Organ.PANCREAS, ("pancrea", "peripancreatic")),
        (Organ.BILE_DUCT, ("cbd",)),
        (Organ.GALLBLADDER, ("gallbladder",)),
    ):
        if body.startswith(prefixes):
            return [organ_id(organ)]
    return []
