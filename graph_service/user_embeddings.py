"""User id -> embedding for one release: what GraphService.GetUserEmbedding and `copl eval` answer.

  TRAINED  the user is in the release's GNN: their row of the embedding table;
  ADAPTED  the user is not, but has labelled pairs (stored after training, or given inline):
           optimization-free adaptation from 2-hop neighbours (adaptation.py);
  DEFAULT  the user has pairs but no usable neighbour (adaptation.py), or, when the caller allows it,
           no pairs at all: the release's population embedding.

Which stored pairs are an unseen user's context: those created up to `context_until`. Serving leaves it
None (every pair stored by the time of the request: pairs stored after training are exactly what
adaptation is for). An evaluation sets it to the time it evaluates "as of", so that pairs stored later
(the test pairs themselves, ingested afterwards, for one) cannot leak into it and a rerun gives the same
numbers. The training snapshot's cut-off is not the right bound: an unseen user's pairs all lie after it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import NamedTuple

import torch

from graph_service.adaptation import AdaptationConfig, adapt
from graph_service.embeddings import GNNCheckpoint, Source
from graph_service.store import PreferenceStore


class UnknownUsers(LookupError):
    """Users with no trained embedding, no stored pairs and no inline context."""

    def __init__(self, user_ids: list[str]):
        self.user_ids = user_ids
        shown = ", ".join(user_ids[:5]) + (" ..." if len(user_ids) > 5 else "")
        super().__init__(f"{len(user_ids)} unknown user(s) with no context: {shown}")


class ResolvedEmbeddings(NamedTuple):
    embeddings: torch.Tensor   # (B, d), unit norm
    sources: list[Source]      # TRAINED | ADAPTED | DEFAULT per user


class UserEmbeddingResolver:
    def __init__(self, checkpoint: GNNCheckpoint, store: PreferenceStore | None = None,
                 config: AdaptationConfig = AdaptationConfig(), context_until: datetime | None = None):
        self.checkpoint = checkpoint
        self.store = store
        self.config = config
        self.context_until = context_until

    def resolve(self, user_ids: Sequence[str], context: Mapping[str, list[tuple[str, str]]] | None = None,
                unknown_as_default: bool = False) -> ResolvedEmbeddings:
        """Embeddings for `user_ids` (in order). `context` maps a user to inline (chosen_id, rejected_id)
        content-hash pairs, used instead of the store for that user."""
        context = context or {}
        idx = self.checkpoint.user_indices(list(user_ids))                       # (B,), -1 unseen
        # dtype explicit: the default dtype is process-wide, and a model load in another thread (transformers sets
        # it while it builds a bf16 backbone) would otherwise hand this request a bf16 buffer
        embeddings = torch.empty(len(user_ids), self.checkpoint.dim, dtype=self.checkpoint.user_embeddings.dtype)
        sources = [Source.TRAINED] * len(user_ids)
        seen = idx >= 0
        embeddings[seen] = self.checkpoint.user_embeddings[idx[seen]]
        unseen = (~seen).nonzero().flatten().tolist()
        if not unseen:
            return ResolvedEmbeddings(embeddings, sources)
        need_store = [user_ids[i] for i in unseen if user_ids[i] not in context]
        stored = self.store.pairs_of(need_store, self.context_until) if self.store is not None and need_store else {}
        pairs = [context.get(user_ids[i]) or stored.get(user_ids[i], []) for i in unseen]
        unknown = [user_ids[i] for i, p in zip(unseen, pairs) if not p]
        if unknown and not unknown_as_default:
            raise UnknownUsers(unknown)
        with_pairs = [(i, p) for i, p in zip(unseen, pairs) if p]
        if with_pairs:
            adapted = adapt(self.checkpoint, [p for _, p in with_pairs], self.config)
            rows = torch.tensor([i for i, _ in with_pairs])
            embeddings[rows] = adapted.embeddings.to(embeddings.dtype)
            for i, source in zip(rows.tolist(), adapted.sources):
                sources[i] = source
        for i, p in zip(unseen, pairs):
            if not p:
                embeddings[i] = self.checkpoint.default_embedding.to(embeddings.dtype)
                sources[i] = Source.DEFAULT
        return ResolvedEmbeddings(embeddings, sources)
