"""``hpb-node admin``: tokens, rules, destinations and jobs from the command line.

Works on the node database named by the settings (``--config``), with the same
functions and the same audit trail as the REST API (actor ``cli:<user>``).

    hpb-node admin token create NAME --role admin|viewer|ingest   (prints the token once)
    hpb-node admin token list | token delete NAME
    hpb-node admin rule list | rule apply FILE.yaml | rule delete NAME
    hpb-node admin destination list | destination add NAME --dimse AE@HOST:PORT
                                    | destination add NAME --url URL | destination delete NAME
    hpb-node admin job list [--state S] [--limit N] | job retry ID | job cancel ID
"""

from __future__ import annotations

import argparse
import getpass
import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from node import api, auth, migrate
from node.db import create_engine_for, session_factory
from node.errors import ConfigError
from node.settings import Settings, load_settings


def open_sessions(settings: Settings) -> sessionmaker[Any]:
    """Sessions on the node database, its schema brought up to date first."""
    migrate.upgrade(settings.database.url)
    return session_factory(create_engine_for(settings.database.url))


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"[:64]
    except (KeyError, OSError):
        return "cli"


def _print(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _run(args: argparse.Namespace) -> int:
    settings = load_settings(Path(args.config) if args.config else None)
    sessions = open_sessions(settings)
    with sessions() as session:
        try:
            code = int(args.admin_func(session, args))
            session.commit()
        except LookupError as exc:
            raise ConfigError(str(exc).strip("'\"")) from exc
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "value"
            raise ConfigError(f"{where}: {first['msg']}") from exc
    return code


def _token_create(session: Session, args: argparse.Namespace) -> int:
    token = auth.create_token(session, args.name, args.role, _actor())
    print(token)
    return 0


def _token_list(session: Session, args: argparse.Namespace) -> int:
    _print(auth.list_tokens(session))
    return 0


def _token_delete(session: Session, args: argparse.Namespace) -> int:
    if not auth.delete_token(session, args.name, _actor()):
        raise LookupError(f"token {args.name} not found")
    return 0


def _rule_list(session: Session, args: argparse.Namespace) -> int:
    _print(api.list_rules(session))
    return 0


def _rule_apply(session: Session, args: argparse.Namespace) -> int:
    """Create or update every rule in a YAML file (a list, or a mapping with ``rules:``)."""
    try:
        data = yaml.safe_load(Path(args.file).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read rules file {args.file}: {exc}") from exc
    items = data.get("rules", []) if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ConfigError(f"{args.file}: expected a list of rules")
    for item in items:
        if not isinstance(item, dict):
            raise ConfigError(f"{args.file}: each rule must be a mapping")
        body = dict(item)
        rule = api.RuleIn(
            name=body.pop("name", ""),
            priority=body.pop("priority", 100),
            enabled=body.pop("enabled", True),
            definition=body,
        )
        exists = any(r["name"] == rule.name for r in api.list_rules(session))
        api.put_rule(session, rule, _actor(), create=not exists)
        print(f"{'updated' if exists else 'created'} rule {rule.name}")
    return 0


def _rule_delete(session: Session, args: argparse.Namespace) -> int:
    api.delete_rule(session, args.name, _actor())
    return 0


def _dest_list(session: Session, args: argparse.Namespace) -> int:
    _print(api.list_destinations(session))
    return 0


def _dest_add(session: Session, args: argparse.Namespace) -> int:
    if args.dimse:
        m = re.match(r"^([^@]{1,16})@([^:]+):(\d+)$", args.dimse)
        if not m:
            raise ConfigError(f"--dimse {args.dimse!r}: expected AE@HOST:PORT")
        dest = api.DestinationIn(
            name=args.name, kind="dimse", ae_title=m[1], host=m[2], port=int(m[3])
        )
    else:
        dest = api.DestinationIn(name=args.name, kind="dicomweb", url=args.url)
    exists = any(d["name"] == dest.name for d in api.list_destinations(session))
    _print(api.put_destination(session, dest, _actor(), create=not exists))
    return 0


def _dest_delete(session: Session, args: argparse.Namespace) -> int:
    api.delete_destination(session, args.name, _actor())
    return 0


def _job_list(session: Session, args: argparse.Namespace) -> int:
    _print(api.list_jobs(session, state=args.state, limit=args.limit))
    return 0


def _job_retry(session: Session, args: argparse.Namespace) -> int:
    _print(api.retry_job(session, args.id, _actor()))
    return 0


def _job_cancel(session: Session, args: argparse.Namespace) -> int:
    _print(api.cancel_job(session, args.id, _actor()))
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("admin", help="manage tokens, rules, destinations and jobs")
    p.set_defaults(func=_run)
    groups = p.add_subparsers(dest="admin_group", required=True)

    def leaf(group: Any, name: str, fn: Any, help_: str) -> argparse.ArgumentParser:
        q: argparse.ArgumentParser = group.add_parser(name, help=help_)
        q.set_defaults(admin_func=fn)
        return q

    tok = groups.add_parser("token", help="API tokens").add_subparsers(dest="op", required=True)
    q = leaf(tok, "create", _token_create, "create a token and print it (shown once)")
    q.add_argument("name")
    q.add_argument("--role", choices=[r.value for r in auth.Role], default="viewer")
    leaf(tok, "list", _token_list, "list token names and roles")
    leaf(tok, "delete", _token_delete, "revoke a token").add_argument("name")

    rule = groups.add_parser("rule", help="routing rules").add_subparsers(dest="op", required=True)
    leaf(rule, "list", _rule_list, "list rules")
    leaf(rule, "apply", _rule_apply, "create or update the rules in a YAML file").add_argument(
        "file"
    )
    leaf(rule, "delete", _rule_delete, "delete a rule").add_argument("name")

    dest = groups.add_parser("destination", help="result destinations").add_subparsers(
        dest="op", required=True
    )
    leaf(dest, "list", _dest_list, "list destinations")
    q = leaf(dest, "add", _dest_add, "add or update a destination")
    q.add_argument("name")
    how = q.add_mutually_exclusive_group(required=True)
    how.add_argument("--dimse", help="AE@HOST:PORT of a C-STORE SCP")
    how.add_argument("--url", help="DICOMweb base URL (STOW-RS)")
    leaf(dest, "delete", _dest_delete, "delete a destination").add_argument("name")

    job = groups.add_parser("job", help="jobs").add_subparsers(dest="op", required=True)
    q = leaf(job, "list", _job_list, "list jobs, newest first")
    q.add_argument("--state", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    q.add_argument("--limit", type=int, default=50)
    leaf(job, "retry", _job_retry, "queue a failed or cancelled job again").add_argument(
        "id", type=int
    )
    leaf(job, "cancel", _job_cancel, "cancel a queued or running job").add_argument("id", type=int)
