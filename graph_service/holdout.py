"""Which stored pairs the models train on, which pick their weights, and which report their accuracy.

Edges are (user, response), not pairs: a held-out pair (u, c, r) leaks its label through propagation if
the training graph still holds u -> c or u -> r from a sibling pair of the same user. So a user's pairs
are grouped into *blocks*: two pairs that share a response (as chosen or rejected, either way) are in one
block, transitively. Holding out whole blocks keeps every edge (user, chosen) and (user, rejected) of a
held-out pair out of the training graph, whatever its sign.

Rule, per user with at least two blocks: one block is held out, drawn at random among the user's
smallest blocks. Where the user labelled each response once (the usual case: one pair per prompt) every
block is one pair, so one pair is held out, as the paper's `context_unseen`; where the user labelled
several pairs on one prompt (a, b), (a, c), (b, c), those three go together or not at all. A user with a
single block (every pair shares a response with another, or the same pair repeated) holds out nothing:
the held-out pairs would take the user's last edges with them.

The held-out users are then split at random into two parts, by user:
  selection  early stopping of the GNN and of the reward model (it picks the weights);
  report     nothing looks at it until training is over: the held-out accuracy a release reports.
A part can be empty (a store with one user, or none with two blocks): training then runs without
early stopping, and the missing figure is reported as None.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

REPORT_SHARE = 0.5   # share of the held-out users whose pairs form the report part (rounded down)


class Holdout(NamedTuple):
    train: torch.Tensor       # (P_train,) int64 row indices of the snapshot's triples: the training graph
    selection: torch.Tensor   # (P_sel,) rows that pick the weights (early stopping)
    report: torch.Tensor      # (P_rep,) rows that only report accuracy

    def counts(self, triples: torch.Tensor) -> dict[str, int]:
        """Pair and user counts of each part, for metrics."""
        def users(rows: torch.Tensor) -> int:
            return int(torch.unique(triples[rows, 0]).numel())

        return {"train_pairs": int(self.train.numel()),
                "selection_pairs": int(self.selection.numel()), "selection_users": users(self.selection),
                "report_pairs": int(self.report.numel()), "report_users": users(self.report)}


def response_blocks(triples: torch.Tensor) -> torch.Tensor:
    """(P,) block label of every row: the smallest row index of the connected set of that user's pairs
    linked by shared responses. Min-label propagation, one vectorized pass per step of block diameter."""
    p = triples.shape[0]
    if p == 0:
        return torch.zeros(0, dtype=torch.int64)
    num_responses = int(triples[:, 1:].max()) + 1
    # (user, response) nodes of each row's two edges, numbered 0..N-1
    _, nodes = torch.unique(triples[:, :1] * num_responses + triples[:, 1:], return_inverse=True)   # (P, 2)
    label = torch.arange(p)
    while True:
        node_label = torch.full((int(nodes.max()) + 1,), p, dtype=torch.int64)
        node_label.scatter_reduce_(0, nodes.flatten(), label.repeat_interleave(2), reduce="amin")
        new = node_label[nodes].min(dim=1).values
        if torch.equal(new, label):
            return label
        label = new


def holdout_split(triples: torch.Tensor, num_users: int, seed: int, report_share: float = REPORT_SHARE) -> Holdout:
    """Hold out one response-disjoint block per user (rule above) and split the held-out users into the
    selection and the report part. Deterministic for (triples, seed)."""
    if not 0.0 <= report_share <= 1.0:
        raise ValueError(f"report_share must be in [0, 1], got {report_share}")
    g = torch.Generator().manual_seed(seed)
    p = triples.shape[0]
    empty = torch.zeros(0, dtype=torch.int64)
    if p == 0:
        return Holdout(empty, empty, empty)
    label = response_blocks(triples)
    size = torch.bincount(label, minlength=p)                                  # (P,) block size at its label row
    blocks = torch.unique(label)                                                # (B,) one row per block
    owner = triples[blocks, 0]                                                  # (B,)
    # Per user: smallest blocks first, ties in random order (three stable sorts, last key first).
    order = torch.randperm(blocks.numel(), generator=g)
    order = order[torch.argsort(size[blocks][order], stable=True)]
    order = order[torch.argsort(owner[order], stable=True)]
    per_user = torch.bincount(owner, minlength=num_users)                       # (U,) blocks per user
    first = torch.cumsum(per_user, 0) - per_user                                # (U,) first slot of each user
    users = (per_user >= 2).nonzero().flatten()                                 # (H,) users who hold one out
    held_block = blocks[order[first[users]]]                                    # (H,)
    # By user: a random report_share of the held-out users (rounded down) reports, the rest selects.
    shuffled = users[torch.randperm(users.numel(), generator=g)]
    n_report = int(users.numel() * report_share)
    part = torch.zeros(num_users, dtype=torch.int8)                             # 0 train, 1 selection, 2 report
    part[shuffled[n_report:]] = 1
    part[shuffled[:n_report]] = 2
    row_part = torch.where(torch.isin(label, held_block), part[triples[:, 0]], 0)   # (P,)
    return Holdout(*((row_part == k).nonzero().flatten() for k in (0, 1, 2)))
