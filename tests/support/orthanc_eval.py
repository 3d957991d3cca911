"""A real Orthanc for evaluation tests: temp storage, free loopback ports, the
DICOMweb plugin, no authentication, no remote access; started and stopped by the test.

(A node-wide fixture may later live in ``tests/support/orthanc.py``; this one is the
evaluation harness's own.)
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import free_port
from tests.support.dcmtk import stop

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))


def dicomweb_plugin() -> Path | None:
    for d in DICOMWEB_PLUGIN_DIRS:
        hits = sorted(d.glob("libOrthancDicomWeb.so*"))
        if hits:
            return hits[0]
    return None


@dataclass(frozen=True)
class OrthancServer:
    http_port: int
    dicom_port: int
    aet: str
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def upload(self, path: Path) -> dict[str, str]:
        resp = httpx.post(f"{self.url}/instances", content=path.read_bytes(), timeout=30)
        resp.raise_for_status()
        return dict(resp.json())


@contextmanager
def run_orthanc(workdir: Path, *, ready_timeout: float = 60.0) -> Iterator[OrthancServer]:
    """Start Orthanc with a config in ``workdir``; yield once ``/system`` answers."""
    plugin = dicomweb_plugin()
    if plugin is None:
        raise RuntimeError("orthanc-dicomweb is not installed (libOrthancDicomWeb.so not found)")
    workdir.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "hpb-eval-test",
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "EVALPACS",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "HttpTimeout": 30,
        # C-GET from a calling AE not declared in DicomModalities (the evaluation's)
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowEcho": True,
    }
    cfg = workdir / "orthanc.json"
    cfg.write_text(json.dumps(config))
    log = workdir / "orthanc.log"
    env = dict(os.environ, TCP_NODELAY="1")
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [str(ORTHANC), str(cfg)], stdout=fh, stderr=subprocess.STDOUT, env=env
        )
    server = OrthancServer(http_port, dicom_port, "EVALPACS", log)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with {proc.returncode}: {log.read_text()[-2000:]}"
                )
            try:
                if httpx.get(f"{server.url}/system", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Orthanc not ready after {ready_timeout} s: {log.read_text()[-2000:]}"
                )
            time.sleep(0.1)
        yield server
    finally:
        stop(proc, timeout=20)
