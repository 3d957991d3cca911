"""Pipelines: a registry of name → callable(JobContext) → PipelineResult.

A pipeline turns one series into result objects (pydicom Datasets). The worker
writes them to the results store and adds one outbox row per object and
destination; a pipeline never sends anything itself.

Errors: :class:`node.errors.PipelineError` means the input or the configuration
cannot work (a refused series, a missing model bundle): the job fails at once
with that message. Any other exception is taken as transient (disk, memory,
database) and retried with backoff up to the job's ``max_attempts``.

``hpb-ct-mr`` is the product pipeline: volume loader → segmentation model →
multimodal fusion and report → DICOM SEG, TID 1500 SR, PDF, key images. An
ultrasound series ends with the outcome "no model for US" (never a silent drop).
Test-only pipelines register themselves from ``tests/support``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from node.errors import PipelineError
from node.settings import Settings

log = logging.getLogger(__name__)

PRODUCT_PIPELINE = "hpb-ct-mr"
PRODUCT_VERSION = "1.0"
MAX_SUMMARY_LESIONS = 50  # the job summary lists at most this many lesions


@dataclass
class JobContext:
    """What a pipeline gets for one job."""

    job_id: int
    attempt: int
    series_uid: str
    study_uid: str
    modality: str
    generation: int
    pipeline_version: str  # the version stamped into output UIDs
    instance_paths: list[Path]  # absolute paths of the series' instances
    settings: Settings
    study: dict[str, Any] = field(default_factory=dict)  # patient/accession for clinical linking
    # (headers=volume.headers) -> models.labs.ClinicalContext
    clinical_loader: Callable[..., Any] | None = None
    heartbeat: Callable[[], None] = lambda: None
    progress: Callable[[str], None] = lambda _msg: None


@dataclass
class PipelineResult:
    outputs: list[tuple[str, Dataset]]  # (kind, dataset): kind in seg, sr, pdf, sc, ko
    outcome: str
    summary: dict[str, Any] = field(default_factory=dict)


PipelineFn = Callable[[JobContext], PipelineResult]


@dataclass(frozen=True)
class PipelineSpec:
    name: str
    version: str
    run: PipelineFn
    description: str = ""


_REGISTRY: dict[str, PipelineSpec] = {}


def register(name: str, version: str, run: PipelineFn, description: str = "") -> None:
    """Add (or replace) a pipeline under ``name``."""
    _REGISTRY[name] = PipelineSpec(name, version, run, description)


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get(name: str) -> PipelineSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise PipelineError(f"unknown pipeline {name!r} (registered: {known})") from None


def names() -> list[str]:
    return sorted(_REGISTRY)


# --------------------------------------------------------------------------- hpb-ct-mr


def _bundle_path(settings: Settings) -> Path:
    if settings.model.bundle is not None:
        return Path(settings.model.bundle)
    try:
        from models.bundle import DEMO_BUNDLE
    except ImportError as exc:
        raise PipelineError(f"the model package is not installed: {exc}") from exc
    return DEMO_BUNDLE


def _summary(findings: Any) -> dict[str, Any]:
    """A compact, identifier-free summary of Findings for admins and the demo."""
    return {
        "diagnoses": {str(d.disease.value): float(d.probability) for d in findings.diagnoses},
        "lesions": [
            {
                "id": les.id,
                "organ": str(les.organ.value),
                "kind": str(les.kind.value),
                "volume_ml": round(float(les.volume_ml), 2),
                "long_axis_mm": round(float(les.long_axis.length_mm), 1),
                "key_slice": int(les.key_slice),
            }
            for les in findings.lesions[:MAX_SUMMARY_LESIONS]
        ],
        "lesion_count": len(findings.lesions),
        "organs": {str(o.organ.value): round(float(o.volume_ml), 1) for o in findings.organs},
        "report": [str(s.text) for s in findings.report][:200],
        "contrast_phase": str(findings.provenance.contrast_phase.value),
        # how the phase was found, what the model leaves unreported, and why
        "notes": [str(n) for n in findings.provenance.notes],
    }


def hpb_ct_mr(ctx: JobContext) -> PipelineResult:
    """The product pipeline (see module docstring)."""
    if ctx.modality.upper() == "US":
        return PipelineResult([], "no model for US", {"modality": "US"})
    try:
        from dicom_sr.build import build_all
        from dicom_sr.options import OutputOptions
        from models.bundle import BundleError, load_bundle
        from models.inference import InferenceError, analyse
        from models.loader import load_series
        from models.report import with_diagnoses_and_report
        from models.volume import VolumeError
    except ImportError as exc:
        raise PipelineError(f"a model or output package is missing: {exc}") from exc
    bundle_dir = _bundle_path(ctx.settings)
    if not bundle_dir.is_dir():
        raise PipelineError(
            f"model bundle not found at {bundle_dir} (set model.bundle in the settings)"
        )
    ctx.progress("loading series")
    try:
        volume = load_series(ctx.instance_paths)
    except VolumeError as exc:
        raise PipelineError(f"series refused by the volume loader: {exc}") from exc
    ctx.heartbeat()
    try:
        bundle = load_bundle(bundle_dir)
    except BundleError as exc:
        raise PipelineError(f"model bundle unusable: {exc}") from exc
    clinical = (
        ctx.clinical_loader(headers=volume.headers) if ctx.clinical_loader is not None else None
    )
    ctx.progress("segmenting")
    try:
        findings = analyse(
            volume,
            bundle,
            list(clinical.values) if clinical is not None else None,
            device=ctx.settings.model.device,
        )
    except InferenceError as exc:
        if "no model" in str(exc).lower() or type(exc).__name__ == "NoModelForModality":
            return PipelineResult([], f"no model for {ctx.modality}", {"modality": ctx.modality})
        raise PipelineError(f"inference failed: {exc}") from exc
    ctx.heartbeat()
    ctx.progress("diagnoses and report")
    if clinical is None:
        from models.labs import ClinicalContext

        clinical = ClinicalContext()
    findings = with_diagnoses_and_report(findings, clinical, modality=volume.modality)
    ctx.progress("writing DICOM outputs")
    from pydicom import dcmread

    sources = [dcmread(p) for p in ctx.instance_paths]
    options = OutputOptions(
        pipeline_version=ctx.pipeline_version,
        not_for_clinical_use=ctx.settings.export.not_for_clinical_use,
    )
    outputs = build_all(findings, sources, options)
    kinds = ", ".join(k for k, _ in outputs)
    return PipelineResult(outputs, f"{len(outputs)} objects ({kinds})", _summary(findings))


register(
    PRODUCT_PIPELINE, PRODUCT_VERSION, hpb_ct_mr, "segmentation, fusion, report, DICOM outputs"
)


def kinds_of(outputs: Sequence[tuple[str, Dataset]]) -> list[str]:
    return [k for k, _ in outputs]
