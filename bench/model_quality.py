# ruff: noqa: E402
"""Measure the shipped segmentation bundle with the project's own code.

    .venv/bin/python bench/model_quality.py --heldout DATASET [--bundle DIR]
        [--shared ../shared/data] [--out bench/results/model_quality.json]

``DATASET`` is a synthetic dataset written by ``hpb-node synth`` with seeds that
were not used for training (the demo weights were trained on seeds 0-239; the
held-out set is seeds 1000-1019: ``hpb-node synth --out D -n 20 --seed 1000
--shape 80 144 144 --spacing 4 2.5 2.5 --mr-share 0.2 --no-dicom``).

Everything runs through ``models.inference.segment`` (the node's inference
pipeline, post-processing included) on the source grid; metrics are
``models.evaluation``'s Dice (``segmentation.dice``) and lesion matching
(``detection.match_lesions``: IoU >= 0.1 or centroid within the reference's
equivalent-sphere radius, one-to-one). Lesion sensitivity counts reference
lesions whose generated diameter (``CaseTruth`` ``diameter_mm``) is >= 10 mm;
false positives are all unmatched predicted lesions, per case.
``lesion_measurement_10mm`` covers the matched lesions >= 10 mm: the model's long
axis against the reference mask's (``detection.longest_axial_diameter_mm``; "within
tolerance" is the report check's rule, ``models.evaluation.text.sizes_within``:
2 mm or 10 % of the larger) and their Dice.
``reported_long_axis_10mm`` compares the long axis the node reports for them
(``models.inference.findings_from_segmentation``, sub-voxel where the bundle
redraws lesion outlines) with the diameter the generator drew.

Results on ``synthetic`` are numbers on synthetic data. ``real_ct`` and
``real_mr`` are the TotalSegmentator example cases in ``../shared/data``
(reference = TotalSegmentator output, not a radiologist); ``in_training`` says
whether the case was in the training manifest.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.backends import organ_masks_from_totalseg_dir, organ_masks_from_totalseg_labelmap
from models.bundle import load_bundle
from models.case import CaseTruth
from models.evaluation.detection import match_lesions
from models.evaluation.segmentation import dice
from models.evaluation.text import sizes_within
from models.inference import findings_from_segmentation, segment
from models.nifti import load_nifti_krc
from models.synthetic.labels import LABEL_OF_ORGAN
from models.vocab import Organ
from models.volume import Volume

ORGANS = (Organ.LIVER, Organ.PANCREAS, Organ.GALLBLADDER)


def _volume(array: np.ndarray, affine: np.ndarray, modality: str, uid: str) -> Volume:
    return Volume(
        array=array.astype(np.float32),
        affine=affine,
        sop_instance_uids=tuple(f"{uid}.{i}" for i in range(array.shape[0])),
        modality=modality,
        series_instance_uid=uid,
        study_instance_uid=uid,
        frame_of_reference_uid=uid,
    )


def synthetic(dataset: Path, bundle_dir: Path | None) -> dict[str, Any]:
    bundle = load_bundle(bundle_dir)
    net = bundle.network()
    rows = [
        json.loads(x) for x in (dataset / "manifest.jsonl").read_text().splitlines() if x.strip()
    ]
    per_organ: dict[str, list[float]] = {o.value: [] for o in ORGANS}
    n_ref10 = n_found10 = 0
    fps: list[int] = []
    # matched lesions >= 10 mm: (model, reference mask) long axes, and Dice
    mask_axis: list[tuple[float, float]] = []
    lesion_dice: list[float] = []
    node_axis: list[tuple[float, float]] = []  # (reported long axis, generated diameter)
    cases = []
    for row in rows:
        image, affine = load_nifti_krc(dataset / row["image"])
        organs, _ = load_nifti_krc(dataset / row["label"])
        lesions, _ = load_nifti_krc(dataset / row["lesions"])
        truth = CaseTruth.from_json(json.loads((dataset / row["truth"]).read_text()))
        t0 = time.perf_counter()
        volume = _volume(image, affine, row["modality"], row["case_id"])
        seg = segment(volume, bundle, network=net)
        seconds = time.perf_counter() - t0
        case: dict[str, Any] = {"case_id": row["case_id"], "modality": row["modality"], "dice": {}}
        for organ in ORGANS:
            # the reference organ includes the lesions inside it, as the model's masks do
            ref = np.asarray(organs) == LABEL_OF_ORGAN[organ]
            d = dice(seg.organ_masks[organ], ref)
            per_organ[organ.value].append(d)
            case["dice"][organ.value] = round(d, 4)
        det = match_lesions(
            row["case_id"],
            seg.lesion_instances,
            np.asarray(lesions),
            affine,
            confidences=seg.lesion_confidence,
        )
        matched = {m.ref for m in det.matches}
        big = [les.number for les in truth.lesions if les.diameter_mm >= 10.0]
        for fig in det.per_lesion:
            if fig["ref_label"] in big:
                mask_axis.append((float(fig["diameter_pred_mm"]), float(fig["diameter_ref_mm"])))
                lesion_dice.append(float(fig["dice"]))
        # the long axis the node reports (its findings: sub-voxel where the bundle
        # redraws outlines) against the diameter the generator drew
        generated = {les.number: les.diameter_mm for les in truth.lesions}
        if det.matches:
            reported = {
                f.number: f.long_axis.length_mm
                for f in findings_from_segmentation(volume, seg, bundle).lesions
            }
            for m in det.matches:
                if m.ref in big and m.pred in reported:
                    node_axis.append((reported[m.pred], generated[m.ref]))
        n_ref10 += len(big)
        n_found10 += sum(1 for n in big if n in matched)
        fps.append(len(det.false_positives))
        case.update(
            lesions_ref=len(truth.lesions),
            lesions_ref_10mm=len(big),
            found_10mm=sum(1 for n in big if n in matched),
            false_positives=len(det.false_positives),
            seconds=round(seconds, 2),
        )
        cases.append(case)
        print(json.dumps(case), flush=True)
    return {
        "data": "synthetic (models.synthetic generator, held-out seeds)",
        "cases": len(rows),
        "dice": {k: round(float(np.mean(v)), 4) for k, v in per_organ.items()},
        "dice_min": {k: round(float(np.min(v)), 4) for k, v in per_organ.items()},
        "lesion_sensitivity_10mm": round(n_found10 / n_ref10, 4) if n_ref10 else None,
        "lesions_10mm": n_ref10,
        "lesions_10mm_found": n_found10,
        "fp_per_case": round(float(np.mean(fps)), 3),
        "lesion_measurement_10mm": _measurement(mask_axis, lesion_dice),
        "reported_long_axis_10mm": _reported(node_axis),
        "per_case": cases,
    }


def _axis_figures(pairs: list[tuple[float, float]]) -> dict[str, Any]:
    """(measured, reference) long axes: how many agree within the report check's
    tolerance (``models.evaluation.text.sizes_within``: 2 mm or 10 %), the mean error
    and the median absolute error."""
    err = np.asarray([a - b for a, b in pairs])
    return {
        "within_tolerance": sum(sizes_within(a, b) for a, b in pairs),
        "error_mm_mean": round(float(err.mean()), 2),
        "abs_error_mm_median": round(float(np.median(np.abs(err))), 2),
    }


def _measurement(axes: list[tuple[float, float]], lesion_dice: list[float]) -> dict[str, Any]:
    """Matched lesions >= 10 mm: the model's long axis against the reference mask's,
    and their Dice."""
    if not axes:
        return {"matched": 0}
    fig = _axis_figures(axes)
    return {
        "matched": len(axes),
        "long_axis_within_tolerance": fig["within_tolerance"],
        "long_axis_error_mm_mean": fig["error_mm_mean"],
        "long_axis_abs_error_mm_median": fig["abs_error_mm_median"],
        "dice_mean": round(float(np.mean(lesion_dice)), 4),
    }


def _reported(pairs: list[tuple[float, float]]) -> dict[str, Any]:
    """Matched lesions >= 10 mm: the long axis the node reports against the diameter
    the generator drew."""
    if not pairs:
        return {"matched": 0}
    return {"matched": len(pairs), **_axis_figures(pairs)}


def real(shared: Path, bundle_dir: Path | None) -> dict[str, Any]:
    bundle = load_bundle(bundle_dir)
    net = bundle.network()
    # which sources the bundle was trained on (written by models.train.export)
    sources = " ".join(bundle.metadata["hpb_node"].get("training", {}).get("cases", {}))
    out: dict[str, Any] = {}
    ct, ct_aff = load_nifti_krc(shared / "ct_abdomen_3mm" / "ct.nii.gz")
    ref_ct = organ_masks_from_totalseg_dir(shared / "ct_abdomen_3mm" / "labels", ct.shape)
    mr, mr_aff = load_nifti_krc(shared / "mr_abdomen_3mm" / "mr.nii.gz")
    lab_mr, _ = load_nifti_krc(shared / "mr_abdomen_3mm" / "labels.nii.gz")
    ref_mr = organ_masks_from_totalseg_labelmap(lab_mr)
    for key, img, aff, mod, ref in (
        ("real_ct", ct, ct_aff, "CT", ref_ct),
        ("real_mr", mr, mr_aff, "MR", ref_mr),
    ):
        seg = segment(_volume(img, aff, mod, key), bundle, network=net)
        out[key] = {
            "data": f"TotalSegmentator example {mod} in ../shared/data (reference: TotalSegmentator output)",
            "dice": {o.value: round(dice(seg.organ_masks[o], ref[o]), 4) for o in ORGANS},
            # the reference marks no lesions: every reported lesion is unconfirmed
            "lesions_reported": len(seg.lesion_organs),
            "in_training": f"totalsegmentator-example {mod} (train)" in sources,
        }
        print(key, json.dumps(out[key]), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heldout", type=Path, required=True)
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "model_quality.json")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle)
    result: dict[str, Any] = {
        "model": {
            "name": bundle.name,
            "version": bundle.version,
            "weights_sha256": bundle.weights_sha256,
            # declared in the bundle (configs/metadata.json hpb_node): how labels are made
            "postprocess": bundle.postprocess.to_json(),
            "min_lesion_ml": bundle.min_lesion_ml,
            "overlap": bundle.overlap,
        },
        "targets_synthetic": {
            "dice": {"liver": 0.95, "pancreas": 0.75, "gallbladder": 0.80},
            "lesion_sensitivity_10mm": 0.90,
        },
        "method": "models.inference.segment on the source grid; models.evaluation dice and match_lesions",
        "synthetic": synthetic(args.heldout, args.bundle),
    }
    result.update(real(args.shared, args.bundle))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
