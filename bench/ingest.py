"""Receive throughput of the node's Storage SCP against DCMTK storescp.

The same 300-slice 512x512 CT series (synthetic, written with
models.series_writer into a temporary folder) is sent by /usr/bin/storescu to

* the node's SCP (node.ingest.StorageSCP + Store: header parse, sha256,
  atomic write with fsync, one SQLite commit per instance), and
* DCMTK storescp ``+B`` (bit-preserving write, no fsync, no database),

alternating, several repetitions, each into a fresh spool / database / folder.
Both sides run with TCP_NODELAY=1 and a 128 KiB maximum PDU. The median MB/s
(10^6 bytes of DICOM files per second of storescu wall time) is written to
bench/results/ingest.json with the machine description.

    .venv/bin/python bench/ingest.py [--slices 300] [--reps 5] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from pynetdicom import evt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.series_writer import write_series  # noqa: E402
from node.db import create_engine_for, session_factory  # noqa: E402
from node.ingest import Outcome, StorageSCP, Store, handle_store  # noqa: E402
from node.migrate import upgrade  # noqa: E402
from node.settings import Settings  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.support.dcmtk import STORESCU, storescp, storescu  # noqa: E402

MAX_PDU = 131072
RESULTS = ROOT / "bench" / "results" / "ingest.json"


def make_series(out: Path, slices: int) -> list[Path]:
    rng = np.random.default_rng(0)
    base = rng.normal(40, 20, size=(512, 512))
    yy, xx = np.mgrid[:512, :512]
    body = ((yy - 256) ** 2 / 200**2 + (xx - 256) ** 2 / 230**2) < 1
    volume = np.empty((slices, 512, 512), dtype=np.float64)
    for k in range(slices):
        volume[k] = np.where(body, base + 5 * np.sin(k / 10), -1000)
    affine = np.diag([1.0, 0.7, 0.7, 1.0])
    return write_series(volume, affine, out, seed="bench-ingest")


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds (user + system) of this process (all threads) and of its waited-for children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def send(port: int, files: list[Path], called: str) -> float:
    start = time.perf_counter()
    result = storescu(port, files, called_ae=called, args=("-R",), max_pdu=MAX_PDU, timeout=1800)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed: {result.stderr[-2000:]}")
    return elapsed


class NullStore(Store):
    """Diagnostic only: answers Success without storing (pynetdicom's receive path alone)."""

    def accept(self, data: bytes, **_: Any) -> Outcome:
        return Outcome(0x0000)


def run_node(
    work: Path,
    files: list[Path],
    profile: bool = False,
    fsync: bool = True,
    null: bool = False,
    handler_s: list[float] | None = None,
    cpu_s: list[tuple[float, float]] | None = None,
) -> float:
    """storescu wall time into the node's SCP; ``handler_s`` collects each C-STORE
    handler's own time (bound around node.ingest.handle_store with pynetdicom's
    public bind/unbind)."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    settings = Settings.model_validate(
        {
            "ingest": {"ae_title": "HPBNODE", "port": 0, "max_pdu": MAX_PDU},
            "spool": {"root": str(work / "spool"), "min_free_mb": 512, "fsync": fsync},
            "database": {"url": f"sqlite:///{work / 'node.db'}"},
        }
    )
    upgrade(settings.database.url)
    engine = create_engine_for(settings.database.url)
    store = (NullStore if null else Store).from_settings(settings, session_factory(engine))
    scp = StorageSCP(settings.ingest, store)
    port = scp.start()
    profiler = cProfile.Profile() if profile else None
    if handler_s is not None or profiler is not None:
        server = scp._server
        assert server is not None

        def timed_store(event: evt.Event, *args: Any) -> int:
            start = time.perf_counter()
            if profiler is not None:  # in the association's thread, around the handler
                profiler.enable()
            try:
                return handle_store(event, *args)
            finally:
                if profiler is not None:
                    profiler.disable()
                if handler_s is not None:
                    handler_s.append(time.perf_counter() - start)

        server.unbind(evt.EVT_C_STORE, handle_store)
        server.bind(evt.EVT_C_STORE, timed_store, [store, scp.assoc_log])
    before = cpu_seconds()
    try:
        elapsed = send(port, files, "HPBNODE")
        after = cpu_seconds()
        if cpu_s is not None:  # the node's threads; storescu
            cpu_s.append((after[0] - before[0], after[1] - before[1]))
    finally:
        scp.stop(timeout=30)
        engine.dispose()
    stored = sum(1 for _ in (work / "spool").glob("*/*/*.dcm"))
    if stored != (0 if null else len(files)):
        raise RuntimeError(f"node stored {stored} of {len(files)} files")
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    return elapsed


def pdu_lengths_with_unlimited_node_pdu(work: Path, files: list[Path]) -> dict[str, Any]:
    """Does a larger advertised maximum PDU on the node change what storescu sends?

    The node advertises 0 (no limit) and storescu is given no --max-send-pdu;
    the P-DATA-TF PDUs it then sends are measured.
    """
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    settings = Settings.model_validate(
        {
            "ingest": {"ae_title": "HPBNODE", "port": 0, "max_pdu": 0},
            "spool": {"root": str(work / "spool"), "min_free_mb": 512, "fsync": False},
            "database": {"url": f"sqlite:///{work / 'node.db'}"},
        }
    )
    upgrade(settings.database.url)
    engine = create_engine_for(settings.database.url)
    scp = StorageSCP(settings.ingest, Store.from_settings(settings, session_factory(engine)))
    lengths: list[int] = []

    def on_pdu(event: evt.Event) -> None:
        if type(event.pdu).__name__ == "P_DATA_TF":
            lengths.append(int(event.pdu.pdu_length))

    port = scp.start()
    server = scp._server
    assert server is not None
    server.bind(evt.EVT_PDU_RECV, on_pdu)
    try:
        result = storescu(port, files, called_ae="HPBNODE", args=("-R",), timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"storescu failed: {result.stderr[-2000:]}")
    finally:
        scp.stop(timeout=30)
        engine.dispose()
    return {
        "node_max_pdu_advertised": 0,
        "storescu_max_send_pdu_option": None,
        "largest_p_data_pdu_received": max(lengths),
        "p_data_pdus_per_instance": round(len(lengths) / len(files), 2),
    }


def run_storescp(work: Path, files: list[Path], cpu_s: list[float] | None = None) -> float:
    if work.exists():
        shutil.rmtree(work)
    port = free_port()
    before = cpu_seconds()
    with storescp(port, work, ae_title="STORESCP", max_pdu=MAX_PDU):
        elapsed = send(port, files, "STORESCP")
    if cpu_s is not None:  # storescp and storescu (and the readiness C-ECHOs)
        cpu_s.append(cpu_seconds()[1] - before[1])
    stored = sum(1 for p in work.iterdir() if p.is_file())
    if stored != len(files):
        raise RuntimeError(f"storescp stored {stored} of {len(files)} files")
    return elapsed


def handler_profile(work: Path, files: list[Path], count: int = 60) -> dict[str, float]:
    """Milliseconds per instance of each step of Store.accept, measured in-process."""
    from node.ingest import IMAGE_SOP_CLASSES
    from node.registry import body_sha256, find_stored, parse_instance, record_instance
    from node.spool import Spool

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    datas = [f.read_bytes() for f in files[:count]]
    url = f"sqlite:///{work / 'node.db'}"
    upgrade(url)
    engine = create_engine_for(url)
    sessions = session_factory(engine)
    out: dict[str, float] = {}

    def timed(name: str, fn: Any) -> None:
        start = time.perf_counter()
        for i, data in enumerate(datas):
            fn(i, data)
        out[name] = round((time.perf_counter() - start) / len(datas) * 1e3, 2)

    timed(
        "parse_header",
        lambda i, d: parse_instance(d, image_classes=IMAGE_SOP_CLASSES, digest=False),
    )
    timed("sha256", lambda i, d: body_sha256(d))
    synced = Spool(work / "a", fsync=True)
    unsynced = Spool(work / "b", fsync=False)
    timed("write_atomic_fsync", lambda i, d: synced.write_atomic(f"1/2/{i}.dcm", [d]))
    timed("write_atomic_no_fsync", lambda i, d: unsynced.write_atomic(f"1/2/{i}.dcm", [d]))
    out.update(fsync_split(work / "c", datas))
    headers = [parse_instance(d, image_classes=IMAGE_SOP_CLASSES) for d in datas]

    def record(i: int, _: bytes) -> None:
        with sessions.begin() as session:
            existing = find_stored(session, headers[i].sop_instance_uid)
            record_instance(session, headers[i], f"x/{i}.dcm", "BENCH", existing=existing)

    timed("database_record_commit", record)
    engine.dispose()
    return out


def ms_per(count: int, seconds: list[float]) -> float:
    return round(statistics.median(seconds) / count * 1e3, 2)


def limits(
    per_instance: dict[str, float],
    profile: dict[str, float],
    pdus: dict[str, Any],
    loads: list[float],
    cpu: dict[str, float],
) -> str:
    """What caps the ratio, in this run's numbers."""
    ceiling = per_instance["storescp_ms"] / per_instance["pynetdicom_noop_handler_ms"]
    return (
        "storescu sends one instance, then waits for its C-STORE response: per-instance"
        " latency is throughput. Median per instance: storescp"
        f" {per_instance['storescp_ms']:.2f} ms, node {per_instance['node_ms']:.2f} ms, of"
        f" which the node's C-STORE handler {per_instance['node_handler_ms']:.2f} ms."
        " (1) pynetdicom itself: with a handler that answers at once it needs"
        f" {per_instance['pynetdicom_noop_handler_ms']:.2f} ms per instance, so no handler"
        f" can lift the ratio above {ceiling:.2f}. Each association runs two Python threads"
        " (DUL reactor, association reactor) that poll queues with 1 ms sleeps and read the"
        " socket in 4 KiB recv() calls; every instance crosses those queues several times."
        " (2) durability before the answer: fsync of the file and of its directory"
        f" ({profile['write_atomic_fsync']:.2f} ms per write in isolation against"
        f" {profile['write_atomic_no_fsync']:.2f} ms without; median fsync of the file"
        f" {profile['fsync_file_median']:.2f} ms, of the directory"
        f" {profile['fsync_directory_median']:.2f} ms; compare node_without_fsync). (3) the rest of the handler: header parse"
        f" {profile['parse_header']:.2f} ms, sha256 {profile['sha256']:.2f} ms (overlapped"
        f" with the write), database {profile['database_record_commit']:.2f} ms."
        " A larger advertised maximum PDU does not help: storescu accepts at most 131072 for"
        " --max-send-pdu, and with the node advertising no limit it sent P-DATA PDUs of at"
        f" most {pdus['largest_p_data_pdu_received']} bytes. CPU per instance (median):"
        f" the node's process {cpu['node_process']:.2f} ms (pynetdicom with the no-op"
        f" handler {cpu['pynetdicom_noop_process']:.2f} ms) against"
        f" {cpu['storescp_and_storescu']:.2f} ms for storescp and storescu together"
        f" (storescu alone {cpu['storescu_sending_to_node']:.2f} ms). Load average (1 min)"
        f" {min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} cores shared with other"
        " jobs: that slows the Python side (GIL hand-offs between threads, scheduling"
        " delays of every 1 ms poll) far more than DCMTK's single-threaded C."
    )


def fsync_split(folder: Path, datas: list[bytes]) -> dict[str, float]:
    """The two flushes of Spool.write_atomic timed apart: the file (its data and its
    inode), then the directory after the rename (ms per instance, median)."""
    folder.mkdir(parents=True)
    file_s: list[float] = []
    dir_s: list[float] = []
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i, data in enumerate(datas):
            tmp = folder / f".tmp-{i}"
            with tmp.open("wb") as f:
                f.write(data)
                f.flush()
                start = time.perf_counter()
                os.fsync(f.fileno())
                file_s.append(time.perf_counter() - start)
            os.replace(tmp, folder / f"{i}.dcm")
            start = time.perf_counter()
            os.fsync(dir_fd)
            dir_s.append(time.perf_counter() - start)
    finally:
        os.close(dir_fd)
    return {
        "fsync_file_median": round(statistics.median(file_s) * 1e3, 2),
        "fsync_directory_median": round(statistics.median(dir_s) * 1e3, 2),
    }


def machine() -> dict[str, Any]:
    import pydicom
    import pynetdicom

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor()
    dcmtk = subprocess.run([STORESCU, "--version"], capture_output=True, text=True, check=False)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "pynetdicom": pynetdicom.__version__,
        "pydicom": pydicom.__version__,
        "dcmtk": (dcmtk.stdout.splitlines() or [""])[0],
        "platform": platform.platform(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--profile", action="store_true", help="cProfile the C-STORE handler in one run and stop"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--note",
        default="2 CPU cores shared with other engineers' jobs while running (see load average)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="hpb-bench-ingest-") as tmp_name:
        tmp = Path(tmp_name)
        files = make_series(tmp / "series", args.slices)
        total_bytes = sum(f.stat().st_size for f in files)
        if args.profile:
            run_node(tmp / "node", files, profile=True)
            return 0
        run_storescp(tmp / "warm", files[:10])  # page cache and binaries warm
        node_s: list[float] = []
        nofsync_s: list[float] = []
        null_s: list[float] = []
        dcmtk_s: list[float] = []
        handler_s: list[float] = []
        node_cpu: list[tuple[float, float]] = []
        null_cpu: list[tuple[float, float]] = []
        dcmtk_cpu: list[float] = []
        loads: list[float] = [os.getloadavg()[0]]
        for rep in range(args.reps):
            node_s.append(run_node(tmp / "node", files, handler_s=handler_s, cpu_s=node_cpu))
            dcmtk_s.append(run_storescp(tmp / "storescp", files, cpu_s=dcmtk_cpu))
            nofsync_s.append(run_node(tmp / "node", files, fsync=False))
            null_s.append(run_node(tmp / "node", files, null=True, cpu_s=null_cpu))
            loads.append(os.getloadavg()[0])
            print(
                f"rep {rep + 1}: node {total_bytes / node_s[-1] / 1e6:.1f} MB/s,"
                f" storescp {total_bytes / dcmtk_s[-1] / 1e6:.1f} MB/s,"
                f" node without fsync {total_bytes / nofsync_s[-1] / 1e6:.1f} MB/s,"
                f" pynetdicom no-op handler {total_bytes / null_s[-1] / 1e6:.1f} MB/s,"
                f" load average {loads[-1]:.2f}",
                flush=True,
            )
        profile = handler_profile(tmp / "profile", files)
        print("handler profile (ms per instance):", profile, flush=True)
        pdus = pdu_lengths_with_unlimited_node_pdu(tmp / "pdu", files[:20])
        print("advertised max PDU 0:", pdus, flush=True)
    node_mb_s = total_bytes / statistics.median(node_s) / 1e6
    storescp_mb_s = total_bytes / statistics.median(dcmtk_s) / 1e6
    n = len(files)
    cpu = {
        "node_process": ms_per(n, [c[0] for c in node_cpu]),
        "storescu_sending_to_node": ms_per(n, [c[1] for c in node_cpu]),
        "pynetdicom_noop_process": ms_per(n, [c[0] for c in null_cpu]),
        "storescp_and_storescu": ms_per(n, dcmtk_cpu),
    }
    per_instance = {
        "node_ms": statistics.median(node_s) / len(files) * 1e3,
        "node_handler_ms": statistics.median(handler_s) * 1e3,
        "node_without_fsync_ms": statistics.median(nofsync_s) / len(files) * 1e3,
        "pynetdicom_noop_handler_ms": statistics.median(null_s) / len(files) * 1e3,
        "storescp_ms": statistics.median(dcmtk_s) / len(files) * 1e3,
    }
    result = {
        "node_mb_s": round(node_mb_s, 2),
        "storescp_mb_s": round(storescp_mb_s, 2),
        "ratio": round(node_mb_s / storescp_mb_s, 3),
        "target_ratio": 0.7,
        "diagnostic_node_without_fsync_mb_s": round(
            total_bytes / statistics.median(nofsync_s) / 1e6, 2
        ),
        "diagnostic_pynetdicom_noop_handler_mb_s": round(
            total_bytes / statistics.median(null_s) / 1e6, 2
        ),
        "diagnostic_ratio_ceiling_pynetdicom_noop": round(
            statistics.median(dcmtk_s) / statistics.median(null_s), 3
        ),
        "per_instance_median_ms": {k: round(v, 2) for k, v in per_instance.items()},
        "cpu_ms_per_instance_median": cpu,
        "series": {
            "files": len(files),
            "rows_columns": [512, 512],
            "transfer_syntax": "Explicit VR Little Endian",
            "total_bytes": total_bytes,
        },
        "repetitions": {
            "node_seconds": [round(s, 3) for s in node_s],
            "storescp_seconds": [round(s, 3) for s in dcmtk_s],
            "node_without_fsync_seconds": [round(s, 3) for s in nofsync_s],
            "pynetdicom_noop_handler_seconds": [round(s, 3) for s in null_s],
        },
        "settings": {
            "max_pdu": MAX_PDU,
            "tcp_nodelay": True,
            "storescu": "-R --max-pdu 131072 --max-send-pdu 131072, the same for both receivers",
            "node": (
                "answers after: header parse (no pixel decoding), atomic write with fsync of"
                " the file and of its directory, one SQLite (WAL, synchronous=NORMAL)"
                " transaction of prepared Core statements; sha256 of the data set computed"
                " on a worker thread while the file is written"
            ),
            "storescp": "+B bit-preserving, no fsync, no database",
            "node_without_fsync": "diagnostic only: settings.spool.fsync false",
            "pynetdicom_noop_handler": "diagnostic only: same SCP, handler answers Success at once",
        },
        "handler_profile_ms_per_instance": profile,
        "advertised_max_pdu_diagnostic": pdus,
        "load_average_1min": {
            "before": round(loads[0], 2),
            "after_each_repetition": [round(x, 2) for x in loads[1:]],
        },
        "limits": limits(per_instance, profile, pdus, loads, cpu),
        "machine": machine(),
        "note": args.note,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("node_mb_s", "storescp_mb_s", "ratio")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
