"""Pair accuracy of GNN scores: the share of (user, chosen, rejected) with s(u, chosen) > s(u, rejected).

The same function serves seen users (rows of the trained table) and unseen ones (adapted embeddings),
so the two numbers in the quality report are measured the same way. A tie counts as wrong.
"""
from __future__ import annotations

import torch

from graph_service.embeddings import GNNCheckpoint
from graph_service.gnn import pair_scores


def evaluate_pairs(checkpoint: GNNCheckpoint, users: torch.Tensor, chosen_idx: torch.Tensor,
                   rejected_idx: torch.Tensor) -> float:
    """users: (N,) int64 seen-user indices, or (N, d) float user embeddings (e.g. from `adapt`);
    chosen_idx / rejected_idx: (N,) int64 response indices of the checkpoint."""
    n = chosen_idx.shape[0]
    if n == 0:
        raise ValueError("no pairs to evaluate")
    if chosen_idx.shape != (n,) or rejected_idx.shape != (n,):
        raise ValueError(f"chosen_idx and rejected_idx must both be (N,), got "
                         f"{tuple(chosen_idx.shape)} and {tuple(rejected_idx.shape)}")
    for name, idx, bound in (("chosen_idx", chosen_idx, checkpoint.num_responses),
                             ("rejected_idx", rejected_idx, checkpoint.num_responses)):
        if int(idx.min()) < 0 or int(idx.max()) >= bound:
            raise ValueError(f"{name} has a response index outside 0..{bound - 1}")
    if users.dim() == 1:
        if users.shape != (n,) or int(users.min()) < 0 or int(users.max()) >= checkpoint.num_users:
            raise ValueError(f"users must be (N,) indices in 0..{checkpoint.num_users - 1}")
        users = checkpoint.user_embeddings[users]                                  # (N, d)
    elif users.shape != (n, checkpoint.dim):
        raise ValueError(f"user embeddings must be ({n}, {checkpoint.dim}), got {tuple(users.shape)}")
    r = checkpoint.response_embeddings
    margin = pair_scores(users.to(r.dtype), r[chosen_idx], r[rejected_idx])       # (N,)
    return float((margin > 0).double().mean())
