"""Run a whole evaluation: reference set against a model's results, into one
JSON-ready dictionary, plus threshold checks on its summary figures."""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.evaluation.classification import (
    binary_summary,
    cohen_kappa,
    confusion,
    fleiss_kappa,
)
from models.evaluation.dataset import CaseMasks, EvaluationSet
from models.evaluation.detection import (
    CaseDetection,
    froc,
    lesion_diameters_mm,
    match_lesions,
)
from models.evaluation.segmentation import compare_masks
from models.evaluation.text import ReportPair, evaluate_reports, structured_from
from models.measure import lesion_instances
from models.vocab import Disease


@dataclass(frozen=True)
class Options:
    threshold: float = 0.5  # probability at which a diagnosis is called positive
    n_bootstrap: int = 2000
    seed: int = 0
    calibration_bins: int = 10
    min_iou: float = 0.1
    min_radius_mm: float = 5.0


def _nanstats(values: Sequence[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        nan = float("nan")
        return {
            "n": int(arr.size),
            "n_inf": int(np.isinf(arr).sum()),
            "mean": nan,
            "median": nan,
            "std": nan,
            "min": nan,
            "max": nan,
        }
    return {
        "n": int(arr.size),
        "n_inf": int(np.isinf(arr).sum()),
        "mean": float(finite.mean()),
        "median": float(np.median(finite)),
        "std": float(finite.std()),
        "min": float(finite.min()),
        "max": float(finite.max()),
    }


# ---------------------------------------------------------------------------
# diagnosis


def evaluate_diagnoses(ref: EvaluationSet, res: EvaluationSet, opt: Options) -> dict[str, Any]:
    if ref.truth is None or not res.probabilities:
        return {}
    out: dict[str, Any] = {"per_disease": {}, "readers": {}}
    diseases = sorted({d for _, d in ref.truth.truth} & {d for _, d in res.probabilities})
    for d in diseases:
        keys = sorted(k for k in ref.truth.truth if k[1] == d and k in res.probabilities)
        if not keys:
            continue
        y = np.array([ref.truth.truth[k] for k in keys])
        p = np.array([res.probabilities[k] for k in keys])
        entry = binary_summary(
            y,
            p,
            threshold=opt.threshold,
            n_resamples=opt.n_bootstrap,
            seed=opt.seed,
            n_bins=opt.calibration_bins,
        )
        entry["cases"] = [k[0] for k in keys]
        entry["truth"] = y.tolist()
        entry["probability"] = p.tolist()
        calls = (p >= opt.threshold).astype(np.int64)
        readers: dict[str, Any] = {}
        names = sorted(ref.truth.readers)
        for name in names:
            lab = ref.truth.readers[name]
            rk = [i for i, k in enumerate(keys) if k in lab]
            if not rk:
                continue
            r = np.array([lab[keys[i]] for i in rk])
            cm = confusion(y[rk], r)
            vs_model = binary_summary(
                r,
                p[rk],
                threshold=opt.threshold,
                n_resamples=opt.n_bootstrap,
                seed=opt.seed,
                n_bins=opt.calibration_bins,
            )
            readers[name] = {
                "n": len(rk),
                "reader_vs_truth": {
                    "accuracy": cm.accuracy,
                    "sensitivity": cm.sensitivity,
                    "specificity": cm.specificity,
                    "ppv": cm.ppv,
                    "npv": cm.npv,
                    "confusion": {"tn": cm.tn, "fp": cm.fp, "fn": cm.fn, "tp": cm.tp},
                },
                "model_vs_truth_same_cases": {
                    "sensitivity": confusion(y[rk], calls[rk]).sensitivity,
                    "specificity": confusion(y[rk], calls[rk]).specificity,
                    "accuracy": confusion(y[rk], calls[rk]).accuracy,
                },
                "model_vs_reader": {
                    "kappa": cohen_kappa(calls[rk], r),
                    "auroc": vs_model["auroc"],
                    "sensitivity": vs_model["sensitivity"],
                    "specificity": vs_model["specificity"],
                },
            }
        if len(names) >= 2:
            common = [k for k in keys if all(k in ref.truth.readers[n] for n in names)]
            table = np.array([[ref.truth.readers[n][k] for n in names] for k in common])
            pairs = (
                {
                    f"{a}|{b}": cohen_kappa(table[:, i], table[:, j])
                    for i, a in enumerate(names)
                    for j, b in enumerate(names)
                    if i < j
                }
                if common
                else {}
            )
            entry["inter_reader"] = {
                "n": len(common),
                "fleiss_kappa": fleiss_kappa(table) if common else float("nan"),
                "cohen_kappa_pairs": pairs,
            }
        entry["readers"] = readers
        out["per_disease"][str(d)] = entry
    return out


# ---------------------------------------------------------------------------
# segmentation and lesions


def evaluate_segmentation(ref: EvaluationSet, res: EvaluationSet, opt: Options) -> dict[str, Any]:
    per_case: list[dict[str, Any]] = []
    detections: list[CaseDetection] = []
    lesions: list[dict[str, Any]] = []
    for case_id in sorted(ref.masks):
        rm = ref.masks[case_id]
        pm = res.masks.get(case_id)
        pm_grid = (
            pm.on_grid(rm.shape, rm.affine) if pm is not None else CaseMasks(rm.affine, rm.shape)
        )
        for name, rmask in sorted(rm.structures.items()):
            pmask = pm_grid.structures.get(name, np.zeros(rm.shape, dtype=bool))
            row: dict[str, Any] = {
                "case_id": case_id,
                "structure": name,
                "predicted": name in pm_grid.structures,
            }
            row.update(compare_masks(pmask, rmask, rm.affine))
            per_case.append(row)
        if rm.lesions is not None:
            plab = pm_grid.lesions if pm_grid.lesions is not None else np.zeros(rm.shape, np.int32)
            det = match_lesions(
                case_id,
                plab,
                rm.lesions,
                rm.affine,
                confidences=pm_grid.lesion_confidence,
                min_iou=opt.min_iou,
                min_radius_mm=opt.min_radius_mm,
            )
            detections.append(det)
            lesions += det.per_lesion
    structures: dict[str, Any] = {}
    for name in sorted({r["structure"] for r in per_case}):
        rows = [r for r in per_case if r["structure"] == name]
        structures[name] = {
            key: _nanstats([r[key] for r in rows])
            for key in (
                "dice",
                "iou",
                "hd95_mm",
                "assd_mm",
                "centroid_error_mm",
                "volume_error_ml",
                "volume_error_pct",
            )
        }
        structures[name]["abs_volume_error_pct"] = _nanstats(
            [abs(r["volume_error_pct"]) for r in rows]
        )
    out: dict[str, Any] = {"per_structure": structures, "per_case": per_case}
    if detections:
        out["lesions"] = {
            "detection": froc(detections),
            "matched": {
                key: _nanstats([r[key] for r in lesions])
                for key in (
                    "dice",
                    "iou",
                    "hd95_mm",
                    "assd_mm",
                    "centroid_error_mm",
                    "volume_error_ml",
                    "volume_error_pct",
                    "diameter_error_mm",
                )
            },
            "abs_diameter_error_mm": _nanstats([abs(r["diameter_error_mm"]) for r in lesions]),
            "per_lesion": lesions,
            "per_case": [
                {
                    "case_id": d.case_id,
                    "tp": len(d.matches),
                    "fn": len(d.false_negatives),
                    "fp": len(d.false_positives),
                }
                for d in detections
            ],
        }
    return out


# ---------------------------------------------------------------------------
# reports


def evaluate_report_texts(ref: EvaluationSet, res: EvaluationSet, opt: Options) -> dict[str, Any]:
    pairs: list[ReportPair] = []
    for case_id in sorted(set(ref.reports) & set(res.reports)):
        structured = res.structured.get(case_id)
        if structured is None:
            probs = {d: p for (c, d), p in res.probabilities.items() if c == case_id}
            diam: list[float] = []
            m = res.masks.get(case_id)
            if m is not None and m.lesions is not None:
                diam = lesion_diameters_mm(lesion_instances(m.lesions), m.affine)
            if probs or diam:
                structured = structured_from(probs, diam, opt.threshold)
        pairs.append(ReportPair(case_id, res.reports[case_id], ref.reports[case_id], structured))
    if not pairs:
        return {}
    return evaluate_reports(pairs)


# ---------------------------------------------------------------------------
# the whole thing


def summary_figures(result: dict[str, Any]) -> dict[str, float]:
    """Flat ``name -> value`` figures that thresholds refer to (see docs/evaluation.md)."""
    flat: dict[str, float] = {}
    for d, e in result.get("diagnosis", {}).get("per_disease", {}).items():
        for key in ("auroc", "accuracy", "sensitivity", "specificity", "ppv", "npv"):
            flat[f"{key}.{d}"] = float(e[key]["value"])
        if "calibration" in e:
            flat[f"ece.{d}"] = float(e["calibration"]["ece"])
    seg = result.get("segmentation", {})
    for s, e in seg.get("per_structure", {}).items():
        for key, name in (
            ("dice", "dice"),
            ("iou", "iou"),
            ("hd95_mm", "hd95"),
            ("assd_mm", "assd"),
            ("centroid_error_mm", "centroid_error"),
            ("abs_volume_error_pct", "volume_error_pct"),
        ):
            flat[f"{name}.{s}"] = float(e[key]["mean"])
    les = seg.get("lesions")
    if les:
        det = les["detection"]
        for key in ("sensitivity", "precision", "fp_per_case", "cpm"):
            flat[f"lesion.{key}"] = float(det[key])
        flat["lesion.dice"] = float(les["matched"]["dice"]["mean"])
        flat["lesion.diameter_error"] = float(les["abs_diameter_error_mm"]["mean"])
    rep = result.get("report", {}).get("summary")
    if rep:
        for key in (
            "completeness",
            "correctness",
            "rouge_l",
            "meteor",
            "flesch_kincaid_grade",
            "consistency",
        ):
            if key in rep:
                flat[f"report.{key}"] = float(rep[key])
        for key, v in rep["bleu"].items():
            flat[f"report.{key}"] = float(v)
    return flat


def structured_results(ref: EvaluationSet, res: EvaluationSet) -> dict[str, Any]:
    """What the results' SRs state, checked against the results' own masks and the
    reference: each stated volume beside the volume of the mask of the same structure."""
    out: dict[str, Any] = {}
    for case_id in sorted(set(res.structured) | set(res.sr_volumes_ml)):
        entry: dict[str, Any] = {}
        st = res.structured.get(case_id)
        if st is not None:
            entry["lesion_diameters_mm"] = list(st.lesion_diameters_mm)
        vols = []
        masks = res.masks.get(case_id)
        refm = ref.masks.get(case_id)
        for name, ml in sorted(res.sr_volumes_ml.get(case_id, {}).items()):
            row: dict[str, Any] = {"structure": name, "sr_ml": ml}
            if masks is not None and name in masks.structures:
                vox = float(abs(np.linalg.det(masks.affine[:3, :3]))) / 1000.0
                row["mask_ml"] = float(masks.structures[name].sum()) * vox
                row["sr_minus_mask_ml"] = ml - row["mask_ml"]
            if refm is not None and name in refm.structures:
                vox = float(abs(np.linalg.det(refm.affine[:3, :3]))) / 1000.0
                row["reference_ml"] = float(refm.structures[name].sum()) * vox
            vols.append(row)
        entry["volumes"] = vols
        out[case_id] = entry
    return out


def evaluate(ref: EvaluationSet, res: EvaluationSet, opt: Options | None = None) -> dict[str, Any]:
    opt = opt or Options()
    result: dict[str, Any] = {
        "options": opt.__dict__,
        "reference": ref.source,
        "results": res.source,
        "n_cases": len(set(ref.case_ids()) & set(res.case_ids())),
        "diagnosis": evaluate_diagnoses(ref, res, opt),
        # results with no masks at all carry no segmentation to evaluate (e.g. a
        # diagnosis-only run); a case missing from results that have masks counts as empty
        "segmentation": evaluate_segmentation(ref, res, opt) if ref.masks and res.masks else {},
        "report": evaluate_report_texts(ref, res, opt),
        "structured_results": structured_results(ref, res),
    }
    result["summary"] = summary_figures(result)
    return result


# ---------------------------------------------------------------------------
# thresholds

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "==": operator.eq,
}
_THRESHOLD = re.compile(r"^\s*([A-Za-z0-9_.]+)\s*(>=|<=|==|>|<)\s*([-+0-9.eE]+|inf)\s*$")


class ThresholdError(ValueError):
    """A threshold expression that cannot be parsed."""


@dataclass(frozen=True)
class Threshold:
    metric: str
    op: str
    value: float
    text: str = field(default="", compare=False)

    @classmethod
    def parse(cls, text: str) -> Threshold:
        m = _THRESHOLD.match(text)
        if m is None:
            raise ThresholdError(f"threshold {text!r} is not of the form metric.name>=number")
        metric = m.group(1)
        head, _, tail = metric.partition(".")
        if tail and tail.upper() in Disease.__members__:
            metric = f"{head}.{Disease[tail.upper()].value}"
        return cls(metric, m.group(2), float(m.group(3)), text)

    def check(self, figures: dict[str, float]) -> dict[str, Any]:
        value = figures.get(self.metric)
        if value is None:
            return {
                "threshold": self.text or f"{self.metric}{self.op}{self.value}",
                "value": None,
                "met": False,
                "reason": f"no figure named {self.metric!r}",
            }
        met = (not math.isnan(value)) and _OPS[self.op](value, self.value)
        return {
            "threshold": self.text or f"{self.metric}{self.op}{self.value}",
            "value": value,
            "met": met,
        }


def check_thresholds(
    result: dict[str, Any], thresholds: Sequence[Threshold]
) -> list[dict[str, Any]]:
    checks = [t.check(result["summary"]) for t in thresholds]
    result["thresholds"] = checks
    return checks
