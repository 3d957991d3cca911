# ruff: noqa: E402
"""How a synthetic case's reference lesions look: a figure and the figures behind it.

    .venv/bin/python bench/lesion_figure.py DATASET CASE_ID --out FILE.png
        [--smooth-mm 4] [--json FILE.json]

``DATASET`` is a synthetic dataset written by ``hpb-node synth``. For each reference
lesion of ``CASE_ID`` it prints (and writes to ``--json``) the median attenuation of the
lesion's core (the reference mask eroded by one voxel), of its outer voxel layer (the
rim), of a ring of its organ 1-2 voxels around it and of the whole organ without
lesions, with the organ's robust standard deviation (1.4826 x MAD); then the same
medians in the image smoothed inside the organ by a Gaussian of ``--smooth-mm`` (the
noise averaged away, so what remains is the lesion against the organ's own texture).
The figure shows each lesion's middle slice, plain and with the reference outline, in
a window of 100 units around the organ's median.

It reads the reference masks: it says what the image holds where a lesion is known to
be, not what any model found. All of it is on **synthetic** data.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.inference import robust_stats, smooth_inside
from models.nifti import load_nifti_krc
from models.synthetic.labels import LABEL_OF_ORGAN
from models.vocab import Organ


def lesion_rows(
    image: np.ndarray,
    organs: np.ndarray,
    lesions: np.ndarray,
    spacing: np.ndarray,
    truth: dict[str, Any],
    smooth_mm: float,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    # per organ label: the smoothed image, its median and robust SD, the raw ones
    stats: dict[int, tuple[np.ndarray, float, float, float, float]] = {}
    for les in truth["lesions"]:
        m = lesions == les["number"]
        if not m.any():
            continue
        label = LABEL_OF_ORGAN[Organ(les["organ"])]
        organ = (organs == label) & (lesions == 0)
        if label not in stats:
            s = smooth_inside(image, organ | (lesions > 0), smooth_mm / spacing)
            stats[label] = (s, *robust_stats(s[organ]), *robust_stats(image[organ]))
        s, s_med, s_sd, o_med, o_sd = stats[label]
        core = ndimage.binary_erosion(m)
        if not core.any():
            core = m
        rim = m & ~core
        ring = ndimage.binary_dilation(m, iterations=2) & ~m & organ
        rows.append(
            {
                "lesion": les["number"],
                "disease": les.get("disease"),
                "organ": les["organ"],
                "diameter_mm": les["diameter_mm"],
                "core": float(np.median(image[core])),
                "rim": float(np.median(image[rim])) if rim.any() else None,
                "ring": float(np.median(image[ring])) if ring.any() else None,
                "organ_median": o_med,
                "organ_robust_sd": round(o_sd, 2),
                "smoothed_core": round(float(np.median(s[core])), 2),
                "smoothed_organ_median": round(s_med, 2),
                "smoothed_organ_robust_sd": round(s_sd, 2),
                "smoothed_core_z": round((float(np.median(s[core])) - s_med) / s_sd, 2)
                if s_sd > 0
                else None,
            }
        )
    return rows


def figure(image: np.ndarray, lesions: np.ndarray, rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(rows), figsize=(3.2 * len(rows), 6.6), squeeze=False)
    for i, row in enumerate(rows):
        m = lesions == row["lesion"]
        k, r, c = (int(v) for v in np.rint(np.argwhere(m).mean(axis=0)))
        view = (slice(max(r - 28, 0), r + 28), slice(max(c - 28, 0), c + 28))
        lo = row["organ_median"] - 50
        for j in (0, 1):
            ax = axes[j, i]
            ax.imshow(image[k][view], cmap="gray", vmin=lo, vmax=lo + 100)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[1, i].contour(m[k][view], levels=[0.5], colors="r", linewidths=0.8)
        axes[0, i].set_title(
            f"lesion {row['lesion']} {row['disease']}\n{row['diameter_mm']} mm, slice {k}",
            fontsize=8,
        )
    fig.suptitle("top: image; bottom: reference outline (synthetic case)", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=72)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("dataset", type=Path)
    ap.add_argument("case_id")
    ap.add_argument("--out", type=Path, required=True, help="the figure (PNG)")
    ap.add_argument("--smooth-mm", type=float, default=4.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    rows_in = [
        json.loads(x)
        for x in (args.dataset / "manifest.jsonl").read_text().splitlines()
        if x.strip()
    ]
    row = next((r for r in rows_in if r["case_id"] == args.case_id), None)
    if row is None:
        raise SystemExit(f"{args.case_id} is not in {args.dataset / 'manifest.jsonl'}")
    image, affine = load_nifti_krc(args.dataset / row["image"])
    organs = np.asarray(load_nifti_krc(args.dataset / row["label"])[0])
    lesions = np.asarray(load_nifti_krc(args.dataset / row["lesions"])[0]).astype(np.int32)
    truth = json.loads((args.dataset / row["truth"]).read_text())
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    rows = lesion_rows(
        np.asarray(image, dtype=np.float32), organs, lesions, spacing, truth, args.smooth_mm
    )
    if not rows:
        raise SystemExit(f"{args.case_id} has no reference lesion with voxels")
    figure(np.asarray(image, dtype=np.float32), lesions, rows, args.out)
    result = {
        "data": "synthetic generator case (hpb-node synth); medians on the reference masks",
        "dataset": args.dataset.name,
        "case_id": args.case_id,
        "modality": row["modality"],
        "phase": row["phase"],
        "smooth_mm": args.smooth_mm,
        "lesions": rows,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
