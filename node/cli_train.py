"""``hpb-node train``: train the segmentation network on a dataset manifest, export a bundle."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from node.errors import ConfigError, PipelineError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the segmentation network on a dataset manifest and export a bundle",
        description=(
            "Train the organ + lesion segmentation network on one or more JSON-lines dataset "
            "manifests (docs/dataset-manifest.md); checkpoints go to --workdir, the best "
            "checkpoint is exported as a bundle to --bundle-out."
        ),
    )
    p.add_argument(
        "--manifest", type=Path, action="append", required=True, help="JSONL manifest (repeatable)"
    )
    p.add_argument("--workdir", type=Path, required=True, help="checkpoints and logs")
    p.add_argument("--bundle-out", type=Path, default=None, help="export the best model here")
    p.add_argument("--network", choices=("demo", "tiny"), default="demo")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--iterations", type=int, default=50, help="iterations per epoch")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument(
        "--spacing", type=float, nargs=3, default=(3.0, 2.0, 2.0), metavar=("K", "R", "C")
    )
    p.add_argument("--roi", type=int, nargs=3, default=(32, 96, 96), metavar=("K", "R", "C"))
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this wall time")
    p.add_argument("--max-val-cases", type=int, default=8)
    p.add_argument("--val-every", type=int, default=1, help="validate every N epochs")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from WORKDIR/last.pt")
    p.add_argument("--name", default="hpb_demo")
    p.add_argument("--version", default="0.1.0")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from models.train import TrainConfig, TrainError, train

    if args.epochs < 1 or args.iterations < 1 or args.batch_size < 1:
        raise ConfigError("--epochs, --iterations and --batch-size must be >= 1")
    config = TrainConfig(
        manifests=list(args.manifest),
        workdir=args.workdir,
        bundle_out=args.bundle_out,
        network=args.network,
        spacing_mm=tuple(args.spacing),
        roi_size=tuple(args.roi),
        epochs=args.epochs,
        iterations_per_epoch=args.iterations,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        max_minutes=args.max_minutes,
        max_val_cases=args.max_val_cases,
        val_every=args.val_every,
        threads=args.threads,
        seed=args.seed,
        resume=args.resume,
        name=args.name,
        version=args.version,
        command=(
            "hpb-node " + shlex.join(sys.argv[1:])
            if Path(sys.argv[0]).name in ("hpb-node", "__main__.py")
            else ""
        ),
    )
    try:
        result = train(config, progress=lambda msg: print(msg, flush=True))
    except TrainError as exc:
        raise PipelineError(f"training failed: {exc}") from exc
    print(
        f"trained {result.epochs_run} epochs in {result.seconds / 60:.1f} min; best epoch "
        f"{result.best_epoch}; bundle: {result.bundle or '(not exported)'}"
    )
    return 0
