"""Latent types (graph_service/latent_types.py) as the content half: EM names planted types with no label, K is read
from the selection pairs, a pair never informs its own training row, the checkpoint keeps the tables, and a user who
arrives after training gets their posterior from their own pairs."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from graph_service.adaptation import adapt
from graph_service.embeddings import GNNCheckpoint, Source
from graph_service.gnn_eval import evaluate_pairs
from graph_service.gnn_training import GNNTrainConfig, train_gnn
from graph_service.snapshot import GraphSnapshot
from graph_service.latent_types import TypesConfig, fit_latent_types, leave_pair_out, posteriors
from testkit.typed_graph import attribute_features, sparse_typed_run, typed_graph, unseen_context_triples
from trainer.pipeline import RewardJob
from trainer.profiles import profile

TYPED = dataclasses.replace(profile("tiny").gnn, max_steps=60, patience=100, content=None,
                            types=TypesConfig(max_types=5, restarts=2))


def _purity(called: torch.Tensor, truth: torch.Tensor) -> float:
    """Share of users in their call's majority type."""
    table = torch.zeros(int(called.max()) + 1, int(truth.max()) + 1).index_put_((called, truth), torch.tensor(1.0),
                                                                                accumulate=True)
    return float(table.max(dim=1).values.sum() / len(called))


@pytest.fixture(scope="module")
def sparse():
    """3 types, 4 pairs a user."""
    return sparse_typed_run(TYPED)


def test_em_names_the_planted_types_and_reads_their_number_from_the_selection_pairs(sparse):
    graph, _, run = sparse
    ck, k = run.checkpoint, TYPED.types.max_types
    found = ck.metrics["latent_types"]
    assert found["types"] in (3, 4), found       # measured 3 (a 5-type start left two empty); a fourth type that
                                                 # splits one in two could win on the selection pairs' noise
    assert found["ridge"] in TYPED.types.ridges and found["selection_loss"] < math.log(2)
    assert ck.content_dim == k and ck.dim == TYPED.model.dim + k
    used = found["types"]
    assert torch.isinf(ck.type_log_prior[used:]).all() and not ck.response_content[:, used:].any()
    half = ck.user_embeddings[:, -k:] * math.sqrt(2)
    torch.testing.assert_close(half.norm(dim=1), torch.ones(ck.num_users))
    assert _purity(half.argmax(dim=1), graph.seen_types) > 0.9      # measured 0.99
    test = graph.seen_test
    assert evaluate_pairs(ck, test[:, 0], test[:, 1], test[:, 2]) > 0.8


def test_one_kind_of_user_gives_one_type():
    """Every user of one type: more types explain the held-out pairs no better, so K = 1 and the content half is the
    same for everyone (it says nothing; the graph half carries whatever else there is)."""
    graph = typed_graph(150, num_types=3, pairs_per_user=4, seed=3)
    triples = graph.snapshot.triples.clone()
    reward = graph.response_attributes[:, 0]                        # everyone labels by the first attribute
    flip = reward[triples[:, 1]] < reward[triples[:, 2]]
    triples[flip, 1], triples[flip, 2] = graph.snapshot.triples[flip, 2], graph.snapshot.triples[flip, 1]
    snapshot = GraphSnapshot(graph.snapshot.user_ids, graph.snapshot.response_ids, triples)
    run = train_gnn(snapshot, TYPED, progress=False, response_features=attribute_features(graph))
    ck = run.checkpoint
    assert ck.metrics["latent_types"]["types"] == 1
    half = ck.user_embeddings[:, -TYPED.types.max_types:]
    assert torch.allclose(half, half[:1].expand_as(half))


def test_posteriors_are_unit_norm_and_a_user_without_pairs_gets_the_prior():
    scores = torch.tensor([[2.0, -1.0, 0.0], [0.0, 1.0, 0.0]])      # 2 responses, 2 types and one unused column
    log_prior = torch.tensor([math.log(0.25), math.log(0.75), -math.inf])
    post = posteriors(scores, log_prior, torch.tensor([[0, 0, 1], [0, 0, 1]]), num_users=2)
    likes_0 = torch.sigmoid(torch.tensor(2.0)) ** 2 * 0.25           # P(both pairs | type 0) * prior
    likes_1 = torch.sigmoid(torch.tensor(-2.0)) ** 2 * 0.75
    torch.testing.assert_close(post[0], F.normalize(torch.stack([likes_0, likes_1, torch.tensor(0.0)]), dim=0))
    torch.testing.assert_close(post[1], F.normalize(torch.tensor([0.25, 0.75, 0.0]), dim=0))


def test_the_reward_models_training_pairs_leave_themselves_out(sparse):
    """Each training row's content half is its user's posterior from their other pairs; the graph half is theirs."""
    graph, _, run = sparse
    ck, users = run.checkpoint, run.training_graph_users
    k, train = ck.content_dim, graph.snapshot.triples[run.holdout.train]
    rows = leave_pair_out(users, ck.response_content, ck.type_log_prior, train)
    assert rows.shape == (train.shape[0], ck.dim)
    assert torch.equal(rows[:, :-k], users[train[:, 0], :-k])
    for p in range(0, len(train), 53):
        others = train[(train[:, 0] == train[p, 0]) & (torch.arange(len(train)) != p)]
        expected = posteriors(ck.response_content, ck.type_log_prior, others, users.shape[0])[train[p, 0]]
        torch.testing.assert_close(rows[p, -k:] * math.sqrt(2), expected)
    job = RewardJob(None, None, [("p", "c", "r")] * len(graph.snapshot.triples), graph.snapshot.triples, users,
                    run.holdout.train, run.holdout.selection, run.holdout.report, content_side=ck.response_content,
                    type_log_prior=ck.type_log_prior)
    torch.testing.assert_close(torch.stack([e.user_emb for e in job.training_examples()]), rows)


def test_checkpoint_round_trip_keeps_the_type_tables(sparse, tmp_path):
    _, _, run = sparse
    run.checkpoint.save(tmp_path / "ck")
    loaded = GNNCheckpoint.load(tmp_path / "ck")
    assert torch.equal(loaded.type_log_prior, run.checkpoint.type_log_prior)
    assert torch.equal(loaded.response_content, run.checkpoint.response_content)
    with pytest.raises(ValueError, match="type_log_prior"):
        dataclasses.replace(run.checkpoint, type_log_prior=run.checkpoint.type_log_prior[:-1])
    with pytest.raises(ValueError, match="type_log_prior"):
        dataclasses.replace(run.checkpoint, response_content=None)


def test_an_unseen_users_posterior_comes_from_their_own_pairs(sparse):
    """The same posterior a trained user's half is; adapted users are typed and scored well at 4 pairs."""
    graph, _, run = sparse
    ck = run.checkpoint
    adapted = adapt(ck, graph.unseen_context)
    assert all(s is Source.ADAPTED for s in adapted.sources)
    k = ck.content_dim
    own = posteriors(ck.response_content, ck.type_log_prior, unseen_context_triples(ck, graph),
                     len(graph.unseen_context))
    torch.testing.assert_close(adapted.embeddings[:, -k:] * math.sqrt(2), own)
    assert _purity(own.argmax(dim=1), graph.unseen_types) > 0.85
    test = graph.unseen_test
    assert evaluate_pairs(ck, adapted.embeddings[test[:, 0]], test[:, 1], test[:, 2]) > 0.8


def test_settings_are_checked(sparse):
    graph, features, _ = sparse
    with pytest.raises(ValueError, match="not both"):
        dataclasses.replace(TYPED, content=profile("tiny").gnn.content)
    with pytest.raises(ValueError, match="response features must be given"):
        train_gnn(graph.snapshot, TYPED, progress=False)
    for bad in ({"max_types": 0}, {"ridges": ()}, {"ridges": (0.0,)}, {"patience": 0}):
        with pytest.raises(ValueError):
            TypesConfig(**bad)
    with pytest.raises(ValueError, match="at least one"):
        fit_latent_types(features, torch.zeros(0, 3, dtype=torch.int64), torch.zeros(0, 3, dtype=torch.int64), 1,
                         TypesConfig())
    assert GNNTrainConfig(types=TypesConfig(max_types=5)).content_dim == 5


def test_without_selection_pairs_there_is_one_type(sparse):
    graph, features, _ = sparse
    types = fit_latent_types(features, graph.snapshot.triples, torch.zeros(0, 3, dtype=torch.int64),
                             graph.snapshot.num_users, TypesConfig(max_types=4))
    assert types.metrics["types"] == 1 and types.metrics["selection_loss"] is None
