"""``hpb-node rules validate FILE`` and ``hpb-node rules test FOLDER``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from node.errors import ConfigError
from node.rules import Rule, SeriesAttributes, explain_text, load_rules_file, rules_from_rows
from node.settings import load_settings


def _validate(args: argparse.Namespace) -> int:
    ruleset = load_rules_file(Path(args.file))  # ConfigError names the rule and field
    print(
        f"{args.file}: {len(ruleset.rules)} rule(s), {len(ruleset.destinations)} destination(s) valid"
    )
    for rule in ruleset.ordered():
        print(
            f"  {rule.priority:>5}  {rule.name}: pipeline {rule.pipeline},"
            f" destinations {rule.destinations}, selection {rule.selection.policy}"
        )
    return 0


def _rules_for(args: argparse.Namespace) -> list[Rule]:
    if args.rules:
        return load_rules_file(Path(args.rules)).ordered()
    settings = load_settings(Path(args.config) if args.config else None)
    if settings.rules_file is not None:
        return load_rules_file(settings.rules_file).ordered()
    from sqlalchemy import select

    from node.db import RuleRow, create_engine_for, session_factory

    engine = create_engine_for(settings.database.url)
    try:
        with session_factory(engine)() as session:
            return rules_from_rows(session.scalars(select(RuleRow)).all())
    finally:
        engine.dispose()


def _test(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder of one series")
    rules = _rules_for(args)
    if not rules:
        raise ConfigError("no rules to test (give --rules FILE or set rules_file)")
    attrs = SeriesAttributes.from_folder(folder, calling_ae=args.calling_ae)
    print(explain_text(rules, attrs))
    return 0 if any(r.explain(attrs)[0] for r in rules) else 1


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("rules", help="validate routing rules or test them on a series")
    sub = p.add_subparsers(dest="rules_command", required=True)
    v = sub.add_parser("validate", help="validate a rules YAML file")
    v.add_argument("file")
    v.set_defaults(func=_validate)
    t = sub.add_parser(
        "test", help="explain which rule matches a folder holding one series, and why"
    )
    t.add_argument("folder")
    t.add_argument("--rules", default=None, help="rules file (default: settings or database)")
    t.add_argument("--calling-ae", default="", help="calling AE title to assume")
    t.set_defaults(func=_test)
