"""The write token: `authorization: Bearer <token>` metadata on writes (AddPreferences) and admin calls (Reload).

Reads are open (both services listen on loopback by default). The token comes from the COPL_WRITE_TOKEN
environment variable or from a file (--token-file; default COPL_HOME/write-token, created with a random
token and mode 0600 when missing, so a fresh `copl up` is never open for writes). Tokens are compared in
constant time and never logged. A call with no token is UNAUTHENTICATED; a wrong token, PERMISSION_DENIED.

Methods map to the role they need (`WRITE`); reads need none. Roles per token (read/write/admin) can be
added here without touching the servicers.
"""
from __future__ import annotations

import hmac
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from copl_common.errors import PermissionDenied, ServiceError, Unauthenticated

TOKEN_ENV = "COPL_WRITE_TOKEN"
WRITE = "write"
# Full method name -> role it needs. Anything not listed is a read, open to all callers.
PROTECTED_METHODS = {
    "/copl.v1.GraphService/AddPreferences": WRITE,
    "/copl.v1.AdminService/Reload": WRITE,
}
log = logging.getLogger("copl.auth")


def load_write_token(token_path: Path, environ=os.environ, create: bool = True) -> str:
    """The write token: COPL_WRITE_TOKEN if set, else the file's first line (created when missing and `create`)."""
    if token := environ.get(TOKEN_ENV, "").strip():
        return token
    if not token_path.exists() and create:
        token_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32) + "\n")
        log.info("created a write token in %s (mode 0600)", token_path)
    try:
        token = token_path.read_text().strip().splitlines()[0].strip()
    except (OSError, IndexError):
        raise ValueError(f"no write token: set {TOKEN_ENV} or put a token in {token_path}") from None
    if len(token) < 16:
        raise ValueError(f"the write token in {token_path} is shorter than 16 characters")
    return token


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that carries `token`."""
    return (("authorization", f"Bearer {token}"),)


def check_token(metadata, expected: str) -> None:
    """Raise Unauthenticated / PermissionDenied unless the metadata carries `expected`."""
    header = next((v for k, v in (metadata or ()) if k == "authorization"), None)
    if header is None:
        raise Unauthenticated("this call needs a write token: metadata 'authorization: Bearer <token>'")
    scheme, _, given = str(header).partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise Unauthenticated("the authorization metadata must be 'Bearer <token>'")
    if not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise PermissionDenied("the write token is not valid")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks the token on protected methods before the handler runs. Sits inside the observability
    interceptor, which turns the errors raised here into statuses and counts them."""

    def __init__(self, token: str, protected: dict[str, str] = PROTECTED_METHODS):
        self._token = token
        self._protected = protected

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method not in self._protected:
            return handler
        try:
            check_token(details.invocation_metadata, self._token)
        except ServiceError as error:
            return _refusing(handler, error)
        return handler


def _refusing(handler: grpc.RpcMethodHandler, error: ServiceError) -> grpc.RpcMethodHandler:
    async def refuse(_request, _context):
        raise error

    if handler.request_streaming or handler.response_streaming:
        raise TypeError("protected methods are unary")  # PROTECTED_METHODS names unary calls only
    return grpc.unary_unary_rpc_method_handler(refuse, request_deserializer=handler.request_deserializer,
                                               response_serializer=handler.response_serializer)
