"""``hpb-node evaluate``: the clinical study's outcome measures on a site's own data.

Reads a reference set and the model's results (folders in the layout of
``docs/evaluation.md``; results optionally fetched from the PACS over DICOMweb,
C-GET or C-MOVE, or computed now by running the model on the reference
studies), writes ``evaluation.json`` and ``evaluation.html`` into ``--out``, and
exits 0 when every ``--threshold`` is met, 1 when one is not (2 on errors).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _run(args: argparse.Namespace) -> int:
    # The evaluation stack (metrics, plots, PACS clients) loads only when the
    # command runs, not on every start of ``hpb-node``.
    from node.evaluate_command import run

    return run(args)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate the model against a reference set (diagnosis, segmentation, report)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--reference", required=True, type=Path, help="reference set folder")
    p.add_argument("--results", type=Path, help="model results folder (same layout)")
    p.add_argument("--out", required=True, type=Path, help="folder for evaluation.json/.html")
    p.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="EXPR",
        help="e.g. dice.liver>=0.9, auroc.hcc>=0.8, lesion.fp_per_case<=1 (repeatable)",
    )
    p.add_argument("--probability-threshold", type=float, default=0.5)
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for 95%% CIs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--title", default="hpb-node evaluation")
    p.add_argument(
        "--pacs-url",
        help="DICOMweb root to fetch results from, e.g. http://127.0.0.1:8042/dicom-web",
    )
    p.add_argument("--pacs-user", help="user:password for the PACS (HTTP basic)")
    p.add_argument(
        "--pacs-dimse",
        metavar="HOST:PORT:AET",
        help="fetch results with DIMSE C-GET from this PACS instead of DICOMweb",
    )
    p.add_argument(
        "--calling-aet",
        default="HPBEVAL",
        help="our AE title for --pacs-dimse (with --retrieve move also the move destination)",
    )
    p.add_argument(
        "--retrieve",
        choices=("get", "move"),
        default="get",
        help="with --pacs-dimse: C-GET (default), or C-MOVE to a storage SCP of ours",
    )
    p.add_argument(
        "--move-port",
        type=int,
        metavar="PORT",
        help="with --retrieve move: the port of our storage SCP (as declared on the PACS)",
    )
    p.add_argument(
        "--move-host",
        default="127.0.0.1",
        help="with --retrieve move: the address our storage SCP listens on (default 127.0.0.1)",
    )
    p.add_argument(
        "--study",
        action="append",
        default=[],
        metavar="CASE=STUDYUID",
        help="a study to fetch from the PACS for a case (repeatable)",
    )
    p.add_argument(
        "--run-model", action="store_true", help="compute results now on <reference>/images"
    )
    p.add_argument("--bundle", help="model bundle folder (default: the shipped one)")
    p.add_argument("--modality", default="CT", help="modality of NIfTI studies for --run-model")
    p.set_defaults(func=_run)
