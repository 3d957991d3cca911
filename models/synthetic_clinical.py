"""Synthetic clinical data for synthetic cases: labs, history text, reference report.

**Everything here is synthetic.** No value comes from a patient. The
distributions are hand-set to follow the usual clinical correlations, with
noise, overlap and missingness, so that a classifier trained on them has to
combine imaging with labs and history rather than read off one variable:

* HCC: AFP raised in about two thirds (median ~60 ng/mL, wide spread);
  HBsAg or anti-HCV reactive in most; usually on a cirrhotic liver.
* cirrhosis: low platelets and albumin, raised INR and bilirubin, AST > ALT;
  small nodular liver and large spleen on imaging.
* PDAC: CA 19-9 raised in most (not all: Lewis-negative patients), obstructive
  jaundice (bilirubin, ALP, GGT) when in the head; weight loss, new diabetes.
* pancreatitis: lipase and amylase raised (lipase more often), epigastric pain;
  swollen, low-attenuation pancreas, sometimes a pseudocyst (which imaging alone
  confuses with a cystic neoplasm).
* cholelithiasis: ALP / GGT mildly raised (markedly with a duct stone); biliary
  colic; about a fifth of stones are isodense to bile and missed on CT.
* liver metastasis: CEA raised in many; history of colorectal (or other)
  cancer; hypoattenuating lesions that overlap HCC on imaging.
* steatosis: ALT / GGT mildly raised; obesity, diabetes, alcohol.

:func:`sample_truth` is a light stand-in for the image generator's case truth
(no voxels; organ sizes, attenuation and lesions only), so that hundreds of
training cases cost milliseconds. :func:`measured_findings` turns a truth into
the measurements a segmentation network would report, with measurement noise,
missed small or isodense lesions and occasional false positives: **image
features made this way come from ground truth plus noise, not from the network.**
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.case import CaseTruth, LesionTruth
from models.findings import (
    Axis,
    Findings,
    LesionFinding,
    OrganFinding,
    Provenance,
)
from models.labs import LAB_PANEL
from models.synthetic.appearance import tissue_value
from models.synthetic.diseases import sample_diseases
from models.vocab import ContrastPhase, Disease, LesionKind, Organ, SubSite

__all__ = [
    "SyntheticClinical",
    "measured_findings",
    "reference_findings",
    "sample_truth",
    "synthesize_clinical",
]

D = Disease
COUINAUD = [s for s in SubSite if s.value.startswith("couinaud")]
PANCREAS_PARTS = (SubSite.PANCREAS_HEAD, SubSite.PANCREAS_BODY, SubSite.PANCREAS_TAIL)

# Contrast phases as the image generator draws them (models.synthetic.diseases).
_PHASES = (
    ContrastPhase.NON_CONTRAST,
    ContrastPhase.ARTERIAL,
    ContrastPhase.PORTAL_VENOUS,
    ContrastPhase.DELAYED,
)
_PHASE_P = (0.15, 0.25, 0.48, 0.12)


@dataclass(frozen=True)
class SyntheticClinical:
    """Labs (panel name -> value in the canonical unit; absent = missing), history, report."""

    labs: dict[str, float]
    history: str
    reference_report: str
    # Each reference finding: {"organ", "kind", "site", "size_mm", "disease"}; the
    # statements a complete generated report has to make.
    reference_findings: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    source: str = "synthetic"


# ---------------------------------------------------------------------------
# stand-in case truth


def _pick(rng: np.random.Generator, seq: Any) -> Any:
    return seq[int(rng.integers(len(seq)))]


def _lesion(
    rng: np.random.Generator,
    number: int,
    organ: Organ,
    kind: LesionKind,
    disease: Disease | None,
    diam: tuple[float, float],
    hu: tuple[float, float],
    site: SubSite | None,
) -> LesionTruth:
    return LesionTruth(
        number=number,
        organ=organ,
        kind=kind,
        disease=disease,
        diameter_mm=round(float(rng.uniform(*diam)), 1),
        centroid_krc=(float(rng.uniform(10, 60)), float(rng.uniform(100, 400)), 0.0),
        sub_site=site,
        mean_hu=round(float(rng.normal(*hu)), 1),
    )


def sample_truth(seed: int, case_id: str | None = None) -> CaseTruth:
    """A CT case truth (no voxels) drawn from the synthetic disease model above.

    The disease set is drawn as the image generator draws it
    (``models.synthetic.diseases.sample_diseases``: its prevalences and
    co-occurrences, e.g. metastases with PDAC, pancreatitis with gallstones), and
    contrast phases and tissue attenuation per phase follow the generator
    (``models.synthetic.appearance``), so the two give comparable truths. (An
    earlier sampler drew one primary disease plus incidental ones; a classifier
    trained on it learned that other diseases' labs argue against, e.g., a
    pancreatic cyst, which does not hold for the generator's cases.)
    """
    rng = np.random.default_rng(seed)
    # the image generator's disease mix and co-occurrence (models.synthetic.diseases)
    diseases: set[Disease] = set(sample_diseases(rng))

    prng = np.random.default_rng([seed, 1])  # own stream: the disease draws stay the same
    phase = _PHASES[int(prng.choice(len(_PHASES), p=_PHASE_P))]

    def tissue(name: str) -> float:
        return tissue_value("CT", phase, name)

    pancreas_hu = float(
        rng.normal(tissue("pancreas") - (22 if D.PANCREATITIS in diseases else 0), 12)
    )
    # haemangioma: mostly the slowly filling core, partly the enhancing peripheral nodules
    haem_hu = 0.75 * tissue("haemangioma_core") + 0.25 * tissue("haemangioma_nodule")
    lesions: list[LesionTruth] = []

    def add(*a: Any) -> None:
        lesions.append(_lesion(rng, len(lesions) + 1, *a))

    liver, panc, gb = Organ.LIVER, Organ.PANCREAS, Organ.GALLBLADDER
    if D.HCC in diseases:
        for _ in range(int(rng.choice([1, 1, 1, 2, 3]))):
            add(liver, LesionKind.MASS, D.HCC, (12, 80), (tissue("hcc"), 22), _pick(rng, COUINAUD))
    if D.LIVER_METASTASIS in diseases:
        for _ in range(int(rng.integers(1, 6))):
            add(
                liver,
                LesionKind.MASS,
                D.LIVER_METASTASIS,
                (7, 50),
                (tissue("metastasis"), 18),
                _pick(rng, COUINAUD),
            )
    if D.HAEMANGIOMA in diseases:
        for _ in range(int(rng.choice([1, 1, 2]))):
            add(liver, LesionKind.MASS, D.HAEMANGIOMA, (8, 55), (haem_hu, 25), _pick(rng, COUINAUD))
    if D.SIMPLE_CYST in diseases:
        for _ in range(int(rng.choice([1, 1, 2, 3]))):
            add(liver, LesionKind.CYST, D.SIMPLE_CYST, (5, 60), (8, 7), _pick(rng, COUINAUD))
    if D.CHOLELITHIASIS in diseases:
        isodense = rng.uniform() < 0.22
        for _ in range(int(rng.choice([1, 1, 2, 3]))):
            hu = (35.0, 10.0) if isodense else (260.0, 150.0)
            add(gb, LesionKind.CALCULUS, D.CHOLELITHIASIS, (4, 25), hu, None)
    if D.PDAC in diseases:
        part = PANCREAS_PARTS[int(rng.choice(3, p=[0.65, 0.2, 0.15]))]
        if rng.uniform() < 0.12:  # isoattenuating PDAC: only secondary signs on CT
            add(panc, LesionKind.MASS, D.PDAC, (12, 35), (pancreas_hu, 4.0), part)
        else:
            add(panc, LesionKind.MASS, D.PDAC, (10, 40), (tissue("pdac"), 15), part)
    if D.PANCREATIC_CYSTIC_LESION in diseases:
        add(
            panc,
            LesionKind.CYST,
            D.PANCREATIC_CYSTIC_LESION,
            (8, 40),
            (14, 8),
            _pick(rng, PANCREAS_PARTS),
        )
    if D.PANCREATITIS in diseases and rng.uniform() < 0.12:  # mass-forming pancreatitis
        add(panc, LesionKind.MASS, D.PANCREATITIS, (18, 40), (78, 12), _pick(rng, PANCREAS_PARTS))
    if D.PANCREATITIS in diseases and rng.uniform() < 0.25:  # pseudocyst
        add(panc, LesionKind.CYST, D.PANCREATITIS, (20, 80), (18, 8), _pick(rng, PANCREAS_PARTS))
    lesions = [
        LesionTruth(
            number=les.number,
            organ=les.organ,
            kind=les.kind,
            disease=les.disease,
            diameter_mm=max(les.diameter_mm, 3.0),
            centroid_krc=les.centroid_krc,
            sub_site=les.sub_site,
            mean_hu=les.mean_hu,
        )
        for les in lesions
    ]

    cirr, stea = D.CIRRHOSIS in diseases, D.STEATOSIS in diseases
    head_mass = any(
        les.disease == D.PDAC and les.sub_site == SubSite.PANCREAS_HEAD for les in lesions
    )
    q: dict[str, float] = {
        "liver_volume_ml": float(rng.normal(1200 if cirr else 1650, 250)),
        "liver_mean_hu": float(
            rng.normal(tissue("liver"), 10)
            - (rng.uniform(12, 40) if stea else 0.0)
            - (8 if cirr else 0.0)
        ),
        "cirrhotic_contour": float(np.clip(rng.normal(0.65 if cirr else 0.2, 0.18), 0, 1)),
        "spleen_volume_ml": float(rng.lognormal(np.log(420 if cirr else 200), 0.3)),
        "spleen_mean_hu": float(rng.normal(tissue("spleen"), 10)),
        "pancreas_volume_ml": float(rng.normal(95 if D.PANCREATITIS in diseases else 70, 15)),
        "pancreas_mean_hu": pancreas_hu,
        "pancreatic_duct_mm": float(
            max(
                1.0,
                rng.normal(6.0 if D.PDAC in diseases else 2.2, 1.8 if D.PDAC in diseases else 0.7),
            )
        ),
        "peripancreatic_stranding": float(
            rng.uniform() < (0.7 if D.PANCREATITIS in diseases else 0.05)
        ),
        "cbd_mm": float(max(2.0, rng.normal(11.0 if head_mass else 5.0, 2.0))),
        "gallbladder_volume_ml": float(rng.normal(35, 10)),
        "gallbladder_wall_mm": float(
            max(1.0, rng.normal(4.0 if D.CHOLELITHIASIS in diseases else 2.2, 1.2))
        ),
    }
    return CaseTruth(
        case_id=case_id or f"syn-{seed:06d}",
        seed=seed,
        modality="CT",
        phase=phase,
        age=int(np.clip(rng.normal(62, 13), 19, 95)),
        sex=str(rng.choice(["M", "F"])),
        diseases=tuple(d for d in Disease if d in diseases),
        lesions=tuple(lesions),
        organ_qualities={k: round(v, 2) for k, v in q.items()},
        source="synthetic",
    )


# ---------------------------------------------------------------------------
# labs


def _lognorm(rng: np.random.Generator, median: float, sigma: float) -> float:
    return float(median * np.exp(rng.normal(0.0, sigma)))


# Per-test probability that the value is simply not available.
_MISSING_P = {
    "HBSAG": 0.4,
    "ANTI_HCV": 0.4,
    "AFP": 0.3,
    "CA19-9": 0.3,
    "CEA": 0.3,
    "BILI_D": 0.3,
    "LIPASE": 0.25,
    "AMYLASE": 0.4,
    "INR": 0.25,
}


def _labs(truth: CaseTruth, rng: np.random.Generator) -> dict[str, float]:
    ds = set(truth.diseases)
    hcc, met, cirr = D.HCC in ds, D.LIVER_METASTASIS in ds, D.CIRRHOSIS in ds
    pdac, panc_itis, stones = D.PDAC in ds, D.PANCREATITIS in ds, D.CHOLELITHIASIS in ds
    stea = D.STEATOSIS in ds
    head = any(
        les.disease == D.PDAC and les.sub_site == SubSite.PANCREAS_HEAD for les in truth.lesions
    )
    duct_stone = stones and rng.uniform() < 0.25
    obstructive = (pdac and head and rng.uniform() < 0.8) or duct_stone
    lewis_negative = rng.uniform() < 0.1
    # conditions outside the target list that move the same labs (realistic overlap)
    other_hepatitis = rng.uniform() < 0.08  # viral / drug hepatitis: ALT, AST up
    drug_cholestasis = rng.uniform() < 0.06  # ALP, GGT up
    benign_ca199 = rng.uniform() < 0.08  # cholangitis, diabetes: benign CA 19-9 rise
    smoker_cea = rng.uniform() < 0.2
    renal = rng.uniform() < 0.05  # renal impairment: lipase, amylase up

    v: dict[str, float] = {}
    v["AFP"] = _lognorm(rng, 25.0 if hcc else 5.0 if cirr else 3.0, 2.0 if hcc else 0.7)
    ca = _lognorm(rng, 250.0 if pdac else 12.0, 1.6 if pdac else 0.6)
    ca *= (3.0 if obstructive else 1.0) * (1.6 if panc_itis or stones else 1.0)
    ca *= 4.0 if benign_ca199 else 1.0
    v["CA19-9"] = 1.0 if lewis_negative else ca
    v["CEA"] = (
        _lognorm(rng, 2.0, 0.5)
        * (12.0 if met and rng.uniform() < 0.7 else 1.0)
        * (2.0 if pdac else 1.0)
        * np.exp(rng.normal(0, 0.6) if met else 0.0)
        * (2.0 if smoker_cea else 1.0)
    )
    bili = _lognorm(rng, 0.6, 0.35)
    if obstructive:
        bili *= _lognorm(rng, 8.0, 0.6)
    bili *= (2.0 if cirr else 1.0) * (1.4 if hcc else 1.0) * (1.5 if panc_itis else 1.0)
    v["BILI_T"] = bili
    v["BILI_D"] = bili * (0.7 if obstructive else 0.3) * float(np.exp(rng.normal(0, 0.15)))
    v["ALT"] = (
        _lognorm(rng, 25.0, 0.4)
        * (1.8 if stea else 1.0)
        * (1.5 if hcc or cirr else 1.0)
        * (2.5 if panc_itis else 1.0)
        * (2.0 if obstructive else 1.0)
        * (3.0 if other_hepatitis else 1.0)
    )
    v["AST"] = (
        _lognorm(rng, 24.0, 0.35)
        * (2.2 if cirr else 1.0)
        * (1.4 if stea else 1.0)
        * (1.6 if hcc or met else 1.0)
        * (2.0 if panc_itis else 1.0)
        * (2.5 if other_hepatitis else 1.0)
    )
    v["ALP"] = (
        _lognorm(rng, 75.0, 0.3)
        * (3.5 if obstructive else 1.0)
        * (2.0 if met else 1.0)
        * (1.4 if stones else 1.0)
        * (1.4 if hcc else 1.0)
        * (2.5 if drug_cholestasis else 1.0)
    )
    v["GGT"] = (
        _lognorm(rng, 25.0, 0.5)
        * (5.0 if obstructive else 1.0)
        * (3.0 if met else 1.0)
        * (1.8 if stones else 1.0)
        * (2.0 if stea or cirr else 1.0)
        * (3.0 if drug_cholestasis else 1.0)
    )
    v["ALB"] = float(
        rng.normal(4.2, 0.35)
        - (0.9 if cirr else 0)
        - (0.4 if hcc or pdac else 0)
        - (0.3 if panc_itis or met else 0)
    )
    v["INR"] = float(rng.normal(1.0, 0.08) + (abs(rng.normal(0.35, 0.15)) if cirr else 0.0))
    v["PLT"] = float(rng.normal(250, 60) * (0.5 if cirr else 1.0) * (1.15 if panc_itis else 1.0))
    v["LIPASE"] = (
        _lognorm(rng, 30.0, 0.4)
        * (_lognorm(rng, 15.0, 0.9) if panc_itis else 1.0)
        * (1.3 if pdac else 1.0)
        * (1.3 if stones else 1.0)
        * (3.0 if renal else 1.0)
    )
    v["AMYLASE"] = (
        _lognorm(rng, 60.0, 0.35)
        * (_lognorm(rng, 5.0, 0.8) if panc_itis else 1.0)
        * (2.0 if renal else 1.0)
    )
    hbv_p = 0.45 if hcc else 0.25 if cirr else 0.03
    hcv_p = 0.35 if hcc else 0.30 if cirr else 0.02
    v["HBSAG"] = float(rng.uniform() < hbv_p)
    v["ANTI_HCV"] = float(rng.uniform() < hcv_p)

    out: dict[str, float] = {}
    for test in LAB_PANEL:
        if rng.uniform() < _MISSING_P.get(test.name, 0.15):
            continue
        lo, hi = test.plausible
        value = float(np.clip(v[test.name], max(lo, 0.0), hi))
        if test.name in ("ALB", "INR"):
            value = round(max(value, lo), 1 if test.name == "ALB" else 2)
        elif not test.qualitative:
            value = round(value, 2 if value < 10 else 1 if value < 100 else 0)
        out[test.name] = value
    return out


# ---------------------------------------------------------------------------
# history text

_HISTORY: dict[Disease, tuple[tuple[str, float], ...]] = {
    D.HCC: (
        ("Known chronic hepatitis B.", 0.35),
        ("Chronic hepatitis C, treated.", 0.25),
        ("Cirrhosis under ultrasound surveillance; new lesion on surveillance ultrasound.", 0.5),
        ("Rising alpha-fetoprotein.", 0.3),
        ("Weight loss.", 0.15),
    ),
    D.CIRRHOSIS: (
        ("Alcohol use disorder.", 0.4),
        ("Known liver cirrhosis.", 0.45),
        ("Ascites and oesophageal varices on endoscopy.", 0.2),
    ),
    D.LIVER_METASTASIS: (
        ("History of colorectal carcinoma, resected.", 0.65),
        ("History of breast cancer.", 0.1),
        ("Staging examination for known malignancy.", 0.35),
        ("Weight loss.", 0.25),
    ),
    D.HAEMANGIOMA: (("Incidental liver lesion on ultrasound.", 0.4),),
    D.SIMPLE_CYST: (("Incidental liver lesion on ultrasound.", 0.3),),
    D.STEATOSIS: (
        ("Obesity and type 2 diabetes.", 0.45),
        ("Raised liver enzymes.", 0.3),
        ("Alcohol use disorder.", 0.15),
    ),
    D.CHOLELITHIASIS: (
        ("Right upper quadrant pain after fatty meals.", 0.55),
        ("Recurrent biliary colic.", 0.3),
    ),
    D.PDAC: (
        ("Painless jaundice.", 0.45),
        ("Weight loss.", 0.5),
        ("New-onset diabetes.", 0.2),
        ("Epigastric pain radiating to the back.", 0.2),
    ),
    D.PANCREATIC_CYSTIC_LESION: (("Incidental pancreatic cyst on previous imaging.", 0.4),),
    D.PANCREATITIS: (
        ("Acute epigastric pain radiating to the back.", 0.7),
        ("Alcohol use disorder.", 0.3),
        ("Vomiting.", 0.3),
        ("Known gallstones.", 0.25),
    ),
}
_BACKGROUND = (
    ("Hypertension.", 0.25),
    ("Smoker.", 0.2),
    ("Type 2 diabetes.", 0.08),
    ("Abdominal pain.", 0.2),
    ("Weight loss.", 0.04),
    ("No history of malignancy.", 0.1),
    ("No history of liver disease.", 0.1),
)


def _history(truth: CaseTruth, rng: np.random.Generator) -> str:
    sex = {"M": "man", "F": "woman"}.get(truth.sex, "patient")
    items: list[str] = [f"{truth.age}-year-old {sex}."]
    pool: list[tuple[str, float]] = []
    for d in truth.diseases:
        pool.extend(_HISTORY.get(d, ()))
    pool.extend(_BACKGROUND)
    cancer = any(d in truth.diseases for d in (D.HCC, D.LIVER_METASTASIS, D.PDAC))
    liver = any(d in truth.diseases for d in (D.HCC, D.CIRRHOSIS, D.STEATOSIS))
    for text, p in pool:
        if text == "No history of malignancy." and cancer:
            continue
        if text == "No history of liver disease." and liver:
            continue
        if text not in items and rng.uniform() < p:
            items.append(text)
    if len(items) == 1 or rng.uniform() < 0.1:
        items.append("Clinical details not provided." if len(items) == 1 else "")
    return " ".join(i for i in items if i)


# ---------------------------------------------------------------------------
# reference report (what a radiologist would write from the truth)

_DX_WORDS = {
    D.HCC: "hepatocellular carcinoma",
    D.LIVER_METASTASIS: "liver metastasis",
    D.HAEMANGIOMA: "haemangioma",
    D.SIMPLE_CYST: "simple cyst",
    D.CIRRHOSIS: "cirrhosis",
    D.STEATOSIS: "hepatic steatosis",
    D.CHOLELITHIASIS: "cholelithiasis",
    D.PDAC: "pancreatic ductal adenocarcinoma",
    D.PANCREATIC_CYSTIC_LESION: "pancreatic cystic lesion",
    D.PANCREATITIS: "pancreatitis",
}


def site_words(site: SubSite | None) -> str:
    if site is None:
        return ""
    if site.value.startswith("couinaud_"):
        return f"segment {site.value.split('_', 1)[1]}"
    return f"pancreatic {site.value.split('_', 1)[1]}"


def _reference(truth: CaseTruth) -> tuple[str, tuple[dict[str, Any], ...]]:
    items: list[dict[str, Any]] = []
    lines: list[str] = []
    for les in truth.lesions:
        site = site_words(les.sub_site)
        where = f" in {site}" if site else ""
        lines.append(
            f"{les.organ.value.capitalize()}: {les.kind.value}{where}, "
            f"{les.diameter_mm:.0f} mm, {les.mean_hu or 0:.0f} HU."
        )
        items.append(
            {
                "organ": les.organ.value,
                "kind": les.kind.value,
                "site": les.sub_site.value if les.sub_site else None,
                "size_mm": les.diameter_mm,
                "disease": les.disease.value if les.disease else None,
            }
        )
    q = truth.organ_qualities
    if D.STEATOSIS in truth.diseases:
        lines.append(f"Liver: diffusely reduced attenuation, {q.get('liver_mean_hu', 0):.0f} HU.")
    if D.CIRRHOSIS in truth.diseases:
        lines.append("Liver: nodular contour; splenomegaly.")
    if D.PANCREATITIS in truth.diseases:
        lines.append("Pancreas: swollen with peripancreatic stranding.")
    impression = "; ".join(_DX_WORDS[d] for d in truth.diseases) or "no abnormality"
    text = "FINDINGS: " + (" ".join(lines) or "Normal.") + f" IMPRESSION: {impression}."
    return text, tuple(items)


def synthesize_clinical(truth: CaseTruth, seed: int | None = None) -> SyntheticClinical:
    """Synthetic labs, history and reference report consistent with ``truth``."""
    rng = np.random.default_rng(truth.seed * 7919 + 17 if seed is None else seed)
    labs = _labs(truth, rng)
    history = _history(truth, rng)
    report, items = _reference(truth)
    return SyntheticClinical(labs, history, report, items)


# ---------------------------------------------------------------------------
# measured findings (ground truth + measurement noise; no network)


def _kind_from_hu(organ: Organ, hu: float, diameter: float) -> LesionKind:
    if organ == Organ.GALLBLADDER:
        return LesionKind.CALCULUS
    if hu < 25:
        return LesionKind.CYST
    return LesionKind.NODULE if diameter < 10 else LesionKind.MASS


def _synthetic_provenance(model_name: str, truth: CaseTruth, note: str) -> Provenance:
    """Provenance of findings made from a generator case's truth, not by a network."""
    return Provenance(
        model_name=model_name,
        model_version="0",
        weights_sha256="",
        pipeline_version="synthetic",
        input_series_uid="",
        input_sop_uids=(),
        contrast_phase=truth.phase,
        notes=(note,),
    )


def measured_findings(truth: CaseTruth, rng: np.random.Generator) -> Findings:
    """What a segmentation network plus measurement would report for ``truth``.

    Masks are 1x1x1 placeholders (only the measurements are meaningful). Noise:
    volumes ±8 %, attenuation ±6 HU, diameters ±5 %; lesions under 6 mm are
    missed half the time, gallstones within 40 HU of bile are missed, and about
    10 % of cases get a small false-positive liver nodule. Lesions under 10 mm
    are missed a quarter of the time (under 6 mm half), pancreatic lesions
    isoattenuating to the gland are missed, and contrast timing shifts every
    attenuation of a case by the same N(0, 10) HU. ``extra["truth_lesion_of"]``
    maps each measured lesion's number to the truth lesion it measures (0 for a
    false positive), so evaluations can tell a missed lesion from a mis-measured one.
    """
    q = truth.organ_qualities
    tiny = np.zeros((1, 1, 1), dtype=bool)

    def vol(key: str, default: float) -> float:
        return max(1.0, float(q.get(key, default)) * float(np.exp(rng.normal(0, 0.08))))

    shift = float(rng.normal(0, 10))  # contrast timing: the whole case

    def hu(key: str, default: float) -> float:
        return float(q.get(key, default)) + shift + float(rng.normal(0, 6))

    organs = [
        OrganFinding(
            Organ.LIVER,
            tiny,
            vol("liver_volume_ml", 1600),
            hu("liver_mean_hu", 105),
            15.0,
            qualities={
                "contour_nodularity": float(
                    np.clip(q.get("cirrhotic_contour", 0.2) + rng.normal(0, 0.12), 0, 1)
                )
            },
        ),
        OrganFinding(Organ.SPLEEN, tiny, vol("spleen_volume_ml", 200), hu("spleen_mean_hu", 110)),
        OrganFinding(
            Organ.PANCREAS,
            tiny,
            vol("pancreas_volume_ml", 70),
            hu("pancreas_mean_hu", 100),
            qualities={
                "duct_diameter_mm": max(0.0, q.get("pancreatic_duct_mm", 2.0) + rng.normal(0, 0.8)),
                "peripancreatic_stranding": float(
                    np.clip(q.get("peripancreatic_stranding", 0.0) + rng.normal(0, 0.25), 0, 1)
                ),
            },
        ),
        OrganFinding(
            Organ.GALLBLADDER,
            tiny,
            vol("gallbladder_volume_ml", 35),
            hu("gallbladder_mean_hu", 10),
            qualities={"wall_mm": max(0.5, q.get("gallbladder_wall_mm", 2.0) + rng.normal(0, 0.7))},
        ),
        OrganFinding(
            Organ.BILE_DUCT,
            tiny,
            1.0,
            None,
            qualities={"cbd_mm": max(1.0, q.get("cbd_mm", 5.0) + rng.normal(0, 1.0))},
        ),
    ]
    lesions: list[LesionFinding] = []
    truth_of: dict[
        int, int
    ] = {}  # measured lesion number -> truth lesion number (0: false positive)
    candidates = list(truth.lesions)
    if rng.uniform() < 0.10:
        candidates.append(
            LesionTruth(
                0,
                Organ.LIVER,
                LesionKind.NODULE,
                None,
                float(rng.uniform(5, 11)),
                (0.0, 0.0, 0.0),
                _pick(rng, COUINAUD),
                float(rng.normal(90, 20)),
            )
        )
    for les in candidates:
        truth_hu = les.mean_hu if les.mean_hu is not None else 60.0
        if les.diameter_mm < 10 and rng.uniform() < (0.5 if les.diameter_mm < 6 else 0.25):
            continue
        if les.organ == Organ.PANCREAS and abs(truth_hu - q.get("pancreas_mean_hu", 100)) < 12:
            continue  # isoattenuating to the pancreas: not seen
        if les.organ == Organ.GALLBLADDER and truth_hu < 50:
            continue  # isodense stone: invisible on CT
        long = max(2.0, les.diameter_mm * float(np.exp(rng.normal(0, 0.05))))
        short = long * float(rng.uniform(0.6, 0.95))
        mean = truth_hu + shift + float(rng.normal(0, 6))
        n = len(lesions) + 1
        truth_of[n] = les.number
        lesions.append(
            LesionFinding(
                number=n,
                organ=les.organ,
                kind=_kind_from_hu(les.organ, mean, long),
                mask=tiny,
                volume_ml=float(np.pi / 6 * long * short * short / 1000.0),
                long_axis=Axis((0, 0, 0), (0, 0, 1), round(long, 1)),
                short_axis=Axis((0, 0, 0), (0, 1, 0), round(short, 1)),
                key_slice=int(les.centroid_krc[0]),
                centroid_lps=(0.0, 0.0, 0.0),
                sub_site=les.sub_site,
                mean_intensity=round(mean, 1),
                std_intensity=10.0,
                confidence=float(np.clip(rng.normal(0.85, 0.08), 0.3, 1.0)),
            )
        )
    prov = _synthetic_provenance(
        "synthetic-measurement",
        truth,
        "image features from ground-truth case + measurement noise, not from the network",
    )
    return Findings(
        tuple(organs), tuple(lesions), (), (), prov, extra={"truth_lesion_of": truth_of}
    )


def reference_findings(truth: CaseTruth) -> Findings:
    """The case truth itself as findings: every lesion, exact sizes and attenuation,
    lesion kinds as generated, organ measurements without noise.

    What a perfect segmentation and measurement would give; report metrics on
    these bound what the report generator can reach on its own (anything missed
    here is missed by the classifier or the report, not by detection).
    """
    q = truth.organ_qualities
    tiny = np.zeros((1, 1, 1), dtype=bool)

    def organ(
        o: Organ, vol: str, dv: float, hu: str | None, dh: float, **qual: str
    ) -> OrganFinding:
        return OrganFinding(
            o,
            tiny,
            float(q.get(vol, dv)) if vol else 1.0,
            float(q.get(hu, dh)) if hu else None,
            qualities={k: float(q[v]) for k, v in qual.items() if v in q},
        )

    organs = [
        organ(
            Organ.LIVER,
            "liver_volume_ml",
            1600,
            "liver_mean_hu",
            105,
            contour_nodularity="cirrhotic_contour",
        ),
        organ(Organ.SPLEEN, "spleen_volume_ml", 200, "spleen_mean_hu", 110),
        organ(
            Organ.PANCREAS,
            "pancreas_volume_ml",
            70,
            "pancreas_mean_hu",
            100,
            duct_diameter_mm="pancreatic_duct_mm",
            peripancreatic_stranding="peripancreatic_stranding",
        ),
        organ(
            Organ.GALLBLADDER,
            "gallbladder_volume_ml",
            35,
            "gallbladder_mean_hu",
            10,
            wall_mm="gallbladder_wall_mm",
        ),
        organ(Organ.BILE_DUCT, "", 1.0, None, 0.0, cbd_mm="cbd_mm"),
    ]
    lesions = [
        LesionFinding(
            number=les.number,
            organ=les.organ,
            kind=les.kind,
            mask=tiny,
            volume_ml=float(np.pi / 6 * les.diameter_mm * (0.8 * les.diameter_mm) ** 2 / 1000.0),
            long_axis=Axis((0, 0, 0), (0, 0, 1), round(les.diameter_mm, 1)),
            short_axis=Axis((0, 0, 0), (0, 1, 0), round(0.8 * les.diameter_mm, 1)),
            key_slice=int(les.centroid_krc[0]),
            centroid_lps=(0.0, 0.0, 0.0),
            sub_site=les.sub_site,
            mean_intensity=les.mean_hu,
            std_intensity=10.0,
            confidence=1.0,
        )
        for les in truth.lesions
    ]
    prov = _synthetic_provenance(
        "synthetic-reference",
        truth,
        "findings are the case truth (no detection or measurement error)",
    )
    return Findings(
        tuple(organs),
        tuple(lesions),
        (),
        (),
        prov,
        extra={"truth_lesion_of": {les.number: les.number for les in truth.lesions}},
    )
