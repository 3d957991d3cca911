"""Train the fusion classifier on synthetic cases and run the ablation.

    .venv/bin/python bench/fusion_ablation.py [--train 4000] [--cal 800] [--test 600]
                                               [--no-save-weights]

Writes ``bench/results/fusion_ablation.json`` (AUROC of fused / image-only /
labs-only and ECE of fused, per disease, on held-out cases) and, unless told
not to, the shipped weights ``models/fusion_weights/fusion.json``.

**Data: synthetic.** Case truths come from ``models.synthetic_clinical.sample_truth``
(a voxel-free stand-in for the image generator), labs and history from
``synthesize_clinical``; image features are computed by ``models.fusion.image_features``
on ``measured_findings``: **ground-truth lesions and organ measurements plus
measurement noise, not the segmentation network's output.**
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.evaluation.classification import auroc, bootstrap, calibration  # noqa: E402
from models.fusion import DEFAULT_WEIGHTS, FusionModel, feature_vector  # noqa: E402
from models.labs import context_from_labs  # noqa: E402
from models.synthetic_clinical import (  # noqa: E402
    measured_findings,
    sample_truth,
    synthesize_clinical,
)
from models.vocab import Disease  # noqa: E402

DATA_NOTE = (
    "synthetic cases (models.synthetic_clinical.sample_truth: voxel-free stand-in for the "
    "image generator); labs and history synthesised from the case truth; image features "
    "from ground-truth masks/measurements + measurement noise (models.synthetic_clinical."
    "measured_findings), not from the segmentation network"
)


def _auroc_gain(t: np.ndarray, s: np.ndarray) -> float:
    """AUROC(fused) - AUROC(image) on the same cases (paired bootstrap)."""
    return float(auroc(t, s[:, 0]) - auroc(t, s[:, 1]))


def dataset(seeds: range) -> tuple[np.ndarray, dict[Disease, np.ndarray]]:
    xs, ys = [], []
    for seed in seeds:
        truth = sample_truth(seed)
        clin = synthesize_clinical(truth)
        findings = measured_findings(truth, np.random.default_rng(seed + 10_000_019))
        ctx = context_from_labs(clin.labs, history=clin.history, age=truth.age, sex=truth.sex)
        xs.append(feature_vector(findings, ctx))
        ys.append([int(d in truth.diseases) for d in Disease])
    y = np.asarray(ys, dtype=np.int64)
    return np.asarray(xs), {d: y[:, i] for i, d in enumerate(Disease)}


def generator_dataset(n: int, first_seed: int) -> tuple[np.ndarray, dict[Disease, np.ndarray]]:
    """Case truths from the image generator (models.synthetic; ~1.5 s a case, volumes discarded)."""
    import torch

    from models.synthetic.generator import generate_case

    torch.set_num_threads(1)
    xs, ys = [], []
    for seed in range(first_seed, first_seed + n):
        truth = generate_case(seed).truth
        if truth.modality != "CT":
            continue
        clin = synthesize_clinical(truth)
        findings = measured_findings(truth, np.random.default_rng(seed + 10_000_019))
        ctx = context_from_labs(clin.labs, history=clin.history, age=truth.age, sex=truth.sex)
        xs.append(feature_vector(findings, ctx))
        ys.append([int(d in truth.diseases) for d in Disease])
    y = np.asarray(ys, dtype=np.int64)
    return np.asarray(xs), {d: y[:, i] for i, d in enumerate(Disease)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--cal", type=int, default=800)
    ap.add_argument("--test", type=int, default=600)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fusion_ablation.json")
    ap.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    ap.add_argument("--no-save-weights", action="store_true")
    ap.add_argument(
        "--generator",
        type=int,
        default=0,
        help="also evaluate on N case truths from the image generator (models.synthetic)",
    )
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    x, y = dataset(range(0, args.train))
    xc, yc = dataset(range(100_000, 100_000 + args.cal))
    xt, yt = dataset(range(200_000, 200_000 + args.test))
    t_data = time.perf_counter() - t0
    meta = {
        "trained_on": f"{args.train} synthetic cases (+{args.cal} for calibration)",
        "data": DATA_NOTE,
        "classifier": "per-disease L2 logistic regression + Platt calibration",
    }
    model = FusionModel.train(x, y, xc, yc, meta)
    preds = {v: model.predict_matrix(xt, v) for v in ("fused", "image", "labs")}
    diseases: dict[str, dict[str, float | int]] = {}
    not_better: list[str] = []
    for d in Disease:
        row: dict[str, float | int] = {
            "positives": int(yt[d].sum()),
            "fused_auroc": round(auroc(yt[d], preds["fused"][d]), 4),
            "image_auroc": round(auroc(yt[d], preds["image"][d]), 4),
            "labs_auroc": round(auroc(yt[d], preds["labs"][d]), 4),
            "fused_ece": round(calibration(yt[d], preds["fused"][d]).ece, 4),
            "image_ece": round(calibration(yt[d], preds["image"][d]).ece, 4),
        }
        paired = np.stack([preds["fused"][d], preds["image"][d]], axis=1)
        ci = bootstrap(_auroc_gain, yt[d], paired, n_resamples=1000)
        row["fused_minus_image_auroc_95ci"] = [round(ci.low, 4), round(ci.high, 4)]
        diseases[d.value] = row
        if row["fused_auroc"] <= row["image_auroc"]:
            not_better.append(d.value)
    result = {
        "cases": args.test,
        "train_cases": args.train,
        "calibration_cases": args.cal,
        "data": DATA_NOTE,
        "features": "image measurements; 16 labs + missingness indicators; "
        "bag-of-concepts history + age/sex (fused only)",
        "diseases": diseases,
        "fused_not_better_than_image": not_better,
        "mean_fused_auroc": round(float(np.mean([r["fused_auroc"] for r in diseases.values()])), 4),
        "mean_image_auroc": round(float(np.mean([r["image_auroc"] for r in diseases.values()])), 4),
        "mean_labs_auroc": round(float(np.mean([r["labs_auroc"] for r in diseases.values()])), 4),
        "seconds_data": round(t_data, 2),
    }
    if args.generator:
        xg, yg = generator_dataset(args.generator, 900_000)
        gen: dict[str, dict[str, float | int]] = {}
        pg = {v: model.predict_matrix(xg, v) for v in ("fused", "image", "labs")}
        for d in Disease:
            if 0 < yg[d].sum() < len(yg[d]):
                gen[d.value] = {
                    "positives": int(yg[d].sum()),
                    "fused_auroc": round(auroc(yg[d], pg["fused"][d]), 4),
                    "image_auroc": round(auroc(yg[d], pg["image"][d]), 4),
                    "labs_auroc": round(auroc(yg[d], pg["labs"][d]), 4),
                    "fused_ece": round(calibration(yg[d], pg["fused"][d]).ece, 4),
                }
        result["generator_truth_check"] = {
            "cases": len(xg),
            "data": "case truths from models.synthetic.generate_case (CT only; phases as the "
            "generator draws them), labs/history synthesised, image features from the truths "
            "+ measurement noise; model trained on the stand-in sampler only",
            "diseases": gen,
            "fused_not_better_than_image": [
                k for k, r in gen.items() if r["fused_auroc"] <= r["image_auroc"]
            ],
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if not args.no_save_weights:
        model.save(args.weights)
    for name, row in diseases.items():
        print(
            f"{name:34s} n+={row['positives']:4d} fused {row['fused_auroc']:.3f} "
            f"image {row['image_auroc']:.3f} labs {row['labs_auroc']:.3f} "
            f"ece {row['fused_ece']:.3f}"
        )
    print("fused not better than image on:", not_better or "none")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
