"""Optimization-free adaptation: reference equivalence, seen-user recovery, fallbacks, and quality."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from graph_service.adaptation import AdaptationConfig, adapt
from graph_service.embeddings import Source
from graph_service.gnn_eval import evaluate_pairs
from graph_service.gnn_training import train_gnn
from testkit.typed_graph import typed_graph
from trainer.profiles import profile


@pytest.fixture(scope="module")
def trained():
    graph = typed_graph(400, num_unseen=40, seed=5)
    run = train_gnn(graph.snapshot, dataclasses.replace(profile("tiny").gnn, max_steps=60, content=None), progress=False)
    return graph, run.checkpoint


def _pairs_of(graph, user: int) -> list[tuple[str, str]]:
    ids, t = graph.snapshot.response_ids, graph.snapshot.triples
    return [(ids[c], ids[r]) for _, c, r in t[t[:, 0] == user].tolist()]


def _reference(ck, pairs, temperature=0.07):
    """The paper's rule written plainly, one user at a time (no candidate cap)."""
    idx = [(ck.response_indices([c])[0].item(), ck.response_indices([r])[0].item()) for c, r in pairs]
    cands = sorted({int(u) for c, _ in idx if c >= 0
                    for u in ck.positive_users[ck.positive_indptr[c]:ck.positive_indptr[c + 1]]})
    if not cands:
        return None
    scored = [(c, r) for c, r in idx if c >= 0 and r >= 0]
    fits = torch.tensor([sum(F.logsigmoid(ck.score(torch.tensor(u), torch.tensor(c))
                                          - ck.score(torch.tensor(u), torch.tensor(r))).item()
                             for c, r in scored) / max(len(scored), 1) for u in cands], dtype=torch.float64)
    weights = torch.softmax(fits / temperature, 0).to(ck.user_embeddings.dtype)
    return F.normalize(weights @ ck.user_embeddings[cands], dim=0)


def test_batched_adaptation_matches_per_user_reference(trained):
    graph, ck = trained
    batch = graph.unseen_context[:6]
    result = adapt(ck, batch, AdaptationConfig(max_candidates=10_000, chunk_users=4))
    assert result.sources == [Source.ADAPTED] * 6
    for i, pairs in enumerate(batch):
        torch.testing.assert_close(result.embeddings[i], _reference(ck, pairs), atol=1e-5, rtol=1e-4)
    single = adapt(ck, batch[2:3], AdaptationConfig(max_candidates=10_000))
    torch.testing.assert_close(single.embeddings[0], result.embeddings[2], atol=1e-6, rtol=1e-5)


def test_user_duplicating_a_seen_users_pairs_lands_near_that_user(trained):
    graph, ck = trained
    users = torch.arange(20)
    result = adapt(ck, [_pairs_of(graph, u) for u in users.tolist()])
    own = (result.embeddings * ck.user_embeddings[users]).sum(1)                       # (20,) cosine
    assert float(own.mean()) > 0.9
    centroids = F.normalize(torch.stack([ck.user_embeddings[graph.seen_types == k].mean(0) for k in range(4)]), dim=1)
    other = (result.embeddings @ centroids.T).masked_fill(
        F.one_hot(graph.seen_types[users], 4).bool(), -2).max(1).values                # best other type
    assert bool((own > other).all())


def test_candidate_cap_keeps_the_largest_overlap(trained):
    graph, ck = trained
    pairs = _pairs_of(graph, 0)
    result = adapt(ck, [pairs], AdaptationConfig(max_candidates=1))
    assert int(result.details["candidates"][0]) == 1
    # User 0 chose every one of its own chosen responses: nobody can overlap more.
    torch.testing.assert_close(result.embeddings[0], ck.user_embeddings[0])


def test_unknown_responses_fall_back_to_default_or_uniform_weights(trained):
    graph, ck = trained
    known_chosen = graph.unseen_context[0][0][0]
    result = adapt(ck, [
        [("f" * 64, "e" * 64)],            # nothing known: no candidate
        [],                                 # no pairs at all
        [(known_chosen, "e" * 64)],         # chosen known, rejected not: candidates, nothing to score
        graph.unseen_context[1] + [("f" * 64, "e" * 64)],
    ])
    assert result.sources == [Source.DEFAULT, Source.DEFAULT, Source.ADAPTED, Source.ADAPTED]
    torch.testing.assert_close(result.embeddings[0], ck.default_embedding)
    torch.testing.assert_close(result.embeddings[1], ck.default_embedding)
    torch.testing.assert_close(ck.default_embedding, F.normalize(ck.user_embeddings.mean(0), dim=0))
    r = ck.response_indices([known_chosen])[0]
    labellers = ck.positive_users[ck.positive_indptr[r]:ck.positive_indptr[r + 1]]
    torch.testing.assert_close(result.embeddings[2], F.normalize(ck.user_embeddings[labellers].mean(0), dim=0))
    assert result.details["unknown_responses"].tolist() == [2, 0, 1, 2]
    assert result.details["pairs_scored"].tolist() == [0, 0, 0, 16]
    torch.testing.assert_close(result.embeddings[3], adapt(ck, graph.unseen_context[1:2]).embeddings[0])


def test_bad_input_raises_value_error(trained):
    _, ck = trained
    with pytest.raises(ValueError):
        adapt(ck, [])
    with pytest.raises(ValueError):
        adapt(ck, [[("a", "b", "c")]])
    with pytest.raises(ValueError):
        AdaptationConfig(temperature=0)


@pytest.mark.slow
def test_quality_on_typed_users_seen_and_unseen():
    """4 types, 16 controversial pairs per user: seen >= 0.90, unseen within 0.05 of seen."""
    graph = typed_graph(1000, num_unseen=300, seed=1)
    ck = train_gnn(graph.snapshot, dataclasses.replace(profile("small").gnn, types=None), progress=False).checkpoint
    seen = evaluate_pairs(ck, graph.seen_test[:, 0], graph.seen_test[:, 1], graph.seen_test[:, 2])
    result = adapt(ck, graph.unseen_context)
    test = graph.unseen_test
    unseen = evaluate_pairs(ck, result.embeddings[test[:, 0]], test[:, 1], test[:, 2])
    assert seen >= 0.90, (seen, unseen)
    assert unseen >= seen - 0.05, (seen, unseen)


def test_resolved_embeddings_keep_the_tables_dtype_whatever_the_default_dtype(trained):
    """A backbone load in another thread of the same process sets torch's process-wide default dtype to bf16 for a
    moment (seen as a refused graph release in a hot-swap test); resolving must not pick it up."""
    from graph_service.user_embeddings import UserEmbeddingResolver
    graph, ck = trained
    resolver = UserEmbeddingResolver(ck)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        out = resolver.resolve([ck.user_ids[0], "newcomer"], context={"newcomer": _pairs_of(graph, 0)})
    finally:
        torch.set_default_dtype(before)
    assert out.embeddings.dtype == ck.user_embeddings.dtype
    torch.testing.assert_close(out.embeddings[0], ck.user_embeddings[0])
