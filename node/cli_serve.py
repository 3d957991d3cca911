"""``hpb-node serve`` (SCP, HTTP, scheduler, workers) and ``hpb-node worker`` (workers only)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from node.serve import NodeService, import_pipeline_modules, write_ready_file
from node.settings import load_settings

log = logging.getLogger(__name__)


def _run(args: argparse.Namespace, *, serve: bool) -> int:
    settings = load_settings(Path(args.config) if args.config else None)
    modules = list(args.pipeline_module or [])
    modules += [m for m in os.environ.get("HPB_PIPELINE_MODULES", "").split(",") if m]
    import_pipeline_modules(modules)
    service = NodeService(
        settings,
        workers=args.workers,
        run_scp=serve,
        run_http=serve,
        run_scheduler=serve,
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d received: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    service.start()
    write_ready_file(Path(args.ready_file) if args.ready_file else None, service.describe())
    stop.wait()
    service.stop(timeout=args.drain_s)
    return 0


def _serve(args: argparse.Namespace) -> int:
    return _run(args, serve=True)


def _worker(args: argparse.Namespace) -> int:
    return _run(args, serve=False)


def register(subparsers: Any) -> None:
    for name, func, text in (
        ("serve", _serve, "run the node: DICOM SCP, HTTP (STOW-RS, admin API), scheduler, workers"),
        ("worker", _worker, "run job workers only (scale-out against a shared PostgreSQL)"),
    ):
        p = subparsers.add_parser(name, help=text, description=text)
        p.add_argument(
            "--workers", type=int, default=None, help="worker threads (default: workers.count)"
        )
        p.add_argument(
            "--pipeline-module",
            action="append",
            metavar="MODULE",
            help="import MODULE first (it registers extra pipelines); repeatable",
        )
        p.add_argument(
            "--ready-file", default=None, help="write ports as JSON to this file once listening"
        )
        p.add_argument(
            "--drain-s", type=float, default=30.0, help="seconds to let work in flight finish"
        )
        p.set_defaults(func=func)


def main(argv: list[str] | None = None) -> int:
    """``python -m node.cli_serve [--config FILE] serve|worker ...`` without the other commands."""
    from node.errors import NodeError

    parser = argparse.ArgumentParser(prog="hpb-node")
    parser.add_argument("--config", default=None)
    parser.add_argument("-v", "--verbose", action="store_true")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except NodeError as exc:
        print(f"hpb-node: error: {exc}", flush=True)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
