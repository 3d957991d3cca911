"""``hpb-node`` command line: one sub-command per module, registered below."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from node.errors import NodeError

# Each module here defines ``register(subparsers)`` adding its sub-command(s);
# a sub-command sets ``func(args) -> int`` with ``set_defaults``.
COMMAND_MODULES: tuple[str, ...] = (
    "node.cli_train",
    "node.cli_synth",
    "node.cli_evaluate",
    "node.cli_clinical",
    "node.cli_admin",
    "node.cli_pull",
    "node.cli_serve",
    "node.cli_rules",
    "node.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpb-node", description=__doc__)
    parser.add_argument("--config", type=str, default=None, help="settings YAML file")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except NodeError as exc:
        print(f"hpb-node: error: {exc}", file=sys.stderr)
        return 2
