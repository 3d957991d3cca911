# ruff: noqa: E402
"""Evaluate the shipped model on synthetic cases: the evaluation harness out of the box.

    .venv/bin/python bench/evaluation_demo.py [--cases 16] [--seed0 7000] [--bootstrap 2000]

Writes ``bench/results/evaluation_demo.json`` and ``evaluation_demo.html``.

**Data: synthetic** (``models.synthetic.generate_case``); reference masks, diagnoses
and reference reports come from the generator's truth
(``models.synthetic_clinical.synthesize_clinical`` for labs, history and the
reference report). Every number here is a number on synthetic data.

What is evaluated depends on what the repository ships (the JSON's ``note`` says
which path ran):

* segmentation + lesions: ``models.inference.analyse`` with the shipped bundle,
  when its weights are present; otherwise no segmentation is evaluated;
* diagnoses: the shipped fusion classifier (``models/fusion_weights``) on the
  segmentation's findings, or, without segmentation weights, on
  ``measured_findings`` (ground truth plus measurement noise: a stand-in);
* report: ``models.report.with_diagnoses_and_report`` (fusion diagnoses and the
  grounded template draft, as the node runs them).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.evaluation import (
    EvaluationSet,
    Options,
    Threshold,
    check_thresholds,
    evaluate,
    write_outputs,
)
from models.evaluation.adapters import add_diagnosis_truth, add_findings, reference_from_truth
from models.evaluation.dataset import DiagnosisTable
from models.evaluation.text import StructuredResult
from models.labs import context_from_labs
from models.nifti import save_nifti_krc
from models.report import with_diagnoses_and_report
from models.series_writer import derived_uid
from models.synthetic import ORGAN_LABELS, generate_case
from models.synthetic_clinical import measured_findings, synthesize_clinical
from models.volume import Volume

DEMO_THRESHOLDS = ("dice.liver>=0.85", "auroc.cirrhosis>=0.7", "lesion.sensitivity>=0.5")


BUNDLE_OVERRIDE: list[Path] = []
SHARED = ROOT.parent / "shared" / "data"
MR_LABELS = {
    1: "spleen",
    2: "kidney_right",
    3: "kidney_left",
    4: "gallbladder",
    5: "liver",
    7: "pancreas",
    25: "portal_vein_and_splenic_vein",
}


def real_data(bundle: Any, opt: Options) -> dict[str, Any]:
    """The model on the shared real CT and MR against their TotalSegmentator labels
    (model output themselves, not a radiologist's: see the data README)."""
    from models.evaluation.adapters import masks_from_findings, volume_from_image
    from models.evaluation.dataset import CaseMasks
    from models.inference import analyse
    from models.nifti import load_nifti_krc
    from models.vocab import Organ

    organs = {o.value for o in Organ}
    out: dict[str, Any] = {}
    for name, image, modality in (
        ("ct_abdomen_3mm", SHARED / "ct_abdomen_3mm" / "ct.nii.gz", "CT"),
        ("mr_abdomen_3mm", SHARED / "mr_abdomen_3mm" / "mr.nii.gz", "MR"),
    ):
        if not image.is_file():
            continue
        volume = volume_from_image(image, modality)
        t = time.perf_counter()
        findings = analyse(volume, bundle)
        seconds = time.perf_counter() - t
        refm = CaseMasks(volume.affine, volume.shape)
        if modality == "CT":
            for f in sorted((SHARED / name / "labels").glob("*.nii.gz")):
                organ = f.name[: -len(".nii.gz")]
                if organ in organs:
                    arr, _ = load_nifti_krc(f)
                    refm.structures[organ] = arr > 0
        else:
            lab, _ = load_nifti_krc(SHARED / name / "labels.nii.gz")
            for value, organ in MR_LABELS.items():
                refm.structures[organ] = lab == value
        ref = EvaluationSet(
            masks={name: refm}, source=f"../shared/data/{name} (TotalSegmentator labels)"
        )
        res = EvaluationSet(
            masks={name: masks_from_findings(findings, volume.affine)}, source="shipped model"
        )
        seg = evaluate(ref, res, opt)["segmentation"]
        out[name] = {
            "modality": modality,
            "inference_s": seconds,
            "per_case": seg["per_case"],
            "lesions_predicted": len(findings.lesions),
        }
    return out


def _bundle() -> Any:
    try:
        from models.bundle import load_bundle

        return load_bundle(BUNDLE_OVERRIDE[0]) if BUNDLE_OVERRIDE else load_bundle()
    except Exception as exc:  # no shipped weights yet, or an unusable bundle: said in the note
        print(f"segmentation bundle not usable: {exc}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cases", type=int, default=16)
    ap.add_argument("--seed0", type=int, default=7000)
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--bundle", type=Path, help="another bundle than the shipped one (testing)")
    args = ap.parse_args(argv)
    if args.bundle:
        BUNDLE_OVERRIDE.append(args.bundle)
    import torch

    torch.set_num_threads(2)
    from models.fusion import DEFAULT_WEIGHTS, FusionModel

    opt = Options(n_bootstrap=args.bootstrap)
    bundle = _bundle()
    fusion = FusionModel.load(DEFAULT_WEIGHTS)
    seeds = range(args.seed0, args.seed0 + args.cases)
    ref = EvaluationSet(
        truth=DiagnosisTable(), source=f"synthetic generator, seeds {seeds.start}-{seeds.stop - 1}"
    )
    res = EvaluationSet(source="shipped model")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            case = generate_case(seed)
            cid = case.truth.case_id
            clin = synthesize_clinical(case.truth)
            ref.masks[cid] = reference_from_truth(
                cid,
                case.affine,
                case.organ_labels,
                case.lesion_labels,
                {v: str(o) for v, o in ORGAN_LABELS.items()},
            )
            add_diagnosis_truth(ref.truth, cid, case.truth.diseases)  # type: ignore[arg-type]
            ref.reports[cid] = clin.reference_report
            img = Path(tmp) / f"{cid}.nii.gz"
            save_nifti_krc(case.image, case.affine, img)
            ref.images[cid] = img
            if bundle is not None:
                from models.inference import analyse

                uid = derived_uid("evaluation-demo", cid)
                volume = Volume(
                    array=case.image,
                    affine=case.affine,
                    sop_instance_uids=tuple(
                        derived_uid(uid, str(k)) for k in range(case.image.shape[0])
                    ),
                    modality=case.modality,
                    series_instance_uid=uid,
                    study_instance_uid=derived_uid(uid, "study"),
                    frame_of_reference_uid=derived_uid(uid, "for"),
                )
                findings = analyse(volume, bundle)
            else:
                findings = measured_findings(case.truth, np.random.default_rng(seed + 10_000_019))
            ctx = context_from_labs(
                clin.labs, history=clin.history, age=case.truth.age, sex=case.truth.sex
            )
            # fusion diagnoses + grounded template report (models.report), as the node runs them
            full = with_diagnoses_and_report(findings, ctx, model=fusion)
            if bundle is not None:
                add_findings(res, cid, full, case.affine, threshold=opt.threshold)
            else:  # measured_findings' masks are placeholders: everything but masks
                for dx in full.diagnoses:
                    res.probabilities[(cid, dx.disease)] = float(dx.probability)
                res.reports[cid] = " ".join(s.text for s in full.report)
                res.structured[cid] = StructuredResult(
                    frozenset(
                        dx.disease for dx in full.diagnoses if dx.probability >= opt.threshold
                    ),
                    tuple(float(les.long_axis.length_mm) for les in full.lesions),
                )
        result = evaluate(ref, res, opt)
        notes = ["all numbers are on SYNTHETIC cases (models.synthetic.generate_case)"]
        notes.append(
            f"segmentation: models.inference.analyse with bundle {bundle.name} {bundle.version}"
            if bundle is not None
            else "segmentation NOT evaluated: the shipped segmentation weights were not in the repository when this ran"
        )
        notes.append(
            "diagnoses: shipped fusion classifier (models/fusion_weights) on "
            + (
                "the segmentation's findings"
                if bundle is not None
                else "measured_findings (truth + measurement noise, a stand-in for segmentation)"
            )
        )
        notes.append("report: models.report.with_diagnoses_and_report (grounded template draft)")
        if bundle is not None:
            result["real_data"] = real_data(bundle, opt)
            notes.append(
                "real_data: the model on ../shared/data's real CT and MR against their "
                "TotalSegmentator labels (themselves model output, not a radiologist's)"
            )
        result["note"] = "; ".join(notes)
        result["runtime_s"] = time.perf_counter() - t0
        check_thresholds(result, [Threshold.parse(t) for t in DEMO_THRESHOLDS])
        json_path, html_path = write_outputs(
            result,
            ref,
            res,
            args.out,
            title="hpb-node evaluation demo (synthetic)",
            stem="evaluation_demo",
        )
    print(json.dumps({k: v for k, v in result["summary"].items()}, indent=1, default=str)[:3000])
    print(result["note"])
    print(f"wrote {json_path} and {html_path} in {result['runtime_s']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
