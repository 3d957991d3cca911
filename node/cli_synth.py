"""``hpb-node synth``: write synthetic training/test cases and their dataset manifest."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from node.errors import ConfigError

_TRANSFER_SYNTAXES = {
    "explicit": "1.2.840.10008.1.2.1",
    "rle": "1.2.840.10008.1.2.5",
    "jpeg2000-lossless": "1.2.840.10008.1.2.4.90",
    "jpegls-lossless": "1.2.840.10008.1.2.4.80",
}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "synth",
        help="write synthetic abdominal CT/MR cases (DICOM + NIfTI + truth) and a manifest",
        description=(
            "Generate seeded synthetic cases with organ/lesion masks and disease truth. "
            "The data are synthetic: numbers computed on them must be quoted as synthetic."
        ),
    )
    p.add_argument("--out", required=True, type=Path, help="dataset folder (manifest.jsonl inside)")
    p.add_argument("-n", "--count", type=int, default=10, help="number of cases")
    p.add_argument("--seed", type=int, default=0, help="first seed (cases use seed .. seed+n-1)")
    p.add_argument("--shape", type=int, nargs=3, metavar=("K", "R", "C"), default=None)
    p.add_argument("--spacing", type=float, nargs=3, metavar=("SK", "SR", "SC"), default=None)
    p.add_argument("--large", action="store_true", help="512x512 benchmark grid")
    p.add_argument("--modality", choices=("CT", "MR"), default="CT")
    p.add_argument("--mr-share", type=float, default=0.0, help="fraction of cases written as MR")
    p.add_argument("--no-dicom", action="store_true", help="NIfTI only (faster)")
    p.add_argument("--transfer-syntax", choices=sorted(_TRANSFER_SYNTAXES), default="explicit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from models.synthetic import generator, write_dataset

    if args.count < 1:
        raise ConfigError("--count must be at least 1")
    if not 0.0 <= args.mr_share <= 1.0:
        raise ConfigError("--mr-share must be between 0 and 1")
    shape = generator.LARGE_SHAPE if args.large else generator.DEFAULT_SHAPE
    spacing = generator.LARGE_SPACING if args.large else generator.DEFAULT_SPACING
    if args.shape:
        if min(args.shape) < 16:
            raise ConfigError("--shape: every dimension must be at least 16")
        shape = tuple(args.shape)
    if args.spacing:
        if min(args.spacing) <= 0:
            raise ConfigError("--spacing must be positive")
        spacing = tuple(args.spacing)
    t0 = time.perf_counter()
    manifest = write_dataset(
        args.out,
        range(args.seed, args.seed + args.count),
        shape=shape,
        spacing=spacing,
        modality=args.modality,
        mr_share=args.mr_share,
        dicom=not args.no_dicom,
        transfer_syntax=_TRANSFER_SYNTAXES[args.transfer_syntax],
    )
    print(
        f"wrote {args.count} synthetic cases in {time.perf_counter() - t0:.1f} s; manifest {manifest}"
    )
    return 0
