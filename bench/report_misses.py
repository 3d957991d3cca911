# ruff: noqa: E402
"""Whether the report bench's missed lesions are in the image: each reference lesion of
the report bench's network records, found or not, against how far it stands out.

    .venv/bin/python bench/report_misses.py
        [--records bench/results/report_network_cases.jsonl]
        [--out bench/results/report_misses.json] [--smooth-mm 4]

For each record (written by ``bench/fusion_network_cases.py``; the first 50 test
records are the report bench's cases) the case is generated again from its seed, on
the same grid, and every reference lesion gets a status from the record: ``detection``
(no measured lesion is matched to it), ``measurement`` (matched, but no matched
lesion's long axis is within max(2 mm, 10 %) of the drawn diameter, the report
check's rule ``models.evaluation.text.sizes_within``) or ``ok``; and the medians of
``bench/lesion_figure.py`` on the reference masks (core, rim, a ring of the organ
around it, the organ's robust SD, and the core's z in the image smoothed inside the
organ). The summary counts each status by that z: a missed lesion 2 or more smoothed
robust SD from its organ was in the image to be found; one under 1 hardly stands out by
its core (a rim brighter than the organ, which some metastases have, is not counted, and
4 mm of smoothing understates a lesion of 10 mm or less: read ``core`` and ``rim``).

All of it is on **synthetic** data: it says how visible the generator draws the
lesions, not how a scanner would show them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from fusion_network_cases import SHAPE, SPACING, load_cases
from lesion_figure import lesion_rows

from models.evaluation.text import sizes_within
from models.synthetic.generator import generate_case

BINS = (("under_1", 0.0, 1.0), ("1_to_2", 1.0, 2.0), ("2_or_more", 2.0, float("inf")))


def status(lesion: dict[str, Any], record: dict[str, Any]) -> tuple[str, list[float]]:
    """The record's outcome for one reference lesion, and the long axes matched to it."""
    mine = [x["long_mm"] for x in record["lesions"] if x["truth_lesion"] == lesion["number"]]
    # the reference report states the diameter rounded to the millimetre
    drawn = float(f"{lesion['diameter_mm']:.0f}")
    if not mine:
        return "detection", mine
    return ("ok" if any(sizes_within(m, drawn) for m in mine) else "measurement"), mine


def case_lesions(record: dict[str, Any], smooth_mm: float) -> list[dict[str, Any]]:
    case = generate_case(int(record["seed"]), shape=SHAPE, spacing=SPACING, modality="CT")
    truth = case.truth.to_json()
    rows = {
        r["lesion"]: r
        for r in lesion_rows(
            case.image.astype(np.float32),
            case.organ_labels,
            case.lesion_labels,
            np.asarray(SPACING),
            truth,
            smooth_mm,
        )
    }
    out: list[dict[str, Any]] = []
    for les in truth["lesions"]:
        state, measured = status(les, record)
        row = rows.get(les["number"], {})
        out.append(
            {
                "case_id": truth["case_id"],
                "phase": truth["phase"],
                "lesion": les["number"],
                "disease": les.get("disease"),
                "organ": les["organ"],
                "diameter_mm": les["diameter_mm"],
                "status": state,
                "measured_long_mm": measured,
                **{
                    k: row.get(k)
                    for k in ("core", "rim", "ring", "organ_median", "organ_robust_sd")
                },
                "smoothed_core_z": row.get("smoothed_core_z"),
            }
        )
    return out


def summary(lesions: list[dict[str, Any]]) -> dict[str, Any]:
    by: dict[str, dict[str, int]] = {}
    for state in ("ok", "measurement", "detection"):
        mine = [x for x in lesions if x["status"] == state]
        by[state] = {
            name: sum(
                1
                for x in mine
                if x["smoothed_core_z"] is not None and lo <= abs(x["smoothed_core_z"]) < hi
            )
            for name, lo, hi in BINS
        }
        by[state]["no_measure"] = sum(x["smoothed_core_z"] is None for x in mine)
    return {
        "lesions": len(lesions),
        "by_status": dict(Counter(x["status"] for x in lesions)),
        "by_status_and_abs_smoothed_z": by,
        "missed_by_organ": dict(
            Counter(f"{x['organ']}: {x['status']}" for x in lesions if x["status"] != "ok")
        ),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--records", type=Path, default=ROOT / "bench" / "results" / "report_network_cases.jsonl"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "report_misses.json")
    ap.add_argument("--smooth-mm", type=float, default=4.0)
    args = ap.parse_args(argv)
    records = load_cases(args.records)
    lesions = [x for r in records for x in case_lesions(r, args.smooth_mm)]
    result = {
        "data": "synthetic generator cases (models.synthetic.generate_case, the seeds of "
        f"{args.records.name}); medians on the reference masks (bench/lesion_figure.py); "
        "status from the records' network findings",
        "model": records[0]["model"] if records else None,
        "cases": len(records),
        "smooth_mm": args.smooth_mm,
        "summary": summary(lesions),
        "lesions": lesions,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
