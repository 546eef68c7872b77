"""Typed exceptions for the gRPC status codes the CoPL services return.

Every failed call raises a subclass of `CoplError`; catch the one you can act on. A rejected
`AddPreferences` request raises `InvalidRecords`, which lists each bad record's index and reason from the
`google.rpc.BadRequest` details the graph service attaches.
"""
from __future__ import annotations

import re

import grpc
from google.rpc import error_details_pb2, status_pb2

_DETAILS_KEY = "grpc-status-details-bin"
_RECORD_FIELD = re.compile(r"^records\[(\d+)\](?:\.(.+))?$")


class CoplError(Exception):
    """A call to a CoPL service failed. `code` is the gRPC status code, `message` the server's text."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class InvalidArgument(CoplError):
    """INVALID_ARGUMENT: malformed input (empty text, wrong embedding length, NaN values...). Do not retry."""


class InvalidRecords(InvalidArgument):
    """AddPreferences refused the whole request: `violations` lists (index in the request, reason) for each
    bad record; none of the request's records was stored. Fix them, or pass `skip_invalid=True`."""

    def __init__(self, code: grpc.StatusCode, message: str, violations: list[tuple[int, str]]):
        super().__init__(code, message)
        self.violations = violations


class NotFound(CoplError):
    """NOT_FOUND: an unknown user with no context, where the call asked for `require_known`."""


class ReleaseMismatch(CoplError):
    """FAILED_PRECONDITION: the embedding belongs to a release the server does not serve (fetch it again
    with `embeddings()`), or the server has no release loaded yet."""


class Unauthenticated(CoplError):
    """UNAUTHENTICATED: a call that needs a token (a write, an admin call, a read where the server requires
    read tokens) came without one."""


class PermissionDenied(CoplError):
    """PERMISSION_DENIED: the server does not know the token, or its role (read, write, admin) is too low."""


class ResourceExhausted(CoplError):
    """RESOURCE_EXHAUSTED: the request is over a documented limit (message size, responses, users, text)."""


class Unavailable(CoplError):
    """UNAVAILABLE: no server answered, after the retries and failovers the call's policy allows."""


class DeadlineExceeded(CoplError):
    """DEADLINE_EXCEEDED: the call did not finish within its deadline (retries included)."""


class ServerError(CoplError):
    """Any other status (INTERNAL, UNIMPLEMENTED, CANCELLED...): a fault on the server or in the protocol."""


_BY_CODE: dict[grpc.StatusCode, type[CoplError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: ReleaseMismatch,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def record_violations(trailing_metadata) -> list[tuple[int, str]]:
    """(index, reason) for each `records[i]` field violation in a status's BadRequest details."""
    for key, value in trailing_metadata or ():
        if key != _DETAILS_KEY:
            continue
        status = status_pb2.Status.FromString(value)
        violations = []
        for detail in status.details:
            if not detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                continue
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            for violation in bad_request.field_violations:
                if match := _RECORD_FIELD.match(violation.field):
                    sub = f"{match.group(2)}: " if match.group(2) else ""
                    violations.append((int(match.group(1)), sub + violation.description))
        return sorted(violations)
    return []


def from_rpc_error(error: grpc.RpcError) -> CoplError:
    """The typed exception for a failed gRPC call (sync or asyncio)."""
    code, message = error.code(), error.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        if violations := record_violations(error.trailing_metadata()):
            return InvalidRecords(code, message, violations)
    return _BY_CODE.get(code, ServerError)(code, message)


def from_code_name(name: str, message: str) -> CoplError:
    """The typed exception for a status code given by name (the per-item errors of a stream)."""
    code = getattr(grpc.StatusCode, name, grpc.StatusCode.UNKNOWN)
    return _BY_CODE.get(code, ServerError)(code, message)
