"""Train the fusion classifier on synthetic cases and run the ablation.

    .venv/bin/python bench/fusion_ablation.py [--train 4000] [--cal 800] [--test 3000]
        [--network-cases bench/results/fusion_network_cases.jsonl]
        [--network-train bench/results/fusion_train_network_cases.jsonl [--network-weight 3]]
        [--no-save-weights]

Writes ``bench/results/fusion_ablation.json`` (AUROC of fused / image-only /
labs-only and ECE, per disease, on held-out cases, with the paired bootstrap
interval of fused minus image) and, unless told not to, the shipped weights
``models/fusion_weights/fusion.json``.

**Data: synthetic.** Training: case truths from ``models.synthetic_clinical.sample_truth``
(a voxel-free stand-in for the image generator, diseases drawn as the generator
draws them), labs and history from ``synthesize_clinical``, image features
(``models.fusion.image_features``) on ``measured_findings``: **ground-truth
lesions and organ measurements plus measurement noise, not the segmentation
network's output** (section ``simulated_measurement``, 3000 held-out cases).

With ``--network-train`` (records of ``bench/fusion_network_cases.py`` on other
seeds than the test records) the heads are also fitted on the segmentation
network's own image features of those cases, each repeated ``--network-weight``
times next to the simulated ones, so that they learn how the network's findings
look (a missed lesion, a merged one, features it does not measure); calibration
stays on the simulated calibration cases.

With ``--network-cases`` (records of ``bench/fusion_network_cases.py``) the
headline ``cases`` / ``diseases`` are the shipped weights on the **segmentation
network's** image features of those generator cases; ``network`` also holds
heads cross-validated on the network's features and the same truths with
simulated measurements.
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


FEATURES_NOTE = (
    "image measurements; 16 labs + missingness indicators; bag-of-concepts history + age/sex "
    "(fused only)"
)
NETWORK_NOTE = (
    "synthetic generator cases (models.synthetic.generate_case, CT); image features from the "
    "segmentation network's findings (models.inference.analyse, shipped demo bundle; contrast "
    "phase as the node's inference sets it: models.phase's estimate from the vein and spleen "
    "attenuation, these cases having no series description; no organ qualities such as duct calibre or "
    "contour nodularity, which the network does not measure: they take their neutral defaults); "
    "labs and history synthesised from the case truth"
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


def network_dataset(
    records: list[dict[str, Any]],
) -> tuple[np.ndarray, np.ndarray, dict[Disease, np.ndarray], list[int]]:
    """Features of network records (bench/fusion_network_cases.py's ``load_cases``):
    image features from the network's findings, and, for the same case truths,
    from ``measured_findings`` (ground truth + noise) for a paired comparison."""
    from fusion_network_cases import findings_from_record

    from models.case import CaseTruth

    xs, xsim, ys, seeds = [], [], [], []
    for rec in records:
        truth = CaseTruth.from_json(rec["truth"])
        clin = synthesize_clinical(truth)
        ctx = context_from_labs(clin.labs, history=clin.history, age=truth.age, sex=truth.sex)
        xs.append(feature_vector(findings_from_record(rec), ctx))
        sim = measured_findings(truth, np.random.default_rng(truth.seed + 10_000_019))
        xsim.append(feature_vector(sim, ctx))
        ys.append([int(d in truth.diseases) for d in Disease])
        seeds.append(int(rec["seed"]))
    y = np.asarray(ys, dtype=np.int64)
    return np.asarray(xs), np.asarray(xsim), {d: y[:, i] for i, d in enumerate(Disease)}, seeds


def refuse_shared_seeds(
    records: list[dict[str, Any]], test_records: list[dict[str, Any]] | None, path: Path
) -> None:
    """Stop when training records of ``path`` share a seed with the test records, or
    were measured by another segmentation model than the test records."""
    if test_records is None:
        return
    train_models = sorted({str(r["model"]) for r in records})
    test_models = sorted({str(r["model"]) for r in test_records})
    if train_models != test_models:
        raise SystemExit(
            f"{path} holds records of {', '.join(train_models)}, the test records of "
            f"{', '.join(test_models)}: run bench/fusion_network_cases.py for both with "
            "one bundle"
        )
    shared = {int(r["seed"]) for r in test_records} & {int(r["seed"]) for r in records}
    if shared:
        raise SystemExit(
            f"{path} and the test records share {len(shared)} seeds: train on other seeds"
        )


def with_network_training(
    x: np.ndarray,
    y: dict[Disease, np.ndarray],
    meta: dict[str, Any],
    records: list[dict[str, Any]],
    weight: int,
    calibration_cases: int,
) -> tuple[np.ndarray, dict[Disease, np.ndarray], dict[str, Any], str]:
    """The simulated training set plus the network ``records`` (of seeds that are not
    test records: see :func:`refuse_shared_seeds`), each repeated ``weight`` times."""
    if weight < 1:
        raise SystemExit("--network-weight must be at least 1")
    xn, _, yn, seeds = network_dataset(records)
    models = sorted({str(r["model"]) for r in records})
    note = (
        f"{DATA_NOTE}; plus {len(xn)} generator cases (seeds {min(seeds)}-{max(seeds)}) with "
        f"image features from the segmentation network's findings ({', '.join(models)}), "
        f"each counted {weight} times"
    )
    meta = {
        **meta,
        "trained_on": f"{len(x)} synthetic cases with simulated measurements and {len(xn)} "
        f"generator cases with the segmentation network's measurements (x{weight}) "
        f"(+{calibration_cases} for calibration)",
        "data": note,
        "network_features_from": models,
    }
    xs = np.concatenate([x] + [xn] * weight)
    ys = {d: np.concatenate([y[d]] + [yn[d]] * weight) for d in Disease}
    return xs, ys, meta, note


def _rows(
    y: dict[Disease, np.ndarray], preds: dict[str, dict[Disease, np.ndarray]], ci: bool = True
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for d in Disease:
        if not 0 < int(y[d].sum()) < len(y[d]):
            out[d.value] = {"positives": int(y[d].sum()), "note": "one class absent: no AUROC"}
            continue
        row: dict[str, Any] = {
            "positives": int(y[d].sum()),
            "fused_auroc": round(auroc(y[d], preds["fused"][d]), 4),
            "image_auroc": round(auroc(y[d], preds["image"][d]), 4),
            "labs_auroc": round(auroc(y[d], preds["labs"][d]), 4),
            "fused_ece": round(calibration(y[d], preds["fused"][d]).ece, 4),
            "image_ece": round(calibration(y[d], preds["image"][d]).ece, 4),
        }
        if ci:
            paired = np.stack([preds["fused"][d], preds["image"][d]], axis=1)
            iv = bootstrap(_auroc_gain, y[d], paired, n_resamples=1000)
            row["fused_minus_image_auroc_95ci"] = [round(iv.low, 4), round(iv.high, 4)]
        out[d.value] = row
    return out


def cross_validated(
    x: np.ndarray, y: dict[Disease, np.ndarray], folds: int = 5, seed: int = 0
) -> dict[str, dict[Disease, np.ndarray]]:
    """Out-of-fold predictions of models trained on ``x`` itself: each fold is
    predicted by heads fitted on three quarters of the other folds and calibrated
    on the last quarter (folds drawn at random with a fixed seed)."""
    n = len(x)
    order = np.random.default_rng(seed).permutation(n)
    fold_of = np.empty(n, dtype=np.int64)
    fold_of[order] = np.arange(n) % folds
    preds: dict[str, dict[Disease, np.ndarray]] = {
        v: {d: np.zeros(n) for d in Disease} for v in ("fused", "image", "labs")
    }
    for k in range(folds):
        test = np.flatnonzero(fold_of == k)
        rest = order[np.isin(order, test, invert=True)]
        cut = int(len(rest) * 0.75)
        fit, cal = rest[:cut], rest[cut:]
        usable = [d for d in Disease if 0 < y[d][fit].sum() < len(fit) and y[d][cal].sum() > 0]
        model = FusionModel.train(
            x[fit],
            {d: y[d][fit] for d in usable},
            x[cal],
            {d: y[d][cal] for d in usable},
            {"trained_on": "network features (cross-validation fold)"},
        )
        for v in preds:
            pm = model.predict_matrix(x[test], v)
            for d in Disease:
                preds[v][d][test] = pm[d] if d in pm else float(y[d][fit].mean())
    return preds


def _not_better(rows: dict[str, dict[str, Any]]) -> list[str]:
    return [
        k for k, r in rows.items() if "fused_auroc" in r and r["fused_auroc"] <= r["image_auroc"]
    ]


def _means(rows: dict[str, dict[str, Any]]) -> dict[str, float]:
    have = [r for r in rows.values() if "fused_auroc" in r]
    return {
        f"mean_{v}_auroc": round(float(np.mean([r[f"{v}_auroc"] for r in have])), 4)
        for v in ("fused", "image", "labs")
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--cal", type=int, default=800)
    ap.add_argument("--test", type=int, default=3000)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fusion_ablation.json")
    ap.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    ap.add_argument("--no-save-weights", action="store_true")
    ap.add_argument(
        "--generator",
        type=int,
        default=0,
        help="also evaluate on N case truths from the image generator (models.synthetic)",
    )
    ap.add_argument(
        "--network-cases",
        type=Path,
        default=None,
        help="segmentation-network records (bench/fusion_network_cases.py): the headline "
        "ablation then uses the network's image features",
    )
    ap.add_argument(
        "--network-train",
        type=Path,
        default=None,
        help="segmentation-network records of other seeds (bench/fusion_network_cases.py) "
        "whose features the heads are also fitted on",
    )
    ap.add_argument("--network-weight", type=int, default=3)
    args = ap.parse_args(argv)
    from fusion_network_cases import load_cases

    test_records = None if args.network_cases is None else load_cases(args.network_cases)
    train_records = None if args.network_train is None else load_cases(args.network_train)
    if train_records is not None:  # before any work is done
        refuse_shared_seeds(train_records, test_records, args.network_train)

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
    train_note = DATA_NOTE
    if train_records is not None:
        x, y, meta, train_note = with_network_training(
            x, y, meta, train_records, args.network_weight, args.cal
        )
    model = FusionModel.train(x, y, xc, yc, meta)
    heads_from = str(meta["trained_on"])
    variants = ("fused", "image", "labs")
    sim_rows = _rows(yt, {v: model.predict_matrix(xt, v) for v in variants})
    simulated: dict[str, Any] = {
        "cases": args.test,
        "train_cases": args.train,
        "calibration_cases": args.cal,
        "data": DATA_NOTE,
        "training": train_note,
        "diseases": sim_rows,
        "fused_not_better_than_image": _not_better(sim_rows),
        **_means(sim_rows),
        "seconds_data": round(t_data, 2),
    }
    result: dict[str, Any] = {
        "cases": args.test,
        "data": DATA_NOTE,
        "training": train_note,
        "features": FEATURES_NOTE,
        "diseases": sim_rows,
        "fused_not_better_than_image": _not_better(sim_rows),
        **_means(sim_rows),
        "simulated_measurement": simulated,
    }
    if test_records is not None:
        xn, xsim, yn, seeds = network_dataset(test_records)
        shipped = _rows(yn, {v: model.predict_matrix(xn, v) for v in variants})
        same_truths = _rows(yn, {v: model.predict_matrix(xsim, v) for v in variants})
        cv = _rows(yn, cross_validated(xn, yn))
        network: dict[str, Any] = {
            "cases": len(xn),
            "seeds": f"{min(seeds)}-{max(seeds)} (models.synthetic.generate_case, CT; demo "
            "network trained on seeds 0-239)",
            "data": NETWORK_NOTE,
            "shipped_model": {
                "what": f"the shipped fusion weights ({heads_from}) on the network's image "
                "features",
                "diseases": shipped,
                "fused_not_better_than_image": _not_better(shipped),
                **_means(shipped),
            },
            "cross_validated": {
                "what": "heads trained on the network's features themselves: 5-fold out-of-fold "
                "predictions (each fold: fit on 3/4 of the other folds, Platt-calibrate on 1/4)",
                "diseases": cv,
                "fused_not_better_than_image": _not_better(cv),
                **_means(cv),
            },
            "same_truths_simulated_measurement": {
                "what": "the same case truths with ground truth + noise image features "
                "(measured_findings) and the shipped weights: the gap to 'shipped_model' is the "
                "network's",
                "diseases": same_truths,
                "fused_not_better_than_image": _not_better(same_truths),
                **_means(same_truths),
            },
        }
        result = {
            "cases": len(xn),
            "data": NETWORK_NOTE + f"; fusion heads: the shipped weights ({heads_from})",
            "training": train_note,
            "features": FEATURES_NOTE,
            "diseases": shipped,
            "fused_not_better_than_image": _not_better(shipped),
            **_means(shipped),
            "network": network,
            "simulated_measurement": simulated,
        }
    if args.generator:
        xg, yg = generator_dataset(args.generator, 900_000)
        gen = _rows(yg, {v: model.predict_matrix(xg, v) for v in variants}, ci=False)
        result["generator_truth_check"] = {
            "cases": len(xg),
            "data": "case truths from models.synthetic.generate_case (CT only; phases as the "
            "generator draws them), labs/history synthesised, image features from the truths "
            "+ measurement noise; model trained on the stand-in sampler only",
            "diseases": gen,
            "fused_not_better_than_image": _not_better(gen),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if not args.no_save_weights:
        model.save(args.weights)
    for title, rows in (
        ("simulated measurement", sim_rows),
        *(
            (f"network ({k})", result["network"][k]["diseases"])
            for k in ("shipped_model", "cross_validated", "same_truths_simulated_measurement")
            if "network" in result
        ),
    ):
        print(f"-- {title}")
        for name, row in rows.items():
            if "fused_auroc" not in row:
                print(f"{name:34s} n+={row['positives']:4d} {row['note']}")
                continue
            print(
                f"{name:34s} n+={row['positives']:4d} fused {row['fused_auroc']:.3f} "
                f"image {row['image_auroc']:.3f} labs {row['labs_auroc']:.3f} "
                f"ece {row['fused_ece']:.3f} ci {row.get('fused_minus_image_auroc_95ci')}"
            )
        print("fused not better than image on:", _not_better(rows) or "none")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
