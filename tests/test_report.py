"""Grounded report: template drafting, the consistency check, composition, LLM rephrasing.

The language-model endpoint is a *fake* OpenAI-compatible server on loopback
(no language model runs here): it returns canned rephrasings, some of which
break the facts on purpose, to show that the same check guards that path.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest

from models.findings import (
    Axis,
    ClinicalValue,
    Diagnosis,
    Findings,
    LesionFinding,
    OrganFinding,
    Provenance,
    ReportSentence,
)
from models.labs import ClinicalContext, context_from_labs
from models.report import (
    check_report,
    check_sentence,
    draft_report,
    rephrase,
    with_diagnoses_and_report,
)
from models.vocab import Disease, LesionKind, Organ, SubSite

MASK = np.zeros((2, 2, 2), dtype=bool)


def base_findings(diagnoses: tuple[Diagnosis, ...] = ()) -> Findings:
    organs = (
        OrganFinding(Organ.LIVER, MASK, 1480.0, 102.0, 12.0, qualities={"contour_nodularity": 0.7}),
        OrganFinding(Organ.SPLEEN, MASK, 420.0, 110.0),
        OrganFinding(Organ.PANCREAS, MASK, 70.0, 98.0, qualities={"duct_diameter_mm": 2.1}),
        OrganFinding(Organ.GALLBLADDER, MASK, 30.0, 8.0, qualities={"wall_mm": 2.0}),
        OrganFinding(Organ.BILE_DUCT, MASK, 1.0, None, qualities={"cbd_mm": 5.0}),
    )
    lesion = LesionFinding(
        number=1,
        organ=Organ.LIVER,
        kind=LesionKind.MASS,
        mask=MASK,
        volume_ml=20.0,
        long_axis=Axis((0, 0, 0), (0, 0, 1), 36.0),
        short_axis=Axis((0, 0, 0), (0, 1, 0), 28.0),
        key_slice=0,
        centroid_lps=(0.0, 0.0, 0.0),
        sub_site=SubSite.COUINAUD_VII,
        mean_intensity=74.0,
    )
    prov = Provenance(
        "m",
        "1",
        "",
        "p",
        "1.2.3",
        (),
        clinical_used=(ClinicalValue("AFP", "1834-1", 412.0, "ng/mL", None, "fhir"),),
    )
    return Findings(organs, (lesion,), diagnoses, (), prov)


DX = (
    Diagnosis(Disease.HCC, 0.91, ("lesion:1",)),
    Diagnosis(Disease.CIRRHOSIS, 0.83),
    Diagnosis(Disease.LIVER_METASTASIS, 0.27),
    Diagnosis(Disease.PDAC, 0.02),
)


def test_template_report_is_grounded_and_complete() -> None:
    f = base_findings(DX)
    report = draft_report(f)
    assert check_report(f, report) == []
    text = " ".join(s.text for s in report)
    lesion = next(s for s in report if s.text.startswith("Lesion 1"))
    assert (
        "36 x 28 mm" in lesion.text
        and "segment VII" in lesion.text
        and "hypoattenuating" in lesion.text
    )
    assert set(lesion.finding_ids) == {"lesion:1", "organ:liver"}
    assert "nodular" in text and "(enlarged)" in text and "AFP 412 ng/mL (high)" in text
    impression = [s for s in report if s.section == "impression"]
    assert impression[0].text.startswith(
        "1. Most consistent with hepatocellular carcinoma (probability 0.91)"
    )
    assert impression[2].text.startswith("3. Possible liver metastasis")
    assert "pancreatic ductal adenocarcinoma" not in text  # 0.02: not named
    advice = [s for s in impression if "recommended" in s.text]
    assert len(advice) == 1 and advice[0].finding_ids == ("dx:hepatocellular_carcinoma",)


@pytest.mark.parametrize(
    ("text", "ids", "problem"),
    [
        ("Lesion 1: 37 x 28 mm mass in liver segment VII.", ("lesion:1",), "number 37"),
        ("Lesion 1: 3.6 cm mass in liver segment VII.", ("lesion:1",), None),
        ("Lesion 1: 36 x 28 mm mass in liver segment VI.", ("lesion:1",), "segment VI"),
        ("Lesion 1: 36 x 28 mm mass in the pancreas.", ("lesion:1",), "pancreas"),
        ("Lesion 1: 36 x 28 mm cyst in liver segment VII.", ("lesion:1",), "cyst"),
        (
            "Lesion 1: 36 x 28 mm hyperattenuating mass.",
            ("lesion:1", "organ:liver"),
            "hyperattenuating",
        ),
        ("Lesion 2: 36 x 28 mm mass.", ("lesion:1",), "lesion 2"),
        ("Liver mass in segment VII, likely haemangioma.", ("lesion:1",), "haemangioma"),
        (
            "Findings suggest pancreatic ductal adenocarcinoma.",
            ("dx:pancreatic_ductal_adenocarcinoma",),
            "names pancreatic",
        ),
        ("Biopsy of the liver is recommended.", ("dx:liver_metastasis",), "recommends"),
        ("The common bile duct measures 5 mm (dilated).", ("organ:bile_duct",), "dilated"),
        ("The common bile duct measures 5 mm (not dilated).", ("organ:bile_duct",), None),
        ("Spleen: volume 420 ml (enlarged).", ("organ:spleen",), None),
        ("Spleen: volume 420 ml (enlarged).", ("organ:liver",), "spleen"),
        ("No pancreatic ductal adenocarcinoma is seen.", ("organ:pancreas",), None),
        ("Lesion 1 shows washout.", ("lesion:9",), "unknown"),
    ],
)
def test_check_rejects_what_the_findings_do_not_support(
    text: str, ids: tuple[str, ...], problem: str | None
) -> None:
    f = base_findings(DX)
    problems = check_sentence(ReportSentence("findings", text, ids), f)
    if problem is None:
        assert problems == []
    else:
        assert problems and problem in " ".join(problems)


def test_with_diagnoses_and_report_carries_clinical_provenance() -> None:
    f = base_findings()
    clinical = context_from_labs(
        {"AFP": 412.0, "HBSAG": 1.0, "PLT": 90.0, "ALB": 2.9},
        history="Known chronic hepatitis B. Cirrhosis under surveillance.",
        age=64,
        sex="M",
    )
    out = with_diagnoses_and_report(f, clinical)
    assert {d.disease for d in out.diagnoses} == set(Disease)
    probs = {d.disease: d.probability for d in out.diagnoses}
    assert probs[Disease.HCC] > 0.5 and probs[Disease.HCC] > probs[Disease.PDAC]
    used = {v.name: v for v in out.provenance.clinical_used}
    assert used["AFP"].value == 412.0 and used["age"].value == 64.0 and used["sex"].value == "M"
    assert "hepatitis_b" in str(used["history"].value)
    assert "Known chronic" not in str(used["history"].value)  # concepts, not the free text
    assert (
        "CA19-9" in out.provenance.clinical_missing and "AFP" not in out.provenance.clinical_missing
    )
    assert check_report(out) == [] and out.report
    lab_sentence = next(s for s in out.report if s.text.startswith("Laboratory context"))
    assert "lab:1834-1" in lab_sentence.finding_ids
    hcc = next(d for d in out.diagnoses if d.disease == Disease.HCC)
    assert hcc.evidence and all(e in out.ids() for e in hcc.evidence)
    assert any("fusion" in n for n in out.provenance.notes)


def test_empty_clinical_context_reports_everything_missing() -> None:
    out = with_diagnoses_and_report(base_findings(), ClinicalContext())
    assert len(out.provenance.clinical_missing) == 16 and "AFP" in out.provenance.clinical_missing
    assert out.provenance.clinical_used == ()
    assert check_report(out) == []


# ---------------------------------------------------------------- fake LLM endpoint


class FakeOpenAI(ThreadingHTTPServer):
    """A FAKE OpenAI-compatible /chat/completions endpoint (no language model here)."""

    requests: list[dict[str, Any]]
    reply: Any


@pytest.fixture()
def fake_llm() -> Iterator[FakeOpenAI]:
    class Handler(BaseHTTPRequestHandler):
        server: FakeOpenAI

        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self.server.requests.append({"path": self.path, "body": body})
            items = json.loads(body["messages"][-1]["content"])
            content = self.server.reply(items)
            out = json.dumps(
                {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
            )
            data = out.encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = FakeOpenAI(("127.0.0.1", 0), Handler)
    server.requests = []
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server
    server.shutdown()
    server.server_close()
    t.join()


def test_rephrasing_must_pass_the_same_check(fake_llm: FakeOpenAI) -> None:
    f = base_findings(DX)
    report = draft_report(f)

    def reply(items: list[dict[str, Any]]) -> str:
        out = []
        for it in items:
            text = it["text"]
            if text.startswith("Lesion 1"):
                text = "In liver segment VII there is a 36 x 28 mm hypoattenuating mass (lesion 1)."
            elif text.startswith("Spleen"):
                text = "The spleen is enlarged at 520 ml."  # wrong number: must be rejected
            elif text.startswith("No calculus"):
                text = "Multiple gallstones are present."  # invented finding: rejected
            out.append({"id": it["id"], "text": text})
        return json.dumps(out)

    fake_llm.reply = reply
    url = f"http://127.0.0.1:{fake_llm.server_address[1]}/v1"
    sentences, notes = rephrase(f, report, url=url, model="fake")
    assert fake_llm.requests[0]["path"] == "/v1/chat/completions"
    assert fake_llm.requests[0]["body"]["model"] == "fake"
    by_ids = {s.finding_ids: s.text for s in sentences}
    assert by_ids[("lesion:1", "organ:liver")].startswith("In liver segment VII")
    assert by_ids[("organ:spleen",)].startswith("Spleen: volume 420 ml")  # template kept
    assert any("No calculus" in s.text for s in sentences)
    assert len(notes) == 2 and all("rejected" in n for n in notes)
    assert check_report(f, sentences) == []


def test_unusable_endpoints_keep_the_template(fake_llm: FakeOpenAI) -> None:
    f = base_findings(DX)
    report = draft_report(f)
    fake_llm.reply = lambda items: "not json at all"
    url = f"http://127.0.0.1:{fake_llm.server_address[1]}/v1"
    sentences, notes = rephrase(f, report, url=url)
    assert sentences == report and "template kept" in notes[0]
    from tests.conftest import free_port

    sentences, notes = rephrase(f, report, url=f"http://127.0.0.1:{free_port()}/v1", timeout_s=2)
    assert sentences == report and "ConnectError" in notes[0]


def test_composition_with_llm_url(fake_llm: FakeOpenAI) -> None:
    fake_llm.reply = lambda items: json.dumps(
        [{"id": it["id"], "text": it["text"]} for it in items]
    )
    url = f"http://127.0.0.1:{fake_llm.server_address[1]}/v1"
    out = with_diagnoses_and_report(base_findings(), context_from_labs({"AFP": 412.0}), llm_url=url)
    assert fake_llm.requests and check_report(out) == []


def test_report_on_real_ct_measurements(shared_data: Any) -> None:
    """Real CT (TotalSegmentator example) measured with models.measure: the report states
    the measured volumes and attenuation and passes the check."""
    from models.measure import ArrayGrid, measure_organ
    from models.nifti import load_nifti_krc

    base = shared_data / "ct_abdomen_3mm"
    ct, affine = load_nifti_krc(base / "ct.nii.gz")
    grid = ArrayGrid(ct, affine)
    organs = []
    for organ, name in (
        (Organ.LIVER, "liver"),
        (Organ.SPLEEN, "spleen"),
        (Organ.PANCREAS, "pancreas"),
        (Organ.GALLBLADDER, "gallbladder"),
    ):
        mask, _ = load_nifti_krc(base / "labels" / f"{name}.nii.gz")
        organs.append(measure_organ(grid, mask > 0, organ))
    prov = Provenance("real-ct-test", "0", "", "p", "1.2.3", ())
    findings = Findings(tuple(organs), (), (), (), prov)
    out = with_diagnoses_and_report(findings, context_from_labs({"ALT": 30.0}, age=60, sex="F"))
    assert check_report(out) == []
    liver = next(o for o in organs if o.organ == Organ.LIVER)
    assert liver.volume_ml == pytest.approx(1120, rel=0.05)  # 41,602 voxels x 27 mm3
    assert f"Liver: volume {liver.volume_ml:.0f} ml" in out.report_text("findings")
    assert "No focal liver lesion is detected." in out.report_text("findings")


def test_mr_findings_get_signal_wording_and_no_hu() -> None:
    from dataclasses import replace

    from models.fusion import image_features

    f = base_findings()
    mr = with_diagnoses_and_report(f, context_from_labs({"AFP": 412.0}), modality="MR")
    text = " ".join(s.text for s in mr.report)
    assert "HU" not in text and "mean signal 74" in text and "hypointense" in text
    assert mr.extra["modality"] == "MR" and check_report(mr) == []
    assert any(n.startswith("MR:") for n in mr.provenance.notes)
    # attenuation features are neutral on MR: the signal scale does not move them
    bright = replace(
        f,
        organs=tuple(replace(o, mean_intensity=(o.mean_intensity or 0) * 5) for o in f.organs),
        extra={"modality": "MR"},
    )
    assert np.allclose(image_features(bright), image_features(replace(f, extra={"modality": "MR"})))
    # ... while on CT they are used
    assert not np.allclose(image_features(replace(bright, extra={})), image_features(f))
    # an MR sentence that says HU-type words is rejected
    bad = ReportSentence(
        "findings", "Lesion 1: 36 x 28 mm hypoattenuating mass.", ("lesion:1", "organ:liver")
    )
    assert check_sentence(bad, mr)
