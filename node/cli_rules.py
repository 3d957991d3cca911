"""``hpb-node rules validate FILE`` and ``hpb-node rules test FOLDER``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from node.errors import ConfigError
from node.rules import Rule, SeriesAttributes, explain_text, load_rules_file, rule_from_row
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


def _rules_for(args: argparse.Namespace) -> tuple[list[Rule], str]:
    """The rules to test and where they came from: ``--rules``, ``rules_file``, or the database."""
    if args.rules:
        return load_rules_file(Path(args.rules)).ordered(), f"rules file {args.rules}"
    settings = load_settings(Path(args.config) if args.config else None)
    if settings.rules_file is not None:
        return load_rules_file(settings.rules_file).ordered(), f"rules file {settings.rules_file}"
    return _rules_in_database(settings.database.url)


def _rules_in_database(url: str) -> tuple[list[Rule], str]:
    """Every rule row (disabled ones are explained as disabled); the database is only read."""
    from sqlalchemy import select
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from node.db import RuleRow, create_engine_for, session_factory

    parsed = make_url(url)
    shown = parsed.render_as_string(hide_password=True)
    database = str(parsed.database or "")
    on_disk = parsed.get_backend_name() == "sqlite" and database not in ("", ":memory:")
    if on_disk and not Path(database).is_file():  # connecting would create an empty one
        raise ConfigError(f"no rules to test: database {shown} does not exist (give --rules FILE)")
    engine = create_engine_for(url)
    rules: list[Rule] = []
    try:
        with session_factory(engine)() as session:
            # only the columns every schema revision has: an older database still reads
            columns = (RuleRow.name, RuleRow.priority, RuleRow.enabled, RuleRow.definition)
            for row in session.execute(select(*columns)).all():
                try:
                    rules.append(rule_from_row(row))
                except ConfigError as exc:  # stored before a schema change: say so, go on
                    print(f"hpb-node: warning: {exc} (not tested)", file=sys.stderr)
    except SQLAlchemyError as exc:
        raise ConfigError(f"cannot read the rules from database {shown}: {exc}") from exc
    finally:
        engine.dispose()
    return sorted(rules, key=lambda r: (r.priority, r.name)), f"database {shown}"


def _test(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder of one series")
    rules, source = _rules_for(args)
    if not rules:
        raise ConfigError(f"no rules to test in {source} (give --rules FILE or set rules_file)")
    attrs = SeriesAttributes.from_folder(folder, calling_ae=args.calling_ae)
    print(f"rules: {len(rules)} from {source}")
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
    t.add_argument(
        "--rules",
        default=None,
        help="rules file (default: settings' rules_file, else the rules in the database)",
    )
    t.add_argument("--calling-ae", default="", help="calling AE title to assume")
    t.set_defaults(func=_test)
