"""What both servers share: a grpc.aio server with health, reflection, the admin service, metrics,
token checks (copl_common/auth.py), TLS (copl_common/tls.py), limits, and graceful shutdown.

Health (`grpc.health.v1`) reports NOT_SERVING for every service until the first release is loaded and
warmed, and again from the moment shutdown begins. Shutdown (SIGINT/SIGTERM): health goes NOT_SERVING and
the server keeps answering for a short notice (a quarter of `shutdown_grace_s`, at most 1 s) so that health
checkers and load balancers see it and move away; then it stops accepting calls, calls in progress get
`shutdown_grace_s` to finish, and whatever is left is cancelled.
"""
from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from copl.v1 import common_pb2, common_pb2_grpc
from copl_common.auth import AuthInterceptor, TokenTable
from copl_common.observability import ObservabilityInterceptor, ServiceMetrics
from copl_common.registry import Release
from copl_common.release_holder import ReleaseHolder
from copl_common.service_settings import ServiceSettings
from copl_common.tls import server_credentials

ADMIN_SERVICE = common_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name


def listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def release_info(release: Release, serving_ids: Sequence[str]) -> common_pb2.ReleaseInfo:
    """ReleaseInfo from a release's manifest."""
    m = release.manifest
    return common_pb2.ReleaseInfo(
        release_id=release.id, created_at=m.get("created_at", ""), backbone=m.get("reward", {}).get("backbone", ""),
        embedding_dim=m.get("gnn", {}).get("dim", 0), num_users=m.get("data", {}).get("users", 0),
        metrics_json=json.dumps(m.get("metrics", {}), sort_keys=True), snapshot_time=m.get("snapshot_time") or "",
        serving_release_ids=list(serving_ids))


class AdminServicer(common_pb2_grpc.AdminServiceServicer):
    """AdminService.Reload: the admin token is checked by the interceptor before this runs."""

    def __init__(self, holder: ReleaseHolder):
        self._holder = holder

    async def Reload(self, request: common_pb2.ReloadRequest, context) -> common_pb2.ReloadResponse:
        result = await self._holder.reload(request.release_id)
        return common_pb2.ReloadResponse(release_id=result.release_id, swapped=result.swapped,
                                         previous_release_id=result.previous_release_id)


class GrpcServer:
    """One service's server. Add servicers, then `start()`; `set_serving(True)` once a release is warm."""

    def __init__(self, name: str, settings: ServiceSettings, tokens: TokenTable | None,
                 service_names: Sequence[str], log: logging.Logger):
        """`tokens`: None reads them as the settings say (auth file, or the single write token)."""
        self.name = name
        self.settings = settings
        self.log = log
        self.metrics = ServiceMetrics(name)
        if tokens is None:
            tokens = TokenTable.from_settings(settings.auth_file, settings.token_path)
        self.tokens = tokens
        # Read now: a missing certificate fails the start, not the first call.
        self._credentials = (server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
                             if settings.tls_cert else None)
        limit = settings.max_message_bytes
        self.server = grpc.aio.server(
            interceptors=[ObservabilityInterceptor(self.metrics, log),
                          AuthInterceptor(self.tokens, settings.require_read_token)],
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
            maximum_concurrent_rpcs=settings.max_concurrent_requests)
        self.service_names = [*service_names, ADMIN_SERVICE]
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], self.server)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._background: list[asyncio.Task] = []

    def in_background(self, *coroutines) -> None:
        """Run watchers (registry pointer, store) until the server stops."""
        self._background += [asyncio.create_task(c) for c in coroutines]

    async def serving_after_swap(self, _loaded) -> None:
        """A ReleaseHolder on_swap callback: a release is loaded and warm."""
        await self.set_serving(True)

    def add_admin(self, holder: ReleaseHolder) -> None:
        common_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(holder), self.server)

    async def start(self, port: int, metrics_port: int) -> int:
        await self.set_serving(False)
        address = listen_address(self.settings.host, port)
        self.port = (self.server.add_secure_port(address, self._credentials) if self._credentials
                     else self.server.add_insecure_port(address))
        if self.port == 0:
            raise OSError(f"{self.name}: cannot listen on {address}")
        await self.server.start()
        if self.tokens.path is not None:
            self.in_background(self.tokens.watch())
        self.metrics_port = self.metrics.serve_http(self.settings.host, metrics_port)
        tls = ("mutual TLS" if self.settings.tls_client_ca else "TLS") if self._credentials else "plaintext"
        self.log.info("%s listening on %s, %s, %d tokens (metrics: %s)", self.name,
                      listen_address(self.settings.host, self.port), tls, len(self.tokens),
                      f"http://{listen_address(self.settings.host, self.metrics_port)}/metrics"
                      if self.metrics_port else "off")
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.health.enter_graceful_shutdown()
        await asyncio.sleep(min(1.0, self.settings.shutdown_grace_s / 4))
        await self.server.stop(self.settings.shutdown_grace_s)
        self.metrics.close()


def run_until_signalled(make: Callable[[], object], log: logging.Logger) -> None:
    """Make and start a service (an object with async start() and stop()), wait for SIGINT or SIGTERM, stop
    it gracefully."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        signalled = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, signalled.set)
        service = make()   # on the loop: grpc.aio objects belong to the loop they are made on
        await service.start()
        await signalled.wait()
        log.info("shutting down: draining calls in progress")
        await service.stop()
        log.info("stopped")

    asyncio.run(main())
