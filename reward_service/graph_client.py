"""The reward service's view of the graph service: user embeddings of the reward service's OWN release.

Every call names the release the reward service serves (GetUserEmbedding.release_id), so an embedding and
a model always come from the same release; the graph service keeps the previous release for a grace period
so a reward service that swaps later still gets its own. Calls carry a deadline (`embedding_deadline_ms`,
and never past the caller's own), so an unreachable graph service is UNAVAILABLE in time, not a hang.

TLS (mutual TLS with a client certificate) and a bearer token, when the graph service asks for them, come
from the reward service's graph_tls_* and graph_token_file settings.

A small cache by (user, release) keeps embeddings for `embedding_cache_ttl_ms`: with the graph service's
invalidation (store_poll_s) that bounds how long a user's new labels take to change their scores. Concurrent
misses for one key share one call. Requests with inline context are never cached.
"""
from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Sequence

import grpc
import torch
from prometheus_client import CollectorRegistry, Counter

from copl.v1 import common_pb2, graph_pb2, graph_pb2_grpc
from copl_common.auth import bearer_metadata
from copl_common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, ServiceError, Unavailable

# The graph service's status -> what the reward service's caller gets.
_MAPPED = {grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument, grpc.StatusCode.NOT_FOUND: NotFound,
           grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
           grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted}
SOURCE_NAMES = {v: k for k, v in common_pb2.EmbeddingSource.items()}
# Reconnect to a restarted graph service within about a second: gRPC's default backoff (1 s growing 1.6x to
# 120 s) kept requests by user id failing for ~3 s after a graph service that was down 10 s came back.
_RECONNECT = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
              ("grpc.max_reconnect_backoff_ms", 1000))


class GraphClient:
    def __init__(self, target: str, deadline_s: float, ttl_s: float, capacity: int,
                 registry: CollectorRegistry | None = None, credentials: grpc.ChannelCredentials | None = None,
                 token: str | None = None):
        self.target = target
        self._credentials = credentials
        self._metadata = bearer_metadata(token) if token else None
        self.deadline_s = deadline_s
        self.ttl_s = ttl_s
        self.capacity = capacity
        self._channel: grpc.aio.Channel | None = None
        self._stub: graph_pb2_grpc.GraphServiceStub | None = None
        self._cache: OrderedDict[tuple[str, str], tuple[torch.Tensor, str, float]] = OrderedDict()
        self._inflight: dict[tuple[str, str], asyncio.Future] = {}
        self.lookups = Counter("copl_user_embedding_cache_total", "Reward service's embedding cache lookups.",
                               ("result",), registry=registry)

    def _graph(self) -> graph_pb2_grpc.GraphServiceStub:
        if self._stub is None:  # created on the serving loop, on first use
            self._channel = (grpc.aio.secure_channel(self.target, self._credentials, options=_RECONNECT)
                             if self._credentials else grpc.aio.insecure_channel(self.target, options=_RECONNECT))
            self._stub = graph_pb2_grpc.GraphServiceStub(self._channel)
        return self._stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    def _timeout(self, caller_remaining: float | None) -> float:
        return self.deadline_s if caller_remaining is None else max(0.0, min(self.deadline_s, caller_remaining))

    async def embedding(self, user_id: str, release_id: str, context: Sequence[common_pb2.PreferencePair] = (),
                        require_known: bool = False, caller_remaining: float | None = None) -> tuple[torch.Tensor, str]:
        """(vector (d,), source name) of one user in `release_id`'s embedding space."""
        if context:
            return await self._fetch(user_id, release_id, context, require_known, caller_remaining)
        key = (user_id, release_id)
        hit = self._cache.get(key)
        if hit is not None and hit[2] > time.monotonic() and not (require_known and hit[1] == "DEFAULT"):
            self.lookups.labels("hit").inc()
            return hit[0], hit[1]
        self.lookups.labels("miss").inc()
        task = None if require_known else self._inflight.get(key)
        if task is None:
            # A task of its own: a caller that gives up does not cancel the fetch others wait on.
            task = asyncio.ensure_future(self._fetch(user_id, release_id, (), require_known, caller_remaining))
            task.add_done_callback(lambda t: self._fetched(key, t))
            if not require_known:
                self._inflight[key] = task
        return await asyncio.shield(task)

    def _fetched(self, key: tuple[str, str], task: asyncio.Task) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if task.cancelled() or task.exception() is not None:  # exception() also marks it retrieved
            return
        vector, source = task.result()
        self._cache[key] = (vector, source, time.monotonic() + self.ttl_s)
        self._cache.move_to_end(key)
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)

    async def _fetch(self, user_id: str, release_id: str, context, require_known: bool,
                     caller_remaining: float | None) -> tuple[torch.Tensor, str]:
        timeout = self._timeout(caller_remaining)
        request = graph_pb2.GetUserEmbeddingRequest(
            users=[graph_pb2.UserQuery(user_id=user_id, context=context)], release_id=release_id,
            require_known=require_known)
        try:
            reply = await self._graph().GetUserEmbedding(request, timeout=timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, timeout) from None
        if reply.release_id != release_id or len(reply.embeddings) != 1:
            raise FailedPrecondition(f"the graph service answered for release {reply.release_id!r}, "
                                     f"not {release_id}")
        found = reply.embeddings[0]
        return torch.tensor(found.vector, dtype=torch.float32), SOURCE_NAMES[found.source]

    def _error(self, exc: grpc.aio.AioRpcError, timeout: float) -> ServiceError:
        code = exc.code()
        if code in _MAPPED:
            return _MAPPED[code](f"graph service: {exc.details()}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return Unavailable(f"the graph service at {self.target} did not answer within {timeout * 1e3:.0f} ms")
        return Unavailable(f"the graph service at {self.target} is unavailable: {code.name} {exc.details() or ''}".strip())

    async def serves(self, release_id: str) -> bool | None:
        """Whether the graph service holds `release_id` now; None when it cannot be asked."""
        try:
            info = await self._graph().GetReleaseInfo(common_pb2.ReleaseInfoRequest(), timeout=self.deadline_s,
                                                      metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            return False if exc.code() == grpc.StatusCode.FAILED_PRECONDITION else None  # no release yet / down
        return release_id in info.serving_release_ids
