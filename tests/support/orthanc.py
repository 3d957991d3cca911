"""A real Orthanc (Debian's /usr/sbin/Orthanc) for tests: the node's PACS.

:class:`OrthancProcess` writes a JSON configuration into a temporary folder,
listens on free loopback ports (HTTP and DICOM), loads the DICOMweb plugin
(found with ``dpkg -L orthanc-dicomweb``), runs with ``TCP_NODELAY=1``, keeps
``RemoteAccessAllowed`` false, and waits for ``/system`` before returning.
``stop()``, ``start()`` and ``restart()`` keep ports and storage (for outage
tests). DICOM peers (``DicomModalities``) are given at construction or added
while running with :meth:`add_modality`; ``DicomAlwaysAllowStore`` is on.

Fixtures: ``orthanc`` (function scope, started, stopped at teardown) and
``orthanc_factory`` (build your own, e.g. with modalities known in advance).
Use it from any test module::

    from tests.support.orthanc import orthanc, orthanc_factory  # noqa: F401
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.support.dcmtk import stop

ORTHANC = Path("/usr/sbin/Orthanc")


@cache
def dicomweb_plugin() -> Path | None:
    """The DICOMweb plugin library as installed by the orthanc-dicomweb package."""
    try:
        out = subprocess.run(
            ["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, check=False
        ).stdout
    except OSError:
        out = ""
    libs = [Path(line) for line in out.splitlines() if ".so" in line and Path(line).is_file()]
    if libs:
        return sorted(libs, key=lambda p: len(str(p)))[0]
    for d in (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc")):
        hits = sorted(d.glob("libOrthancDicomWeb.so*"))
        if hits:
            return hits[0]
    return None


class OrthancProcess:
    """One Orthanc server process with its own storage under ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        *,
        aet: str = "ORTHANC",
        modalities: dict[str, tuple[str, str, int]] | None = None,
        dicomweb: bool = True,
    ) -> None:
        if not ORTHANC.is_file():
            raise RuntimeError(f"Orthanc is not installed at {ORTHANC} (apt-get install orthanc)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.modalities = dict(modalities or {})
        self.dicomweb = dicomweb
        self.log_path = self.workdir / "orthanc.log"
        self.config_path = self.workdir / "orthanc.json"
        self._proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle ----------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "Name": f"hpb-test-{self.aet}",
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "DicomModalities": {
                name: [aet, host, port] for name, (aet, host, port) in self.modalities.items()
            },
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomCheckModalityHost": False,
            "UnknownSopClassAccepted": True,
            "HttpTimeout": 30,
            "DicomScuTimeout": 30,
            "StableAge": 2,
            "Plugins": [],
        }
        if self.dicomweb:
            plugin = dicomweb_plugin()
            if plugin is None:
                raise RuntimeError("orthanc-dicomweb is not installed (no plugin library found)")
            config["Plugins"] = [str(plugin)]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        return config

    def start(self, ready_timeout: float = 60.0) -> None:
        if self.running:
            return
        self.config_path.write_text(json.dumps(self._config(), indent=1))
        env = dict(os.environ, TCP_NODELAY="1")
        with self.log_path.open("ab") as fh:
            self._proc = subprocess.Popen(
                [str(ORTHANC), str(self.config_path)], stdout=fh, stderr=subprocess.STDOUT, env=env
            )
        deadline = time.monotonic() + ready_timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with {self._proc.returncode}: {self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/system", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc not ready after {ready_timeout} s: {self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        stop(proc, timeout=20)

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # -- REST helpers -------------------------------------------------------------

    def get(self, path: str, **params: Any) -> Any:
        resp = httpx.get(f"{self.url}{path}", params=params or None, timeout=30)
        resp.raise_for_status()
        return resp.json()

    def post(self, path: str, body: Any, timeout: float = 120.0) -> Any:
        resp = httpx.post(f"{self.url}{path}", json=body, timeout=timeout)
        resp.raise_for_status()
        return resp.json() if resp.content else None

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Declare a DICOM peer at run time (kept for restarts)."""
        self.modalities[name] = (aet, host, port)
        resp = httpx.put(
            f"{self.url}/modalities/{name}",
            json={"AET": aet, "Host": host, "Port": port},
            timeout=30,
        )
        resp.raise_for_status()

    def upload(self, path: Path) -> dict[str, Any]:
        resp = httpx.post(f"{self.url}/instances", content=Path(path).read_bytes(), timeout=60)
        resp.raise_for_status()
        return dict(resp.json())

    def store_to_modality(self, modality: str, resources: list[str]) -> Any:
        """Orthanc's modality store (C-STORE from Orthanc to the peer)."""
        return self.post(
            f"/modalities/{modality}/store", {"Resources": resources, "Synchronous": True}
        )

    def find_instances(self, **query: str) -> list[dict[str, Any]]:
        """Instances matching DICOM tags (e.g. SOPInstanceUID=..., Modality=SEG), expanded."""
        found = self.post(
            "/tools/find", {"Level": "Instance", "Query": query, "Expand": True}, timeout=30
        )
        return list(found)

    def instance_count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def series_by_uid(self, series_uid: str) -> list[dict[str, Any]]:
        found = self.post(
            "/tools/find",
            {"Level": "Series", "Query": {"SeriesInstanceUID": series_uid}, "Expand": True},
            timeout=30,
        )
        return list(found)


def _new(tmp: Path, **kwargs: Any) -> OrthancProcess:
    return OrthancProcess(tmp, **kwargs)


@pytest.fixture()
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., OrthancProcess]]:
    made: list[OrthancProcess] = []

    def make(**kwargs: Any) -> OrthancProcess:
        server = _new(tmp_path / f"orthanc{len(made)}", **kwargs)
        made.append(server)
        server.start()
        return server

    yield make
    for server in made:
        server.stop()


@pytest.fixture()
def orthanc(orthanc_factory: Callable[..., OrthancProcess]) -> OrthancProcess:
    return orthanc_factory()
