"""The bipartite preference graph as tensors: what the store exports and the GNN trains on.

Users and responses are indexed 0..U-1 and 0..R-1; the index maps give the external ids
(user_id strings; response ids are content hashes of the response text, so a text labelled by
many users is one node). One row of `triples` is one preference (user, chosen, rejected).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import torch


@dataclass(frozen=True)
class GraphSnapshot:
    user_ids: list[str]            # index -> user_id
    response_ids: list[str]        # index -> response content hash (hex sha256 of the text)
    triples: torch.Tensor          # (P, 3) int64: user_idx, chosen_idx, rejected_idx
    user_groups: list[str | None] = field(default_factory=list)  # index -> group label (plots only), may be empty
    snapshot_time: datetime | None = None  # preferences created up to this time (None: all)

    def __post_init__(self):
        t = self.triples
        if t.dtype != torch.int64 or t.dim() != 2 or t.shape[1] != 3:
            raise ValueError(f"triples must be an int64 (P, 3) tensor, got {t.dtype} {tuple(t.shape)}")
        if t.numel():
            if int(t[:, 0].max()) >= len(self.user_ids) or int(t[:, 1:].max()) >= len(self.response_ids):
                raise ValueError("triples index past the user or response maps")
            if int(t.min()) < 0:
                raise ValueError("negative index in triples")
        if self.user_groups and len(self.user_groups) != len(self.user_ids):
            raise ValueError("user_groups must be empty or one label per user")

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_responses(self) -> int:
        return len(self.response_ids)

    def positive_edges(self) -> torch.Tensor:
        """(2, E+) unique (user_idx, chosen_idx) edges, sorted by user."""
        return self._unique_edges(self.triples[:, 1])

    def negative_edges(self) -> torch.Tensor:
        """(2, E-) unique (user_idx, rejected_idx) edges, sorted by user."""
        return self._unique_edges(self.triples[:, 2])

    def _unique_edges(self, responses: torch.Tensor) -> torch.Tensor:
        # One int64 key per edge: a 1-D unique is far cheaper than unique(dim=0) on millions of rows.
        key = torch.unique(self.triples[:, 0] * self.num_responses + responses)
        return torch.stack([key // self.num_responses, key % self.num_responses])
