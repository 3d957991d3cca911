"""``hpb-node demo``: one synthetic case through the whole node, on embedded defaults.

Steps (each printed as it happens):

1. generate a synthetic abdominal CT case (``models.synthetic``) and write it
   as a DICOM series;
2. start an archive standing in for the PACS: Orthanc when installed
   (``/usr/sbin/Orthanc``), otherwise a small pynetdicom Storage SCP that
   keeps what it receives in a folder;
3. start the node (SQLite and spool in the work folder, SCP, HTTP, scheduler,
   one worker) with one rule sending CT/MR results to the archive;
4. send the series over C-STORE (pynetdicom SCU);
5. follow the series and its job (stability, queue, pipeline, delivery);
6. show the result: diagnosis probabilities, lesions, report text, a PNG
   overlay of the key slice, and where the SEG, SR and other objects went.

Nothing is faked: the product pipeline ``hpb-ct-mr`` runs (model bundle from
``--bundle`` or ``settings.model.bundle``, else the shipped demo bundle); if it
cannot run, the demo says why (the job's last error) and exits 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from node.errors import NodeError

log = logging.getLogger(__name__)

ORTHANC = Path("/usr/sbin/Orthanc")


def say(text: str) -> None:
    print(text, flush=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- archives


@dataclass
class Archive:
    name: str
    ae_title: str
    port: int
    describe: str
    _stop: Any = None
    _list: Any = None

    def stop(self) -> None:
        if self._stop is not None:
            self._stop()

    def holds(self, sop_uid: str) -> bool:
        return bool(self._list(sop_uid)) if self._list is not None else False


def start_orthanc(workdir: Path) -> Archive:
    import httpx

    http_port, dicom_port = _free_port(), _free_port()
    config = {
        "Name": "hpb-demo-pacs",
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "DicomAlwaysAllowStore": True,
        "UnknownSopClassAccepted": True,
        "Plugins": [],
    }
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "orthanc.json").write_text(json.dumps(config))
    log_file = (workdir / "orthanc.log").open("wb")
    proc = subprocess.Popen(
        [str(ORTHANC), str(workdir / "orthanc.json")],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, TCP_NODELAY="1"),
    )
    url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise NodeError(f"Orthanc exited at start (log: {workdir / 'orthanc.log'})")
        try:
            if httpx.get(f"{url}/system", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise NodeError("Orthanc did not start within 60 s")
        time.sleep(0.2)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log_file.close()

    def lookup(sop_uid: str) -> list[Any]:
        found = httpx.post(
            f"{url}/tools/find",
            json={"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}},
            timeout=30,
        ).json()
        return list(found)

    return Archive(
        "Orthanc",
        "ORTHANC",
        dicom_port,
        f"Orthanc at {url} (DICOM port {dicom_port})",
        stop,
        lookup,
    )


def start_folder_archive(folder: Path) -> Archive:
    """A minimal pynetdicom Storage SCP that writes what it receives to ``folder``."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        Comprehensive3DSRStorage,
        EncapsulatedPDFStorage,
        KeyObjectSelectionDocumentStorage,
        SegmentationStorage,
    )

    folder.mkdir(parents=True, exist_ok=True)
    ae = AE(ae_title="DEMOARCHIVE")
    syntaxes = [
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.5",
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.90",
    ]
    for cx in AllStoragePresentationContexts:
        if cx.abstract_syntax is not None:
            ae.add_supported_context(cx.abstract_syntax, syntaxes)
    for extra in (
        SegmentationStorage,
        Comprehensive3DSRStorage,
        EncapsulatedPDFStorage,
        KeyObjectSelectionDocumentStorage,
    ):
        ae.add_supported_context(extra, syntaxes)

    def on_store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        return 0x0000

    port = _free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )

    def stop() -> None:
        if server is not None:
            server.shutdown()

    def lookup(sop_uid: str) -> bool:
        return (folder / f"{sop_uid}.dcm").is_file()

    return Archive(
        "folder archive",
        "DEMOARCHIVE",
        port,
        f"a pynetdicom Storage SCP writing to {folder}",
        stop,
        lookup,
    )


# --------------------------------------------------------------------------- steps


def make_case(workdir: Path, seed: int) -> tuple[list[Path], Any]:
    from models.series_writer import write_series
    from models.synthetic import generate_case
    from models.synthetic.writer import series_info

    case = generate_case(seed)
    info = series_info(case)
    paths = write_series(
        case.image,
        case.affine,
        workdir / "case" / "dicom",
        modality=case.truth.modality,
        info=info,
        seed=case.truth.case_id,
    )
    return paths, case


def store_clinical(sessions: Any, case: Any, first_file: Path) -> int:
    """Synthetic labs and history for the case, stored as the node's clinical data."""
    from datetime import UTC, datetime, timedelta

    from pydicom import dcmread

    from models.labs import by_name
    from models.synthetic_clinical import synthesize_clinical
    from node.clinical.store import LabRecord, NoteRecord, store_batch

    ds = dcmread(first_file, stop_before_pixels=True)
    patient_id = str(ds.PatientID)
    d = str(ds.StudyDate)
    when = datetime(int(d[:4]), int(d[4:6]), int(d[6:8]), 8, 0, tzinfo=UTC) - timedelta(days=1)
    clinical = synthesize_clinical(case.truth)
    labs = []
    for name, value in clinical.labs.items():
        test = by_name(name)
        labs.append(
            LabRecord(
                patient_id=patient_id,
                issuer="",
                code=test.loinc,
                value=value,
                unit=test.unit,
                observed_at=when,
                source="json",  # as an import of a synthetic JSON export
                source_ref=f"{patient_id}-{name}",
            )
        )
    notes = []
    if clinical.history:
        notes.append(
            NoteRecord(
                patient_id=patient_id,
                issuer="",
                kind="history",
                text=clinical.history,
                recorded_at=when,
                source="json",  # as an import of a synthetic JSON export
                source_ref=f"{patient_id}-history",
            )
        )
    with sessions.begin() as session:
        result = store_batch(session, labs, notes, where="demo")
    return int(result.stored)


def send(paths: list[Path], port: int, ae_title: str) -> int:
    from pydicom import dcmread
    from pynetdicom import AE

    datasets = [dcmread(p) for p in paths]
    ae = AE(ae_title="DEMOSCU")
    for key in {(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets}:
        ae.add_requested_context(key[0], key[1])
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        raise NodeError(f"could not associate with the node on port {port}")
    ok = 0
    try:
        for i, ds in enumerate(datasets, 1):
            status = assoc.send_c_store(ds)
            if status and int(status.Status) == 0:
                ok += 1
            if i % 16 == 0 or i == len(datasets):
                say(f"      sent {i}/{len(datasets)}")
    finally:
        assoc.release()
    return ok


def follow(sessions: Any, timeout: float) -> Any:
    """Print series/job/outbox changes until the job and its deliveries are final."""
    from sqlalchemy import select

    from node.db import TERMINAL_JOB_STATES, Job, OutboxItem, OutboxState, Series

    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sessions() as s:
            series = s.scalars(select(Series)).first()
            job = s.scalars(select(Job).order_by(Job.id.desc())).first()
            items = s.scalars(select(OutboxItem)).all() if job else []
            lines = []
            if series is not None:
                lines.append(
                    f"      series: {series.state.value} ({series.instance_count} instances)"
                )
                if series.routing_note:
                    lines.append("      routing: " + series.routing_note.splitlines()[0])
            if job is not None:
                lines.append(f"      job {job.id}: {job.state.value} (attempt {job.attempts})")
                if job.state.value == "running" and job.outcome.startswith("running: "):
                    lines.append(f"      job {job.id}: {job.outcome.removeprefix('running: ')}")
            for it in items:
                lines.append(f"      {it.kind} -> {it.destination}: {it.state.value}")
            for line in lines:
                if line not in seen:
                    seen.add(line)
                    say(line)
            settled = not items or all(
                i.state in (OutboxState.SENT, OutboxState.FAILED) for i in items
            )
            if job is not None and job.state in TERMINAL_JOB_STATES and settled:
                s.expunge(job)
                return job
            if series is not None and series.routing_note.startswith("no rule matched"):
                raise NodeError("the series matched no rule: " + series.routing_note)
        time.sleep(0.5)
    raise NodeError(f"no final result within {timeout:.0f} s")


def overlay_png(
    series_paths: list[Path], seg_path: Path, out: Path, key_slice: int | None
) -> Path | None:
    """The key slice of the series with the SEG's segments drawn over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from dicom_sr.readers import read_seg
    from models.loader import load_series

    volume = load_series(series_paths)
    seg = read_seg(seg_path, list(volume.sop_instance_uids))
    if not seg.masks:
        return None
    union = np.zeros(volume.shape, dtype=np.int32)
    for number, mask in sorted(seg.masks.items()):
        union[mask] = number
    k = (
        key_slice
        if key_slice is not None and 0 <= key_slice < volume.shape[0]
        else int(np.argmax((union > 0).sum(axis=(1, 2))))
    )
    image = np.clip((volume.array[k].astype(float) + 160) / 400, 0, 1)  # W 400 / L 40
    fig, ax = plt.subplots(figsize=(6, 6), dpi=100)
    ax.imshow(image, cmap="gray", interpolation="nearest")
    labels = np.ma.masked_where(union[k] == 0, union[k])
    ax.imshow(labels, cmap="tab20", alpha=0.45, interpolation="nearest")
    names = {s.number: s.label for s in seg.segments}
    present = sorted(int(v) for v in np.unique(union[k]) if v)
    ax.set_title(
        f"key slice {k}: " + ", ".join(names.get(n, str(n)) for n in present)[:80], fontsize=8
    )
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def run_demo(args: argparse.Namespace) -> int:
    from node.serve import NodeService
    from node.settings import Settings
    from node.worker import results_root

    t0 = time.monotonic()
    if args.pipeline_module:
        from node.serve import import_pipeline_modules

        import_pipeline_modules(list(args.pipeline_module))
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="hpb-demo-"))
    if workdir.exists() and args.workdir and args.fresh:
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    say(f"hpb-node demo (work folder {workdir}) -- NOT FOR CLINICAL USE")
    say(f"[1/6] generating a synthetic abdominal case (seed {args.seed})")
    paths, case = make_case(workdir, args.seed)
    truth = case.truth
    say(
        f"      {len(paths)} {truth.modality} slices; truth: {', '.join(str(d.value) for d in truth.diseases) or 'no disease'}"
    )
    use_orthanc = ORTHANC.is_file() and not args.no_orthanc
    say(
        "[2/6] starting the archive ("
        + ("Orthanc" if use_orthanc else "pynetdicom Storage SCP")
        + ")"
    )
    archive = (
        start_orthanc(workdir / "orthanc")
        if use_orthanc
        else start_folder_archive(workdir / "archive")
    )
    say(f"      {archive.describe}")
    service = None
    try:
        rules = {
            "destinations": [
                {
                    "name": "archive",
                    "kind": "dimse",
                    "ae_title": archive.ae_title,
                    "host": "127.0.0.1",
                    "port": archive.port,
                }
            ],
            "rules": [
                {
                    "name": "hpb-ct-mr",
                    "match": {"modality": ["CT", "MR", "US"]},
                    "pipeline": args.pipeline,
                    "destinations": ["archive"],
                }
            ],
        }
        (workdir / "rules.yaml").write_text(yaml.safe_dump(rules))
        settings = Settings.model_validate(
            {
                "rules_file": str(workdir / "rules.yaml"),
                "ingest": {"ae_title": "HPBNODE", "port": _free_port()},
                "http": {"port": _free_port()},
                "spool": {"root": str(workdir / "spool"), "min_free_mb": 0},
                "database": {"url": f"sqlite:///{workdir / 'hpb-node.db'}"},
                "scheduler": {"stable_after_s": 2.0, "sweep_interval_s": 0.5},
                "workers": {"count": 1, "lease_s": 300, "heartbeat_s": 10, "max_attempts": 1},
                "export": {"max_attempts": 3, "backoff_s": 1.0},
                "model": {"bundle": args.bundle} if args.bundle else {},
            }
        )
        say("[3/6] starting the node (SQLite, local spool, SCP, HTTP, scheduler, 1 worker)")
        service = NodeService(settings)
        service.start()
        say(
            f"      DICOM {settings.ingest.ae_title}@127.0.0.1:{service.dicom_port}, HTTP http://127.0.0.1:{service.http_port}/health"
        )
        assert service.sessions is not None
        stored = store_clinical(service.sessions, case, paths[0])
        say(
            f"      clinical store: {stored} synthetic lab value(s) and the history note for this patient"
        )
        say(f"[4/6] sending the series over C-STORE ({len(paths)} instances)")
        ok = send(paths, service.dicom_port, settings.ingest.ae_title)
        say(f"      {ok}/{len(paths)} acknowledged")
        say("[5/6] waiting: stability, routing, job, delivery")
        assert service.sessions is not None
        job = follow(service.sessions, args.timeout)
        say("[6/6] result")
        if job.state.value != "succeeded":
            say(f"      job {job.id} {job.state.value}: {job.last_error}")
            return 1
        say(f"      outcome: {job.outcome}")
        summary = job.result or {}
        diagnoses = sorted(summary.get("diagnoses", {}).items(), key=lambda kv: -kv[1])
        if diagnoses:
            say("      diagnosis probabilities:")
            for name, p in diagnoses:
                say(f"        {name:<32} {p:5.2f}")
        if summary.get("contrast_phase"):
            say(f"      contrast phase: {summary['contrast_phase']}")
        lesions = summary.get("lesions", [])
        say(f"      lesions: {summary.get('lesion_count', len(lesions))}")
        for les in lesions:
            say(
                f"        {les['id']}: {les['kind']} in {les['organ']}, {les['long_axis_mm']} mm, {les['volume_ml']} ml"
            )
        if summary.get("report"):
            say("      report draft:")
            for sentence in summary["report"]:
                say(f"        {sentence}")
        objects = summary.get("objects", [])
        results = results_root(settings)
        series_uid = str(truth_series_uid(paths[0]))
        seg = next((o for o in objects if o["kind"] == "seg"), None)
        if seg is not None:
            key = lesions[0]["key_slice"] if lesions else None
            png = overlay_png(
                paths,
                results / series_uid / f"{seg['sop_instance_uid']}.dcm",
                workdir / "key-slice.png",
                key,
            )
            if png is not None:
                say(f"      overlay: {png}")
        say(f"      objects sent to {archive.name}:")
        for o in objects:
            where = "stored" if archive.holds(o["sop_instance_uid"]) else "NOT FOUND"
            say(f"        {o['kind']:<4} {o['sop_instance_uid']}  ({where})")
        say(f"done in {time.monotonic() - t0:.0f} s")
        return 0
    finally:
        if service is not None:
            service.stop(timeout=10)
        archive.stop()


def truth_series_uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def _demo(args: argparse.Namespace) -> int:
    logging.getLogger().setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    if not args.verbose:
        for noisy in ("apscheduler", "pynetdicom", "node.queue", "node.export"):
            logging.getLogger(noisy).setLevel(logging.CRITICAL)
    try:
        return run_demo(args)
    except KeyboardInterrupt:
        return 130


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run one synthetic case through the node end to end (no PACS or PostgreSQL needed)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workdir", default=None, help="work folder (default: a new temporary one)")
    p.add_argument("--fresh", action="store_true", help="empty --workdir first")
    p.add_argument("--seed", type=int, default=7, help="synthetic case seed")
    p.add_argument("--bundle", default=None, help="model bundle folder (default: the shipped one)")
    p.add_argument(
        "--no-orthanc",
        action="store_true",
        help="use the pynetdicom archive even if Orthanc is installed",
    )
    p.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for the result")
    p.add_argument(
        "--pipeline", default="hpb-ct-mr", help="pipeline to run (default: the product pipeline)"
    )
    p.add_argument(
        "--pipeline-module",
        action="append",
        metavar="MODULE",
        help="import MODULE first (it registers extra pipelines)",
    )
    p.set_defaults(func=_demo)


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="hpb-node")
    parser.add_argument("-v", "--verbose", action="store_true")
    register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args()
    sys.exit(ns.func(ns))
