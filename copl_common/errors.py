"""Domain errors of the services, each with the gRPC status a caller gets for it (DESIGN.md "gRPC API").

Service logic raises these as plain Python; the servers' interceptor (copl_common/observability.py) turns
them into statuses, so the logic stays callable and testable without gRPC. Anything else that escapes a
call becomes INTERNAL with a request id, never a bare UNKNOWN.
"""
from __future__ import annotations

from collections.abc import Sequence

import grpc


class ServiceError(Exception):
    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, field_violations: Sequence[tuple[str, str]] = ()):
        super().__init__(message)
        self.message = message
        # (field, description) pairs sent as a google.rpc.BadRequest in the status details
        self.field_violations = list(field_violations)


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServiceError):
    """No release loaded, or a release this server does not serve."""
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    """A dependency (the database, the graph service) cannot be reached: the caller may retry."""
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


def summarize(items: Sequence[str], shown: int = 3) -> str:
    """'a; b; c and 4 more': the first few of a list, for a status message."""
    head = "; ".join(items[:shown])
    return head + (f" and {len(items) - shown} more" if len(items) > shown else "")
