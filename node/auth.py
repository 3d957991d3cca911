"""API tokens: three roles, stored hashed, checked on every admin API and STOW-RS request.

A token is a random string shown once when created; the database keeps only
its SHA-256 (``ApiToken.token_sha256``). ``viewer`` tokens read the admin API;
``admin`` tokens also change configuration, retry or cancel jobs, manage
tokens and may store instances; ``ingest`` tokens only store instances through
STOW-RS (what a PACS routing to the node holds) and read nothing.
The settings' ``http.admin_token`` is a bootstrap admin token (named
``settings``) so a fresh installation can create its first stored tokens; it
is refused outside demo mode while it is the demo secret
(``Settings.check_secrets``). The settings' ``http.ingest_token`` (named
``settings-ingest``, empty: none) is an ingest token known before the node
first starts, for the PACS's configuration (compose: ``HPB_INGEST_TOKEN``).

:func:`bearer_principal` and :func:`require` make the FastAPI dependencies:
401 without a token or with an unknown one, 403 with a token whose role may
not do what the route does.
"""

# No ``from __future__ import annotations`` here: FastAPI must see the
# dependency closures' ``Annotated`` parameters as objects, not strings.
import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Callable, Collection
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from node.db import ApiToken, audit
from node.errors import ConfigError

log = logging.getLogger(__name__)

BOOTSTRAP_NAME = "settings"
INGEST_BOOTSTRAP_NAME = "settings-ingest"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


class Role(StrEnum):
    ADMIN = "admin"
    VIEWER = "viewer"
    INGEST = "ingest"


READ_ROLES = frozenset({Role.ADMIN, Role.VIEWER})  # read the admin API
ADMIN_ROLES = frozenset({Role.ADMIN})  # change anything through the admin API
STORE_ROLES = frozenset({Role.ADMIN, Role.INGEST})  # store instances through STOW-RS


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


def resolve_token(
    session: Session, token: str, bootstrap_token: str = "", ingest_token: str = ""
) -> Principal | None:
    """The principal holding ``token``, or None when it is unknown.

    ``bootstrap_token`` and ``ingest_token`` are the settings' tokens
    (``http.admin_token``, ``http.ingest_token``); empty ones match nothing.
    """
    if not token:
        return None
    digest = hash_token(token)
    if bootstrap_token and hmac.compare_digest(digest, hash_token(bootstrap_token)):
        return Principal(BOOTSTRAP_NAME, Role.ADMIN)
    if ingest_token and hmac.compare_digest(digest, hash_token(ingest_token)):
        return Principal(INGEST_BOOTSTRAP_NAME, Role.INGEST)
    row = session.scalars(select(ApiToken).where(ApiToken.token_sha256 == digest)).first()
    if row is None:
        return None
    return Principal(row.name, Role(row.role))


def create_token(session: Session, name: str, role: str, actor: str) -> str:
    """Store a new token (hashed) and return it in clear: the only time it is shown."""
    if not _NAME.match(name) or name in (BOOTSTRAP_NAME, INGEST_BOOTSTRAP_NAME):
        raise ConfigError(
            f"token name {name!r}: 1-64 letters, digits, '_.@-', "
            f"not {BOOTSTRAP_NAME!r} or {INGEST_BOOTSTRAP_NAME!r}"
        )
    try:
        parsed = Role(role)
    except ValueError:
        roles = ", ".join(repr(r.value) for r in Role)
        raise ConfigError(f"token role {role!r}: must be one of {roles}") from None
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


# --------------------------------------------------------------------------- FastAPI


def bearer_principal(
    sessions: sessionmaker[Any], bootstrap_token: str = "", ingest_token: str = ""
) -> Callable[..., Principal]:
    """A dependency: the request's principal from its bearer token, else 401."""
    bearer = HTTPBearer(auto_error=False)

    def principal(
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Principal:
        who = None
        if creds is not None and creds.scheme.lower() == "bearer":
            with sessions() as session:
                who = resolve_token(session, creds.credentials, bootstrap_token, ingest_token)
        if who is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "a valid API token is required (Authorization: Bearer <token>)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return who

    return principal


def require(
    principal: Callable[..., Principal], roles: Collection[Role], action: str
) -> Callable[..., Principal]:
    """A dependency: ``principal``, or 403 when its role is not in ``roles``."""
    allowed = frozenset(roles)
    names = " or ".join(sorted(r.value for r in allowed))

    def check(who: Annotated[Principal, Depends(principal)]) -> Principal:
        if who.role not in allowed:
            log.warning("refused: %s with token %r of role %s", action, who.name, who.role.value)
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"{action} needs an {names} token")
        return who

    return check
