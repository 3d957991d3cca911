"""API tokens: two roles, stored hashed, checked on every admin API request.

A token is a random string shown once when created; the database keeps only
its SHA-256 (``ApiToken.token_sha256``). ``viewer`` tokens read; ``admin``
tokens also change configuration, retry or cancel jobs and manage tokens.
The settings' ``http.admin_token`` is a bootstrap admin token (named
``settings``) so a fresh installation can create its first stored tokens; it
is refused outside demo mode while it is the demo secret
(``Settings.check_secrets``).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from node.db import ApiToken, audit
from node.errors import ConfigError

BOOTSTRAP_NAME = "settings"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


class Role(StrEnum):
    ADMIN = "admin"
    VIEWER = "viewer"


@dataclass(frozen=True)
class Principal:
    """Who made a request: the token's name and role."""

    name: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def resolve_token(session: Session, token: str, bootstrap_token: str = "") -> Principal | None:
    """The principal holding ``token``, or None when it is unknown."""
    if not token:
        return None
    digest = hash_token(token)
    if bootstrap_token and hmac.compare_digest(digest, hash_token(bootstrap_token)):
        return Principal(BOOTSTRAP_NAME, Role.ADMIN)
    row = session.scalars(select(ApiToken).where(ApiToken.token_sha256 == digest)).first()
    if row is None:
        return None
    return Principal(row.name, Role(row.role))


def create_token(session: Session, name: str, role: str, actor: str) -> str:
    """Store a new token (hashed) and return it in clear: the only time it is shown."""
    if not _NAME.match(name) or name == BOOTSTRAP_NAME:
        raise ConfigError(
            f"token name {name!r}: 1-64 letters, digits, '_.@-', not {BOOTSTRAP_NAME!r}"
        )
    try:
        parsed = Role(role)
    except ValueError:
        raise ConfigError(f"token role {role!r}: must be 'admin' or 'viewer'") from None
    if session.scalars(select(ApiToken).where(ApiToken.name == name)).first() is not None:
        raise ConfigError(f"token name {name!r} already exists")
    token = secrets.token_urlsafe(32)
    session.add(ApiToken(name=name, role=parsed.value, token_sha256=hash_token(token)))
    audit(session, actor, "token.create", f"token:{name}", role=parsed.value)
    try:
        session.flush()
    except IntegrityError as exc:
        raise ConfigError(f"token name {name!r} already exists") from exc
    return token


def delete_token(session: Session, name: str, actor: str) -> bool:
    """Revoke the token called ``name``; False when there is none."""
    row = session.scalars(select(ApiToken).where(ApiToken.name == name)).first()
    if row is None:
        return False
    session.delete(row)
    audit(session, actor, "token.delete", f"token:{name}")
    return True


def list_tokens(session: Session) -> list[dict[str, str]]:
    rows = session.scalars(select(ApiToken).order_by(ApiToken.name)).all()
    return [{"name": r.name, "role": r.role, "created_at": r.created_at.isoformat()} for r in rows]
