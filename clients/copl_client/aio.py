"""The asyncio client: `AsyncClient`. The blocking `Client` (sync.py) runs this one on a thread of its own."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from copl.v1 import common_pb2, common_pb2_grpc, graph_pb2, graph_pb2_grpc, reward_pb2_grpc
from copl_client.batch import BatchJob
from copl_client.endpoints import Endpoint, EndpointPool, TLSConfig, token_from_env
from copl_client.errors import Unavailable, from_rpc_error
from copl_client.jsonl import FileJobSummary, score_file
from copl_client.results import (AddResult, EmbeddingSource, ItemResult, PairLike, Preference, ReleaseInfo,
                                 ReloadResult, ScoreItem, Scores, UserEmbedding, pair_proto, record_proto)
from copl_client.retry import RetryPolicy

DEFAULT_GRAPH = "127.0.0.1:50051"    # `copl up`'s ports (plaintext, or TLS when a TLSConfig is given)
DEFAULT_REWARD = "127.0.0.1:50052"
GRAPH_SERVICE = "copl.v1.GraphService"
REWARD_SERVICE = "copl.v1.RewardService"


class AsyncClient:
    """A client of the CoPL graph and reward services, for asyncio code.

    Args:
        reward: reward-service target(s): `grpc://HOST:PORT`, `grpcs://HOST:PORT` or a list of them.
            Calls go round robin to the healthy ones and fail over to the next on UNAVAILABLE.
        graph: graph-service target(s), the same way.
        token: bearer token sent as `authorization: Bearer ...` on every call (default: $COPL_TOKEN).
            Writes (`add_preferences`) and admin calls (`reload`) need one.
        tls: root certificates, and a client certificate and key for mutual TLS (see `TLSConfig`).
        timeout: the default deadline of a call in seconds, retries included.
        retry: how calls retry when no server answers (see `RetryPolicy`).
        channel_options: extra gRPC channel arguments.

    Use it as `async with AsyncClient(...) as client:`, or call `close()`.
    """

    def __init__(self, reward: str | Sequence[str] = DEFAULT_REWARD, graph: str | Sequence[str] = DEFAULT_GRAPH, *,
                 token: str | None = None, tls: TLSConfig | None = None, timeout: float = 30.0,
                 retry: RetryPolicy = RetryPolicy(), channel_options: Sequence[tuple[str, Any]] = ()):
        self.reward = EndpointPool(reward, REWARD_SERVICE, tls, channel_options)
        self.graph = EndpointPool(graph, GRAPH_SERVICE, tls, channel_options)
        token = token_from_env(token)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout, self.retry = timeout, retry

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every channel."""
        await asyncio.gather(self.reward.close(), self.graph.close())

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def call(self, pool: EndpointPool, stub_class, method: str, request, timeout: float | None = None,
                   pin: Endpoint | None = None):
        """One unary RPC with the client's deadline, retries and failover (`pin`: that endpoint only)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout if timeout is not None else self.timeout)
        last = "no healthy server"
        for attempt in range(1, self.retry.max_attempts + 1):
            ep = pin or await pool.acquire()
            if ep is not None:
                try:
                    return await ep.method(stub_class, method)(request, timeout=max(deadline - loop.time(), 0.001),
                                                               metadata=self._metadata)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise from_rpc_error(exc) from None
                    last = f"{ep.target}: {exc.details()}"
                    if pin is None:
                        pool.mark_down(ep)
            if attempt == self.retry.max_attempts:
                break
            if pin is None and pool.any_healthy():
                continue    # fail over to the next address at once
            delay = self.retry.backoff(attempt)
            if loop.time() + delay >= deadline:
                break
            await asyncio.sleep(delay)
        raise Unavailable(grpc.StatusCode.UNAVAILABLE, f"{method}: no server answered ({last})")

    async def score(self, user: str | UserEmbedding, prompt: str, responses: Sequence[str], *,
                    context: Sequence[PairLike] = (), require_known: bool = False,
                    timeout: float | None = None) -> Scores:
        """Personalized rewards for `responses` to `prompt`, one per response, in order.

        `user` is a user id (the reward service looks its embedding up in the graph service) or a
        `UserEmbedding` from `embeddings()` (no lookup; ReleaseMismatch once the release changed).
        `context`: labelled pairs of a user the store does not know yet (with a user id only).
        `require_known`: NotFound for an unknown user with no context, instead of the default embedding.
        """
        item = ScoreItem(prompt=prompt, responses=responses, context=context, require_known=require_known,
                         **({"embedding": user} if isinstance(user, UserEmbedding) else {"user_id": user}))
        reply = await self.call(self.reward, reward_pb2_grpc.RewardServiceStub, "ScoreResponses", item.to_proto(),
                                timeout)
        return Scores(scores=tuple(reply.scores), release_id=reply.release_id,
                      embedding_source=EmbeddingSource.from_proto(reply.embedding_source))

    async def embeddings(self, user_ids: Sequence[str], *, context: Mapping[str, Sequence[PairLike]] | None = None,
                         release_id: str = "", require_known: bool = False,
                         timeout: float | None = None) -> list[UserEmbedding]:
        """Embeddings of a batch of users, one per id, in order; each says its source and release.

        `context`: for users the store does not know yet, labelled pairs to adapt from (not stored).
        `release_id`: answer in that release's space (ReleaseMismatch when the server no longer holds it).
        `require_known`: NotFound for an unknown user with no context, instead of the default embedding.
        """
        if isinstance(user_ids, str):
            raise TypeError("embeddings() takes a list of user ids")
        context = context or {}
        request = graph_pb2.GetUserEmbeddingRequest(
            users=[graph_pb2.UserQuery(user_id=u, context=[pair_proto(p) for p in context.get(u, ())])
                   for u in user_ids], release_id=release_id, require_known=require_known)
        reply = await self.call(self.graph, graph_pb2_grpc.GraphServiceStub, "GetUserEmbedding", request, timeout)
        return [UserEmbedding(user_id=e.user_id, vector=tuple(e.vector),
                              source=EmbeddingSource.from_proto(e.source), release_id=reply.release_id)
                for e in reply.embeddings]

    async def add_preferences(self, records: Iterable[Preference | Mapping[str, Any]], *, skip_invalid: bool = False,
                              timeout: float | None = None) -> AddResult:
        """Store preference records (needs a write token). Idempotent: a stored record counts as a duplicate.

        All or nothing: if any record is invalid none is stored and `InvalidRecords` lists (index, reason)
        for each bad one; with `skip_invalid` the valid ones are stored and the result lists the rest.
        Safe to retry (records are content-addressed), so it is retried on UNAVAILABLE like a read.
        """
        request = graph_pb2.AddPreferencesRequest(records=[record_proto(r) for r in records],
                                                  skip_invalid=skip_invalid)
        reply = await self.call(self.graph, graph_pb2_grpc.GraphServiceStub, "AddPreferences", request, timeout)
        return AddResult(inserted=reply.inserted, duplicates=reply.duplicates,
                         rejected=tuple((r.index, r.reason) for r in reply.rejected))

    async def release_info(self, service: str = "reward", timeout: float | None = None) -> ReleaseInfo:
        """The release a service serves now (`service`: "reward" or "graph")."""
        pool, stub = self._service(service)
        reply = await self.call(pool, stub, "GetReleaseInfo", common_pb2.ReleaseInfoRequest(), timeout)
        return ReleaseInfo.from_proto(reply)

    async def reload(self, release_id: str = "", timeout: float = 300.0) -> list[ReloadResult]:
        """Make every server load the registry's current release (or `release_id`) now (needs an admin token).

        Graph services first, so that reward services that swap after them find embeddings of the new
        release; then each reward service. Stops at the first failure and raises it.
        """
        results = []
        for name, pool in (("graph", self.graph), ("reward", self.reward)):
            for ep in pool.endpoints:
                reply = await self.call(pool, common_pb2_grpc.AdminServiceStub, "Reload",
                                        common_pb2.ReloadRequest(release_id=release_id), timeout, pin=ep)
                results.append(ReloadResult(address=ep.target, service=name, release_id=reply.release_id,
                                            swapped=reply.swapped, previous_release_id=reply.previous_release_id))
        return results

    def _service(self, name: str):
        if name == "reward":
            return self.reward, reward_pb2_grpc.RewardServiceStub
        if name == "graph":
            return self.graph, graph_pb2_grpc.GraphServiceStub
        raise ValueError(f"unknown service {name!r}: 'reward' or 'graph'")

    def iter_score_many(self, items: Iterable[ScoreItem | Mapping] | AsyncIterable[ScoreItem | Mapping], *,
                        concurrency: int = 64, progress: bool = False, total: int | None = None,
                        max_stall_s: float = 300.0) -> AsyncIterator[ItemResult]:
        """Score many items through the streaming RPC; yield one `ItemResult` per item, in input order.

        Items are `ScoreItem`s or rows like {"id"?, "user_id" | "embedding", "prompt", "responses"}.
        At most `concurrency` items are unanswered (or answered but not yet consumed) at any time, so memory
        stays bounded whatever the input's length. An item the server rejects comes back with `error` set
        and the job goes on. When a reward service goes away, the unanswered items are sent again on a new
        stream (another address, or the same one once it is back); the job raises `Unavailable` after
        `max_stall_s` seconds without a reply, and the typed error of any whole-call failure (a bad token...).
        `progress` shows a tqdm bar when tqdm is installed.
        """
        return BatchJob(self, items, concurrency=concurrency, progress=progress, total=total,
                        max_stall_s=max_stall_s).results()

    async def score_many(self, items, *, concurrency: int = 64, progress: bool = False,
                         max_stall_s: float = 300.0) -> list[ItemResult]:
        """`iter_score_many` collected into a list (results in input order)."""
        total = len(items) if hasattr(items, "__len__") else None
        return [r async for r in self.iter_score_many(items, concurrency=concurrency, progress=progress, total=total,
                                                      max_stall_s=max_stall_s)]

    async def score_file(self, input_path: str | Path, output_path: str | Path, *, concurrency: int = 64,
                         progress: bool = True, max_stall_s: float = 300.0) -> FileJobSummary:
        """Score a JSONL file of rows {"id"?, "user_id" | "embedding", "prompt", "responses", "context"?}
        into a JSONL file of results, one line per input row, in input order. Resumable: a re-run skips the
        rows already in the output and never writes a row twice (see `copl_client.jsonl`)."""
        return await score_file(self, Path(input_path), Path(output_path), concurrency=concurrency,
                                progress=progress, max_stall_s=max_stall_s)
