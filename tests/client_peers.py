"""Scriptable gRPC peers for the client's fault-injection tests: real grpc.aio servers on loopback that
implement the copl.v1 stubs (and the standard health service), each on its own event-loop thread, told to
answer UNAVAILABLE, drop a stream, or go away and come back on the same port. Their answers are a plain
function of the request (score = length of the response), so a test can check every result."""
from __future__ import annotations

import asyncio
import threading
from collections import Counter
from dataclasses import dataclass, field

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from copl.v1 import common_pb2, common_pb2_grpc, graph_pb2, graph_pb2_grpc, reward_pb2, reward_pb2_grpc

RELEASE = "peer-release"


def expected_scores(responses) -> list[float]:
    return [float(len(r)) for r in responses]


@dataclass
class Script:
    """What a peer does: `fail` lists status codes for the next unary calls, one each, before it answers;
    a stream is cut with UNAVAILABLE after `drop_stream_after` replies (once); `stream_abort` ends every
    stream with that code; `reply_delay_s` slows stream replies so a client could run ahead."""

    fail: list[grpc.StatusCode] = field(default_factory=list)
    drop_stream_after: int | None = None
    stream_abort: grpc.StatusCode | None = None
    reply_delay_s: float = 0.0


class _Reward(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, peer: "Peer"):
        self.peer = peer

    async def ScoreResponses(self, request, context):
        await self.peer.unary(context, "ScoreResponses")
        return reward_pb2.ScoreResponse(scores=expected_scores(request.responses), release_id=RELEASE,
                                        embedding_source=common_pb2.TRAINED, request_id=request.request_id)

    async def ScoreResponsesStream(self, request_iterator, context):
        peer = self.peer
        peer.calls["ScoreResponsesStream"] += 1
        peer.metadata.append(dict(context.invocation_metadata()))
        if peer.script.stream_abort is not None:
            await context.abort(peer.script.stream_abort, "refused by the peer")
        queue: asyncio.Queue = asyncio.Queue()

        async def read():            # read eagerly: only the client's own bound limits what is in flight
            async for request in request_iterator:
                peer.stream_received += 1
                peer.in_flight += 1
                peer.max_in_flight = max(peer.max_in_flight, peer.in_flight)
                await queue.put(request)
            await queue.put(None)

        reader = asyncio.create_task(read())
        try:
            while (request := await queue.get()) is not None:
                if peer.script.reply_delay_s:
                    await asyncio.sleep(peer.script.reply_delay_s)
                drop = peer.script.drop_stream_after
                if drop is not None and peer.stream_replies >= drop:
                    peer.script.drop_stream_after = None
                    reader.cancel()
                    await asyncio.gather(reader, return_exceptions=True)
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "stream dropped by the peer")
                peer.in_flight -= 1
                peer.stream_replies += 1
                peer.answered[request.request_id] += 1
                if request.prompt == "bad":
                    yield reward_pb2.ScoreResponse(request_id=request.request_id, error=reward_pb2.ItemError(
                        code="INVALID_ARGUMENT", message="bad prompt"))
                else:
                    yield reward_pb2.ScoreResponse(scores=expected_scores(request.responses), release_id=RELEASE,
                                                   embedding_source=common_pb2.TRAINED, request_id=request.request_id)
        finally:
            reader.cancel()
            peer.in_flight = 0

    async def GetReleaseInfo(self, request, context):
        await self.peer.unary(context, "GetReleaseInfo")
        return common_pb2.ReleaseInfo(release_id=RELEASE, metrics_json='{"accuracy": 0.9}',
                                      serving_release_ids=[RELEASE])


class _Graph(graph_pb2_grpc.GraphServiceServicer):
    def __init__(self, peer: "Peer"):
        self.peer = peer

    async def AddPreferences(self, request, context):
        await self.peer.unary(context, "AddPreferences")
        bad = [(i, "prompt is empty") for i, r in enumerate(request.records) if not r.prompt]
        if bad and not request.skip_invalid:
            status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=f"{len(bad)} invalid record(s)")
            detail = error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f"records[{i}].prompt", description=why)
                for i, why in bad])
            status.details.add().Pack(detail)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, status.message,
                                trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),))
        return graph_pb2.AddPreferencesResponse(inserted=len(request.records) - len(bad), rejected=[
            graph_pb2.RejectedRecord(index=i, reason=why) for i, why in bad])

    async def GetUserEmbedding(self, request, context):
        await self.peer.unary(context, "GetUserEmbedding")
        return graph_pb2.GetUserEmbeddingResponse(release_id=RELEASE, embeddings=[
            graph_pb2.UserEmbedding(user_id=q.user_id, vector=[1.0, 0.0],
                                    source=common_pb2.ADAPTED if q.context else common_pb2.TRAINED)
            for q in request.users])


class _Admin(common_pb2_grpc.AdminServiceServicer):
    def __init__(self, peer: "Peer"):
        self.peer = peer

    async def Reload(self, request, context):
        await self.peer.unary(context, "Reload")
        return common_pb2.ReloadResponse(release_id=request.release_id or RELEASE, swapped=False)


class Peer:
    """A fake-free peer: a real server answering by script. `start()`/`stop()` may be repeated; the port stays."""

    def __init__(self, port: int = 0, tls: grpc.ServerCredentials | None = None):
        self.port, self.script, self.tls = port, Script(), tls
        self.calls: Counter = Counter()
        self.metadata: list[dict] = []
        self.answered: Counter = Counter()
        self.stream_received = self.stream_replies = self.in_flight = self.max_in_flight = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = None
        self.health = None

    @property
    def target(self) -> str:
        return f"{'grpcs' if self.tls else 'grpc'}://127.0.0.1:{self.port}"

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def unary(self, context, method: str) -> None:
        self.calls[method] += 1
        self.metadata.append(dict(context.invocation_metadata()))
        if self.script.fail:
            code = self.script.fail.pop(0)
            await context.abort(code, f"{code.name} by script")

    def start(self) -> "Peer":
        async def start():
            server = grpc.aio.server()
            reward_pb2_grpc.add_RewardServiceServicer_to_server(_Reward(self), server)
            graph_pb2_grpc.add_GraphServiceServicer_to_server(_Graph(self), server)
            common_pb2_grpc.add_AdminServiceServicer_to_server(_Admin(self), server)
            self.health = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
            address = f"127.0.0.1:{self.port}"
            self.port = server.add_secure_port(address, self.tls) if self.tls else server.add_insecure_port(address)
            await server.start()
            self._server = server
        self._run(start())
        return self

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self._run(self.health.set("", status))

    def stop(self) -> None:
        if self._server is not None:
            self._run(self._server.stop(0))
            self._server = None

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
