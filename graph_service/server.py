"""The graph service's gRPC server: a thin servicer over graph_service/serving.py, and its lifecycle."""
from __future__ import annotations

import logging

from copl.v1 import common_pb2, graph_pb2, graph_pb2_grpc
from copl_common.auth import TokenTable
from copl_common.registry import Registry
from copl_common.release_holder import ReleaseHolder
from copl_common.server import GrpcServer, release_info, run_until_signalled
from copl_common.service_settings import ServiceSettings
from graph_service.serving import GraphCore, UserQuery, load_graph_release
from graph_service.store import PreferenceStore

log = logging.getLogger("copl.graph")
SERVICE_NAME = graph_pb2.DESCRIPTOR.services_by_name["GraphService"].full_name
_SOURCES = {name: common_pb2.EmbeddingSource.Value(name) for name in ("TRAINED", "ADAPTED", "DEFAULT")}


def _record(r: graph_pb2.PreferenceRecord) -> dict:
    """A proto record as the JSON object the validator reads (proto3 cannot tell an empty string from a
    missing one, so both read as empty and fail the same way)."""
    return {"user_id": r.user_id, "prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected,
            "group": r.group or None, "controversial": r.controversial if r.HasField("controversial") else None,
            "created_at": r.created_at or None}


class GraphServicer(graph_pb2_grpc.GraphServiceServicer):
    def __init__(self, core: GraphCore):
        self.core = core

    async def AddPreferences(self, request: graph_pb2.AddPreferencesRequest, context) -> graph_pb2.AddPreferencesResponse:
        result = await self.core.add_preferences([_record(r) for r in request.records], request.skip_invalid)
        return graph_pb2.AddPreferencesResponse(
            inserted=result.inserted, duplicates=result.duplicates,
            rejected=[graph_pb2.RejectedRecord(index=i, reason=reason) for i, reason in result.rejected])

    async def GetUserEmbedding(self, request: graph_pb2.GetUserEmbeddingRequest, context) -> graph_pb2.GetUserEmbeddingResponse:
        queries = [UserQuery(u.user_id, [(p.prompt, p.chosen, p.rejected) for p in u.context]) for u in request.users]
        release_id, found = await self.core.embeddings(queries, request.release_id, request.require_known)
        return graph_pb2.GetUserEmbeddingResponse(
            release_id=release_id,
            embeddings=[graph_pb2.UserEmbedding(user_id=e.user_id, vector=e.vector, source=_SOURCES[e.source])
                        for e in found])

    async def GetReleaseInfo(self, request: common_pb2.ReleaseInfoRequest, context) -> common_pb2.ReleaseInfo:
        loaded = self.core.holder.require()
        return release_info(loaded.release, self.core.holder.serving_ids())


class GraphService:
    """The running graph service: server, release holder, registry and store watchers."""

    def __init__(self, settings: ServiceSettings, token: str | None = None):
        """`token`: one admin token instead of those the settings name (tests)."""
        self.settings = settings
        self.server = GrpcServer("graph", settings, TokenTable.fixed(token) if token else None,
                                 [SERVICE_NAME], log)
        self.store = PreferenceStore(settings.store_url)
        self.holder: ReleaseHolder = ReleaseHolder(
            Registry(settings.registry_path), load_graph_release, self.server.metrics, log,
            keep_previous_s=settings.release_grace_s, on_swap=self.server.serving_after_swap)
        self.core = GraphCore(settings, self.store, self.holder, self.server.metrics.registry)
        graph_pb2_grpc.add_GraphServiceServicer_to_server(GraphServicer(self.core), self.server.server)
        self.server.add_admin(self.holder)

    @property
    def port(self) -> int | None:
        return self.server.port

    async def start(self) -> int:
        port = await self.server.start(self.settings.graph_port, self.settings.graph_metrics_port)
        await self.holder.poll_once()  # serve the current release as soon as it is warm
        self.server.in_background(self.holder.watch(self.settings.release_poll_s), self.core.watch_store())
        return port

    async def stop(self) -> None:
        await self.server.stop()
        self.store.close()


def serve(settings: ServiceSettings) -> None:
    """Run until SIGINT or SIGTERM (`copl serve graph`)."""
    run_until_signalled(lambda: GraphService(settings), log)
