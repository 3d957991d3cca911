"""Grounded report drafts: every sentence cites the findings it states, and is checked.

* :func:`draft_report` writes the findings (organ by organ: liver, bile duct,
  gallbladder, pancreas, spleen; each lesion with size, site and attenuation;
  relevant abnormal lab values) and the impression (target diseases ranked by
  probability, with follow-up wording only where the evidence supports it),
  from templates: no language model is needed.
* :func:`check_report` rejects any sentence that its cited findings do not
  support: cited ids must exist; every number must equal (to the precision
  written) a measurement of a cited finding; organ and site words (Couinaud
  segment, pancreatic head/body/tail) must be those of cited findings; lesion
  kind and attenuation words, "dilated", "enlarged", "nodular", "thickened"
  must agree with the measurements; a disease named positively must be a cited
  diagnosis with probability >= :data:`MENTION_P`; a recommendation must cite a
  diagnosis with probability >= :data:`LIKELY_P` (or a cyst it is about).
* :func:`rephrase` (optional) sends the sentences to a local OpenAI-compatible
  endpoint; each rephrased sentence must pass the same check or the template
  sentence is kept.
* :func:`with_diagnoses_and_report` composes: fusion probabilities ->
  ``Findings.diagnoses``; clinical values used / missing -> provenance; report.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

from models.findings import (
    ClinicalValue,
    Diagnosis,
    Findings,
    LesionFinding,
    OrganFinding,
    ReportSentence,
)
from models.labs import LAB_PANEL, ClinicalContext, by_name
from models.vocab import ContrastPhase, Disease, LesionKind, Organ, SubSite

__all__ = [
    "LIKELY_P",
    "MENTION_P",
    "check_report",
    "draft_report",
    "rephrase",
    "with_diagnoses_and_report",
]

log = logging.getLogger(__name__)

MENTION_P = 0.2  # a disease is named in the impression from this probability
LIKELY_P = 0.5  # ... called "most consistent with" and may carry follow-up advice
SPLEEN_ENLARGED_ML = 350.0
CBD_DILATED_MM = 7.0
PANCREATIC_DUCT_DILATED_MM = 3.5
GB_WALL_THICK_MM = 3.5
NODULAR = 0.5
REL_HU = 10.0  # CT lesion vs organ: hypo below -10 HU, hyper above +10 HU
REL_MR = 0.10  # MR lesion vs organ signal: hypo below -10 %, hyper above +10 %

DISEASE_WORDS: dict[Disease, str] = {
    Disease.HCC: "hepatocellular carcinoma",
    Disease.LIVER_METASTASIS: "liver metastasis",
    Disease.HAEMANGIOMA: "haemangioma",
    Disease.SIMPLE_CYST: "simple hepatic cyst",
    Disease.CIRRHOSIS: "cirrhosis",
    Disease.STEATOSIS: "hepatic steatosis",
    Disease.CHOLELITHIASIS: "cholelithiasis",
    Disease.PDAC: "pancreatic ductal adenocarcinoma",
    Disease.PANCREATIC_CYSTIC_LESION: "pancreatic cystic lesion",
    Disease.PANCREATITIS: "pancreatitis",
}
DISEASE_ORGAN: dict[Disease, Organ] = {
    Disease.HCC: Organ.LIVER,
    Disease.LIVER_METASTASIS: Organ.LIVER,
    Disease.HAEMANGIOMA: Organ.LIVER,
    Disease.SIMPLE_CYST: Organ.LIVER,
    Disease.CIRRHOSIS: Organ.LIVER,
    Disease.STEATOSIS: Organ.LIVER,
    Disease.CHOLELITHIASIS: Organ.GALLBLADDER,
    Disease.PDAC: Organ.PANCREAS,
    Disease.PANCREATIC_CYSTIC_LESION: Organ.PANCREAS,
    Disease.PANCREATITIS: Organ.PANCREAS,
}
_LESION_DISEASES: dict[Disease, tuple[Organ, tuple[LesionKind, ...]]] = {
    Disease.HCC: (Organ.LIVER, (LesionKind.MASS, LesionKind.NODULE)),
    Disease.LIVER_METASTASIS: (Organ.LIVER, (LesionKind.MASS, LesionKind.NODULE)),
    Disease.HAEMANGIOMA: (Organ.LIVER, (LesionKind.MASS, LesionKind.NODULE)),
    Disease.SIMPLE_CYST: (Organ.LIVER, (LesionKind.CYST,)),
    Disease.CHOLELITHIASIS: (Organ.GALLBLADDER, (LesionKind.CALCULUS,)),
    Disease.PDAC: (Organ.PANCREAS, (LesionKind.MASS, LesionKind.NODULE)),
    Disease.PANCREATIC_CYSTIC_LESION: (Organ.PANCREAS, (LesionKind.CYST,)),
    Disease.PANCREATITIS: (Organ.PANCREAS, (LesionKind.CYST, LesionKind.MASS)),
}
_FOLLOW_UP: dict[Disease, str] = {
    Disease.HCC: "Multiphase contrast-enhanced CT or MRI and multidisciplinary review are recommended.",
    Disease.LIVER_METASTASIS: "Correlation with the oncological history and staging is recommended.",
    Disease.PDAC: "Pancreatic protocol CT and multidisciplinary review are recommended.",
    Disease.PANCREATIC_CYSTIC_LESION: "Follow-up imaging according to pancreatic cyst guidelines is recommended.",
}
# Abnormal values of these labs are quoted as context (panel name -> words).
_LAB_WORDS: dict[str, str] = {
    "AFP": "AFP",
    "CA19-9": "CA 19-9",
    "CEA": "CEA",
    "BILI_T": "total bilirubin",
    "ALT": "ALT",
    "AST": "AST",
    "ALP": "alkaline phosphatase",
    "GGT": "GGT",
    "ALB": "albumin",
    "INR": "INR",
    "PLT": "platelets",
    "LIPASE": "lipase",
    "AMYLASE": "amylase",
    "HBSAG": "HBsAg",
    "ANTI_HCV": "anti-HCV",
}
_UNIT_WORDS = {"10*3/uL": "x10^3/uL", "{INR}": "", "[U]/mL": "U/mL", "{presence}": ""}
_ORGAN_WORDS: dict[Organ, str] = {
    Organ.LIVER: "liver",
    Organ.GALLBLADDER: "gallbladder",
    Organ.PANCREAS: "pancreas",
    Organ.SPLEEN: "spleen",
    Organ.BILE_DUCT: "common bile duct",
}


# ---------------------------------------------------------------------------
# words


def site_text(organ: Organ, site: SubSite | None) -> str:
    """ "liver segment VII", "pancreatic head", or the organ alone."""
    if site is None:
        return {Organ.GALLBLADDER: "the gallbladder"}.get(
            organ, f"the {_ORGAN_WORDS.get(organ, organ.value)}"
        )
    if site.value.startswith("couinaud_"):
        return f"liver segment {site.value.split('_', 1)[1]}"
    return f"the pancreatic {site.value.split('_', 1)[1]}"


def _fmt(x: float, decimals: int = 0) -> str:
    return f"{x:.{decimals}f}"


def is_ct(findings: Findings) -> bool:
    """CT unless ``findings.extra["modality"]`` says otherwise (MR: signal, not HU)."""
    return str(findings.extra.get("modality", "CT")).upper() == "CT"


def _attenuation(les: LesionFinding, organ: OrganFinding | None, ct: bool = True) -> str:
    if les.mean_intensity is None or organ is None or organ.mean_intensity is None:
        return ""
    if ct:
        rel = les.mean_intensity - organ.mean_intensity
        low, high = rel < -REL_HU, rel > REL_HU
        return "hypoattenuating" if low else "hyperattenuating" if high else "isoattenuating"
    ratio = les.mean_intensity / organ.mean_intensity if organ.mean_intensity else 1.0
    low, high = ratio < 1.0 - REL_MR, ratio > 1.0 + REL_MR
    return "hypointense" if low else "hyperintense" if high else "isointense"


def _intensity_words(findings: Findings) -> tuple[str, str]:
    """("mean attenuation", " HU") on CT, ("mean signal", "") on MR."""
    return ("mean attenuation", " HU") if is_ct(findings) else ("mean signal", "")


def _lesion_sentence(les: LesionFinding, findings: Findings) -> ReportSentence:
    host = findings.organ(les.organ)
    att = _attenuation(les, host, is_ct(findings)) if les.kind != LesionKind.CALCULUS else ""
    what, unit = _intensity_words(findings)
    words = f"{att} {les.kind.value}".strip()
    size = f"{_fmt(les.long_axis.length_mm)} x {_fmt(les.short_axis.length_mm)} mm"
    text = f"Lesion {les.number}: {size} {words} in {site_text(les.organ, les.sub_site)}"
    ids = [les.id]
    if les.mean_intensity is not None:
        text += f", {what} {_fmt(les.mean_intensity)}{unit}"
        if att and host is not None and host.mean_intensity is not None:
            text += f" (parenchyma {_fmt(host.mean_intensity)}{unit})"
            ids.append(host.id)
    return ReportSentence("findings", text + ".", tuple(ids))


def _lab_text(v: ClinicalValue) -> str | None:
    if v.name not in _LAB_WORDS or not isinstance(v.value, (int, float)):
        return None
    test = by_name(v.name)
    value = float(v.value)
    if test.qualitative:
        return f"{_LAB_WORDS[v.name]} reactive" if value >= 0.5 else None
    if not (test.is_high(value) or test.is_low(value)):
        return None
    decimals = 2 if test.name == "INR" else 1 if value < 10 else 0
    unit = _UNIT_WORDS.get(test.unit, test.unit)
    flag = "high" if test.is_high(value) else "low"
    return f"{_LAB_WORDS[v.name]} {_fmt(value, decimals)}{(' ' + unit) if unit else ''} ({flag})"


# ---------------------------------------------------------------------------
# drafting


def _organ_sentences(findings: Findings) -> list[ReportSentence]:
    out: list[ReportSentence] = []
    S = ReportSentence
    what, unit = _intensity_words(findings)
    liver, spleen = findings.organ(Organ.LIVER), findings.organ(Organ.SPLEEN)
    lesions = sorted(findings.lesions, key=lambda x: x.number)

    def lesions_in(organ: Organ) -> list[LesionFinding]:
        return [les for les in lesions if les.organ == organ]

    if liver is not None:
        text = f"Liver: volume {_fmt(liver.volume_ml)} ml"
        if liver.mean_intensity is not None:
            text += f", {what} {_fmt(liver.mean_intensity)}{unit}"
        out.append(S("findings", text + ".", (liver.id,)))
        if (
            spleen is not None
            and is_ct(findings)
            and findings.provenance.contrast_phase
            not in (ContrastPhase.ARTERIAL, ContrastPhase.DELAYED)
            and liver.mean_intensity is not None
            and spleen.mean_intensity is not None
            and liver.mean_intensity < spleen.mean_intensity - REL_HU
        ):
            out.append(
                S(
                    "findings",
                    f"The liver is hypoattenuating relative to the spleen "
                    f"({_fmt(liver.mean_intensity)} HU vs {_fmt(spleen.mean_intensity)} HU).",
                    (liver.id, spleen.id),
                )
            )
        nod = liver.qualities.get("contour_nodularity")
        if nod is not None and nod > NODULAR:
            out.append(
                S(
                    "findings",
                    f"The liver contour is nodular (nodularity index {nod:.2f}).",
                    (liver.id,),
                )
            )
        mine = lesions_in(Organ.LIVER)
        out += [_lesion_sentence(les, findings) for les in mine]
        if not mine:
            out.append(S("findings", "No focal liver lesion is detected.", (liver.id,)))
    duct = findings.organ(Organ.BILE_DUCT)
    if duct is not None and "cbd_mm" in duct.qualities:
        cbd = duct.qualities["cbd_mm"]
        state = "dilated" if cbd > CBD_DILATED_MM else "not dilated"
        out.append(
            S("findings", f"The common bile duct measures {cbd:.0f} mm ({state}).", (duct.id,))
        )
    gb = findings.organ(Organ.GALLBLADDER)
    if gb is not None:
        stones = lesions_in(Organ.GALLBLADDER)
        out += [_lesion_sentence(les, findings) for les in stones]
        if not stones:
            out.append(S("findings", "No calculus is detected in the gallbladder.", (gb.id,)))
        wall = gb.qualities.get("wall_mm")
        if wall is not None and wall > GB_WALL_THICK_MM:
            out.append(
                S("findings", f"The gallbladder wall is thickened ({wall:.1f} mm).", (gb.id,))
            )
    panc = findings.organ(Organ.PANCREAS)
    if panc is not None:
        text = f"Pancreas: volume {_fmt(panc.volume_ml)} ml"
        if panc.mean_intensity is not None:
            text += f", {what} {_fmt(panc.mean_intensity)}{unit}"
        out.append(S("findings", text + ".", (panc.id,)))
        d = panc.qualities.get("duct_diameter_mm")
        if d is not None:
            state = "dilated" if d > PANCREATIC_DUCT_DILATED_MM else "not dilated"
            out.append(
                S(
                    "findings",
                    f"The main pancreatic duct measures {d:.1f} mm ({state}).",
                    (panc.id,),
                )
            )
        if panc.qualities.get("peripancreatic_stranding", 0.0) > 0.5:
            out.append(S("findings", "There is peripancreatic fat stranding.", (panc.id,)))
        mine = lesions_in(Organ.PANCREAS)
        out += [_lesion_sentence(les, findings) for les in mine]
        if not mine:
            out.append(S("findings", "No focal pancreatic lesion is detected.", (panc.id,)))
    if spleen is not None:
        state = " (enlarged)" if spleen.volume_ml > SPLEEN_ENLARGED_ML else ""
        out.append(
            S("findings", f"Spleen: volume {_fmt(spleen.volume_ml)} ml{state}.", (spleen.id,))
        )
    others = [
        les for les in lesions if les.organ not in (Organ.LIVER, Organ.GALLBLADDER, Organ.PANCREAS)
    ]
    out += [_lesion_sentence(les, findings) for les in others]
    return out


def _lab_sentence(findings: Findings) -> list[ReportSentence]:
    parts: list[str] = []
    ids: list[str] = []
    for v in findings.provenance.clinical_used:
        t = _lab_text(v)
        if t is not None:
            parts.append(t)
            ids.append(v.id)
    if not parts:
        return []
    return [ReportSentence("findings", "Laboratory context: " + "; ".join(parts) + ".", tuple(ids))]


def _supporting_lesions(findings: Findings, d: Disease) -> list[LesionFinding]:
    if d not in _LESION_DISEASES:
        return []
    organ, kinds = _LESION_DISEASES[d]
    return [les for les in findings.lesions if les.organ == organ and les.kind in kinds]


def _impression(findings: Findings) -> list[ReportSentence]:
    ranked = sorted(findings.diagnoses, key=lambda dx: -dx.probability)
    named = [dx for dx in ranked if dx.probability >= MENTION_P][:5]
    out: list[ReportSentence] = []
    if not named:
        ids = tuple(dx.id for dx in ranked) or tuple(f.id for f in findings.organs[:1])
        if ids:
            out.append(
                ReportSentence(
                    "impression",
                    "No target disease reaches the reporting threshold.",
                    ids,
                )
            )
        return out
    for rank, dx in enumerate(named, 1):
        lesions = _supporting_lesions(findings, dx.disease)
        lead = "Most consistent with" if dx.probability >= LIKELY_P else "Possible"
        text = f"{rank}. {lead} {DISEASE_WORDS[dx.disease]} (probability {dx.probability:.2f})"
        cited = [dx.id]
        if lesions:
            nums = ", ".join(str(les.number) for les in lesions[:4])
            text += f", lesion{'s' if len(lesions[:4]) > 1 else ''} {nums}"
            cited += [les.id for les in lesions[:4]]
        out.append(ReportSentence("impression", text + ".", tuple(cited)))
    for dx in named:
        if dx.probability < LIKELY_P or dx.disease not in _FOLLOW_UP:
            continue
        out.append(ReportSentence("impression", _FOLLOW_UP[dx.disease], (dx.id,)))
    return out


def draft_report(findings: Findings) -> tuple[ReportSentence, ...]:
    """Template report for ``findings`` (diagnoses and clinical provenance already set)."""
    return tuple(_organ_sentences(findings) + _lab_sentence(findings) + _impression(findings))


# ---------------------------------------------------------------------------
# checking

_NUMBER = re.compile(r"(?<![\w.])(-?\d+(?:\.\d+)?)(\s*cm\b)?")
_LESION_REF = re.compile(r"\blesions? ((?:\d+(?:, | and )?)+)", re.I)
_SEGMENT = re.compile(r"\bsegments? (IVa|IVb|VIII|VII|VI|IV|V|III|II|I)\b")
_PART = re.compile(r"\b(head|body|tail)\b")
_ORGAN_PATTERNS: dict[Organ, re.Pattern[str]] = {
    Organ.LIVER: re.compile(r"\b(liver|hepatic)\b"),
    Organ.GALLBLADDER: re.compile(r"\bgall ?bladder\b"),
    Organ.PANCREAS: re.compile(r"\b(pancreas|pancreatic|peripancreatic)\b"),
    Organ.SPLEEN: re.compile(r"\b(spleen|splenic|splenomegaly)\b"),
    Organ.BILE_DUCT: re.compile(r"\b(bile duct|biliary|choledoch\w*)\b"),
}
_KIND_WORDS: dict[LesionKind, re.Pattern[str]] = {
    LesionKind.CALCULUS: re.compile(r"\b(calculus|calculi|stones?)\b"),
    LesionKind.CYST: re.compile(r"\bcysts?\b"),
    LesionKind.MASS: re.compile(r"\bmass(es)?\b"),
    LesionKind.NODULE: re.compile(r"\bnodules?\b"),
}
_ATT_WORDS = (
    "hypoattenuating",
    "hyperattenuating",
    "isoattenuating",
    "hypointense",
    "hyperintense",
    "isointense",
)
_ADVICE = re.compile(r"\b(recommend\w*|suggest\w*|advis\w*|follow-up)\b", re.I)
_NEGATION = re.compile(r"\b(no|not|without|negative for|no evidence of|absence of)\b")


def _measurements(fid: str, findings: Findings) -> list[float]:
    vals: list[float] = []
    for o in findings.organs:
        if o.id == fid:
            vals += [o.volume_ml, *(v for v in o.qualities.values())]
            vals += [x for x in (o.mean_intensity,) if x is not None]
    for les in findings.lesions:
        if les.id == fid:
            vals += [
                les.long_axis.length_mm,
                les.short_axis.length_mm,
                les.volume_ml,
                float(les.number),
            ]
            vals += [x for x in (les.mean_intensity,) if x is not None]
    for dx in findings.diagnoses:
        if dx.id == fid:
            vals.append(dx.probability)
    for v in findings.provenance.clinical_used:
        if v.id == fid and isinstance(v.value, (int, float)):
            vals.append(float(v.value))
    return vals


def _matches(written: str, value: float, cm: bool) -> bool:
    decimals = len(written.split(".", 1)[1]) if "." in written else 0
    n = float(written) * (10.0 if cm else 1.0)
    tol = 0.5 * 10.0 ** (-decimals) * (10.0 if cm else 1.0) + 1e-9
    return abs(n - value) <= tol


def _cited_organs(ids: Iterable[str], findings: Findings) -> set[Organ]:
    out: set[Organ] = set()
    for fid in ids:
        for o in findings.organs:
            if o.id == fid:
                out.add(o.organ)
        for les in findings.lesions:
            if les.id == fid:
                out.add(les.organ)
        for dx in findings.diagnoses:
            if dx.id == fid:
                out.add(DISEASE_ORGAN[dx.disease])
    return out


def _disease_mentions(text: str) -> set[Disease]:
    """Diseases named positively (not negated in the same clause)."""
    from models.evaluation.text import DISEASE_TERMS  # the evaluation lexicon: one list

    found: set[Disease] = set()
    for clause in re.split(r"[,;:]|\bbut\b|\bhowever\b", text.lower()):
        for disease, pats in DISEASE_TERMS.items():
            for pat in pats:
                m = re.search(pat, clause)
                if m and not _NEGATION.search(clause[: m.start()]):
                    found.add(disease)
                    break
    return found


def check_sentence(s: ReportSentence, findings: Findings) -> list[str]:
    """Problems with one sentence (empty when its cited findings support it)."""
    problems: list[str] = []
    known = findings.ids()
    unknown = [i for i in s.finding_ids if i not in known]
    if unknown:
        return [f"cites unknown findings {unknown}: {s.text!r}"]
    text, low = s.text, s.text.lower()
    cited_lesions = [les for les in findings.lesions if les.id in s.finding_ids]
    cited_dx = [dx for dx in findings.diagnoses if dx.id in s.finding_ids]
    # lesion references ("lesion 2", "lesions 1, 3") must be cited
    for m in _LESION_REF.finditer(text):
        for num in re.findall(r"\d+", m.group(1)):
            if f"lesion:{num}" not in s.finding_ids:
                problems.append(f"names lesion {num} without citing it: {text!r}")
    # numbers: each equals a measurement of a cited finding
    allowed = [v for fid in s.finding_ids for v in _measurements(fid, findings)]
    stripped = _LESION_REF.sub("lesion", text)
    stripped = re.sub(r"^\d+\.\s", "", stripped)  # impression rank "1. "
    stripped = re.sub(r"x10\^\d+/uL", "", stripped)  # unit exponent
    stripped = re.sub(r"\b(?:CA )?19-9\b", "", stripped)
    for m in _NUMBER.finditer(stripped):
        if not any(_matches(m.group(1), v, bool(m.group(2))) for v in allowed):
            problems.append(f"number {m.group(0).strip()} matches no cited measurement: {text!r}")
    # organ words
    organs = _cited_organs(s.finding_ids, findings)
    for organ, pat in _ORGAN_PATTERNS.items():
        if pat.search(low) and organ not in organs:
            problems.append(
                f"mentions the {organ.value} but cites no {organ.value} finding: {text!r}"
            )
    # site words
    segs = {f"couinaud_{m.group(1)}" for m in _SEGMENT.finditer(text)}
    sites = {les.sub_site.value for les in cited_lesions if les.sub_site is not None}
    for seg in segs - sites:
        problems.append(
            f"names {seg.replace('couinaud_', 'segment ')} but no cited lesion is there: {text!r}"
        )
    if _ORGAN_PATTERNS[Organ.PANCREAS].search(low):
        for part in {m.group(1) for m in _PART.finditer(low)}:
            if f"pancreas_{part}" not in sites:
                problems.append(
                    f"names the pancreatic {part} but no cited lesion is there: {text!r}"
                )
    # lesion kind and attenuation words
    if cited_lesions and not cited_dx:
        kinds = {les.kind for les in cited_lesions}
        for kind, pat in _KIND_WORDS.items():
            if pat.search(low) and kind not in kinds:
                problems.append(
                    f"calls a lesion a {kind.value} but it was measured as {'/'.join(sorted(k.value for k in kinds))}: {text!r}"
                )
        atts = {
            _attenuation(les, findings.organ(les.organ), is_ct(findings)) for les in cited_lesions
        }
        for word in _ATT_WORDS:
            if word in low and word not in atts and "relative to the spleen" not in low:
                problems.append(f"says {word} but the measurements do not: {text!r}")
    # qualitative organ words
    checks: list[tuple[str, bool]] = []
    duct = findings.organ(Organ.BILE_DUCT)
    panc = findings.organ(Organ.PANCREAS)
    if "dilated" in low and "not dilated" not in low:
        ok = (
            duct is not None
            and duct.id in s.finding_ids
            and duct.qualities.get("cbd_mm", 0) > CBD_DILATED_MM
        ) or (
            panc is not None
            and panc.id in s.finding_ids
            and panc.qualities.get("duct_diameter_mm", 0) > PANCREATIC_DUCT_DILATED_MM
        )
        checks.append(("dilated", ok))
    if "not dilated" in low:
        ok = (
            duct is not None
            and duct.id in s.finding_ids
            and duct.qualities.get("cbd_mm", 99) <= CBD_DILATED_MM
        ) or (
            panc is not None
            and panc.id in s.finding_ids
            and panc.qualities.get("duct_diameter_mm", 99) <= PANCREATIC_DUCT_DILATED_MM
        )
        checks.append(("not dilated", ok))
    if "enlarged" in low or "splenomegaly" in low:
        sp = findings.organ(Organ.SPLEEN)
        checks.append(
            (
                "enlarged",
                sp is not None and sp.id in s.finding_ids and sp.volume_ml > SPLEEN_ENLARGED_ML,
            )
        )
    if "nodular" in low:
        lv = findings.organ(Organ.LIVER)
        checks.append(
            (
                "nodular",
                lv is not None
                and lv.id in s.finding_ids
                and lv.qualities.get("contour_nodularity", 0) > NODULAR,
            )
        )
    if "thickened" in low:
        gb = findings.organ(Organ.GALLBLADDER)
        checks.append(
            (
                "thickened",
                gb is not None
                and gb.id in s.finding_ids
                and gb.qualities.get("wall_mm", 0) > GB_WALL_THICK_MM,
            )
        )
    problems += [
        f"says {word!r} but the cited measurements do not: {text!r}"
        for word, ok in checks
        if not ok
    ]
    # disease words
    probs = {dx.disease: dx.probability for dx in cited_dx}
    for d in _disease_mentions(text):
        if probs.get(d, 0.0) < MENTION_P:
            problems.append(
                f"names {d.value} without a cited diagnosis of probability >= {MENTION_P}: {text!r}"
            )
    # advice
    if _ADVICE.search(text):
        strong = [dx for dx in cited_dx if dx.probability >= LIKELY_P]
        if not strong:
            problems.append(
                f"recommends without a cited diagnosis of probability >= {LIKELY_P}: {text!r}"
            )
    return problems


def check_report(
    findings: Findings, sentences: Sequence[ReportSentence] | None = None
) -> list[str]:
    """Every problem of every sentence (``findings.report`` unless given)."""
    out: list[str] = []
    for s in findings.report if sentences is None else sentences:
        out += check_sentence(s, findings)
    return out


# ---------------------------------------------------------------------------
# optional language-model rephrasing

_SYSTEM = (
    "You edit radiology report sentences for style. Rephrase each sentence in the register of a "
    "radiology report. Keep every number exactly as written, keep organ and segment names, "
    "add no new finding, no diagnosis and no recommendation. Answer with a JSON list of objects "
    '{"id": <id>, "text": <sentence>} in the same order.'
)


def rephrase(
    findings: Findings,
    sentences: Sequence[ReportSentence],
    *,
    url: str,
    model: str = "local",
    timeout_s: float = 30.0,
    client: Any = None,
) -> tuple[tuple[ReportSentence, ...], list[str]]:
    """Sentences rephrased by an OpenAI-compatible ``/chat/completions`` endpoint.

    Each rephrased sentence keeps the template sentence's citations and must
    pass :func:`check_sentence`; otherwise the template sentence is kept. An
    unreachable or malformed endpoint keeps every template sentence. Returns
    the sentences and notes saying what was kept and why.
    """
    import httpx

    payload = {
        "model": model,
        "temperature": 0,
        "messages": [
            {"role": "system", "content": _SYSTEM},
            {
                "role": "user",
                "content": json.dumps([{"id": i, "text": s.text} for i, s in enumerate(sentences)]),
            },
        ],
    }
    own = client is None
    http = client or httpx.Client(timeout=timeout_s)
    try:
        resp = http.post(url.rstrip("/") + "/chat/completions", json=payload)
        resp.raise_for_status()
        content = resp.json()["choices"][0]["message"]["content"]
        items = json.loads(content)
        proposed = {int(it["id"]): str(it["text"]) for it in items}
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
        return tuple(sentences), [
            f"rephrasing endpoint unusable ({type(exc).__name__}); template kept"
        ]
    finally:
        if own:
            http.close()
    out: list[ReportSentence] = []
    notes: list[str] = []
    for i, s in enumerate(sentences):
        text = proposed.get(i, "").strip()
        if not text:
            out.append(s)
            notes.append(f"sentence {i}: no rephrasing returned; template kept")
            continue
        candidate = ReportSentence(s.section, text, s.finding_ids)
        problems = check_sentence(candidate, findings)
        if problems:
            out.append(s)
            notes.append(f"sentence {i}: rephrasing rejected ({problems[0]}); template kept")
        else:
            out.append(candidate)
    return tuple(out), notes


# ---------------------------------------------------------------------------
# composition


def _clinical_values(clinical: ClinicalContext) -> tuple[ClinicalValue, ...]:
    from models.fusion import history_concepts

    extra: list[ClinicalValue] = []
    if clinical.age is not None:
        extra.append(ClinicalValue("age", "", float(clinical.age), "a", None, "dicom"))
    if clinical.sex is not None:
        extra.append(ClinicalValue("sex", "", clinical.sex, "", None, "dicom"))
    concepts = sorted(history_concepts(clinical.history)) if clinical.history else []
    if concepts:
        # the concepts the model used, not the free text (which may identify the patient)
        extra.append(ClinicalValue("history", "", ", ".join(concepts), "", None, "history"))
    return tuple(clinical.values) + tuple(extra)


def with_diagnoses_and_report(
    findings: Findings,
    clinical: ClinicalContext,
    *,
    model: Any = None,
    llm_url: str | None = None,
    llm_model: str = "local",
    modality: str | None = None,
) -> Findings:
    """``findings`` with fusion diagnoses, clinical provenance and a checked report.

    ``model`` is a :class:`models.fusion.FusionModel` (default: the shipped
    weights). With ``llm_url`` the template sentences are offered to that
    endpoint for rephrasing (each must pass the same check). ``modality`` ("CT",
    "MR"; default ``findings.extra["modality"]`` or CT) chooses HU or signal
    wording and whether attenuation features are used; it is kept in ``extra``.
    """
    from models.fusion import DEFAULT_WEIGHTS

    fusion = model if model is not None else _default_model()
    used = _clinical_values(clinical)
    notes = list(findings.provenance.notes)
    have = clinical.lab_values()
    missing = tuple(
        dict.fromkeys(
            [*clinical.missing_names(), *(t.name for t in LAB_PANEL if t.name not in have)]
        )
    )
    prov = replace(findings.provenance, clinical_used=used, clinical_missing=missing)
    extra = dict(findings.extra)
    if modality is not None:
        extra["modality"] = modality.upper()
    if not is_ct(replace(findings, extra=extra)):
        notes.append(
            "MR: signal intensities are not used by the fusion classifier (trained on CT HU)"
        )
    staged = replace(findings, diagnoses=(), report=(), provenance=prov, extra=extra)
    probs = fusion.predict(staged, clinical)
    diagnoses = tuple(
        Diagnosis(d, round(float(p), 3), fusion.evidence(staged, clinical, d))
        for d, p in probs.items()
    )
    weights = fusion.meta.get("weights_sha256", "")
    notes.append(f"fusion: {fusion.meta.get('classifier', 'fusion model')} {weights}".strip())
    if fusion is _DEFAULT.get("model"):
        notes.append(f"fusion weights: {DEFAULT_WEIGHTS.name}")
    staged = replace(staged, diagnoses=diagnoses, provenance=replace(prov, notes=tuple(notes)))
    sentences = draft_report(staged)
    if llm_url:
        sentences, llm_notes = rephrase(staged, sentences, url=llm_url, model=llm_model)
        notes += llm_notes
    kept = tuple(s for s in sentences if not check_sentence(s, staged))
    if len(kept) < len(sentences):  # a template bug: drop rather than state the unsupported
        notes.append(f"report: {len(sentences) - len(kept)} unsupported sentence(s) removed")
        log.warning("report: %d unsupported sentence(s) removed", len(sentences) - len(kept))
    sentences = kept
    return replace(staged, report=tuple(sentences), provenance=replace(prov, notes=tuple(notes)))


_DEFAULT: dict[str, Any] = {}


def _default_model() -> Any:
    from models.fusion import FusionModel

    if "model" not in _DEFAULT:
        _DEFAULT["model"] = FusionModel.load()
    return _DEFAULT["model"]
