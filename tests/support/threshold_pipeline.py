"""A TEST-ONLY pipeline standing in for the model: a real DICOM SEG of HU > 100.

Importing this module registers the pipeline ``threshold-test`` (version
``t1``) in :mod:`node.pipelines`; ``hpb-node serve --pipeline-module
tests.support.threshold_pipeline`` does the same in a node process. The SEG is
written by highdicom with deterministic UIDs (:func:`dicom_sr.uids.output_uid`),
so a re-run replaces it in the PACS. ``HPB_TEST_PIPELINE_SLEEP`` (seconds, with
heartbeats) makes a job last long enough for crash tests.
"""

from __future__ import annotations

import os
import time

import highdicom as hd
import numpy as np
from pydicom import dcmread
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from dicom_sr.uids import output_uid
from node.errors import PipelineError
from node.pipelines import JobContext, PipelineResult, register

NAME = "threshold-test"
VERSION = "t1"
HU_THRESHOLD = 100.0


def threshold_pipeline(ctx: JobContext) -> PipelineResult:
    delay = float(os.environ.get("HPB_TEST_PIPELINE_SLEEP", "0") or 0)
    end = time.monotonic() + delay
    while time.monotonic() < end:
        ctx.heartbeat()
        time.sleep(0.1)
    if ctx.modality.upper() == "US":
        return PipelineResult([], "no model for US", {"modality": "US"})
    datasets = [dcmread(p) for p in ctx.instance_paths]
    if any("ImagePositionPatient" not in ds for ds in datasets):
        raise PipelineError("threshold pipeline needs cross-sectional images with positions")
    normal = np.cross(
        np.asarray(datasets[0].ImageOrientationPatient[:3], dtype=float),
        np.asarray(datasets[0].ImageOrientationPatient[3:], dtype=float),
    )
    datasets.sort(key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))))
    hu = np.stack(
        [
            ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
            for ds in datasets
        ]
    )
    mask = (hu > HU_THRESHOLD).astype(np.uint8)
    if not mask.any():
        return PipelineResult([], "no voxel above threshold", {"voxels": 0})
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="HU above 100 (test)",
        segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Bone,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="threshold-test", version=VERSION, family=codes.cid7162.ArtificialIntelligence
        ),
    )
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=output_uid(ctx.series_uid, ctx.pipeline_version, "seg"),
        series_number=9101,
        sop_instance_uid=output_uid(ctx.series_uid, ctx.pipeline_version, "seg", "1"),
        instance_number=1,
        manufacturer="hpb-node tests",
        manufacturer_model_name="threshold-test",
        software_versions=VERSION,
        device_serial_number="test-1",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=True,
    )
    return PipelineResult(
        [("seg", seg)], "1 object (seg)", {"voxels": int(mask.sum()), "slices": len(datasets)}
    )


register(NAME, VERSION, threshold_pipeline, "TEST ONLY: SEG of HU > 100")


def count_pipeline(ctx: JobContext) -> PipelineResult:
    """TEST ONLY: append the job id to ``HPB_TEST_COUNT_FILE`` (one line per run), no outputs."""
    path = os.environ["HPB_TEST_COUNT_FILE"]
    time.sleep(float(os.environ.get("HPB_TEST_PIPELINE_SLEEP", "0") or 0))
    ctx.heartbeat()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{ctx.job_id} {os.getpid()}\n".encode())
    finally:
        os.close(fd)
    return PipelineResult([], "counted", {})


register("count-test", "c1", count_pipeline, "TEST ONLY: records each run")
