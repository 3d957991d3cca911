"""Report quality on synthetic cases: completeness, unsupported sentences, readability.

    .venv/bin/python bench/report_quality.py [--cases 50]
        [--network-cases bench/results/fusion_network_cases.jsonl]

Writes ``bench/results/report_quality.json``. Metrics come from the evaluation
package (``models.evaluation.text``, rules in ``docs/evaluation.md``):
completeness = reference items (asserted disease mentions and lesion sizes of
the reference report written from the case truth) found asserted in the
generated report; readability = Flesch-Kincaid grade and Flesch reading ease
of the generated report. Unsupported sentences are counted by
``models.report.check_sentence`` on the sentences the report keeps.

**Data: synthetic.** The same 50 case truths (``sample_truth``, labs / history
/ reference reports from ``synthesize_clinical``) are reported from findings
of different origin, so that each miss can be put down to its stage:

* ``simulated_measurement`` (the headline numbers without ``--network-cases``): ground-truth lesions and
  organ measurements plus measurement noise and simulated detection misses
  (``measured_findings``): a stand-in for the segmentation network, **not its
  output**; diagnoses from the shipped fusion weights.
* ``reference_findings``: the truth itself (``reference_findings``: every
  lesion, exact sizes); diagnoses from the fusion weights. Misses here are the
  classifier's.
* ``reference_findings_and_diagnoses``: the truth and the true diagnoses
  (probability 1). Misses here are the report generator's own: the upper bound
  of the report generator alone.
* ``network`` (with ``--network-cases``; then the headline numbers, since it is
  what the node writes): the segmentation network's findings on generator cases
  (``bench/fusion_network_cases.py``; other case truths, first ``--cases``
  records).

Every missed reference item is put down to a cause: a lesion size to
``detection`` (the lesion was not found), ``measurement`` (found, measured
outside the max(2 mm, 10 %) tolerance) or ``report`` (found and measured but
not stated); a disease to ``classifier`` (fused probability below 0.2: not
named; or 0.2-0.5: named as "possible", which the rules count as uncertain,
not stated) with whether its lesions went undetected, or to ``report`` (the
diagnosis reached 0.5 and the report does not assert it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.case import CaseTruth  # noqa: E402
from models.evaluation.text import (  # noqa: E402
    compare_findings,
    extract,
    matched_sizes,
    readability,
    sizes_within,
)
from models.findings import Findings  # noqa: E402
from models.labs import context_from_labs  # noqa: E402
from models.report import LIKELY_P, MENTION_P, check_sentence, with_diagnoses_and_report  # noqa: E402
from models.synthetic_clinical import (  # noqa: E402
    measured_findings,
    reference_findings,
    sample_truth,
    synthesize_clinical,
)
from models.vocab import Disease  # noqa: E402

SOURCES = {
    "simulated_measurement": "ground truth + measurement noise and simulated detection misses "
    "(models.synthetic_clinical.measured_findings; not the segmentation network); fusion diagnoses",
    "reference_findings": "the case truth as findings (models.synthetic_clinical.reference_findings:"
    " every lesion, exact sizes); fusion diagnoses",
    "reference_findings_and_diagnoses": "the case truth as findings and the true diagnoses "
    "(probability 1): the report generator alone (upper bound)",
    "network": "segmentation network output (models.inference.analyse, shipped demo bundle) on "
    "generator cases (bench/fusion_network_cases.py); fusion diagnoses",
}


class TruthDiagnoses:
    """A stand-in for the fusion model that knows the case's diseases (probability 1)."""

    meta: ClassVar[dict[str, str]] = {"classifier": "true diagnoses (bench oracle)"}

    def __init__(self, truth: CaseTruth) -> None:
        self.truth = truth

    def predict(self, findings: Findings, clinical: Any) -> dict[Disease, float]:
        return {d: float(d in self.truth.diseases) for d in Disease}

    def evidence(self, findings: Findings, clinical: Any, disease: Disease) -> tuple[str, ...]:
        return ()


def _mean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return round(float(np.mean(vals)), 4) if vals else float("nan")


def _size_causes(truth: CaseTruth, findings: Findings, text: str) -> list[str]:
    """Cause of each reference lesion size the generated text does not state."""
    stated = list(extract(text).sizes_mm)
    # the reference report writes one size per truth lesion, in this order
    ref = [float(f"{les.diameter_mm:.0f}") for les in truth.lesions]
    hit = matched_sizes(ref, stated)
    link: dict[int, int] | None = findings.extra.get("truth_lesion_of")
    measured = {les.number: les.long_axis.length_mm for les in findings.lesions}
    causes: list[str] = []
    if link is None:  # network output: no link to the truth lesions
        lesions = [les.long_axis.length_mm for les in findings.lesions]
        n_unstated = len(lesions) - len(matched_sizes(lesions, stated))
        causes += ["report (a measured lesion's size is not stated)"] * n_unstated
        causes += ["detection or measurement (network output)"] * (len(ref) - len(hit))
        return causes
    # by lesion identity (the link), not by value as the metric matches sizes
    written = [float(f"{les.long_axis.length_mm:.0f}") for les in findings.lesions]
    unstated = [n for n, w in zip(measured, written, strict=True) if w not in stated]
    for i, les in enumerate(truth.lesions):
        mine = [n for n, t in link.items() if t == les.number]
        if not mine:
            causes.append("detection")
        elif not any(sizes_within(measured[n], ref[i]) for n in mine):
            causes.append("measurement")
        elif all(n in unstated for n in mine):
            causes.append("report")
    # the metric matches sizes by value: a neighbouring lesion's size can take the match
    # of a lesion that was stated correctly (or give one to a mis-measured lesion)
    extra = (len(ref) - len(hit)) - len(causes)
    causes += ["matched by value to another lesion's size (metric artefact)"] * max(extra, 0)
    return causes


def _disease_cause(d: Disease, truth: CaseTruth, out: Findings, text: str) -> str:
    p = next((dx.probability for dx in out.diagnoses if dx.disease == d), 0.0)
    if p >= LIKELY_P:
        return "report"
    borne = [les for les in truth.lesions if les.disease == d]
    link: dict[int, int] | None = out.extra.get("truth_lesion_of")
    if borne and link is not None and not {x.number for x in borne} & set(link.values()):
        lesions = ", its lesions not detected"
    elif borne and link is None and not {x.organ for x in borne} & {x.organ for x in out.lesions}:
        lesions = ", no lesion detected in its organ"
    else:
        lesions = ""
    if p >= MENTION_P:
        return f"classifier: named as possible (0.2 <= p < 0.5){lesions}"
    return f"classifier: not named (p < 0.2){lesions}"


def evaluate(
    cases: Iterator[tuple[CaseTruth, Findings]], oracle: bool = False, fusion: Any = None
) -> dict[str, Any]:
    """Report metrics of ``cases``: diagnoses by ``fusion`` (default: the shipped fusion
    weights) or, with ``oracle``, the true ones."""
    completeness: list[float] = []
    correctness: list[float] = []
    grades: list[float] = []
    ease: list[float] = []
    unsupported = removed = sentences = n = 0
    causes: dict[str, int] = {}
    per_case: list[dict[str, Any]] = []
    examples: list[dict[str, object]] = []
    for truth, findings in cases:
        n += 1
        clin = synthesize_clinical(truth)
        ctx = context_from_labs(clin.labs, history=clin.history, age=truth.age, sex=truth.sex)
        out = with_diagnoses_and_report(
            findings, ctx, model=TruthDiagnoses(truth) if oracle else fusion
        )
        text = out.report_text("findings") + " " + out.report_text("impression")
        cmp = compare_findings(text, clin.reference_report)
        completeness.append(cmp["completeness"])
        correctness.append(cmp["correctness"])
        misses = [f"size: {c}" for c in _size_causes(truth, out, text)]
        misses += [
            f"{d}: {_disease_cause(Disease(d), truth, out, text)}" for d in cmp["missed_diseases"]
        ]
        for m in misses:
            what, cause = m.split(": ", 1)
            key = f"{'lesion size' if what == 'size' else 'disease'}: {cause}"
            causes[key] = causes.get(key, 0) + 1
        if misses:
            per_case.append(
                {
                    "case": truth.case_id,
                    "completeness": round(cmp["completeness"], 4),
                    "missed": misses,
                }
            )
        unsupported += sum(1 for s in out.report if check_sentence(s, out))
        removed += sum(
            1 for note in out.provenance.notes if note.startswith("report:") and "removed" in note
        )
        sentences += len(out.report)
        r = readability(text)
        grades.append(r["flesch_kincaid_grade"])
        ease.append(r["flesch_reading_ease"])
        if len(examples) < 3:
            examples.append(
                {"case": truth.case_id, "reference": clin.reference_report, "generated": text}
            )
    report_failures = sum(v for k, v in causes.items() if ": report" in k)
    return {
        "cases": n,
        "completeness": _mean(completeness),
        "correctness": _mean(correctness),
        "unsupported_sentences": unsupported,
        "sentences": sentences,
        "cases_with_template_sentences_removed_by_the_check": removed,
        "readability": {
            "flesch_kincaid_grade": _mean(grades),
            "flesch_reading_ease": _mean(ease),
        },
        "missed_items_by_cause": dict(sorted(causes.items())),
        "missed_items_that_are_report_generation_failures": report_failures,
        "cases_with_misses": per_case,
        "examples": examples,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cases", type=int, default=50)
    ap.add_argument("--first-seed", type=int, default=300_000)
    ap.add_argument("--network-cases", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "report_quality.json")
    ap.add_argument(
        "--weights", type=Path, default=None, help="fusion weights (default: the shipped ones)"
    )
    args = ap.parse_args(argv)
    fusion = None
    if args.weights is not None:
        from models.fusion import FusionModel

        fusion = FusionModel.load(args.weights)
    seeds = range(args.first_seed, args.first_seed + args.cases)

    def simulated() -> Iterator[tuple[CaseTruth, Findings]]:
        for seed in seeds:
            truth = sample_truth(seed)
            yield truth, measured_findings(truth, np.random.default_rng(seed + 10_000_019))

    def exact() -> Iterator[tuple[CaseTruth, Findings]]:
        for seed in seeds:
            truth = sample_truth(seed)
            yield truth, reference_findings(truth)

    by_source: dict[str, dict[str, Any]] = {
        "simulated_measurement": evaluate(simulated(), fusion=fusion),
        "reference_findings": evaluate(exact(), fusion=fusion),
        "reference_findings_and_diagnoses": evaluate(exact(), oracle=True),
    }
    if args.network_cases is not None:
        from fusion_network_cases import findings_from_record, load_cases

        records = load_cases(args.network_cases)[: args.cases]

        def network() -> Iterator[tuple[CaseTruth, Findings]]:
            for rec in records:
                yield CaseTruth.from_json(rec["truth"]), findings_from_record(rec)

        by_source["network"] = evaluate(network(), fusion=fusion)
    for name, res in by_source.items():
        res["data"] = SOURCES[name]
    # the headline is what the node itself writes: the network's findings where given
    head_name = "network" if "network" in by_source else "simulated_measurement"
    head = by_source[head_name]
    result = {
        "cases": head["cases"],
        "data": "synthetic cases (models.synthetic_clinical); headline numbers: "
        + SOURCES[head_name],
        "headline_findings_source": head_name,
        "completeness": head["completeness"],
        "completeness_definition": "models.evaluation.text.compare_findings: reference disease "
        "mentions (asserted; 'possible' is uncertain, not asserted) and lesion sizes (matched "
        "within max(2 mm, 10 %)) found in the generated report",
        "unsupported_sentences": head["unsupported_sentences"],
        "readability": head["readability"],
        "completeness_by_findings_source": {k: v["completeness"] for k, v in by_source.items()},
        "unsupported_sentences_by_findings_source": {
            k: v["unsupported_sentences"] for k, v in by_source.items()
        },
        "report_generation_failures_by_findings_source": {
            k: v["missed_items_that_are_report_generation_failures"] for k, v in by_source.items()
        },
        "by_findings_source": by_source,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    summary = {k: v for k, v in result.items() if k != "by_findings_source"}
    summary["missed_items_by_cause"] = {k: v["missed_items_by_cause"] for k, v in by_source.items()}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
