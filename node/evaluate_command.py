"""``hpb-node evaluate``: the clinical study's outcome measures on a site's own data.

Reads a reference set and the model's results (folders in the layout of
``docs/evaluation.md``; results optionally fetched from the PACS over DICOMweb,
C-GET or C-MOVE, or computed now by running the model on the reference
studies), writes ``evaluation.json`` and ``evaluation.html`` into ``--out``, and
exits 0 when every ``--threshold`` is met, 1 when one is not (2 on errors).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np

from models.evaluation import (
    CaseMasks,
    EvaluationSet,
    Options,
    Threshold,
    ThresholdError,
    check_thresholds,
    evaluate,
    load_set,
    write_outputs,
)
from models.evaluation.dataset import (
    VOLUME_UNITS_ML,
    DatasetError,
    SRContent,
    group_structure,
    is_lesion_label,
    structure_name,
)
from models.evaluation.pacs import (
    DicomWebClient,
    DimsePeer,
    MoveDestination,
    PacsFetchError,
    cget_results,
    cmove_results,
    fetch_results,
)
from node.errors import ConfigError, PipelineError

log = logging.getLogger(__name__)

EXIT_MET = 0
EXIT_NOT_MET = 1


# ---------------------------------------------------------------------------
# dicom_sr readers as evaluation readers (models cannot import dicom_sr)


def seg_reader(path: Path) -> CaseMasks:
    """A SEG read by :func:`dicom_sr.readers.read_seg` on its own grid."""
    from dicom_sr.errors import DicomOutputError
    from dicom_sr.readers import read_seg

    try:
        seg = read_seg(path)
    except DicomOutputError as exc:
        raise DatasetError(str(exc)) from exc
    if seg.affine is None or not seg.masks:
        raise DatasetError(f"{path}: the SEG has no masks on a regular grid")
    first = next(iter(seg.masks.values()))
    shape = (int(first.shape[0]), int(first.shape[1]), int(first.shape[2]))
    out = CaseMasks(seg.affine, shape)
    n = 0
    for info in seg.segments:
        mask = seg.masks[info.number]
        if is_lesion_label(info.label):
            if out.lesions is None:
                out.lesions = np.zeros(shape, dtype=np.int32)
            n += 1
            out.lesions[mask & (out.lesions == 0)] = n
        else:
            name = structure_name(info.label)
            out.structures[name] = out.structures.get(name, np.zeros(shape, bool)) | mask
    return out


def sr_reader(path: Path) -> SRContent:
    """Lesion long axes and report text of a TID 1500 SR read by :func:`dicom_sr.readers.read_sr`."""
    from dicom_sr.errors import DicomOutputError
    from dicom_sr.readers import read_sr

    try:
        sr = read_sr(path)
    except DicomOutputError as exc:
        raise DatasetError(str(exc)) from exc
    # one diameter per lesion: a lesion's volumetric and planar (key-slice) groups
    # share its tracking UID
    diameters: dict[str, float] = {}
    volumes: dict[str, float] = {}
    for i, g in enumerate(sr.groups):
        where = group_structure(g.tracking_id, g.finding_sites[0][2] if g.finding_sites else "")
        for m in g.measurements if not is_lesion_label(g.tracking_id) else ():
            factor = VOLUME_UNITS_ML.get(m.unit[0] if m.unit else "")
            if m.name[2].lower() == "volume" and factor is not None:
                volumes.setdefault(where, m.value * factor)
        best = 0.0
        for m in g.measurements:
            meaning = m.name[2].lower()
            unit = m.unit[0] if m.unit else ""
            factor = {"mm": 1.0, "cm": 10.0}.get(unit)
            if factor and ("diameter" in meaning or "long axis" in meaning):
                best = max(best, m.value * factor)
        if best > 0:
            key = g.tracking_uid or g.tracking_id or f"#{i}"
            diameters[key] = max(diameters.get(key, 0.0), best)
    text = " ".join(t for t in (sr.findings_text, sr.impression_text) if t)
    return SRContent(tuple(diameters.values()), text, tuple(volumes.items()))


def _readers() -> dict[str, Any]:
    try:
        import dicom_sr.readers  # noqa: F401
    except ImportError:  # pragma: no cover - dicom_sr is part of the node
        return {}
    return {"seg_reader": seg_reader, "sr_reader": sr_reader}


# ---------------------------------------------------------------------------
# running the model now


def run_model(reference: EvaluationSet, bundle_path: str | None, modality: str) -> EvaluationSet:
    """The model's results computed now on the reference studies, as the node computes
    them: segmentation and measurements (``models.inference.analyse``), then fusion
    diagnoses and the grounded report (``models.report.with_diagnoses_and_report``) with
    the case's clinical context where the reference has one (else images only)."""
    from models.bundle import BundleError, load_bundle
    from models.evaluation.adapters import add_findings, volume_from_image
    from models.inference import InferenceError, analyse
    from models.labs import ClinicalContext
    from models.report import with_diagnoses_and_report
    from models.volume import VolumeError

    if not reference.images:
        raise ConfigError(
            "--run-model needs the studies (images/<case>, or a manifest's image/dicom)"
        )
    try:
        bundle = load_bundle(bundle_path)
    except BundleError as exc:
        raise ConfigError(f"cannot load the model bundle: {exc}") from exc
    results = EvaluationSet(source=f"model run now ({bundle.name} {bundle.version})")
    for case_id, path in sorted(reference.images.items()):
        try:
            volume = volume_from_image(path, modality)
            findings = analyse(volume, bundle)
            findings = with_diagnoses_and_report(
                findings, reference.clinical.get(case_id, ClinicalContext())
            )
        except (InferenceError, VolumeError, ValueError) as exc:
            raise PipelineError(f"case {case_id}: the model could not run: {exc}") from exc
        add_findings(results, case_id, findings, volume.affine)
        log.info("case %s: model run (%d lesions)", case_id, len(findings.lesions))
    return results


# ---------------------------------------------------------------------------
# command


def _fetch(args: argparse.Namespace, dest: Path, *, images: bool) -> None:
    """Fetch each ``--study`` from the PACS (DICOMweb, C-GET or C-MOVE) into ``dest``."""
    if not args.study:
        raise ConfigError("fetching from the PACS needs at least one --study CASE=STUDYUID")
    studies = {}
    for item in args.study:
        case, sep, uid = item.partition("=")
        if not sep or not case or not uid:
            raise ConfigError(f"--study {item!r} is not CASE=STUDYUID")
        studies[case] = uid
    try:
        if args.pacs_dimse and args.retrieve == "move":
            peer = DimsePeer.parse(args.pacs_dimse)
            ours = MoveDestination(args.calling_aet, args.move_host, args.move_port)
            cmove_results(peer, studies, dest, destination=ours, images=images)
        elif args.pacs_dimse:
            peer = DimsePeer.parse(args.pacs_dimse)
            cget_results(peer, studies, dest, calling_aet=args.calling_aet, images=images)
        else:
            auth = tuple(args.pacs_user.split(":", 1)) if args.pacs_user else None
            with DicomWebClient(args.pacs_url, auth=auth) as client:  # type: ignore[arg-type]
                fetch_results(client, studies, dest, images=images)
    except PacsFetchError as exc:
        raise PipelineError(f"fetching from the PACS failed: {exc}") from exc


def run(args: argparse.Namespace) -> int:
    try:
        thresholds = [Threshold.parse(t) for t in args.threshold]
    except ThresholdError as exc:
        raise ConfigError(str(exc)) from exc
    from_pacs = bool(args.pacs_url or args.pacs_dimse)
    if args.pacs_url and args.pacs_dimse:
        raise ConfigError("give --pacs-url or --pacs-dimse, not both")
    if args.retrieve == "move" and not args.pacs_dimse:
        raise ConfigError("--retrieve move needs --pacs-dimse HOST:PORT:AET")
    if args.retrieve == "move" and not args.move_port:
        raise ConfigError(
            "--retrieve move needs --move-port: the port the PACS knows for "
            f"AE title {args.calling_aet} (its move destination)"
        )
    if sum((bool(args.results), from_pacs and not args.run_model, bool(args.run_model))) != 1:
        raise ConfigError(
            "give exactly one of --results, --pacs-url/--pacs-dimse (with --study), or --run-model "
            "(which may take its studies from the PACS with --pacs-url/--pacs-dimse)"
        )
    readers = _readers()
    try:
        reference = load_set(args.reference, reference=True, **readers)
        fetched = args.out / "fetched"
        if from_pacs:
            _fetch(args, fetched, images=True)
        if args.run_model:
            if from_pacs:  # the studies as the PACS holds them
                images = fetched / "images"
                for case in (
                    sorted(p for p in images.iterdir() if p.is_dir()) if images.is_dir() else []
                ):
                    reference.images[case.name] = case
            results = run_model(reference, args.bundle, args.modality)
        elif from_pacs:
            results = load_set(fetched, reference=False, **readers)
        else:
            results = load_set(args.results, reference=False, **readers)
    except DatasetError as exc:
        raise ConfigError(f"input unusable: {exc}") from exc
    opt = Options(threshold=args.probability_threshold, n_bootstrap=args.bootstrap, seed=args.seed)
    result = evaluate(reference, results, opt)
    checks = check_thresholds(result, thresholds)
    json_path, html_path = write_outputs(result, reference, results, args.out, title=args.title)
    print(f"wrote {json_path} and {html_path}")
    for c in checks:
        print(f"{'met' if c['met'] else 'NOT MET'}: {c['threshold']} (value {c['value']})")
    return EXIT_MET if all(c["met"] for c in checks) else EXIT_NOT_MET
