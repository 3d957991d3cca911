"""``build_all``: every output object for one series' findings, in sending order."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pydicom.dataset import Dataset

from dicom_sr.keyimages import build_key_objects, build_secondary_captures
from dicom_sr.options import OutputOptions
from dicom_sr.report_pdf import build_pdf
from dicom_sr.seg import build_seg
from dicom_sr.sr import build_sr
from models.findings import Findings

log = logging.getLogger(__name__)


def build_all(
    findings: Findings,
    source_datasets: Sequence[Dataset],
    options: OutputOptions,
    *,
    frame_numbers: Sequence[int | None] | None = None,
) -> list[tuple[str, Dataset]]:
    """SEG, SR, PDF, SC images and KOS as ``(kind, dataset)`` pairs.

    Kinds: "seg", "sr", "pdf", "sc", "ko". Objects referenced by others come
    first (SEG before SR, SC before KOS), so sending in order never leaves a
    dangling reference in the PACS. Without any segmented voxel there is no SEG
    and no SR; the PDF is still written.
    """
    out: list[tuple[str, Dataset]] = []
    has_voxels = any(o.mask.any() for o in findings.organs) or any(
        les.mask.any() for les in findings.lesions
    )
    sr = None
    if has_voxels:
        seg = build_seg(findings, source_datasets, options=options, frame_numbers=frame_numbers)
        out.append(("seg", seg))
        sr = build_sr(findings, source_datasets, seg, options=options, frame_numbers=frame_numbers)
        out.append(("sr", sr))
    else:
        log.info("no segmented voxels: no SEG or SR written")
    if options.pdf:
        out.append(
            (
                "pdf",
                build_pdf(
                    findings, source_datasets, options=options, sr=sr, frame_numbers=frame_numbers
                ),
            )
        )
    scs: list[Dataset] = []
    if options.secondary_capture:
        scs = build_secondary_captures(
            findings, source_datasets, options=options, frame_numbers=frame_numbers
        )
        out.extend(("sc", sc) for sc in scs)
    has_keys = any(les.mask.any() for les in findings.lesions)
    if options.key_objects and has_keys:
        out.append(
            (
                "ko",
                build_key_objects(
                    findings,
                    source_datasets,
                    options=options,
                    secondary_captures=scs,
                    frame_numbers=frame_numbers,
                ),
            )
        )
    return out
