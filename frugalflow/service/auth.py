"""Who may call the service: bearer tokens (one admin token, or a TOML file of named
principals) compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request

from ..exceptions import UserError

log = logging.getLogger("frugalflow.service")

_TOKEN_SHAPE = re.compile(r"[\x21-\x7e]+")  # what an Authorization header carries intact

Role = Literal["admin", "user"]


class UnauthenticatedServiceWarning(UserWarning):
    """`create_router` was mounted without a token: anyone who reaches the app may use it."""


# -- principals ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Principal:
    """Who a bearer token stands for: an `admin` sees every run, a `user` only its own."""

    name: str
    role: Role = "user"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


SINGLE_TOKEN = Principal("admin", "admin")
"""The principal of the one `token=` (FRUGALFLOW_TOKEN): an admin named "admin"."""


def _check_token(token: Any, what: str) -> str:
    if not isinstance(token, str) or not token:
        raise UserError(f"{what} is empty: use a secret, e.g. from "
                        "python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    if not _TOKEN_SHAPE.fullmatch(token):
        raise UserError(
            f"{what} has spaces or non-ASCII characters, which an Authorization header does "
            "not carry intact: use printable ASCII (e.g. secrets.token_urlsafe(32))")
    return token


def load_tokens(path: str | PathLike[str]) -> dict[str, Principal]:
    """Named principals from a TOML file, one table per person:

        [alice]
        token = "..."     # her bearer token (printable ASCII, unique)
        role = "admin"    # "admin" (every run) or "user" (own runs only; the default)
    """
    file = Path(path)
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"tokens file {file} does not exist: name an existing TOML file "
                        "(--tokens / FRUGALFLOW_TOKENS)") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"tokens file {file} is not valid TOML: {e}") from None
    out: dict[str, Principal] = {}
    for name, entry in data.items():
        usage = (f'tokens file {file}: [{name}] must be a table with token = "..." and '
                 'role = "admin" or "user"')
        if not isinstance(entry, dict) or set(entry) - {"token", "role"}:
            raise UserError(usage)
        token = _check_token(entry.get("token"), f"tokens file {file}: the token of [{name}]")
        role = entry.get("role", "user")
        if role not in ("admin", "user"):
            raise UserError(usage)
        if token in out:
            raise UserError(f"tokens file {file}: [{out[token].name}] and [{name}] have the "
                            "same token; give each principal its own")
        out[token] = Principal(name, role)
    if not out:
        raise UserError(f"tokens file {file} names no principal: add a [name] table with "
                        'token = "..." and role = "admin" or "user"')
    return out


class Auth:
    """Bearer tokens -> principals. Open (everyone, principal None) when it has no token."""

    def __init__(self, token: str | None,
                 tokens: Mapping[str, Principal] | str | PathLike[str] | None) -> None:
        if isinstance(tokens, (str, PathLike)):
            tokens = load_tokens(tokens)
        entries: dict[str, Principal] = {}
        if token is not None:
            entries[_check_token(token, "the token (--token, FRUGALFLOW_TOKEN)")] = SINGLE_TOKEN
        for t, who in (tokens or {}).items():
            if not isinstance(who, Principal) or who.role not in ("admin", "user"):
                raise UserError(f"tokens: {who!r} is not a Principal(name, 'admin' or 'user')")
            _check_token(t, f"the token of principal {who.name!r}")
            if t in entries:
                raise UserError(f"principal {who.name!r} has the same token as "
                                f"{entries[t].name!r}; give each its own")
            entries[t] = who
        roles: dict[str, str] = {}
        for who in entries.values():
            # Runs belong to a name: one name with two roles would let a user into the
            # runs of the admin of that name (e.g. a [admin] user and --token's "admin").
            if roles.setdefault(who.name, who.role) != who.role:
                raise UserError(f"principal name {who.name!r} is given both roles admin and "
                                "user (--token's principal is named 'admin'): rename one")
        # Digests, compared in constant time: neither the time nor the length of a
        # comparison says how much of a guess was right.
        self._entries = [(hashlib.sha256(t.encode()).digest(), who) for t, who in entries.items()]

    @property
    def open(self) -> bool:
        return not self._entries

    def identify(self, request: Request) -> Principal | None:
        """The principal of the request's bearer token; None when it has none or a wrong one."""
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            given = ""  # matches no token: tokens are never empty
        digest = hashlib.sha256(given.strip().encode("latin-1", "replace")).digest()
        found = None
        for expected, who in self._entries:  # no early exit: every token costs the same
            if hmac.compare_digest(digest, expected):
                found = who
        return found

    async def require(self, request: Request) -> Principal | None:
        """FastAPI dependency: the caller's principal (None when the API is open), or 401."""
        if self.open:
            return None
        who = self.identify(request)
        if who is None:
            raise HTTPException(401, detail={"error": "Unauthorized",
                                             "message": "send Authorization: Bearer <token>"},
                                headers={"WWW-Authenticate": "Bearer"})
        return who
