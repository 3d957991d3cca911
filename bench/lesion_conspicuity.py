# ruff: noqa: E402
"""Which lesions the shipped bundle finds, against how far each stands out in the image.

    .venv/bin/python bench/lesion_conspicuity.py DATASET [DATASET ...] [--bundle DIR]
        [--threads N] [--out bench/results/lesion_conspicuity.json]

``DATASET`` is a synthetic dataset written by ``hpb-node synth`` (as for
``bench/model_quality.py``). For every case the node's inference
(``models.inference.segment``) runs and is matched to the reference lesions
(``models.evaluation.detection.match_lesions``, the bench's rule). For each reference
lesion whose generated diameter is >= 10 mm, its conspicuity is
``models.inference.conspicuity`` on the **reference** masks: the median of the image in
the lesion minus the median of a ring of its reference organ 2-3 voxels around it
(other lesions left out), in robust standard deviations of that ring, the measure the
bundle's ``min_conspicuity`` step uses. The JSON lists every such lesion (case,
modality, phase, disease, diameter, found, conspicuity) and, per dataset, how many
were found and missed by |conspicuity| < 1, 1-2 and >= 2.

All of it is on **synthetic** data: it says how visible the generator draws the
lesions the network misses, not how a scanner shows them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model_quality import _volume

from models.bundle import load_bundle
from models.case import CaseTruth
from models.evaluation.detection import match_lesions
from models.inference import conspicuity, segment
from models.measure import lesion_boxes, padded_box
from models.nifti import load_nifti_krc
from models.synthetic.labels import LABEL_OF_ORGAN

BINS = (("under_1", 0.0, 1.0), ("1_to_2", 1.0, 2.0), ("2_or_more", 2.0, float("inf")))


def dataset_lesions(dataset: Path, bundle: Any, net: Any) -> list[dict[str, Any]]:
    rows = [
        json.loads(x) for x in (dataset / "manifest.jsonl").read_text().splitlines() if x.strip()
    ]
    out: list[dict[str, Any]] = []
    for row in rows:
        image, affine = load_nifti_krc(dataset / row["image"])
        organs = np.asarray(load_nifti_krc(dataset / row["label"])[0])
        lesions = np.asarray(load_nifti_krc(dataset / row["lesions"])[0]).astype(np.int32)
        truth = CaseTruth.from_json(json.loads((dataset / row["truth"]).read_text()))
        seg = segment(_volume(image, affine, row["modality"], row["case_id"]), bundle, network=net)
        det = match_lesions(row["case_id"], seg.lesion_instances, lesions, affine, measure=False)
        found = {m.ref for m in det.matches}
        boxes = lesion_boxes(lesions)
        for les in truth.lesions:
            if les.diameter_mm < 10.0:
                continue
            z = None  # a lesion without voxels in the mask is listed, without a measure
            if les.number in boxes:
                box = padded_box(boxes[les.number], lesions.shape, 4)
                organ = (organs[box] == LABEL_OF_ORGAN[les.organ]) & (lesions[box] == 0)
                z = conspicuity(np.asarray(image)[box], lesions[box] == les.number, organ)
            out.append(
                {
                    "dataset": dataset.name,
                    "case_id": row["case_id"],
                    "modality": row["modality"],
                    "phase": row["phase"],
                    "organ": les.organ.value,
                    "disease": les.disease.value if les.disease is not None else None,
                    "diameter_mm": les.diameter_mm,
                    "found": les.number in found,
                    "conspicuity": None if z is None else round(z, 2),
                }
            )
        print(row["case_id"], flush=True)
    return out


def summary(lesions: list[dict[str, Any]]) -> dict[str, Any]:
    def count(found: bool, lo: float, hi: float) -> int:
        return sum(
            1
            for x in lesions
            if x["found"] is found
            and x["conspicuity"] is not None
            and lo <= abs(x["conspicuity"]) < hi
        )

    return {
        "lesions_10mm": len(lesions),
        "found": sum(x["found"] for x in lesions),
        "missed": sum(not x["found"] for x in lesions),
        "missed_by_abs_conspicuity": {name: count(False, lo, hi) for name, lo, hi in BINS},
        "found_by_abs_conspicuity": {name: count(True, lo, hi) for name, lo, hi in BINS},
        "no_conspicuity": sum(x["conspicuity"] is None for x in lesions),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("datasets", type=Path, nargs="+")
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "lesion_conspicuity.json"
    )
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle)
    net = bundle.network()
    per: dict[str, list[dict[str, Any]]] = {
        d.name: dataset_lesions(d, bundle, net) for d in args.datasets
    }
    result = {
        "data": "synthetic generator cases (hpb-node synth); conspicuity on the reference masks "
        "(models.inference.conspicuity); found: models.evaluation.detection.match_lesions "
        "against models.inference.segment",
        "model": f"{bundle.name} {bundle.version} {bundle.weights_sha256[:12]}",
        "datasets": {name: summary(rows) for name, rows in per.items()},
        "lesions": [x for rows in per.values() for x in rows],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result["datasets"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
