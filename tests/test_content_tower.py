"""The content tower (graph_service/content_tower.py) beside the signed GCN: what it adds, that it cannot
memorize its own labels, its checkpoint round trip, and the content half of an unseen user's embedding."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from graph_service.adaptation import adapt
from graph_service.content_tower import ContentConfig, fit_content_tower, leave_pair_out
from graph_service.embeddings import GNNCheckpoint, Source
from graph_service.gnn_eval import evaluate_pairs
from graph_service.gnn_training import graph_half_evidence, train_gnn
from graph_service.snapshot import GraphSnapshot
from testkit.typed_graph import attribute_features, sparse_typed_run, typed_graph, unseen_context_triples
from trainer.profiles import profile

GRAPH_ONLY = dataclasses.replace(profile("tiny").gnn, max_steps=60, patience=100, content=None)
JOINED = dataclasses.replace(GRAPH_ONLY, content=ContentConfig(dim=8, steps=200))


@pytest.fixture(scope="module")
def sparse():
    """4 pairs a user: the graph alone cannot place users well here."""
    return sparse_typed_run(JOINED)


def test_the_content_half_places_sparse_users_the_graph_alone_cannot(sparse):
    graph, _, run = sparse
    graph_only = train_gnn(graph.snapshot, GRAPH_ONLY, progress=False)
    test = graph.seen_test
    joined = evaluate_pairs(run.checkpoint, test[:, 0], test[:, 1], test[:, 2])
    alone = evaluate_pairs(graph_only.checkpoint, test[:, 0], test[:, 1], test[:, 2])
    assert joined > 0.75 and joined > alone + 0.15          # measured 0.815 against 0.54
    ck = run.checkpoint
    assert (ck.dim, ck.content_dim) == (GRAPH_ONLY.model.dim + 8, 8)
    torch.testing.assert_close(ck.user_embeddings.norm(dim=1), torch.ones(ck.num_users))


def test_a_pair_never_predicts_itself():
    """Labels drawn at random carry no signal: a tower that let each pair into its own user's vector would fit
    them anyway (loss well under log 2); left out, the tower has nothing to fit."""
    graph = typed_graph(200, num_types=3, pairs_per_user=4, seed=2)
    triples = graph.snapshot.triples.clone()
    flip = torch.rand(len(triples), generator=torch.Generator().manual_seed(0)) < 0.5
    triples[flip, 1], triples[flip, 2] = graph.snapshot.triples[flip, 2], graph.snapshot.triples[flip, 1]
    tower = fit_content_tower(attribute_features(graph), triples, graph.snapshot.num_users, ContentConfig(dim=8, steps=200))
    assert tower.final_loss > math.log(2) - 0.03


def test_checkpoint_round_trip_keeps_the_content_table(sparse, tmp_path):
    _, _, run = sparse
    run.checkpoint.save(tmp_path / "ck")
    loaded = GNNCheckpoint.load(tmp_path / "ck")
    assert torch.equal(loaded.response_content, run.checkpoint.response_content)
    assert torch.equal(loaded.user_embeddings, run.checkpoint.user_embeddings)
    with pytest.raises(ValueError, match="response_content"):
        dataclasses.replace(run.checkpoint, response_content=run.checkpoint.response_content[:, :0])


def test_an_unseen_users_content_half_comes_from_their_own_pairs(sparse):
    """The same formula as a trained user's: the unit mean of A f_chosen - A f_rejected over their pairs; the
    graph half is the neighbours' weighted mean. Adapted users are placed by type at 4 pairs."""
    graph, _, run = sparse
    ck = run.checkpoint
    adapted = adapt(ck, graph.unseen_context)
    assert all(s is Source.ADAPTED for s in adapted.sources)
    k = ck.content_dim
    owner, chosen, rejected = unseen_context_triples(ck, graph).T
    sums = torch.zeros(len(graph.unseen_context), k).index_add_(
        0, owner, ck.response_content[chosen] - ck.response_content[rejected])
    torch.testing.assert_close(adapted.embeddings[:, -k:] * math.sqrt(2), F.normalize(sums, dim=1))
    test = graph.unseen_test
    accuracy = evaluate_pairs(ck, adapted.embeddings[test[:, 0]], test[:, 1], test[:, 2])
    assert accuracy > 0.8


def test_features_must_match_the_config(sparse):
    graph, features, _ = sparse
    with pytest.raises(ValueError, match="response features must be given"):
        train_gnn(graph.snapshot, JOINED, progress=False)
    with pytest.raises(ValueError, match="response features must be given"):
        train_gnn(graph.snapshot, GRAPH_ONLY, progress=False, response_features=features)
    with pytest.raises(ValueError, match="response features must be"):
        train_gnn(graph.snapshot, JOINED, progress=False, response_features=features[:-1])
    with pytest.raises(ValueError):
        ContentConfig(dim=0)
    with pytest.raises(ValueError, match="at least one"):
        fit_content_tower(features, GraphSnapshot(["u"], ["r"], torch.zeros(0, 3, dtype=torch.int64)).triples, 1,
                          ContentConfig())


def test_the_reward_models_training_pairs_leave_themselves_out(sparse):
    """Each training pair's embedding is its user's with that pair out of the content half: adding the pair back
    gives the published content half; the graph half is the user's own; a user's only pair leaves a zero half."""
    graph, _, run = sparse
    ck, users = run.checkpoint, run.training_graph_users
    k, train = ck.content_dim, graph.snapshot.triples[run.holdout.train]
    single = torch.tensor([[0, 0, 1]])   # one more "user" (the table's last row) with a single pair
    triples = torch.cat([train, single + torch.tensor([[users.shape[0], 0, 0]])])
    table = torch.cat([users, users[:1]])
    rows = leave_pair_out(table, ck.response_content, triples)                                   # (P, d)
    assert rows.shape == (triples.shape[0], ck.dim)
    assert torch.equal(rows[:, :-k], table[triples[:, 0], :-k])
    u, c, r = train.T
    diff = ck.response_content[c] - ck.response_content[r]
    without = rows[:-1, -k:] * math.sqrt(2)
    assert torch.allclose(without.norm(dim=1), torch.ones(len(train)), atol=1e-5)
    sums = torch.zeros(users.shape[0], k).index_add_(0, u, diff)     # the published half is built from `train`
    assert torch.allclose(F.normalize(sums[u], dim=1), users[u, -k:] * math.sqrt(2), atol=1e-5)
    for p in range(0, len(train), 97):                                # spot checks, pair by pair
        others = [q for q in range(len(train)) if u[q] == u[p] and q != p]
        assert torch.allclose(without[p], F.normalize(diff[others].sum(0), dim=0), atol=1e-5)
    assert (without * diff).sum(1).mean() < (users[u, -k:] * math.sqrt(2) * diff).sum(1).mean()
    assert torch.equal(rows[-1, -k:], torch.zeros(k))


def test_graph_half_evidence_is_a_sign_test_of_the_own_vector_against_the_populations():
    """Graph half = the first 2 columns. User 0's own vector gets pairs 0-2 right where the population's (the mean
    of both users) gets them wrong; on pair 3 both are right: 3 disagreements, all the own vector's: z = 3 / sqrt(3)."""
    users = torch.tensor([[1.0, 0.0, 5.0], [-3.0, 1.0, 5.0]])                 # population graph half: (-1, 0.5)
    responses = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 9.0], [1.0, 3.0, 0.0]])
    triples = torch.tensor([[0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 2, 1]])
    evidence = graph_half_evidence(users, responses, triples, graph_dim=2)
    assert evidence == {"own_accuracy": 1.0, "population_accuracy": 0.25, "z": pytest.approx(math.sqrt(3))}
    assert graph_half_evidence(users, responses, triples[3:], graph_dim=2)["z"] == 0.0   # no disagreement


def test_training_records_the_graph_halfs_evidence_with_a_tower_only(sparse):
    graph, _, run = sparse
    assert set(run.checkpoint.metrics["graph_half"]) == {"own_accuracy", "population_accuracy", "z"}
    assert train_gnn(graph.snapshot, GRAPH_ONLY, progress=False).checkpoint.metrics["graph_half"] is None
