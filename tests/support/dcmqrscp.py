"""DCMTK's dcmqrscp as a second real PACS for query/retrieve tests.

Unlike Orthanc 1.10, dcmqrscp answers C-MOVE with the standard's detail: status
0xA801 for a move destination missing from its HostTable, and 0xB000 with
NumberOfFailedSuboperations when some instances could not be sent. It listens on a
free loopback port with its own database folder, indexed with ``dcmqridx``, and
accepts associations from any calling AE. (It forks a child per association:
``--single-process`` crashes after the first association in DCMTK 3.6.7.)
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port
from tests.support.dcmtk import dcmtk_env, stop, wait_for_echo

DCMQRSCP = "/usr/bin/dcmqrscp"
DCMQRIDX = "/usr/bin/dcmqridx"


@dataclass(frozen=True)
class QrScp:
    port: int
    aet: str
    log: Path


@contextmanager
def dcmqrscp(
    workdir: Path,
    files: Sequence[Path],
    *,
    aet: str = "QRPACS",
    move_destinations: dict[str, tuple[str, int]] | None = None,
) -> Iterator[QrScp]:
    """Run dcmqrscp holding ``files``; ``move_destinations`` is AE title -> (host, port).
    Ready once it answers C-ECHO; stopped (terminate, then kill) on exit."""
    db = workdir / "db"
    db.mkdir(parents=True, exist_ok=True)
    port = free_port()
    hosts = "\n".join(
        f"dest{i} = ({ae}, {host}, {p})"
        for i, (ae, (host, p)) in enumerate((move_destinations or {}).items())
    )
    config = workdir / "dcmqrscp.cfg"
    config.write_text(
        f"NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 4\n\n"
        f"HostTable BEGIN\n{hosts}\nHostTable END\n\n"
        "VendorTable BEGIN\nVendorTable END\n\n"
        f"AETable BEGIN\n{aet} {db} RW (100, 1024mb) ANY\nAETable END\n"
    )
    if files:
        subprocess.run(
            [DCMQRIDX, str(db), *map(str, files)], env=dcmtk_env(), check=True, capture_output=True
        )
    log = workdir / "dcmqrscp.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [DCMQRSCP, "-c", str(config), str(port)],
            env=dcmtk_env(),
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_echo(proc, port, aet, "dcmqrscp", log.read_text)
        yield QrScp(port, aet, log)
    finally:
        stop(proc)
