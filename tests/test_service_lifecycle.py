"""Service lifecycle on real servers: no release yet, a release appearing, hot swaps under traffic, a corrupted
release refused, rollback, the database gone, the graph service unreachable, the concurrency limit, and a
graceful shutdown that lets the call in progress finish."""
from __future__ import annotations

import asyncio
import shutil
import socket
import threading
import time
import urllib.request

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from copl.v1 import common_pb2, graph_pb2, reward_pb2
from copl_common.registry import Registry
from tests.conftest import PG_ADMIN, new_postgres_database
from tests.service_harness import AUTH, ServiceLoop, Stubs, copy_registry, copy_release, settings_for, wait_for

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _health(stubs: Stubs, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(stubs.channel).Check(health_pb2.HealthCheckRequest(service=service)).status


def _error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


def _request(tiny_release, i: int = 0) -> reward_pb2.ScoreRequest:
    r = tiny_release.dataset.test[i]
    return reward_pb2.ScoreRequest(user_id=r["user_id"], prompt=r["prompt"], responses=[r["chosen"], r["rejected"]])


def test_no_release_then_one_appears_and_database_down(tiny_release, tmp_path):
    """Empty registry: NOT_SERVING and FAILED_PRECONDITION; writes still work. A release published into
    the registry is picked up by the pointer poll and both services go SERVING. A database that goes away
    makes writes UNAVAILABLE."""
    loop = ServiceLoop()
    try:
        with new_postgres_database() as url:
            registry = Registry(tmp_path / "registry")
            settings = settings_for(url, registry.root)
            graph = loop.graph(settings)
            reward = loop.reward(settings.with_overrides(graph_target=f"127.0.0.1:{graph.port}"))
            g, r = Stubs(graph.port), Stubs(reward.port)
            for stubs, name in ((g, "copl.v1.GraphService"), (r, "copl.v1.RewardService")):
                assert _health(stubs) == NOT_SERVING and _health(stubs, name) == NOT_SERVING
            for call, request in ((g.graph.GetUserEmbedding, graph_pb2.GetUserEmbeddingRequest(
                    users=[graph_pb2.UserQuery(user_id="u")])), (r.reward.ScoreResponses, _request(tiny_release)),
                    (g.graph.GetReleaseInfo, common_pb2.ReleaseInfoRequest())):
                error = _error(call, request)
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "no release loaded" in error.details()
            reload = _error(r.admin.Reload, common_pb2.ReloadRequest(), metadata=AUTH)
            assert reload.code() == grpc.StatusCode.FAILED_PRECONDITION and "no current release" in reload.details()
            record = graph_pb2.PreferenceRecord(user_id="early", prompt="p", chosen="a", rejected="b")
            added = g.graph.AddPreferences(graph_pb2.AddPreferencesRequest(records=[record]), metadata=AUTH)
            assert added.inserted == 1

            source = tiny_release.release
            shutil.copytree(source.path, registry.releases_dir / source.id)
            registry.set_current(source.id)
            wait_for(lambda: _health(g) == SERVING and _health(r) == SERVING, 120, "both services to serve")
            assert r.reward.ScoreResponses(_request(tiny_release)).release_id == source.id

            with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
            down = _error(g.graph.AddPreferences, graph_pb2.AddPreferencesRequest(records=[record]), metadata=AUTH)
            assert down.code() == grpc.StatusCode.UNAVAILABLE and "preference store is unavailable" in down.details()
            # trained users need no database: reads of them go on
            assert r.reward.ScoreResponses(_request(tiny_release)).release_id == source.id
            g.close(), r.close()
    finally:
        loop.close()


def _metric(service, name: str, **labels) -> float:
    return service.server.metrics.registry.get_sample_value(name, labels) or 0.0


def test_hot_swap_under_traffic_refusal_and_rollback(tiny_release, tmp_path):
    loop = ServiceLoop()
    try:
        registry = copy_registry(tiny_release.registry, tmp_path / "registry")
        first = tiny_release.release.id
        settings = settings_for(tiny_release.db_url, registry.root, release_poll_s=0.2)
        graph = loop.graph(settings)
        reward = loop.reward(settings.with_overrides(graph_target=f"127.0.0.1:{graph.port}"))
        g, r = Stubs(graph.port), Stubs(reward.port)
        # Clients score without pause, by user id, through the whole swap; every reply must name a release.
        replies, failures, running = [], [], threading.Event()
        running.set()

        def traffic() -> None:
            i = 0
            while running.is_set():
                try:
                    replies.append(r.reward.ScoreResponses(_request(tiny_release, i % 50), timeout=30).release_id)
                except grpc.RpcError as exc:
                    failures.append(exc.code())
                i += 1

        clients = [threading.Thread(target=traffic) for _ in range(2)]
        for c in clients:
            c.start()
        wait_for(lambda: len(replies) >= 5, 60, "traffic")

        # Reload with an explicit id (the pointer poll does not race it): the graph side first, as an operator
        # would; the reward service would otherwise wait for the graph service to serve the release.
        second = copy_release(registry, first)
        for stubs in (g, r):
            swapped = stubs.admin.Reload(common_pb2.ReloadRequest(release_id=second.id), metadata=AUTH)
            assert (swapped.release_id, swapped.swapped, swapped.previous_release_id) == (second.id, True, first)
        again = g.admin.Reload(common_pb2.ReloadRequest(release_id=second.id), metadata=AUTH)
        assert (again.release_id, again.swapped) == (second.id, False)
        registry.set_current(second.id)   # the pointer follows; the watchers see it and have nothing to do
        wait_for(lambda: graph.holder.pointer_seen == reward.holder.pointer_seen == second.id, 30, "the poll")
        n_before = len(replies)
        wait_for(lambda: len(replies) >= n_before + 5, 60, "traffic after the swap")
        running.clear()
        for c in clients:
            c.join(60)
        assert failures == []
        assert set(replies) == {first, second.id} and replies[-1] == second.id

        # The graph service still answers in the previous release's space; the reward service refuses it.
        info = g.graph.GetReleaseInfo(common_pb2.ReleaseInfoRequest())
        assert list(info.serving_release_ids) == [second.id, first]
        old = g.graph.GetUserEmbedding(graph_pb2.GetUserEmbeddingRequest(
            users=[graph_pb2.UserQuery(user_id=tiny_release.dataset.test[0]["user_id"])], release_id=first))
        assert old.release_id == first
        stale = reward_pb2.ScoreRequest(embedding=reward_pb2.UserEmbeddingInput(
            vector=old.embeddings[0].vector, release_id=first), prompt="p", responses=["r"])
        assert _error(r.reward.ScoreResponses, stale).code() == grpc.StatusCode.FAILED_PRECONDITION

        # A corrupted release is refused, logged and counted; the old one keeps serving.
        broken = copy_release(registry, first, corrupt="reward/weights.safetensors")
        refused = _error(r.admin.Reload, common_pb2.ReloadRequest(release_id=broken.id), metadata=AUTH)
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "refused" in refused.details() and "checksum" in refused.details()
        assert _metric(reward, "copl_release_refused_total") == 1
        assert r.reward.ScoreResponses(_request(tiny_release)).release_id == second.id
        damaged_gnn = copy_release(registry, first, corrupt="gnn/tables.safetensors")
        for stubs in (g, r):   # both sides check the GNN's files, so neither swaps to it
            error = _error(stubs.admin.Reload, common_pb2.ReloadRequest(release_id=damaged_gnn.id), metadata=AUTH)
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "checksum" in error.details()
        assert _metric(reward, "copl_release_refused_total") == 2
        assert r.reward.ScoreResponses(_request(tiny_release)).release_id == second.id

        # Rollback: point CURRENT at the first release; both services follow by polling, no Reload.
        registry.set_current(first)
        wait_for(lambda: r.reward.ScoreResponses(_request(tiny_release)).release_id == first, 120, "rollback")
        assert g.graph.GetReleaseInfo(common_pb2.ReleaseInfoRequest()).release_id == first
        assert _metric(reward, "copl_release_swaps_total") == 3
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{reward.server.metrics_port}/metrics").read().decode()
        assert f'copl_release_info{{release_id="{first}"}} 1.0' in metrics and second.id not in metrics
        g.close(), r.close()
    finally:
        loop.close()


@pytest.fixture
def blackhole():
    """A TCP port that accepts connections and never answers: a graph service that hangs."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def test_unreachable_graph_concurrency_limit_and_graceful_shutdown(tiny_release, blackhole, tmp_path):
    loop = ServiceLoop()
    try:
        registry = copy_registry(tiny_release.registry, tmp_path / "registry")
        reward = loop.reward(settings_for(tiny_release.db_url, registry.root, graph_target=blackhole,
                                          embedding_deadline_ms=300, max_concurrent_requests=2,
                                          shutdown_grace_s=8.0))
        r = Stubs(reward.port)
        dim = tiny_release.release.manifest["gnn"]["dim"]
        by_embedding = reward_pb2.ScoreRequest(
            embedding=reward_pb2.UserEmbeddingInput(vector=[dim ** -0.5] * dim, release_id=tiny_release.release.id),
            prompt="How do I keep basil alive?", responses=["Water it.", "Ignore it."])
        assert len(r.reward.ScoreResponses(by_embedding).scores) == 2   # needs no graph service

        started = time.monotonic()
        down = _error(r.reward.ScoreResponses, _request(tiny_release), timeout=20)
        # Which one depends on where the blackhole stalls the call: the 300 ms deadline, or the connection attempt
        # (retried every 100 ms to 1 s, so that a restarted graph service is found again within a second).
        assert down.code() == grpc.StatusCode.UNAVAILABLE
        assert f"the graph service at {blackhole}" in down.details(), down.details()
        assert "did not answer within 300 ms" in down.details() or "is unavailable" in down.details()
        assert time.monotonic() - started < 5   # the service's own deadline, long before the caller's 20 s

        # max_concurrent_requests=2: two open streams hold both slots.
        release_streams = threading.Event()

        def requests():
            yield by_embedding
            release_streams.wait(60)

        streams = [r.reward.ScoreResponsesStream(requests()) for _ in range(2)]
        assert [len(next(stream).scores) for stream in streams] == [2, 2]
        busy = _error(r.reward.ScoreResponses, by_embedding)
        assert busy.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        release_streams.set()
        assert [list(stream) for stream in streams] == [[], []]

        # Graceful shutdown: NOT_SERVING at once, the call in progress completes, then nothing is accepted.
        long = reward_pb2.ScoreRequest(embedding=by_embedding.embedding, prompt="Tell me about gardens. " * 20,
                                       responses=[f"Answer number {i}. " * 30 for i in range(64)])
        labels = dict(grpc_type="unary", grpc_service="copl.v1.RewardService", grpc_method="ScoreResponses")
        calls = _metric(reward, "grpc_server_started_total", **labels)
        in_flight = r.reward.ScoreResponses.future(long, timeout=60)
        wait_for(lambda: _metric(reward, "grpc_server_started_total", **labels) > calls, 30, "the long call to start")
        stopping = asyncio.run_coroutine_threadsafe(reward.stop(), loop.loop)
        loop.services.remove(reward)
        wait_for(lambda: _health(r) == NOT_SERVING, 5, "NOT_SERVING during shutdown")
        assert len(in_flight.result().scores) == 64
        stopping.result(60)
        assert _error(r.reward.ScoreResponses, by_embedding, timeout=5).code() == grpc.StatusCode.UNAVAILABLE
        r.close()
    finally:
        loop.close()
