"""Fine-tune the shipped hpb_demo weights with more weight on lesions (see docs/model-card.md).

    .venv/bin/python scripts/finetune_hpb_demo.py --data var/model/synth_train \\
        --shared ../shared/data --workdir var/model/finetune1 --minutes 50 --threads 1

``--data`` is a synthetic dataset from ``hpb-node synth`` (training seeds only:
cases whose seed ends in 9 are left out, as for the shipped run); the real
TotalSegmentator example CT and MR from ``--shared`` are added with sampling
weight 8. Checkpoints go to ``--workdir``; nothing is exported to a bundle here
(the post-processing thresholds are tuned on validation cases afterwards).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.backends import totalseg_manifest_rows  # noqa: E402
from models.bundle import DEMO_BUNDLE  # noqa: E402
from models.network import MeanEnsemble  # noqa: E402
from models.train import TrainConfig, train  # noqa: E402


def _weights(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        out[name] = float(value)
    return out


def _member_weights(path: Path, index: int, workdir: Path) -> Path:
    """Write member ``index`` of an ensemble's weights to ``workdir`` as a plain state dict."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    member = MeanEnsemble.member_state(state, index)
    if not member:
        raise SystemExit(
            f"{path}: no weights under members.{index}.* (not an ensemble with that member)"
        )
    out = workdir / f"init_member{index}.pt"
    torch.save(member, out)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--init", type=Path, default=DEMO_BUNDLE / "models" / "model.pt")
    ap.add_argument(
        "--init-member",
        type=int,
        default=None,
        metavar="I",
        help="start from member I of an ensemble's weights in --init (keys members.I.*)",
    )
    ap.add_argument("--minutes", type=float, default=50.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--sampling",
        action="append",
        default=[],
        metavar="CLASS=W",
        help="patch-centre sampling weight of a class (default: lesion=6)",
    )
    ap.add_argument(
        "--loss",
        action="append",
        default=[],
        metavar="CLASS=W",
        help="loss weight of a class (default: lesion=3)",
    )
    ap.add_argument(
        "--case-weight",
        action="append",
        default=[],
        metavar="KEY=W",
        help="sampling weight of cases with a lesion of this disease (KEY: a disease, or "
        "MODALITY:disease, e.g. MR:cholelithiasis); a case takes the largest that applies",
    )
    ap.add_argument(
        "--all-seeds",
        action="store_true",
        help="train on every case in --data (default: leave out seeds ending in 9)",
    )
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.workdir.mkdir(parents=True, exist_ok=True)
    case_weights = _weights(args.case_weight)
    rows = []
    for case in sorted((args.data.resolve() / "cases").iterdir()):
        seed = int(case.name.rsplit("-", 1)[1])
        if not (case / "truth.json").is_file():
            continue
        truth = json.loads((case / "truth.json").read_text())
        keys = set()
        for les in truth.get("lesions", ()):
            keys |= {str(les.get("disease")), f"{truth.get('modality', 'CT')}:{les.get('disease')}"}
        weight = max([1.0] + [case_weights[k] for k in keys if k in case_weights])
        rows.append(
            {
                "case_id": case.name,
                "image": str(case / "image.nii.gz"),
                "label": str(case / "organ_labels.nii.gz"),
                "lesions": str(case / "lesion_labels.nii.gz"),
                "modality": truth.get("modality", "CT"),
                # seeds ending in 9 were validation for the shipped run: not trained on
                "split": "val" if seed % 10 == 9 and not args.all_seeds else "train",
                "weight": weight,
            }
        )
    for row in totalseg_manifest_rows(args.shared):
        rows.append({**row, "weight": 8.0})
    manifest = args.workdir / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    init = args.init
    if args.init_member is not None:
        init = _member_weights(args.init, args.init_member, args.workdir)
    config = TrainConfig(
        manifests=[manifest],
        workdir=args.workdir,
        spacing_mm=(4.0, 2.5, 2.5),
        roi_size=(32, 64, 64),
        epochs=10_000,
        iterations_per_epoch=20,
        batch_size=3,
        learning_rate=args.lr,
        max_minutes=args.minutes,
        max_val_cases=0,
        val_every=10_000,
        threads=args.threads,
        seed=args.seed,
        init_weights=init,
        sampling_weights={"lesion": 6.0, **_weights(args.sampling)},
        loss_weights={"lesion": 3.0, **_weights(args.loss)},
        batch_dice=True,
        command=" ".join(sys.argv),
    )
    result = train(config, progress=print)
    print(json.dumps({"epochs_run": result.epochs_run, "seconds": round(result.seconds, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
