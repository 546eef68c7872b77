"""The reward service's gRPC server: a thin servicer over reward_service/serving.py, and its lifecycle."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import torch

from copl.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from copl_common.auth import TokenTable, read_token
from copl_common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from copl_common.registry import Registry, Release
from copl_common.release_holder import ReleaseHolder
from copl_common.server import GrpcServer, release_info, run_until_signalled
from copl_common.service_settings import ServiceSettings
from copl_common.tls import channel_credentials
from reward_service.batcher import DynamicBatcher
from reward_service.graph_client import SOURCE_NAMES, GraphClient
from reward_service.serving import RewardCore, RewardRelease, ScoreInput, load_reward_release

log = logging.getLogger("copl.reward")
SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name
# Errors of one streamed item: it gets a reply with `error` set and the stream goes on.
ITEM_ERRORS = (InvalidArgument, NotFound, FailedPrecondition, Unavailable, ResourceExhausted)


def _input(request: reward_pb2.ScoreRequest) -> ScoreInput:
    if request.WhichOneof("user") == "embedding":
        e = request.embedding
        return ScoreInput(request.prompt, request.responses, embedding=e.vector, embedding_release_id=e.release_id,
                          embedding_source=SOURCE_NAMES.get(e.source, ""))
    return ScoreInput(request.prompt, request.responses, user_id=request.user_id, context=request.context,
                      require_known=request.require_known)


def _reply(request: reward_pb2.ScoreRequest, out) -> reward_pb2.ScoreResponse:
    return reward_pb2.ScoreResponse(scores=out.scores, release_id=out.release_id, request_id=request.request_id,
                                    embedding_source=common_pb2.EmbeddingSource.Value(out.embedding_source or
                                                                                      "EMBEDDING_SOURCE_UNSPECIFIED"))


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, core: RewardCore, stream_max_in_flight: int):
        self.core = core
        self.stream_max_in_flight = stream_max_in_flight

    async def ScoreResponses(self, request: reward_pb2.ScoreRequest, context) -> reward_pb2.ScoreResponse:
        return _reply(request, await self.core.score(_input(request), context.time_remaining()))

    async def ScoreResponsesStream(self, requests: AsyncIterator[reward_pb2.ScoreRequest],
                                   context) -> AsyncIterator[reward_pb2.ScoreResponse]:
        """Replies in request order. At most `stream_max_in_flight` requests are in flight (read, not yet
        answered): the next request is read only when a reply has gone out, so a fast writer (or a slow reader)
        is held back by gRPC flow control instead of filling memory."""
        self.core.holder.require()   # no release: the whole call fails, before reading anything
        slots = asyncio.Semaphore(self.stream_max_in_flight)
        started: asyncio.Queue[asyncio.Task | None] = asyncio.Queue()
        deadline = None if context.time_remaining() is None else time.monotonic() + context.time_remaining()

        async def one(request: reward_pb2.ScoreRequest) -> reward_pb2.ScoreResponse:
            try:
                remaining = None if deadline is None else deadline - time.monotonic()
                return _reply(request, await self.core.score(_input(request), remaining))
            except ITEM_ERRORS as exc:
                return reward_pb2.ScoreResponse(request_id=request.request_id,
                                                error=reward_pb2.ItemError(code=exc.code.name, message=exc.message))

        async def read() -> None:
            try:
                async for request in requests:
                    await slots.acquire()
                    await started.put(asyncio.create_task(one(request)))
            finally:
                await started.put(None)

        reader = asyncio.create_task(read())
        try:
            while (task := await started.get()) is not None:
                yield await task
                slots.release()   # after the reply is sent: replies waiting on a slow reader count as in flight
            await reader   # a failed read (e.g. a message over the size limit) fails the call
        finally:
            reader.cancel()
            while not started.empty():
                if (task := started.get_nowait()) is not None:
                    task.cancel()

    async def GetReleaseInfo(self, request: common_pb2.ReleaseInfoRequest, context) -> common_pb2.ReleaseInfo:
        loaded = self.core.holder.require()
        return release_info(loaded.release, [loaded.id])


class RewardService:
    """The running reward service: server, release holder, batcher, graph client, registry watcher."""

    def __init__(self, settings: ServiceSettings, token: str | None = None):
        """`token`: one admin token instead of those the settings name (tests)."""
        self.settings = settings
        self.server = GrpcServer("reward", settings, TokenTable.fixed(token) if token else None,
                                 [SERVICE_NAME], log)
        registry = self.server.metrics.registry
        self.batcher = DynamicBatcher(lambda jobs: jobs[0].model.forward(jobs), settings.max_batch_tokens,
                                      settings.max_queue_delay_ms, settings.max_queue_pairs, registry,
                                      settings.torch_threads)
        graph_tls = (channel_credentials(settings.graph_tls_ca, settings.graph_tls_cert, settings.graph_tls_key)
                     if settings.graph_tls_ca else None)
        graph_token = read_token(Path(settings.graph_token_file).expanduser()) if settings.graph_token_file else None
        self.graph = GraphClient(settings.graph_address, settings.embedding_deadline_ms / 1e3,
                                 settings.embedding_cache_ttl_ms / 1e3, settings.embedding_cache_size, registry,
                                 graph_tls, graph_token)
        self.holder: ReleaseHolder[RewardRelease] = ReleaseHolder(
            Registry(settings.registry_path), self._load, self.server.metrics, log,
            before_swap=self._wait_for_graph, on_swap=self.server.serving_after_swap)
        self.core = RewardCore(settings, self.holder, self.batcher, self.graph)
        reward_pb2_grpc.add_RewardServiceServicer_to_server(RewardServicer(self.core, settings.stream_max_in_flight),
                                                            self.server.server)
        self.server.add_admin(self.holder)

    def _load(self, release: Release) -> RewardRelease:
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)   # this loading thread's smoke and warm-up passes
        return load_reward_release(release, self.settings.device, self.settings.dtype)

    async def _wait_for_graph(self, release: Release) -> None:
        """Swap only once the graph service can answer in the new release's embedding space (it polls the
        same registry), so requests by user id do not fail during the swap; give up waiting after
        `release_sync_timeout_s` or at once when the graph service cannot be asked."""
        deadline = time.monotonic() + self.settings.release_sync_timeout_s
        while (serves := await self.graph.serves(release.id)) is False and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if not serves:
            log.warning("swapping to release %s although the graph service at %s %s", release.id,
                        self.graph.target, "does not serve it yet" if serves is False else "cannot be reached")

    @property
    def port(self) -> int | None:
        return self.server.port

    async def start(self) -> int:
        self.batcher.start()
        port = await self.server.start(self.settings.reward_port, self.settings.reward_metrics_port)
        await self.holder.poll_once()
        self.server.in_background(self.holder.watch(self.settings.release_poll_s))
        return port

    async def stop(self) -> None:
        await self.server.stop()
        await self.batcher.close()
        await self.graph.close()


def serve(settings: ServiceSettings) -> None:
    """Run until SIGINT or SIGTERM (`copl serve reward`)."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # a service log is not a terminal
    run_until_signalled(lambda: RewardService(settings), log)
