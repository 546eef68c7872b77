"""Bearer tokens with roles: `authorization: Bearer <token>` metadata, checked before a handler runs.

Roles are ordered: admin implies write implies read. AddPreferences needs write, AdminService.Reload needs
admin; every other call is a read, open unless `require_read_token` is set; the gRPC health service is
always open (load balancers and container health checks call it without credentials).

Where the tokens come from:
- `--auth-file` (COPL_AUTH_FILE): one `ROLE TOKEN` a line (`#` comments and blank lines ignored; tokens of
  at least 16 characters, no whitespace, each listed once). When it is set, nothing else is read.
- otherwise the single write token of earlier versions, which becomes an admin token: COPL_WRITE_TOKEN, or
  the first line of `--token-file` (default COPL_HOME/write-token, created with a random token and mode
  0600 when missing, so a fresh `copl up` is never open for writes).
The file in use is watched (size, mtime, inode; every `RELOAD_CHECK_S`): a changed file is parsed whole and
swapped in; a malformed one keeps the previous table and logs why (never the tokens themselves).

Only sha256 digests of the tokens are kept, and a given token is looked up by its digest, so the time a
check takes says nothing about how much of a token was right. A call with no token (or not `Bearer`) is
UNAUTHENTICATED; an unknown token, or one whose role is too low, is PERMISSION_DENIED.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import grpc

from copl_common.errors import PermissionDenied, ServiceError, Unauthenticated

TOKEN_ENV = "COPL_WRITE_TOKEN"
READ, WRITE, ADMIN = "read", "write", "admin"
ROLE_RANK = {READ: 1, WRITE: 2, ADMIN: 3}
MIN_TOKEN_CHARS = 16
RELOAD_CHECK_S = 1.0
# Full method name -> the role it needs; unlisted methods are reads.
METHOD_ROLES = {
    "/copl.v1.GraphService/AddPreferences": WRITE,
    "/copl.v1.AdminService/Reload": ADMIN,
}
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
log = logging.getLogger("copl.auth")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_roles(text: str, source: str) -> dict[bytes, str]:
    """Token digest -> role from `ROLE TOKEN` lines. ValueError names the line, never the token."""
    table: dict[bytes, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{source}:{number}: expected 'ROLE TOKEN' (two fields), got {len(parts)} fields")
        role, token = parts
        if role not in ROLE_RANK:
            raise ValueError(f"{source}:{number}: unknown role {role!r}; expected read, write or admin")
        if len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"{source}:{number}: the token is shorter than {MIN_TOKEN_CHARS} characters")
        if _digest(token) in table:
            raise ValueError(f"{source}:{number}: this token is already listed")
        table[_digest(token)] = role
    if not table:
        raise ValueError(f"{source}: no tokens")
    return table


def _parse_single_token(text: str, source: str) -> dict[bytes, str]:
    token = (text.strip().splitlines() or [""])[0].strip()
    if not token:
        raise ValueError(f"no write token: set {TOKEN_ENV} or put a token in {source}")
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"the write token in {source} is shorter than {MIN_TOKEN_CHARS} characters")
    return {_digest(token): ADMIN}


def create_token_file(token_path: Path) -> None:
    """A random token in `token_path` (mode 0600), unless the file exists."""
    if token_path.exists():
        return
    token_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(32) + "\n")
    log.info("created a write token in %s (mode 0600)", token_path)


def read_token(path: Path) -> str:
    """The token on the first line of `path` (a caller's own token: the CLI, the reward service's to the graph)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read the token file {path}: {exc.strerror}") from None
    _parse_single_token(text, str(path))
    return text.strip().splitlines()[0].strip()


def load_write_token(token_path: Path, environ: Mapping[str, str] = os.environ, create: bool = True) -> str:
    """The single write token: COPL_WRITE_TOKEN if set, else the file's first line (created when missing and
    `create`)."""
    if token := environ.get(TOKEN_ENV, "").strip():
        return token
    if create:
        create_token_file(token_path)
    if not token_path.exists():
        raise ValueError(f"no write token: set {TOKEN_ENV} or put a token in {token_path}")
    return read_token(token_path)


class TokenTable:
    """Token digests and their roles, from one file (re-read when it changes) or fixed."""

    def __init__(self, roles: dict[bytes, str], path: Path | None = None,
                 parse: Callable[[str, str], dict[bytes, str]] = parse_roles):
        self._roles = roles
        self.path = path
        self._parse = parse
        self._seen = self._stat()

    @classmethod
    def from_file(cls, path: Path, parse: Callable[[str, str], dict[bytes, str]] = parse_roles) -> TokenTable:
        """ValueError (one line) when the file cannot be read or parsed."""
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"cannot read the token file {path}: {exc.strerror}") from None
        return cls(parse(text, str(path)), path, parse)

    @classmethod
    def fixed(cls, token: str, role: str = ADMIN) -> TokenTable:
        return cls({_digest(token): role})

    @classmethod
    def from_settings(cls, auth_file: str, token_path: Path, environ: Mapping[str, str] = os.environ) -> TokenTable:
        """The roles file when one is named; else the single write token (as admin), from the environment or
        its file (created when missing)."""
        if auth_file:
            return cls.from_file(Path(auth_file).expanduser())
        if token := environ.get(TOKEN_ENV, "").strip():
            return cls(_parse_single_token(token, TOKEN_ENV))
        create_token_file(token_path)
        return cls.from_file(token_path, _parse_single_token)

    def __len__(self) -> int:
        return len(self._roles)

    def _stat(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def reload_if_changed(self) -> bool:
        """Re-read the file if it changed since last seen; True when a new table is in use."""
        if self.path is None or (seen := self._stat()) == self._seen:
            return False
        self._seen = seen   # a broken file is reported once, not on every check
        try:
            roles = self._parse(self.path.read_text(), str(self.path))
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            log.warning("token file %s changed but is not usable, keeping the previous %d tokens: %s",
                        self.path, len(self._roles), reason)
            return False
        self._roles = roles
        log.info("reloaded %d tokens from %s", len(roles), self.path)
        return True

    async def watch(self, interval_s: float = RELOAD_CHECK_S) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.reload_if_changed()

    def check(self, metadata, needed: str) -> None:
        """Raise Unauthenticated / PermissionDenied unless the metadata carries a token of role `needed` or above."""
        header = next((v for k, v in (metadata or ()) if k == "authorization"), None)
        if header is None:
            raise Unauthenticated(f"this call needs a {needed} token: metadata 'authorization: Bearer <token>'")
        scheme, _, given = str(header).partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise Unauthenticated("the authorization metadata must be 'Bearer <token>'")
        role = self._roles.get(_digest(given.strip()))
        if role is None:
            raise PermissionDenied("the token is not valid")
        if ROLE_RANK[role] < ROLE_RANK[needed]:
            raise PermissionDenied(f"this call needs the {needed} role; the token has {role}")


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that carries `token`."""
    return (("authorization", f"Bearer {token}"),)


def role_needed(method: str, require_read_token: bool) -> str | None:
    """The role a full method name needs, or None when it is open."""
    if method.startswith(OPEN_PREFIXES):
        return None
    return METHOD_ROLES.get(method, READ if require_read_token else None)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks the token before the handler runs. Sits inside the observability interceptor, which turns the
    errors raised here into statuses and counts them."""

    def __init__(self, tokens: TokenTable, require_read_token: bool = False):
        self.tokens = tokens
        self._require_read_token = require_read_token

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        needed = None if handler is None else role_needed(details.method, self._require_read_token)
        if needed is None:
            return handler
        try:
            self.tokens.check(details.invocation_metadata, needed)
        except ServiceError as error:
            return _refusing(handler, error)
        return handler


def _refusing(handler: grpc.RpcMethodHandler, error: ServiceError) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that fails with `error` without reading a request."""
    async def refuse(_request, _context):
        raise error

    async def refuse_stream(_request, _context):
        raise error
        yield  # noqa: unreachable - makes this an async generator, as streaming handlers are

    kinds = {(False, False): (grpc.unary_unary_rpc_method_handler, refuse),
             (False, True): (grpc.unary_stream_rpc_method_handler, refuse_stream),
             (True, False): (grpc.stream_unary_rpc_method_handler, refuse),
             (True, True): (grpc.stream_stream_rpc_method_handler, refuse_stream)}
    make, behaviour = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(behaviour, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
