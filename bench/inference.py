"""CPU wall time and peak memory of the node's inference on 512 x 512 CT series.

    .venv/bin/python bench/inference.py [--slices 100 300 600] [--threads 2]
        [--out bench/results/inference.json]

For each size a fresh child process builds a CT ``Volume`` of N slices of
512 x 512 (0.75 mm pixels, 1.0 mm slices): the real TotalSegmentator example CT
from ``../shared/data`` resampled onto that grid (or, without the shared data,
a synthetic case from ``models.synthetic``), then times
``models.inference.analyse`` with the shipped bundle (reorientation, resampling,
normalisation, sliding-window inference, post-processing, resampling back,
measurements). Series loading from DICOM is not included. Peak RSS is the
child's ``ru_maxrss`` (the whole process, volume included).

The CPU of the machine these numbers were taken on is shared with other jobs;
the load average at the start of each run is recorded next to the figures.
Target: <= 60 s and <= 6 GB for 300 slices on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _make_volume(slices: int) -> tuple[np.ndarray, np.ndarray, str]:
    import torch

    shared = ROOT.parent / "shared" / "data" / "ct_abdomen_3mm" / "ct.nii.gz"
    affine = np.array(
        [[0, 0, 0.75, -192.0], [0, 0.75, 0, -192.0], [1.0, 0, 0, -300.0], [0, 0, 0, 1]]
    )
    if shared.is_file():
        from models.nifti import load_nifti_krc

        ct, _ = load_nifti_krc(shared)
        src = "real CT (TotalSegmentator example) resampled"
        base = torch.from_numpy(ct.astype(np.float32))[None, None]
    else:
        from models.synthetic.generator import generate_case

        case = generate_case(1)
        src = "synthetic CT resampled"
        base = torch.from_numpy(case.image)[None, None]
    with torch.no_grad():
        arr = torch.nn.functional.interpolate(base, size=(slices, 512, 512), mode="trilinear")
    return arr[0, 0].numpy().astype(np.float32), affine, src


def run_one(slices: int, threads: int) -> dict[str, object]:
    import torch

    from models.bundle import load_bundle
    from models.inference import analyse
    from models.volume import Volume

    torch.set_num_threads(threads)
    array, affine, src = _make_volume(slices)
    vol = Volume(
        array=array,
        affine=affine,
        sop_instance_uids=tuple(f"1.2.826.0.1.3680043.10.1451.9.{i}" for i in range(slices)),
        modality="CT",
        series_instance_uid="1.2.826.0.1.3680043.10.1451.9",
        study_instance_uid="1.2.826.0.1.3680043.10.1451.8",
        frame_of_reference_uid="1.2.826.0.1.3680043.10.1451.7",
    )
    bundle = load_bundle()
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    findings = analyse(vol, bundle)
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {
        "slices": slices,
        "rows": 512,
        "columns": 512,
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(peak_mb, 1),
        "device": f"cpu ({threads} torch threads)",
        "load_average_at_start": round(load, 2),
        "organs": len(findings.organs),
        "lesions": len(findings.lesions),
        "input": src,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", type=int, nargs="+", default=[100, 300, 600])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "inference.json")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(run_one(args.one, args.threads)))
        return 0
    results = []
    for n in args.slices:
        proc = subprocess.run(
            [sys.executable, __file__, "--one", str(n), "--threads", str(args.threads)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(row), flush=True)
        results.append(row)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
