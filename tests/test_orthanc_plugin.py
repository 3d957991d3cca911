"""The Orthanc router plugin (orthanc/hpb_router.py) in a real Orthanc.

DCMTK storescu sends a CT series to Orthanc; the plugin, running on Orthanc's
own Python, routes it when stable to a pynetdicom Storage SCP standing in for
the node's DICOM listener (AE HPBNODE). The node's outputs sent back to
Orthanc (a SEG, a CT-like series from the node's AE, a series with the node's
manufacturer) and series refused by the site filters are never routed, and
each decision is listed by /hpb-router/routed with its reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
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
    workdir: Path, http_port: int, dicom_port: int, node_port: int, router: dict[str, Any]
) -> dict[str, Any]:
    """The production orthanc/orthanc.json with test paths, ports and credentials."""
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
    conf["DicomWeb"]["Servers"] = {}
    conf["HpbRouter"].update(router)
    return conf


def start_orthanc(workdir: Path, node_port: int, router: dict[str, Any]) -> OrthancProc:
    http_port, dicom_port = free_port(), free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "orthanc.json"
    cfg.write_text(json.dumps(orthanc_config(workdir, http_port, dicom_port, node_port, router)))
    log = workdir / "orthanc.log"
    env = dict(os.environ, TCP_NODELAY="1")
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
