"""Real graph and reward services for tests: in this process, on an asyncio loop of their own in a thread,
listening on free loopback ports; tests talk to them through real gRPC channels."""
from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path

import grpc

from copl.v1 import common_pb2_grpc, graph_pb2_grpc, reward_pb2_grpc
from copl_common.auth import bearer_metadata
from copl_common.registry import Registry
from copl_common.service_settings import ServiceSettings
from graph_service.server import GraphService
from reward_service.server import RewardService
from testkit.services import copy_release  # noqa: F401  (tests import it from here)

TOKEN = "test-write-token-0123456789"
AUTH = bearer_metadata(TOKEN)


def settings_for(db_url: str, registry: Path, **overrides) -> ServiceSettings:
    base = dict(host="127.0.0.1", graph_port=0, reward_port=0, graph_metrics_port=0, reward_metrics_port=0,
                db_url=db_url, registry=str(registry), release_poll_s=0.3, store_poll_s=0.25, shutdown_grace_s=2.0)
    return ServiceSettings(**{**base, **overrides})


class ServiceLoop:
    """Hosts services on one event loop in a daemon thread; `run` calls into it synchronously."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="services", daemon=True)
        self.thread.start()
        self.services: list = []

    def run(self, coro, timeout: float = 300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _start(self, cls, settings: ServiceSettings, token: str | None):
        async def start():
            service = cls(settings, token=token)   # grpc.aio objects belong to the loop they are made on
            await service.start()
            return service
        service = self.run(start())
        self.services.append(service)
        return service

    def graph(self, settings: ServiceSettings, token: str | None = TOKEN) -> GraphService:
        """`token`: the one admin token; None: the tokens the settings name (auth file, token file)."""
        return self._start(GraphService, settings, token)

    def reward(self, settings: ServiceSettings, token: str | None = TOKEN) -> RewardService:
        return self._start(RewardService, settings, token)

    def stop(self, service) -> None:
        self.run(service.stop())
        self.services.remove(service)

    def close(self) -> None:
        for service in list(self.services):
            self.stop(service)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Stubs:
    def __init__(self, port: int):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.graph = graph_pb2_grpc.GraphServiceStub(self.channel)
        self.reward = reward_pb2_grpc.RewardServiceStub(self.channel)
        self.admin = common_pb2_grpc.AdminServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()


def copy_registry(src: Path, dst: Path) -> Registry:
    shutil.copytree(src, dst)
    return Registry(dst)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
