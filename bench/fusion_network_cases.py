"""Run the segmentation network on synthetic generator cases and keep its measurements.

    .venv/bin/python bench/fusion_network_cases.py --cases 300 [--first-seed 700000]
        [--out bench/results/fusion_network_cases.jsonl] [--bundle DIR] [--threads N]

For each seed: ``models.synthetic.generate_case`` (CT, 80 x 144 x 144 voxels at
4 x 2.5 x 2.5 mm, the grid of ``bench/model_quality.py``'s held-out set), then
``models.inference.analyse`` with the shipped bundle (the node's inference,
post-processing and measurement). One JSON line per case: the case truth, the
network's organ and lesion measurements and the seconds taken. The file is
appended to and cases already in it are skipped, so a run can be resumed; a file
whose records came from another bundle (name, version, weights) is refused, so
that one file never mixes two models' findings (after a bundle change, write new
files: ``bench/refit_fusion.sh`` does all of it).

``bench/fusion_ablation.py --network-cases FILE`` and
``bench/report_quality.py --network-cases FILE`` read it: image features (and
report findings) then come from the network, not from ground truth plus noise.
The demo weights (0.3.x) were trained on generator seeds 0-239; seeds from 700000 on
were never used to train them. Seeds 700000-700319 are the fusion ablation's and the
report bench's test cases; seeds 710000-710399
(``--out bench/results/fusion_train_network_cases.jsonl``) train the fusion heads
(``bench/fusion_ablation.py --network-train``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = (80, 144, 144)
SPACING = (4.0, 2.5, 2.5)


def model_id(bundle: Any) -> str:
    """How a record names the bundle that measured it: name, version, weights hash."""
    return f"{bundle.name} {bundle.version} {bundle.weights_sha256[:12]}"


class MixedModels(ValueError):
    """Records of more than one segmentation model in one file."""


def check_one_model(records: list[dict[str, Any]], path: Path, model: str | None = None) -> None:
    """Raise :class:`MixedModels` if ``records`` (of ``path``) come from more than one
    model, or from another than ``model``."""
    found = sorted({str(r.get("model")) for r in records})
    if len(found) > 1:
        raise MixedModels(f"{path}: records of several models ({', '.join(found)})")
    if model is not None and found and found[0] != model:
        raise MixedModels(
            f"{path} holds records of {found[0]}, not of {model}: write the new bundle's "
            "records to another file (--out) or remove this one"
        )


def case_record(seed: int, bundle: Any, net: Any) -> dict[str, Any]:
    from models.evaluation.detection import match_lesions
    from models.inference import analyse
    from models.synthetic.generator import generate_case
    from models.volume import Volume

    case = generate_case(seed, shape=SHAPE, spacing=SPACING, modality="CT")
    uid = f"2.25.{seed}"
    volume = Volume(
        array=case.image.astype(np.float32),
        affine=case.affine,
        sop_instance_uids=tuple(f"{uid}.{i}" for i in range(case.image.shape[0])),
        modality=case.modality,
        series_instance_uid=uid,
        study_instance_uid=uid,
        frame_of_reference_uid=uid,
    )
    t0 = time.perf_counter()
    findings = analyse(volume, bundle, network=net)
    seconds = time.perf_counter() - t0
    # which truth lesion each measured lesion is (the evaluation's matching; 0: a false
    # positive), so report_quality can tell a missed lesion from a mis-measured one
    instances = np.zeros(case.lesion_labels.shape, dtype=np.int32)
    for les in findings.lesions:
        instances[les.mask] = les.number
    det = match_lesions(str(seed), instances, case.lesion_labels, case.affine, measure=False)
    truth_of = {m.pred: m.ref for m in det.matches}
    return {
        "seed": seed,
        "truth": case.truth.to_json(),
        "seconds": round(seconds, 2),
        "model": model_id(bundle),
        "organs": [
            {
                "organ": o.organ.value,
                "volume_ml": round(float(o.volume_ml), 2),
                "mean": None if o.mean_intensity is None else round(float(o.mean_intensity), 2),
                "std": None if o.std_intensity is None else round(float(o.std_intensity), 2),
                "confidence": round(float(o.confidence), 3),
                "qualities": {k: round(float(v), 3) for k, v in o.qualities.items()},
            }
            for o in findings.organs
        ],
        "lesions": [
            {
                "number": les.number,
                "organ": les.organ.value,
                "kind": les.kind.value,
                "long_mm": round(float(les.long_axis.length_mm), 2),
                "short_mm": round(float(les.short_axis.length_mm), 2),
                "volume_ml": round(float(les.volume_ml), 3),
                "site": les.sub_site.value if les.sub_site is not None else None,
                "mean": None if les.mean_intensity is None else round(float(les.mean_intensity), 2),
                "confidence": round(float(les.confidence), 3),
                "truth_lesion": truth_of.get(les.number, 0),
            }
            for les in findings.lesions
        ],
    }


def load_cases(path: Path) -> list[dict[str, Any]]:
    """The records of ``path`` in seed order; :class:`MixedModels` if they come from
    more than one model."""
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    check_one_model(rows, path)
    return sorted(rows, key=lambda r: int(r["seed"]))


def findings_from_record(rec: dict[str, Any]) -> Any:
    """The network's findings of one record (masks are 1x1x1 placeholders).

    The contrast phase is what ``models.inference.analyse`` sets for these cases,
    whose volumes carry no series description: ``models.phase``'s estimate from the
    measured portal/splenic vein and spleen attenuation (records written before
    that estimate existed are thereby read the way the node reads them now).
    """
    from models.findings import Axis, Findings, LesionFinding, OrganFinding, Provenance
    from models.phase import estimate_phase
    from models.vocab import LesionKind, Organ, SubSite

    tiny = np.zeros((1, 1, 1), dtype=bool)
    organs = tuple(
        OrganFinding(
            Organ(o["organ"]),
            tiny,
            float(o["volume_ml"]),
            o["mean"],
            o["std"],
            float(o["confidence"]),
            qualities=dict(o["qualities"]),
        )
        for o in rec["organs"]
    )
    lesions = tuple(
        LesionFinding(
            number=int(les["number"]),
            organ=Organ(les["organ"]),
            kind=LesionKind(les["kind"]),
            mask=tiny,
            volume_ml=float(les["volume_ml"]),
            long_axis=Axis((0, 0, 0), (0, 0, 1), float(les["long_mm"])),
            short_axis=Axis((0, 0, 0), (0, 1, 0), float(les["short_mm"])),
            key_slice=0,
            centroid_lps=(0.0, 0.0, 0.0),
            sub_site=SubSite(les["site"]) if les["site"] else None,
            mean_intensity=les["mean"],
            confidence=float(les["confidence"]),
        )
        for les in rec["lesions"]
    )
    phase = estimate_phase("CT", {}, {o.organ: o.mean_intensity for o in organs})
    prov = Provenance(
        model_name=str(rec["model"]),
        model_version="",
        weights_sha256="",
        pipeline_version="bench",
        input_series_uid=f"2.25.{rec['seed']}",
        input_sop_uids=(),
        contrast_phase=phase.phase,
        notes=(
            "image features from the segmentation network (models.inference.analyse)",
            phase.reason,
        ),
    )
    extra: dict[str, Any] = {"modality": "CT"}
    if all("truth_lesion" in les for les in rec["lesions"]):  # records from 2026-11-29 on
        extra["truth_lesion_of"] = {
            int(x["number"]): int(x["truth_lesion"]) for x in rec["lesions"]
        }
    return Findings(organs, lesions, (), (), prov, extra=extra)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cases", type=int, default=300)
    ap.add_argument("--first-seed", type=int, default=700_000)
    ap.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "fusion_network_cases.jsonl"
    )
    ap.add_argument("--bundle", type=Path, default=None, help="default: the shipped hpb_demo")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch

    from models.bundle import load_bundle

    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle)
    done: set[int] = set()
    if args.out.is_file():
        try:
            records = load_cases(args.out)
            check_one_model(records, args.out, model_id(bundle))
        except MixedModels as exc:
            print(f"fusion_network_cases: {exc}", file=sys.stderr)
            return 2
        done = {int(r["seed"]) for r in records}
    net = bundle.network()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a", encoding="utf-8") as fh:
        for seed in range(args.first_seed, args.first_seed + args.cases):
            if seed in done:
                continue
            rec = case_record(seed, bundle, net)
            fh.write(json.dumps(rec, separators=(",", ":")) + "\n")
            fh.flush()
            print(seed, rec["seconds"], len(rec["lesions"]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
