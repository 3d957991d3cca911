"""Run DCMTK's storescu / storescp / findscu / echoscu as independent DICOM peers.

Every call sets ``TCP_NODELAY=1`` (DCMTK otherwise waits ~44 ms per message on
loopback) and uses the Debian binaries by absolute path (pynetdicom's
console scripts of the same names shadow them inside the venv).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
FINDSCU = "/usr/bin/findscu"
ECHOSCU = "/usr/bin/echoscu"


def dcmtk_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def storescu(
    port: int,
    files: Sequence[Path | str],
    *,
    host: str = "127.0.0.1",
    calling_ae: str = "STORESCU",
    called_ae: str = "HPBNODE",
    args: Sequence[str] = ("-R",),
    max_pdu: int | None = None,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Send ``files`` with /usr/bin/storescu (``-R``: only the contexts the files need)."""
    cmd = [STORESCU, "-aet", calling_ae, "-aec", called_ae, "-nh", *args]
    if max_pdu is not None:
        cmd += ["--max-pdu", str(max_pdu), "--max-send-pdu", str(max_pdu)]
    cmd += [host, str(port), *(str(f) for f in files)]
    return subprocess.run(
        cmd, env=dcmtk_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def echoscu(
    port: int,
    *,
    host: str = "127.0.0.1",
    calling_ae: str = "ECHOSCU",
    called_ae: str = "HPBNODE",
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    cmd = [ECHOSCU, "-aet", calling_ae, "-aec", called_ae, host, str(port)]
    return subprocess.run(
        cmd, env=dcmtk_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def findscu(
    port: int,
    keys: Sequence[str],
    *,
    host: str = "127.0.0.1",
    calling_ae: str = "FINDSCU",
    called_ae: str = "ORTHANC",
    level: str = "STUDY",
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """C-FIND (Study Root) with ``keys`` like ``["StudyInstanceUID", "PatientID=X"]``."""
    cmd = [
        FINDSCU,
        "-S",
        "-aet",
        calling_ae,
        "-aec",
        called_ae,
        "-k",
        f"QueryRetrieveLevel={level}",
    ]
    for key in keys:
        cmd += ["-k", key]
    cmd += [host, str(port)]
    return subprocess.run(
        cmd, env=dcmtk_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
    """Block until a TCP listener accepts on ``host:port``; TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"nothing listening on {host}:{port} after {timeout} s"
                ) from None
            time.sleep(0.05)


def wait_for_echo(
    proc: subprocess.Popen[bytes],
    port: int,
    ae_title: str,
    name: str,
    output: Callable[[], str],
    timeout: float = 30,
) -> None:
    """Wait until the DCMTK server ``proc`` answers C-ECHO on ``port``; fail with its
    ``output()`` if it exits first, or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while echoscu(port, called_ae=ae_title, timeout=10).returncode != 0:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}: {output()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} did not answer C-ECHO within {timeout:g} s")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """Terminate a server process; kill it if it has not ended after ``timeout`` s."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def storescp(
    port: int,
    out_dir: Path,
    *,
    ae_title: str = "STORESCP",
    max_pdu: int = 131072,
    args: Sequence[str] = ("+B",),
) -> Iterator[subprocess.Popen[bytes]]:
    """Run /usr/bin/storescp on ``port`` writing into ``out_dir`` (``+B``: bit-preserving).

    Ready when ``echoscu`` gets a C-ECHO answer; stopped (terminate, then kill) on exit.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        STORESCP,
        "-aet",
        ae_title,
        "--max-pdu",
        str(max_pdu),
        "-od",
        str(out_dir),
        *args,
        str(port),
    ]
    proc = subprocess.Popen(cmd, env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_echo(
            proc,
            port,
            ae_title,
            "storescp",
            lambda: proc.stderr.read().decode() if proc.stderr else "",
        )
        yield proc
    finally:
        stop(proc)
