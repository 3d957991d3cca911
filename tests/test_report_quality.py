"""Report completeness by stage: the report generator alone states every reference
finding; what the benchmark misses is put down to detection or the classifier."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.case import CaseTruth
from models.evaluation.text import compare_findings
from models.findings import Findings
from models.labs import context_from_labs
from models.report import check_report, with_diagnoses_and_report
from models.synthetic_clinical import (
    measured_findings,
    reference_findings,
    sample_truth,
    synthesize_clinical,
)
from models.vocab import Disease

ROOT = Path(__file__).resolve().parents[1]


class TrueDiagnoses:
    meta: dict[str, str] = {"classifier": "truth"}  # noqa: RUF012

    def __init__(self, truth: CaseTruth) -> None:
        self.truth = truth

    def predict(self, findings: Findings, clinical: Any) -> dict[Disease, float]:
        return {d: float(d in self.truth.diseases) for d in Disease}

    def evidence(self, findings: Findings, clinical: Any, disease: Disease) -> tuple[str, ...]:
        return ()


@pytest.mark.parametrize("seed", range(300_000, 300_030))
def test_report_generator_alone_states_every_reference_finding(seed: int) -> None:
    truth = sample_truth(seed)
    clin = synthesize_clinical(truth)
    ctx = context_from_labs(clin.labs, history=clin.history, age=truth.age, sex=truth.sex)
    out = with_diagnoses_and_report(reference_findings(truth), ctx, model=TrueDiagnoses(truth))
    text = out.report_text("findings") + " " + out.report_text("impression")
    cmp = compare_findings(text, clin.reference_report)
    assert cmp["missed_diseases"] == [], text
    assert np.isnan(cmp["completeness"]) or cmp["completeness"] == 1.0, (text, cmp)
    assert cmp["contradictions"] == []
    assert check_report(out) == []


def test_similar_sizes_do_not_take_each_others_match() -> None:
    """Sizes are matched one-to-one by a maximum matching: 38 pairs with one 42, 42 with
    the other and 40 with 44 (closest-pair-first matching would leave 44 unmatched)."""
    ref = "FINDINGS: Liver: mass, 42 mm. Liver: mass, 42 mm. Liver: mass, 44 mm. IMPRESSION: x."
    cand = "Lesion 1: 38 x 30 mm mass. Lesion 2: 42 x 30 mm mass. Lesion 3: 40 x 30 mm mass."
    cmp = compare_findings(cand, ref)
    assert cmp["completeness"] == 1.0 and cmp["correctness"] == 1.0
    far = compare_findings("Lesion 1: 30 x 20 mm mass.", ref)
    assert far["completeness"] == 0.0


def test_reference_findings_are_the_truth() -> None:
    truth = next(t for t in map(sample_truth, range(300_000, 300_100)) if len(t.lesions) >= 2)
    f = reference_findings(truth)
    assert [les.long_axis.length_mm for les in f.lesions] == [
        round(les.diameter_mm, 1) for les in truth.lesions
    ]
    assert [les.kind for les in f.lesions] == [les.kind for les in truth.lesions]
    assert f.extra["truth_lesion_of"] == {les.number: les.number for les in truth.lesions}


def test_measured_lesions_are_linked_to_the_truth() -> None:
    linked = missed = 0
    for seed in range(300_000, 300_200):
        truth = sample_truth(seed)
        f = measured_findings(truth, np.random.default_rng(seed))
        link = f.extra["truth_lesion_of"]
        assert set(link) == {les.number for les in f.lesions}
        by_number = {les.number: les for les in truth.lesions}
        for les in f.lesions:
            t = link[les.number]
            if t == 0:  # a simulated false positive
                continue
            linked += 1
            assert by_number[t].organ == les.organ
            assert (
                abs(les.long_axis.length_mm - by_number[t].diameter_mm)
                < 0.4 * by_number[t].diameter_mm
            )
        missed += len(truth.lesions) - sum(1 for t in link.values() if t)
    assert linked > 100 and missed > 0  # both kinds occur in 200 cases


def test_report_quality_results_name_their_sources() -> None:
    res = json.loads((ROOT / "bench" / "results" / "report_quality.json").read_text())
    for key in ("cases", "completeness", "unsupported_sentences", "readability"):
        assert key in res
    assert res["cases"] == 50
    by = res["completeness_by_findings_source"]
    # the headline is the node's own path (the network's findings) where it was run
    head = res["headline_findings_source"]
    assert head == ("network" if "network" in by else "simulated_measurement")
    assert by[head] == res["completeness"]
    assert res["by_findings_source"][head]["data"] in res["data"]
    # the report generator alone: every reference item stated
    assert by["reference_findings_and_diagnoses"] == 1.0
    assert all(v == 0 for v in res["unsupported_sentences_by_findings_source"].values())
    causes = res["by_findings_source"]["simulated_measurement"]["missed_items_by_cause"]
    assert sum(causes.values()) > 0 and all(": report" not in k for k in causes)


def test_report_misses_bench_states_each_lesion_as_its_record_does(tmp_path: Path) -> None:
    """bench/report_misses.py on two of the report bench's records: every reference
    lesion is listed with the status its record gives (not matched: detection; matched
    but no long axis within max(2 mm, 10 %): measurement), with its medians on the
    reference masks; the committed results list the committed records' lesions with
    the same statuses."""
    import subprocess
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    from report_misses import status

    records_path = ROOT / "bench" / "results" / "report_network_cases.jsonl"
    records = [json.loads(x) for x in records_path.read_text().splitlines() if x.strip()]
    # a case with a missed and a mis-measured lesion, and one without either
    chosen = [r for r in records if r["truth"]["case_id"] in ("synth-700001", "synth-700002")]
    assert len(chosen) == 2
    rec = tmp_path / "two.jsonl"
    rec.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    out = tmp_path / "misses.json"
    script = ROOT / "bench" / "report_misses.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--records", str(rec), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert res["cases"] == 2 and res["model"] == chosen[0]["model"]
    listed = [(x["case_id"], x["lesion"], x["status"]) for x in res["lesions"]]
    expected = [
        (r["truth"]["case_id"], les["number"], status(les, r)[0])
        for r in chosen
        for les in r["truth"]["lesions"]
    ]
    assert listed == expected and len(listed) == res["summary"]["lesions"]
    assert {s for _, _, s in listed} >= {"ok", "detection"}
    # a missed lesion is matched by no measured lesion of its record
    for case_id, number, state in listed:
        r = next(x for x in chosen if x["truth"]["case_id"] == case_id)
        matched = [x for x in r["lesions"] if x["truth_lesion"] == number]
        assert (state == "detection") == (not matched)
    assert all(x["core"] is not None and x["smoothed_core_z"] is not None for x in res["lesions"])
    # a gallstone stands far above the bile around it
    stones = [x for x in res["lesions"] if x["disease"] == "cholelithiasis"]
    assert stones and all(x["smoothed_core_z"] > 3 for x in stones)
    committed = json.loads((ROOT / "bench" / "results" / "report_misses.json").read_text())
    assert committed["model"] == records[0]["model"]
    assert [(x["case_id"], x["lesion"], x["status"]) for x in committed["lesions"]] == [
        (r["truth"]["case_id"], les["number"], status(les, r)[0])
        for r in records
        for les in r["truth"]["lesions"]
    ]
