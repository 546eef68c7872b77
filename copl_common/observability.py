"""Metrics, request ids and request logs for both services, in one server interceptor.

Metric names follow the gRPC Prometheus interceptors (go-grpc-prometheus, py-grpc-prometheus), so the
dashboards operators already have work as they are:
  grpc_server_started_total{grpc_type,grpc_service,grpc_method}
  grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}
  grpc_server_handling_seconds{grpc_type,grpc_service,grpc_method}      (histogram)
  grpc_server_msg_received_total / grpc_server_msg_sent_total{grpc_type,grpc_service,grpc_method}
plus the release being served (copl_release_info{release_id} = 1), swaps and refused releases. Each service
keeps its own CollectorRegistry (two services in one process never share counters) and adds its own metrics
to it (batch sizes, queue depth, cache hits).

Every call gets a request id (the caller's `x-request-id` metadata, or a new one), returned in the trailing
metadata. Logs: one line per call at DEBUG (method, status, milliseconds, request id); failures of ours
(INTERNAL, UNAVAILABLE) at WARNING/ERROR with the request id. Request contents (texts, tokens) are never logged.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from copl_common.errors import ServiceError

REQUEST_ID_KEY = "x-request-id"
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

# Latency buckets from 0.5 ms (a cached embedding) to 10 s (a large batch on a CPU).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServiceMetrics:
    """The gRPC and release metrics of one service, in its own registry."""

    def __init__(self, service: str):
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("grpc_type", "grpc_service", "grpc_method")
        r = self.registry
        self.started = Counter("grpc_server_started_total", "RPCs started on the server.", labels, registry=r)
        self.handled = Counter("grpc_server_handled_total", "RPCs completed on the server, regardless of success "
                               "or failure.", (*labels, "grpc_code"), registry=r)
        self.handling = Histogram("grpc_server_handling_seconds", "Response latency of RPCs handled by the server.",
                                  labels, buckets=LATENCY_BUCKETS, registry=r)
        self.msg_received = Counter("grpc_server_msg_received_total", "Stream messages received by the server.",
                                    labels, registry=r)
        self.msg_sent = Counter("grpc_server_msg_sent_total", "Stream messages sent by the server.", labels, registry=r)
        self.release_info = Gauge("copl_release_info", "1 for the release this service serves.", ("release_id",),
                                  registry=r)
        self.release_swaps = Counter("copl_release_swaps_total", "Releases swapped in.", registry=r)
        self.release_refused = Counter("copl_release_refused_total", "Releases refused by validation.", registry=r)

    def set_release(self, release_id: str, previous: str | None) -> None:
        if previous:
            self.release_info.remove(previous)
        self.release_info.labels(release_id).set(1)

    def serve_http(self, host: str, port: int) -> int | None:
        """Expose the metrics on http://host:port/metrics; returns the bound port (None when port is -1)."""
        if port < 0:
            return None
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return server.server_port

    def close(self) -> None:
        if (server := getattr(self, "_http", None)) is not None:
            server.shutdown()
            server.server_close()


def _split_method(full: str) -> tuple[str, str]:
    # "/copl.v1.GraphService/GetUserEmbedding" -> ("copl.v1.GraphService", "GetUserEmbedding")
    service, _, method = full.lstrip("/").partition("/")
    return service, method


def _grpc_type(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    return "server_stream" if handler.response_streaming else "unary"


def _status_with_violations(error: ServiceError) -> grpc.Status:
    """A rich status (google.rpc.Status with a BadRequest detail), read by grpc_status.rpc_status.from_call."""
    bad = error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in error.field_violations])
    detail = any_pb2.Any()
    detail.Pack(bad)
    return rpc_status.to_status(status_pb2.Status(code=getattr(code_pb2, error.code.name), message=error.message,
                                                  details=[detail]))


class _Call:
    """Book-keeping of one call: its request id, timing, final code and the log line."""

    def __init__(self, interceptor: "ObservabilityInterceptor", kind: str, service: str, method: str, context):
        self.log, self.metrics = interceptor.log, interceptor.metrics
        self.labels = (kind, service, method)
        self.method = method
        self.context = context
        given = dict(context.invocation_metadata() or ()).get(REQUEST_ID_KEY, "")
        self.request_id = given if _REQUEST_ID_OK.match(given) else uuid.uuid4().hex[:16]
        request_id.set(self.request_id)  # each call runs in its own task, so this is the call's own
        context.set_trailing_metadata(((REQUEST_ID_KEY, self.request_id),))
        self.started = time.perf_counter()
        self.code = grpc.StatusCode.OK
        self.metrics.started.labels(*self.labels).inc()

    async def fail(self, exc: BaseException) -> None:
        """Turn an exception into the call's status (always raises)."""
        if isinstance(exc, ServiceError):
            self.code = exc.code
            if exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
                self.log.warning("%s %s: %s (request id %s)", self.method, exc.code.name, exc.message, self.request_id)
            if exc.field_violations:
                await self.context.abort_with_status(_status_with_violations(exc))
            await self.context.abort(exc.code, exc.message)
        self.code = grpc.StatusCode.INTERNAL
        self.log.error("%s failed (request id %s)", self.method, self.request_id, exc_info=exc)
        await self.context.abort(grpc.StatusCode.INTERNAL,
                                 f"internal error (request id {self.request_id}); the server log has the details")

    @contextlib.asynccontextmanager
    async def guarded(self) -> AsyncIterator[None]:
        """The catch-all around a handler: every way a call ends gets its status, its metrics and its log line."""
        try:
            yield
        except grpc.aio.AbortError:
            self.aborted()
            raise
        except asyncio.CancelledError:
            self.code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # noqa: BLE001 - every failure gets a status, never UNKNOWN
            await self.fail(exc)
        finally:
            self.finish()

    def aborted(self) -> None:
        """The handler aborted the call itself (context.abort): keep the code it set."""
        code = self.context.code()
        self.code = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN

    def finish(self) -> None:
        seconds = time.perf_counter() - self.started
        self.metrics.handled.labels(*self.labels, self.code.name).inc()
        self.metrics.handling.labels(*self.labels).observe(seconds)
        if self.log.isEnabledFor(logging.DEBUG):
            self.log.debug("%s %s %.1f ms request_id=%s", self.method, self.code.name, seconds * 1e3, self.request_id)


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    """Outermost interceptor: request ids, metrics, logs, and domain errors -> statuses (catch-all INTERNAL)."""

    def __init__(self, metrics: ServiceMetrics, log: logging.Logger):
        self.metrics = metrics
        self.log = log

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        service, method = _split_method(details.method)
        kind = _grpc_type(handler)
        if not handler.request_streaming and not handler.response_streaming:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, kind, service, method),
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                self._streaming(handler.stream_stream, kind, service, method, streams_in=True),
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(handler.unary_stream, kind, service, method, streams_in=False),
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        return handler  # client streaming: none of ours

    def _unary(self, behavior, kind: str, service: str, method: str):
        async def run(request, context):
            call = _Call(self, kind, service, method, context)
            async with call.guarded():
                return await behavior(request, context)
        return run

    def _streaming(self, behavior, kind: str, service: str, method: str, streams_in: bool):
        labels = (kind, service, method)

        async def count_in(requests: AsyncIterator) -> AsyncIterator:
            async for item in requests:
                self.metrics.msg_received.labels(*labels).inc()
                yield item

        if not inspect.isasyncgenfunction(behavior):  # writes with context.write (grpc_health's Watch)
            async def run_writer(request, context):
                call = _Call(self, kind, service, method, context)
                async with call.guarded():
                    return await behavior(count_in(request) if streams_in else request, context)
            return run_writer

        async def run(request, context):
            call = _Call(self, kind, service, method, context)
            async with call.guarded():
                async for reply in behavior(count_in(request) if streams_in else request, context):
                    self.metrics.msg_sent.labels(*labels).inc()
                    yield reply
        return run


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its plugin set-up lines are noise in a service log
