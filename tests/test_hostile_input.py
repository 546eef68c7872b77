"""Hostile input: hypothesis over every field of every RPC's request (GraphService, RewardService including
the stream, AdminService, release info) against one pair of real servers. No input may crash a server or
get a status outside the documented ones (DESIGN.md "gRPC API"): never UNKNOWN, never INTERNAL. The JSONL
importer's property test is tests/test_records.py::test_whatever_arrives_is_stored_and_trainable_or_reported.
"""
from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from copl.v1 import common_pb2, graph_pb2, reward_pb2
from tests.service_harness import AUTH, ServiceLoop, Stubs, copy_registry, settings_for

DOCUMENTED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED",
              "UNAUTHENTICATED", "PERMISSION_DENIED", "UNAVAILABLE"}
EXAMPLES = settings(max_examples=50, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])

# Text as protobuf carries it (UTF-8, so no lone surrogates): short, empty, NULs and control characters,
# and now and then over the 16,000-character limits.
TEXT = st.one_of(st.text(st.characters(exclude_categories=("Cs",)), max_size=30), st.just(""),
                 st.sampled_from(["\x00", "\n", " ", "\u202e", "😀" * 3, "a\x00b"]),
                 st.builds(lambda c, n: c * n, st.sampled_from("xé\x00"), st.integers(16_000, 16_500)))
FLOATS = st.floats(width=32)   # NaN and infinities included
PAIRS = st.lists(st.builds(common_pb2.PreferencePair, prompt=TEXT, chosen=TEXT, rejected=TEXT), max_size=3)


@pytest.fixture(scope="module")
def servers(tiny_release, tmp_path_factory):
    """A graph and a reward service on the tiny release, with a store of their own (the examples write)."""
    root = tmp_path_factory.mktemp("hostile")
    registry = copy_registry(tiny_release.registry, root / "registry")
    loop = ServiceLoop()
    try:
        base = settings_for(f"sqlite:///{root / 'store.db'}", registry.root, max_responses_per_request=16,
                            max_context_pairs=4)
        graph = loop.graph(base)
        reward = loop.reward(base.with_overrides(graph_target=f"127.0.0.1:{graph.port}"))
        g, r = Stubs(graph.port), Stubs(reward.port)
        yield g, r, tiny_release
        g.close(), r.close()
    finally:
        loop.close()


def _status(call, request, **kwargs) -> str:
    try:
        call(request, timeout=30, **kwargs)
    except grpc.RpcError as exc:
        assert exc.code().name in DOCUMENTED, f"{exc.code().name}: {exc.details()}"
        return exc.code().name
    return "OK"


def _alive(g: Stubs, r: Stubs) -> None:
    """Both servers still answer after the example."""
    g.graph.GetReleaseInfo(common_pb2.ReleaseInfoRequest(), timeout=10)
    r.reward.GetReleaseInfo(common_pb2.ReleaseInfoRequest(), timeout=10)


@EXAMPLES
@given(records=st.lists(st.builds(graph_pb2.PreferenceRecord, user_id=TEXT, prompt=TEXT, chosen=TEXT, rejected=TEXT,
                                  group=TEXT, controversial=st.one_of(st.none(), st.booleans()),
                                  created_at=st.one_of(TEXT, st.sampled_from(["2024-01-01T00:00:00Z", "2024-13-99",
                                                                              "9999-12-31T23:59:59+14:00"]))),
                        max_size=4),
       skip_invalid=st.booleans(), authorized=st.booleans())
def test_add_preferences(servers, records, skip_invalid, authorized):
    g, r, _ = servers
    request = graph_pb2.AddPreferencesRequest(records=records, skip_invalid=skip_invalid)
    code = _status(g.graph.AddPreferences, request, metadata=AUTH if authorized else ())
    if not authorized:
        assert code == "UNAUTHENTICATED"
    _alive(g, r)


@EXAMPLES
@given(users=st.lists(st.builds(graph_pb2.UserQuery, user_id=st.one_of(TEXT, st.sampled_from(["u00001", "u00150"])),
                                context=PAIRS), max_size=4),
       release_id=st.one_of(st.just(""), TEXT), require_known=st.booleans())
def test_get_user_embedding(servers, users, release_id, require_known):
    g, r, _ = servers
    _status(g.graph.GetUserEmbedding, graph_pb2.GetUserEmbeddingRequest(users=users, release_id=release_id,
                                                                         require_known=require_known))
    _alive(g, r)


def _score_requests(tiny_release):
    dim = tiny_release.release.manifest["gnn"]["dim"]
    embedding = st.builds(reward_pb2.UserEmbeddingInput,
                          vector=st.one_of(st.lists(FLOATS, min_size=dim, max_size=dim),
                                           st.lists(FLOATS, max_size=2 * dim + 1)),
                          release_id=st.one_of(st.just(tiny_release.release.id), TEXT),
                          source=st.integers(0, 2**31 - 1))
    common = dict(prompt=TEXT, responses=st.lists(TEXT, max_size=20), request_id=TEXT, context=PAIRS,
                  require_known=st.booleans())
    return st.one_of(st.builds(reward_pb2.ScoreRequest, user_id=TEXT, **common),
                     st.builds(reward_pb2.ScoreRequest, embedding=embedding, **common),
                     st.builds(reward_pb2.ScoreRequest, **common))   # neither user nor embedding


@pytest.fixture(scope="module")
def score_requests(servers):
    return _score_requests(servers[2])


@EXAMPLES
@given(data=st.data())
def test_score_responses(servers, score_requests, data):
    g, r, _ = servers
    _status(r.reward.ScoreResponses, data.draw(score_requests))
    _alive(g, r)


@settings(EXAMPLES, max_examples=25)
@given(data=st.data())
def test_score_responses_stream(servers, score_requests, data):
    g, r, _ = servers
    requests = data.draw(st.lists(score_requests, max_size=4))
    try:
        replies = list(r.reward.ScoreResponsesStream(iter(requests), timeout=60))
    except grpc.RpcError as exc:
        assert exc.code().name in DOCUMENTED, f"{exc.code().name}: {exc.details()}"
    else:
        assert len(replies) == len(requests)
        for request, reply in zip(requests, replies):
            assert reply.request_id == request.request_id
            if reply.HasField("error"):
                assert reply.error.code in DOCUMENTED - {"OK"}, reply.error
            else:
                assert len(reply.scores) == len(request.responses)
    _alive(g, r)


@EXAMPLES
@given(release_id=st.one_of(TEXT, st.just("20240101T000000Z-0123abcd"), st.just("../../etc")),
       authorized=st.booleans(), reward=st.booleans())
def test_admin_reload_and_release_info(servers, release_id, authorized, reward):
    g, r, tiny_release = servers
    stubs = r if reward else g
    code = _status(stubs.admin.Reload, common_pb2.ReloadRequest(release_id=release_id),
                   metadata=AUTH if authorized else ())
    if not authorized:
        assert code == "UNAUTHENTICATED"
    for info in (g.graph.GetReleaseInfo(common_pb2.ReleaseInfoRequest()),
                 r.reward.GetReleaseInfo(common_pb2.ReleaseInfoRequest())):
        assert info.release_id == tiny_release.release.id   # nothing hostile swapped a release in
