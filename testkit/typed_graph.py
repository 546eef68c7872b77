"""Synthetic typed-user preference graphs for testing and benchmarking the signed GCN.

Modelled on UltraFeedback-P: every prompt has `responses_per_prompt` responses, each with one
hidden score per attribute; users come in `num_types` types and a user of type k prefers the
response with the higher attribute k. Every pair is controversial (the types do not all agree on
it), so a user's type must be inferred from their own labels: the hardest case for the GNN.
Each user labels pairs on distinct prompts; test pairs sit on further prompts of the same user, so
they never appear in the training graph but their responses do (labelled by other users).
Users beyond `num_users` are "unseen": only their context pairs (as response ids) and test pairs
are returned, as a user arriving after training would have them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from graph_service.records import content_hash
from graph_service.snapshot import GraphSnapshot


@dataclass(frozen=True)
class TypedGraph:
    snapshot: GraphSnapshot                      # the seen users' preferences: the training graph
    seen_types: torch.Tensor                     # (U,) int64 hidden type per seen user
    seen_test: torch.Tensor                      # (Ts, 3) int64 (user_idx, chosen_idx, rejected_idx), not in snapshot
    unseen_context: list[list[tuple[str, str]]]  # per unseen user: (chosen_id, rejected_id) response hashes
    unseen_types: torch.Tensor                   # (V,) int64
    unseen_test: torch.Tensor                    # (Tu, 3) int64 (unseen position, chosen_idx, rejected_idx)
    response_attributes: torch.Tensor            # (R, K) float hidden scores: what a response's text would carry


def typed_graph(num_users: int, num_unseen: int = 0, num_types: int = 4, pairs_per_user: int = 16,
                test_pairs_per_user: int = 4, responses_per_prompt: int = 4, seed: int = 0) -> TypedGraph:
    if num_users < 1 or num_unseen < 0 or num_types < 2 or pairs_per_user < 1 or test_pairs_per_user < 0:
        raise ValueError("need num_users >= 1, num_unseen >= 0, num_types >= 2, pairs_per_user >= 1")
    if responses_per_prompt < 2:
        raise ValueError(f"responses_per_prompt must be >= 2, got {responses_per_prompt}")
    g = torch.Generator().manual_seed(seed)
    total = num_users + num_unseen
    slots = pairs_per_user + test_pairs_per_user
    # About as many responses as users: each response is labelled ~2 * pairs_per_user times.
    num_prompts = max(total // responses_per_prompt, 2 * slots)
    num_responses = num_prompts * responses_per_prompt
    attributes = torch.rand(num_responses, num_types, generator=g)              # (R, K)
    types = torch.randint(num_types, (total,), generator=g)                      # (U + V,)

    prompt = torch.randint(num_prompts, (total, slots), generator=g)             # (U + V, S)
    first = torch.randint(responses_per_prompt, (total, slots), generator=g)
    second = (first + torch.randint(1, responses_per_prompt, (total, slots), generator=g)) % responses_per_prompt
    bad = torch.ones(total, slots, dtype=torch.bool)
    while bool(bad.any()):   # redraw slots on a repeated prompt or with a pair every type agrees on
        n_bad = int(bad.sum())
        prompt[bad] = torch.randint(num_prompts, (n_bad,), generator=g)
        first[bad] = torch.randint(responses_per_prompt, (n_bad,), generator=g)
        second[bad] = (first[bad] + torch.randint(1, responses_per_prompt, (n_bad,), generator=g)) \
            % responses_per_prompt
        sorted_prompts, order = prompt.sort(dim=1)
        repeat = torch.zeros_like(bad)
        repeat.scatter_(1, order[:, 1:], sorted_prompts[:, 1:] == sorted_prompts[:, :-1])
        a, b = prompt * responses_per_prompt + first, prompt * responses_per_prompt + second
        sign = attributes[a] > attributes[b]                                      # (U + V, S, K)
        unanimous = sign.all(dim=2) | (~sign).all(dim=2)
        bad = repeat | unanimous
    a, b = prompt * responses_per_prompt + first, prompt * responses_per_prompt + second
    a_wins = torch.gather(attributes[a] > attributes[b], 2,
                          types[:, None, None].expand(total, slots, 1)).squeeze(2)  # (U + V, S)
    chosen, rejected = torch.where(a_wins, a, b), torch.where(a_wins, b, a)
    owner = torch.arange(total)[:, None].expand(total, slots)
    triples = torch.stack([owner, chosen, rejected], dim=2)                      # (U + V, S, 3)

    ids = [content_hash(f"synthetic prompt {i // responses_per_prompt} response {i % responses_per_prompt}")
           for i in range(num_responses)]
    seen_train = triples[:num_users, :pairs_per_user].reshape(-1, 3)
    snapshot = GraphSnapshot(user_ids=[f"user-{i}" for i in range(num_users)], response_ids=ids,
                             triples=seen_train.contiguous(),
                             user_groups=[f"type-{k}" for k in types[:num_users].tolist()])
    unseen = triples[num_users:]                                                  # (V, S, 3)
    unseen_test = unseen[:, pairs_per_user:].reshape(-1, 3).clone()
    unseen_test[:, 0] -= num_users
    context = unseen[:, :pairs_per_user, 1:].tolist()                             # (V, pairs, 2) nested lists
    return TypedGraph(
        snapshot=snapshot, seen_types=types[:num_users].clone(),
        seen_test=triples[:num_users, pairs_per_user:].reshape(-1, 3).contiguous(),
        unseen_context=[[(ids[c], ids[r]) for c, r in user] for user in context],
        unseen_types=types[num_users:].clone(), unseen_test=unseen_test, response_attributes=attributes)


def attribute_features(graph: TypedGraph, seed: int = 0) -> torch.Tensor:
    """(R, K) the responses' hidden attribute scores plus a little noise: stand-ins for the backbone's text features
    in tests of the content half (the tower, latent types)."""
    noise = torch.randn(graph.response_attributes.shape, generator=torch.Generator().manual_seed(seed))
    return graph.response_attributes + 0.05 * noise


def sparse_typed_run(config) -> tuple[TypedGraph, torch.Tensor, object]:
    """200 users of 3 types with 4 pairs each (40 more arriving later) and a GNN of `config` with a content half
    trained on them: (graph, attribute features, TrainedGNN). The regime where the graph alone places users badly."""
    from graph_service.gnn_training import train_gnn     # the testkit's graphs do not need the trainer otherwise
    graph = typed_graph(200, num_unseen=40, num_types=3, pairs_per_user=4, test_pairs_per_user=4, seed=5)
    features = attribute_features(graph)
    return graph, features, train_gnn(graph.snapshot, config, progress=False, response_features=features)


def unseen_context_triples(checkpoint, graph: TypedGraph) -> torch.Tensor:
    """(P, 3) the unseen users' context pairs as (unseen position, chosen index, rejected index) in `checkpoint`."""
    idx = checkpoint.response_indices([h for pairs in graph.unseen_context for pair in pairs for h in pair]).view(-1, 2)
    owner = torch.repeat_interleave(torch.arange(len(graph.unseen_context)),
                                    torch.tensor([len(p) for p in graph.unseen_context]))
    return torch.cat([owner[:, None], idx], dim=1)
