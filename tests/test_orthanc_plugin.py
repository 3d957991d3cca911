"""The Orthanc router plugin (orthanc/hpb_router.py) in a real Orthanc.

DCMTK storescu sends a CT series to Orthanc; the plugin, running on Orthanc's
own Python, routes it when stable to a pynetdicom Storage SCP standing in for
the node's DICOM listener (AE HPBNODE). The node's outputs sent back to
Orthanc (a SEG, a CT-like series from the node's AE, a series with the node's
manufacturer) and series refused by the site filters are never routed, and
each decision is listed by /hpb-router/routed with its reason.

End to end, with real parts only: storescu -> Orthanc -> plugin -> ``hpb-node
serve`` (a process) -> the shipped model pipeline ``hpb-ct-mr`` -> SEG, TID 1500
SR and Encapsulated PDF back in Orthanc, read through Orthanc's REST API
(tests/test_pull.py runs the same chain in pull mode).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.events import Event
from sqlalchemy import select

from dicom_sr.readers import read_sr
from node import auth, migrate
from node.db import Instance, create_engine_for, session_factory
from node.pipelines import PRODUCT_PIPELINE
from tests.conftest import ROOT, free_port

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
STORESCU = "/usr/bin/storescu"
PLUGIN_DIR = Path("/usr/share/orthanc/plugins")
AUTH = ("admin", "test-only-password")


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``check`` until true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class OrthancProc:
    url: str
    dicom_port: int
    aet: str
    proc: subprocess.Popen[bytes]
    log: Path
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.url, auth=AUTH, timeout=30)

    def get(self, uri: str) -> Any:
        r = self.client.get(uri)
        r.raise_for_status()
        return r.json()


def orthanc_config(
    workdir: Path,
    http_port: int,
    dicom_port: int,
    node_port: int,
    router: dict[str, Any],
    stow_url: str | None = None,
) -> dict[str, Any]:
    """The production orthanc/orthanc.json with test paths, ports and credentials.

    The node as a DICOMweb server (``hpbnode``, the production entry with its
    token header) is kept only with a ``stow_url``.
    """
    conf: dict[str, Any] = json.loads((ROOT / "orthanc" / "orthanc.json").read_text())
    conf.update(
        StorageDirectory=str(workdir / "db"),
        IndexDirectory=str(workdir / "db"),
        HttpPort=http_port,
        DicomPort=dicom_port,
        RemoteAccessAllowed=False,
        RegisteredUsers={AUTH[0]: AUTH[1]},
        DicomAlwaysAllowStore=True,
        StableAge=1,
        SaveJobs=False,
        PythonScript=str(ROOT / "orthanc" / "hpb_router.py"),
        Plugins=[
            str(PLUGIN_DIR / "libOrthancDicomWeb.so"),
            str(PLUGIN_DIR / "libOrthancPython.so"),
        ],
    )
    conf["DicomModalities"]["hpbnode"].update(Host="127.0.0.1", Port=node_port)
    servers = conf["DicomWeb"]["Servers"]
    conf["DicomWeb"]["Servers"] = {}
    if stow_url is not None:
        conf["DicomWeb"]["Servers"] = {"hpbnode": {**servers["hpbnode"], "Url": stow_url}}
    conf["HpbRouter"].update(router)
    return conf


def start_orthanc(
    workdir: Path,
    node_port: int,
    router: dict[str, Any],
    stow_url: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> OrthancProc:
    """Orthanc with the router plugin; ``extra_env``: more environment (HPB_INGEST_TOKEN)."""
    http_port, dicom_port = free_port(), free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "orthanc.json"
    conf = orthanc_config(workdir, http_port, dicom_port, node_port, router, stow_url)
    cfg.write_text(json.dumps(conf))
    log = workdir / "orthanc.log"
    env = {**os.environ, "TCP_NODELAY": "1", **(extra_env or {})}
    with log.open("wb") as out:
        proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=out, stderr=subprocess.STDOUT, env=env)
    orth = OrthancProc(f"http://127.0.0.1:{http_port}", dicom_port, "HPBPACS", proc, log)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"Orthanc exited: {log.read_text(errors='replace')[-3000:]}")
        try:
            return orth.client.get("/system").status_code == 200
        except httpx.TransportError:
            return False

    wait_for(ready, 30, "Orthanc to answer /system")
    return orth


def stop_orthanc(orth: OrthancProc) -> None:
    orth.client.close()
    orth.proc.terminate()
    try:
        orth.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        orth.proc.kill()
        orth.proc.wait()


def storescu(orth: OrthancProc, files: list[Path], calling_ae: str = "MODALITY1") -> None:
    cmd = [STORESCU, "-R", "-aet", calling_ae, "-aec", orth.aet, "127.0.0.1", str(orth.dicom_port)]
    done = subprocess.run(
        [*cmd, *map(str, files)],
        capture_output=True,
        text=True,
        env=dict(os.environ, TCP_NODELAY="1"),
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"storescu failed: {done.stderr}"


@dataclass
class StorageScp:
    """A pynetdicom Storage SCP standing in for the node's DICOM listener."""

    port: int
    received: dict[str, list[str]] = field(default_factory=dict)  # series UID -> SOP UIDs
    calling: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, event: Event) -> int:
        ds = event.dataset
        with self.lock:
            self.received.setdefault(str(ds.SeriesInstanceUID), []).append(str(ds.SOPInstanceUID))
            self.calling.add(str(event.assoc.requestor.ae_title).strip())
        return 0x0000

    def count(self, series_uid: str) -> int:
        with self.lock:
            return len(self.received.get(series_uid, []))


@pytest.fixture()
def node_scp() -> Iterator[StorageScp]:
    scp = StorageScp(port=free_port())
    ae = AE(ae_title="HPBNODE")
    ae.supported_contexts = StoragePresentationContexts
    server = ae.start_server(
        ("127.0.0.1", scp.port), block=False, evt_handlers=[(evt.EVT_C_STORE, scp.handle)]
    )
    yield scp
    server.shutdown()


def copy_series(sources: list[Path], out: Path, **changes: str) -> tuple[str, list[Path]]:
    """Copies of ``sources`` as a new series (new UIDs) with ``changes`` applied."""
    out.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    paths = []
    for i, src in enumerate(sources):
        ds = pydicom.dcmread(src)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for key, value in changes.items():
            setattr(ds, key, value)
        path = out / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return series_uid, paths


def test_plugin_routes_stable_ct_and_never_routes_node_outputs(
    shared_data: Path, tmp_path: Path, node_scp: StorageScp
) -> None:
    src = shared_data / "ct_liver_3slice"
    ct = sorted(src.glob("0*.dcm"))
    ct_uid = str(pydicom.dcmread(ct[0], stop_before_pixels=True).SeriesInstanceUID)
    seg_uid = str(pydicom.dcmread(src / "liver_seg.dcm", stop_before_pixels=True).SeriesInstanceUID)
    from_node_uid, from_node = copy_series(ct, tmp_path / "from_node", SeriesDescription="Liver")
    by_maker_uid, by_maker = copy_series(ct, tmp_path / "maker", Manufacturer="hpb-node")
    scout_uid, scout = copy_series(ct, tmp_path / "scout", SeriesDescription="Scout 2")

    orth = start_orthanc(tmp_path / "orthanc", node_scp.port, {"MinInstances": 1})
    try:
        storescu(orth, ct)
        wait_for(lambda: node_scp.count(ct_uid) == 3, 60, "the CT series at the node SCP")
        assert node_scp.calling == {"HPBPACS"}

        # The node's results come back into Orthanc: none may be routed again.
        storescu(orth, [src / "liver_seg.dcm"], calling_ae="HPBNODE")
        storescu(orth, from_node, calling_ae="HPBNODE")
        storescu(orth, by_maker)
        storescu(orth, scout)

        def decided() -> bool:
            skipped = orth.get("/hpb-router/routed")["skipped"]
            return len({s["series_uid"] for s in skipped}) >= 4

        wait_for(decided, 60, "the plugin's decision on the four other series")
        state = orth.get("/hpb-router/routed")
        assert state["enabled"] is True
        assert [r["series_uid"] for r in state["routed"]] == [ct_uid]
        reasons = {s["series_uid"]: s["reason"] for s in state["skipped"]}
        assert reasons[seg_uid] == "node output: modality SEG"
        assert reasons[from_node_uid] == "node output: sent by the node's AE HPBNODE"
        assert reasons[by_maker_uid] == "node output: manufacturer HPB-NODE"
        assert reasons[scout_uid].startswith("filter: series description matches Exclude")

        # Only the CT reached the node; the routing is recorded on the series.
        assert set(node_scp.received) == {ct_uid}
        assert node_scp.count(ct_uid) == 3
        series_id = state["routed"][0]["series"]
        meta = json.loads(orth.client.get(f"/series/{series_id}/metadata/HpbRouted").text)
        assert meta["target"] == "hpbnode" and meta["method"] == "dimse"
        assert meta["instances"] == 3
        job = orth.get(f"/jobs/{meta['job']}")
        assert job["State"] == "Success"
    finally:
        stop_orthanc(orth)


# ---------------------------------------------------------------- the node as a process


@dataclass
class NodeProc:
    """``hpb-node serve`` in its own process (SCP, HTTP, scheduler, one worker)."""

    proc: subprocess.Popen[bytes]
    dicom_port: int
    http_port: int
    log: Path
    api: httpx.Client
    config: Path


def node_config(
    workdir: Path,
    orth: OrthancProc,
    node_port: int,
    pipeline: str,
    admin_token: str,
    http_port: int | None = None,
    ingest_token: str = "",
) -> Path:
    """Settings and rules for a node that sends its results back to ``orth``."""
    rules = workdir / "rules.yaml"
    rules.write_text(
        json.dumps(
            {
                "destinations": [
                    {
                        "name": "pacs",
                        "kind": "dimse",
                        "ae_title": orth.aet,
                        "host": "127.0.0.1",
                        "port": orth.dicom_port,
                    }
                ],
                "rules": [
                    {
                        "name": "liver-ct",
                        "match": {"modality": ["CT"], "series_description": "(?i)portal|venous"},
                        "pipeline": pipeline,
                        "destinations": ["pacs"],
                    }
                ],
            }
        )
    )
    cfg = workdir / "node.yaml"
    cfg.write_text(
        json.dumps(
            {
                "demo": False,
                "rules_file": str(rules),
                "ingest": {"ae_title": "HPBNODE", "host": "127.0.0.1", "port": node_port},
                "http": {
                    "host": "127.0.0.1",
                    "port": http_port or free_port(),
                    "admin_token": admin_token,
                    "ingest_token": ingest_token,
                },
                "database": {"url": f"sqlite:///{workdir / 'node.db'}"},
                "spool": {"root": str(workdir / "spool"), "min_free_mb": 0},
                "scheduler": {"stable_after_s": 1.0, "sweep_interval_s": 0.5},
                "workers": {"count": 1, "backoff_s": 1.0},
                "export": {"backoff_s": 1.0},
            }
        )
    )
    return cfg


def start_node(workdir: Path, cfg: Path, admin_token: str, *modules: str) -> NodeProc:
    ready = workdir / "ready.json"
    log = workdir / "node.log"
    cmd = [sys.executable, "-m", "node", "--config", str(cfg), "serve"]
    cmd += ["--ready-file", str(ready), "--drain-s", "5"]
    for m in modules:
        cmd += ["--pipeline-module", m]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2", TCP_NODELAY="1")
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir)

    def started() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"node exited: {log.read_text(errors='replace')[-3000:]}")
        return ready.is_file()

    wait_for(started, 60, "the node's ready file")
    info = json.loads(ready.read_text())
    api = httpx.Client(
        base_url=f"http://127.0.0.1:{info['http_port']}",
        headers={"Authorization": f"Bearer {admin_token}"},
        timeout=30,
    )
    return NodeProc(proc, info["dicom_port"], info["http_port"], log, api, cfg)


def stop_node(node: NodeProc) -> None:
    node.api.close()
    node.proc.terminate()
    try:
        node.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        node.proc.kill()
        node.proc.wait()


def study_modalities(orth: OrthancProc, study_uid: str) -> dict[str, list[dict[str, Any]]]:
    """Series of a study in Orthanc by modality."""
    found = orth.client.post(
        "/tools/find",
        json={"Level": "Series", "Query": {"StudyInstanceUID": study_uid}, "Expand": True},
    ).json()
    out: dict[str, list[dict[str, Any]]] = {}
    for series in found:
        out.setdefault(series["MainDicomTags"].get("Modality", ""), []).append(series)
    return out


def node_results_delivered(node: NodeProc, orth: OrthancProc, series_uid: str) -> bool:
    """The node's one job for ``series_uid`` succeeded and each of its objects is in Orthanc."""
    jobs = node.api.get("/api/jobs").json()
    if [(j["series_instance_uid"], j["state"]) for j in jobs] != [(series_uid, "succeeded")]:
        assert all(j["state"] not in ("failed", "cancelled") for j in jobs), jobs
        return False
    objects = jobs[0]["result"]["objects"]
    return bool(objects) and all(
        orth.client.post(
            "/tools/find",
            json={"Level": "Instance", "Query": {"SOPInstanceUID": o["sop_instance_uid"]}},
        ).json()
        for o in objects
    )


def check_model_results(
    orth: OrthancProc, study_uid: str, series_uid: str, sources: list[Path]
) -> dict[str, pydicom.Dataset]:
    """The model's SEG, SR and PDF for ``series_uid``, read back through Orthanc's REST API.

    One series of one instance each, in the source's study; the SEG and the SR
    reference the source series (the SR also the SEG, as TID 1500 evidence), the
    PDF's source is the SR.
    """
    found = study_modalities(orth, study_uid)
    results: dict[str, pydicom.Dataset] = {}
    for modality in ("SEG", "SR", "DOC"):
        assert len(found.get(modality, [])) == 1, f"{modality}: {found.get(modality)}"
        (instance,) = found[modality][0]["Instances"]
        raw = orth.client.get(f"/instances/{instance}/file")
        raw.raise_for_status()
        results[modality] = pydicom.dcmread(io.BytesIO(raw.content))
    seg, sr, doc = results["SEG"], results["SR"], results["DOC"]
    source_sops = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in sources}
    for ds in results.values():
        assert ds.StudyInstanceUID == study_uid
        assert ds.SeriesInstanceUID != series_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert {
        str(i.ReferencedSOPInstanceUID)
        for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    } <= source_sops

    (evidence_study,) = sr.CurrentRequestedProcedureEvidenceSequence
    assert evidence_study.StudyInstanceUID == study_uid
    evidence = {
        str(s.SeriesInstanceUID): {str(i.ReferencedSOPInstanceUID) for i in s.ReferencedSOPSequence}
        for s in evidence_study.ReferencedSeriesSequence
    }
    assert set(evidence) == {series_uid, str(seg.SeriesInstanceUID)}
    assert evidence[series_uid] == source_sops
    assert evidence[str(seg.SeriesInstanceUID)] == {str(seg.SOPInstanceUID)}
    report = read_sr(sr)
    assert report.groups, "the SR has no measurement group"
    assert {g.referenced_segment[0] for g in report.groups if g.referenced_segment} == {
        str(seg.SOPInstanceUID)
    }

    assert doc.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert bytes(doc.EncapsulatedDocument).startswith(b"%PDF-")
    assert doc.SourceInstanceSequence[0].ReferencedSOPInstanceUID == sr.SOPInstanceUID
    return results


def test_invalid_router_section_disables_the_plugin_with_a_clear_log(
    tmp_path: Path, node_scp: StorageScp
) -> None:
    orth = start_orthanc(tmp_path / "orthanc", node_scp.port, {"Method": "ftp"})
    try:
        state = orth.get("/hpb-router/routed")
        assert state == {"routed": [], "skipped": [], "enabled": False}
    finally:
        stop_orthanc(orth)
    assert "hpb-router disabled: HpbRouter.Method must be 'dimse' or 'stow'" in orth.log.read_text()


# ---------------------------------------------------------------- end to end

E2E_TOKEN = "e2e-admin-token-not-the-demo-secret"


def e2e_ct(shared_data: Path, out: Path, seed: str) -> tuple[str, str, list[Path]]:
    """A real abdominal CT written as a DICOM series (study UID, series UID, files)."""
    from models.nifti import load_nifti_krc
    from models.series_writer import SeriesInfo, write_series

    ct, affine = load_nifti_krc(shared_data / "ct_abdomen_3mm" / "ct.nii.gz")
    info = SeriesInfo()
    paths = write_series(ct, affine, out, info=info, seed=seed)
    return info.study_uid, info.series_uid, paths


# The shipped model pipeline (node/pipelines.py, bundle models/bundles/hpb_demo):
# (pipeline name, extra --pipeline-module imports, modalities expected back in Orthanc).
E2E_PIPELINE = (PRODUCT_PIPELINE, (), {"SEG", "SR", "DOC"})


def test_end_to_end_storescu_orthanc_plugin_node_results_in_orthanc(
    shared_data: Path, tmp_path: Path
) -> None:
    """DCMTK storescu -> Orthanc -> plugin -> node -> pipeline -> results back in Orthanc."""
    pipeline, modules, expected = E2E_PIPELINE
    study_uid, series_uid, files = e2e_ct(shared_data, tmp_path / "ct", "e2e-push")
    node_port = free_port()
    orth = start_orthanc(tmp_path / "orthanc", node_port, {"MinInstances": 1})
    node = None
    try:
        (tmp_path / "node").mkdir()
        cfg = node_config(tmp_path / "node", orth, node_port, pipeline, E2E_TOKEN)
        node = start_node(tmp_path / "node", cfg, E2E_TOKEN, *modules)
        storescu(orth, files)

        wait_for(
            lambda: node_results_delivered(node, orth, series_uid),
            300,
            f"the node's results ({sorted(expected)} at least) in Orthanc",
        )
        assert expected <= set(study_modalities(orth, study_uid))
        check_model_results(orth, study_uid, series_uid, files)

        # the results are not routed back to the node (no loop)
        n_outputs = sum(len(v) for k, v in study_modalities(orth, study_uid).items() if k != "CT")
        wait_for(
            lambda: len(orth.get("/hpb-router/routed")["skipped"]) >= n_outputs,
            60,
            "the plugin's decision on each result series",
        )
        state = orth.get("/hpb-router/routed")
        assert [r["series_uid"] for r in state["routed"]] == [series_uid]
        assert all(s["reason"].startswith("node output") for s in state["skipped"])
        assert len(node.api.get("/api/jobs").json()) == 1
        audit = node.api.get("/api/audit").json()
        assert {"result.created", "export.sent"} <= {e["action"] for e in audit}
    finally:
        if node is not None:
            stop_node(node)
        stop_orthanc(orth)


# ---------------------------------------------------------------- STOW-RS routing


def node_instances(db: Path) -> set[str]:
    """SOP Instance UIDs in the node's database."""
    engine = create_engine_for(f"sqlite:///{db}")
    try:
        with session_factory(engine)() as s:
            return set(s.scalars(select(Instance.sop_instance_uid)))
    finally:
        engine.dispose()


def stow_routing_job(orth: OrthancProc, files: list[Path]) -> dict[str, Any]:
    """Send ``files`` to ``orth``; the plugin's STOW-RS job for them once finished."""
    storescu(orth, files)
    wait_for(lambda: bool(orth.get("/hpb-router/routed")["routed"]), 60, "the routing")
    series_id = orth.get("/hpb-router/routed")["routed"][0]["series"]
    meta = json.loads(orth.client.get(f"/series/{series_id}/metadata/HpbRouted").text)
    assert meta["method"] == "stow" and meta["target"] == "hpbnode"

    def finished() -> bool:
        return orth.get(f"/jobs/{meta['job']}")["State"] in ("Success", "Failure")

    wait_for(finished, 60, "Orthanc's STOW-RS job")
    job: dict[str, Any] = orth.get(f"/jobs/{meta['job']}")
    return job


def test_plugin_routes_by_stow_with_the_nodes_ingest_token(
    shared_data: Path, tmp_path: Path
) -> None:
    """``"Method": "stow"``: Orthanc sends HPB_INGEST_TOKEN (orthanc.json HttpHeaders) to the node.

    As in compose.yaml, the node's ``http.ingest_token`` and Orthanc's
    HPB_INGEST_TOKEN hold the same secret: the series is stored. A viewer token
    in its place is refused (403): Orthanc's job fails and the node stores nothing.
    """
    ct = sorted((shared_data / "ct_liver_3slice").glob("0*.dcm"))
    ct_sops = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in ct}
    workdir = tmp_path / "node"
    workdir.mkdir()
    db = workdir / "node.db"
    migrate.upgrade(f"sqlite:///{db}")
    engine = create_engine_for(f"sqlite:///{db}")
    with session_factory(engine)() as s:
        viewer = auth.create_token(s, "orthanc-viewer", "viewer", "test")
        s.commit()
    engine.dispose()
    ingest = "e2e-ingest-token-of-the-site"
    node_port, node_http = free_port(), free_port()
    stow_url = f"http://127.0.0.1:{node_http}/dicom-web/"
    router = {"MinInstances": 1, "Method": "stow"}
    node = None
    try:
        for name, token, state, stored in (
            ("viewer", viewer, "Failure", set()),
            ("ingest", ingest, "Success", ct_sops),
        ):
            env = {"HPB_INGEST_TOKEN": token}
            orth = start_orthanc(tmp_path / f"orthanc-{name}", node_port, router, stow_url, env)
            try:
                if node is None:
                    cfg = node_config(
                        workdir, orth, node_port, "hpb-ct-mr", E2E_TOKEN, node_http, ingest
                    )
                    node = start_node(workdir, cfg, E2E_TOKEN)
                job = stow_routing_job(orth, ct)
                assert job["State"] == state, f"{name}: {job}"
                assert node_instances(db) == stored, name
            finally:
                stop_orthanc(orth)
        assert node is not None
        refused = "refused: storing instances (STOW-RS) with token 'orthanc-viewer' of role viewer"
        assert refused in node.log.read_text(errors="replace")
        assert (
            "received HTTP status 403" in (tmp_path / "orthanc-viewer" / "orthanc.log").read_text()
        )
    finally:
        if node is not None:
            stop_node(node)
