"""Benchmark: write a BINARY SEG with 30 segments on a 512 x 512 x 300 CT series.

Eight organ-like ellipsoids (disjoint) and 22 spherical lesions inside them (so
segments overlap, the default BINARY policy), on a synthetic in-memory series
whose datasets carry full CT image headers but no pixel data (the SEG builder
reads geometry only). Records seconds and peak RSS of this process in
bench/results/seg_write.json. Masks are allocated with np.zeros, as a model's
post-processing would, so untouched pages of empty masks are not resident.

    .venv/bin/python bench/seg_write.py
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicom_sr import OutputOptions, build_seg  # noqa: E402
from dicom_sr.testing import findings_from_masks  # noqa: E402
from models.series_writer import derived_uid  # noqa: E402
from models.vocab import LesionKind, Organ  # noqa: E402

SHAPE = (300, 512, 512)


def series() -> tuple[list[Dataset], np.ndarray]:
    study, ser, frame = (derived_uid("bench", x) for x in ("study", "series", "for"))
    aff = np.eye(4)
    aff[:3, 0] = (0, 0, 1.0)
    aff[:3, 1] = (0, 0.7, 0)
    aff[:3, 2] = (0.7, 0, 0)
    aff[:3, 3] = (-180.0, -180.0, -150.0)
    out = []
    for k in range(SHAPE[0]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = derived_uid(ser, str(k))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, ser, frame
        ds.Modality = "CT"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Bench^X", "B1", "", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "1200", "A1", "1"
        ds.ReferringPhysicianName = ""
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.Rows, ds.Columns = SHAPE[1], SHAPE[2]
        ds.ImagePositionPatient = [float(v) for v in aff[:3, 3] + k * aff[:3, 0]]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = 1.0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        out.append(ds)
    return out, aff


def ellipsoid(
    centre: tuple[int, int, int], radii: tuple[int, int, int], within: np.ndarray | None = None
) -> np.ndarray:
    """An ellipsoid mask; only its bounding box is written (the rest stays untouched)."""
    m = np.zeros(SHAPE, dtype=bool)
    lo = [max(c - r, 0) for c, r in zip(centre, radii, strict=True)]
    hi = [min(c + r + 1, n) for c, r, n in zip(centre, radii, SHAPE, strict=True)]
    kk, rr, cc = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    d = (
        ((kk - centre[0]) / radii[0]) ** 2
        + ((rr - centre[1]) / radii[1]) ** 2
        + ((cc - centre[2]) / radii[2]) ** 2
    )
    box = d <= 1.0
    if within is not None:
        box &= within[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = box
    return m


def main() -> None:
    dss, aff = series()
    organ_specs = [
        (Organ.LIVER, (140, 200, 150), (90, 110, 110)),
        (Organ.SPLEEN, (130, 200, 400), (50, 60, 50)),
        (Organ.PANCREAS, (170, 300, 280), (25, 30, 90)),
        (Organ.GALLBLADDER, (180, 320, 150), (25, 25, 25)),
        (Organ.KIDNEY_LEFT, (200, 380, 400), (55, 45, 35)),
        (Organ.KIDNEY_RIGHT, (210, 380, 110), (55, 45, 35)),
        (Organ.PORTAL_SPLENIC_VEIN, (160, 260, 250), (10, 12, 120)),
        (Organ.BILE_DUCT, (175, 290, 200), (30, 6, 6)),
    ]
    organs = {o: ellipsoid(c, r) for o, c, r in organ_specs}
    rng = np.random.default_rng(0)
    lesions = []
    for i in range(22):
        organ = [Organ.LIVER, Organ.LIVER, Organ.SPLEEN, Organ.PANCREAS, Organ.KIDNEY_LEFT][i % 5]
        idx = np.argwhere(organs[organ][::7, ::7, ::7]) * 7
        centre = idx[rng.integers(len(idx))]
        r = int(rng.integers(4, 15))
        mask = ellipsoid(tuple(centre), (r, r, r), within=organs[organ])
        lesions.append((organ, LesionKind.MASS, mask, None))
    findings = findings_from_masks(
        organs, lesions, aff, [str(d.SOPInstanceUID) for d in dss], str(dss[0].SeriesInstanceUID)
    )
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    seg = build_seg(findings, dss, options=OutputOptions(pipeline_version="bench"))
    out = ROOT / "bench" / "results" / "seg_write.dcm"
    seg.save_as(out, enforce_file_format=True)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    size_mb = out.stat().st_size / 1e6
    check = pydicom.dcmread(out, stop_before_pixels=True)
    out.unlink()
    result = {
        "segments": len(check.SegmentSequence),
        "frames": int(check.NumberOfFrames),
        "segments_overlap": str(check.SegmentsOverlap),
        "series_shape_krc": list(SHAPE),
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(peak, 1),
        "rss_before_build_mb": round(rss_before, 1),
        "file_mb": round(size_mb, 1),
        "targets": {"seconds": 10, "peak_rss_mb": 2048},
        "note": (
            "build_seg + save_as of a BINARY SEG (8 organs + 22 overlapping lesions); "
            "in-memory source headers without pixel data; peak RSS is the whole process "
            "(masks included). Measured on a shared 2-core CPU with other engineers' jobs "
            "running, so seconds are noisy."
        ),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%MZ"),
    }
    (ROOT / "bench" / "results" / "seg_write.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
