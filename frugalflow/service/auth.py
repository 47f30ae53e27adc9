"""Who may call the service: bearer tokens (one admin token, or a TOML file of named
principals) compared in constant time, sent as `Authorization: Bearer` or, from the run
viewer's pages, as a cookie (then writes need the CSRF header and a same-origin request)."""

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

from urllib.parse import urlsplit

from fastapi import HTTPException, Request

from ..exceptions import UserError

log = logging.getLogger("frugalflow.service")

_TOKEN_SHAPE = re.compile(r"[\x21-\x7e]+")  # what an Authorization header carries intact

Role = Literal["admin", "user"]


COOKIE = "frugalflow_token"
"""The cookie the run viewer's token prompt sets: the token itself, HttpOnly, SameSite=Strict,
scoped to the service's path (the browser's EventSource cannot send an Authorization header)."""

CSRF_HEADER = "X-Frugalflow-CSRF"
"""A write authenticated by the cookie must carry this header (any value): a cross-site form
cannot send it, and a cross-site script cannot without a CORS preflight the service refuses."""

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


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

    def lookup(self, given: str) -> Principal | None:
        """The principal of the token `given`; None for a wrong one."""
        digest = hashlib.sha256(given.strip().encode("latin-1", "replace")).digest()
        found = None
        for expected, who in self._entries:  # no early exit: every token costs the same
            if hmac.compare_digest(digest, expected):
                found = who
        return found

    def credentials(self, request: Request) -> tuple[Principal | None, bool]:
        """The request's principal and whether it came from the cookie. An Authorization
        header wins; the cookie counts only on a request without one."""
        header = request.headers.get("authorization")
        if header is None and (cookie := request.cookies.get(COOKIE)):
            return self.lookup(cookie), True
        scheme, _, given = (header or "").partition(" ")
        if scheme.lower() != "bearer":
            given = ""  # matches no token: tokens are never empty
        return self.lookup(given), False

    def identify(self, request: Request) -> Principal | None:
        """The principal of the request's token (header or cookie); None when it has none
        or a wrong one."""
        return self.credentials(request)[0]

    async def require(self, request: Request) -> Principal | None:
        """FastAPI dependency: the caller's principal (None when the API is open), or 401;
        403 for a cookie-authenticated write without the CSRF header or from another site."""
        if self.open:
            return None
        who, by_cookie = self.credentials(request)
        if who is None:
            raise HTTPException(401, detail={"error": "Unauthorized",
                                             "message": "send Authorization: Bearer <token>"},
                                headers={"WWW-Authenticate": "Bearer"})
        if by_cookie and request.method not in _SAFE_METHODS:
            check_csrf(request)
        return who


def same_origin(request: Request) -> bool:
    """True unless the request's Origin (or, without one, Referer) names another host than
    the one it was sent to. Browsers send Origin on every cross-site POST."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if source is None:
        return True  # not a browser's cross-site request: browsers send Origin on POST
    host = request.headers.get("host", "")
    return source != "null" and urlsplit(source).netloc.lower() == host.lower()


def check_csrf(request: Request) -> None:
    """403 unless a cookie-authenticated write comes from the service's own pages."""
    if request.headers.get(CSRF_HEADER) is None or not same_origin(request):
        raise HTTPException(403, detail={
            "error": "CSRFRefused",
            "message": f"a write authenticated by the {COOKIE} cookie must come from the "
                       f"run viewer (same origin, with the {CSRF_HEADER} header); other "
                       "clients send Authorization: Bearer <token>"})
