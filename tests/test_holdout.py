"""The held-out split: no edge of a held-out pair in the training graph, parts split by user, determinism."""
from __future__ import annotations

import torch

from graph_service.holdout import holdout_split, response_blocks


def _edges(triples: torch.Tensor) -> set[tuple[int, int]]:
    """Unsigned (user, response) edges of a set of pairs."""
    return {(u, x) for u, c, r in triples.tolist() for x in (c, r)}


def _random_triples(seed: int) -> tuple[torch.Tensor, int]:
    """Few responses per user, so siblings often share a response; some exact repeats and a lone pair."""
    g = torch.Generator().manual_seed(seed)
    users = int(torch.randint(1, 12, (1,), generator=g))
    responses = int(torch.randint(3, 15, (1,), generator=g))
    p = int(torch.randint(1, 60, (1,), generator=g))
    chosen = torch.randint(responses, (p,), generator=g)
    rejected = (chosen + torch.randint(1, responses, (p,), generator=g)) % responses
    triples = torch.stack([torch.randint(users, (p,), generator=g), chosen, rejected], dim=1)
    repeats = triples[torch.randint(p, (p // 5,), generator=g)]
    return torch.cat([triples, repeats]), users + 1            # the last user has no pair at all


def test_no_held_out_edge_is_in_the_training_graph():
    for seed in range(200):
        _check_split(*_random_triples(seed), seed)


def _check_split(triples: torch.Tensor, num_users: int, seed: int) -> None:
    split = holdout_split(triples, num_users, seed=seed)
    rows = torch.cat(list(split)).sort().values
    assert torch.equal(rows, torch.arange(triples.shape[0]))                      # a partition of the rows
    train = triples[split.train]
    held = triples[torch.cat([split.selection, split.report])]
    assert not _edges(held) & _edges(train)
    held_users = set(held[:, 0].tolist())
    assert held_users <= set(train[:, 0].tolist())                                # nobody loses every edge
    assert not set(triples[split.selection, 0].tolist()) & set(triples[split.report, 0].tolist())  # by user
    # Every user who could hold a block out does, and holds out exactly one (its pairs share responses).
    blocks = response_blocks(triples)
    for user in range(num_users):
        mine = triples[:, 0] == user
        n_blocks = torch.unique(blocks[mine]).numel()
        mine_held = torch.isin(torch.nonzero(mine).flatten(), torch.cat([split.selection, split.report]))
        assert (user in held_users) == (n_blocks >= 2)
        if n_blocks >= 2:
            assert torch.unique(blocks[mine][mine_held]).numel() == 1


def test_blocks_join_pairs_that_share_a_response_transitively():
    triples = torch.tensor([[0, 1, 2], [0, 3, 4], [0, 2, 3], [0, 5, 6], [1, 5, 6], [0, 6, 5]])
    assert response_blocks(triples).tolist() == [0, 0, 0, 3, 4, 3]


def test_one_pair_per_prompt_holds_out_one_pair_per_user_and_splits_users_evenly():
    # 40 users x 5 pairs on distinct responses: every block is one pair
    triples = torch.tensor([[u, 10 * k, 10 * k + 1] for u in range(40) for k in range(5)])
    split = holdout_split(triples, 40, seed=0)
    assert split.counts(triples) == {"train_pairs": 160, "selection_pairs": 20, "selection_users": 20,
                                     "report_pairs": 20, "report_users": 20}
    again = holdout_split(triples, 40, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(split, again))
    other = holdout_split(triples, 40, seed=1)
    assert not torch.equal(split.report, other.report)


def test_users_without_two_blocks_hold_nothing_out():
    one_pair = torch.tensor([[0, 1, 2], [1, 1, 2]])
    repeated = torch.tensor([[0, 1, 2], [0, 1, 2], [0, 2, 1]])
    for triples in (one_pair, repeated):
        split = holdout_split(triples, 2, seed=0)
        assert split.train.numel() == triples.shape[0]
        assert split.selection.numel() == split.report.numel() == 0
    lone = holdout_split(torch.tensor([[0, 1, 2], [0, 3, 4]]), 1, seed=0)
    assert (lone.train.numel(), lone.selection.numel(), lone.report.numel()) == (1, 1, 0)  # one user: no report part
