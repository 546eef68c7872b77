"""Optimization-free adaptation for users the GNN has not seen (CoPL, DESIGN.md item 3).

For a new user with labelled pairs (chosen_id, rejected_id):
  1. candidates: seen users with a positive edge to any of the new user's chosen responses (2 hops
     through shared positively labelled responses), gathered from the response -> users CSR;
     at most `max_candidates`, those sharing the most chosen responses first (ties: lower index);
  2. each candidate c gets fit(c) = mean over the new user's pairs of log sigmoid(s(c, chosen) - s(c, rejected)),
     weights = softmax(fit / temperature) over the user's candidates;
  3. embedding = L2-normalize(sum of weight * candidate embedding). No gradient step.
Step 3 re-normalizes (the paper's weighted mean has norm <= 1): the reward model's gate was trained
on unit-norm trained embeddings, and the mean's direction is what carries the preference. With a content
half (content_tower.py, latent_types.py) only the graph half of the embedding is the neighbours' mean: the content
half is computed from the user's own scored pairs exactly as for a trained user, which needs no neighbour at all.

Response ids are content hashes (sha256 of the text), so a pair's response that any seen user
labelled matches its trained node by hash, whether the pair came from the store after training or
inline in the request. A response with no trained node has no embedding and no labellers:
  - a pair whose chosen response is known still finds candidates through it;
  - only pairs with both responses known are scored; a user whose candidates come only from
    half-known pairs gets uniform weights (fit is 0 for every candidate);
  - a user with no candidate at all (no known chosen response, or nobody else chose it) gets the
    checkpoint's population default embedding and source DEFAULT.
Everything is batched tensor work: candidates and pairs are padded per user to (B, C, d) and
(B, P, d) blocks of `chunk_users` users, so memory is bounded by chunk_users * max_candidates * d.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import NamedTuple

import torch
import torch.nn.functional as F

from graph_service.content_tower import join_users
from graph_service.embeddings import GNNCheckpoint, Source


@dataclass(frozen=True)
class AdaptationConfig:
    temperature: float = 0.07    # softmax temperature over candidate fits (paper)
    max_candidates: int = 512    # per new user; bounds latency and memory when popular responses have many labellers
    chunk_users: int = 256       # new users per padded block; bounds the (chunk, candidates, d) gather

    def __post_init__(self):
        if self.temperature <= 0 or self.max_candidates < 1 or self.chunk_users < 1:
            raise ValueError("temperature must be > 0, max_candidates and chunk_users >= 1")


class Adaptation(NamedTuple):
    embeddings: torch.Tensor           # (B, d) unit-norm
    sources: list[Source]              # per user: ADAPTED or DEFAULT
    details: dict[str, torch.Tensor]   # per user (B,): pairs, pairs_scored, unknown_responses, candidates, top_weight


def adapt(checkpoint: GNNCheckpoint, pairs_per_user: list[list[tuple[str, str]]],
          config: AdaptationConfig = AdaptationConfig()) -> Adaptation:
    """Embeddings for a batch of new users from their (chosen_response_id, rejected_response_id) pairs."""
    b = len(pairs_per_user)
    if b == 0:
        raise ValueError("no users to adapt")
    counts = torch.tensor(list(map(len, pairs_per_user)), dtype=torch.int64)              # (B,)
    flat = list(chain.from_iterable(pairs_per_user))
    if flat and any(len(p) != 2 for p in flat):
        raise ValueError("every pair must be a (chosen_response_id, rejected_response_id) tuple")
    idx = checkpoint.response_indices(list(chain.from_iterable(flat))).view(-1, 2)      # (P, 2), -1 unknown
    owner = torch.repeat_interleave(torch.arange(b), counts)                              # (P,)
    chosen, rejected = idx[:, 0], idx[:, 1]
    out, n_cand, n_scored, top = [], [], [], []
    for lo in range(0, b, config.chunk_users):   # a loop over blocks of users, not over users
        hi = min(b, lo + config.chunk_users)
        rows = (owner >= lo) & (owner < hi)
        emb, c, s, w = _adapt_block(checkpoint, owner[rows] - lo, chosen[rows], rejected[rows], hi - lo, config)
        out.append(emb), n_cand.append(c), n_scored.append(s), top.append(w)
    candidates = torch.cat(n_cand)
    embeddings = torch.cat(out)
    default = candidates == 0
    embeddings[default] = checkpoint.default_embedding.to(embeddings.dtype)
    sources = [Source.DEFAULT if d else Source.ADAPTED for d in default.tolist()]
    unknown = torch.zeros(b, dtype=torch.int64).index_add_(0, owner, (idx < 0).sum(dim=1))
    details = {"pairs": counts, "pairs_scored": torch.cat(n_scored), "unknown_responses": unknown,
               "candidates": candidates, "top_weight": torch.cat(top)}
    return Adaptation(embeddings, sources, details)


def _adapt_block(ck: GNNCheckpoint, owner: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, b: int,
                 config: AdaptationConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """owner (P,) in 0..b-1; chosen / rejected (P,) response indices or -1. Returns (b, d) embeddings
    (zero rows where there is no candidate), candidates (b,), scored pairs (b,), top weight (b,)."""
    num_users, num_resp = ck.num_users, ck.num_responses
    users, responses, indptr = ck.user_embeddings, ck.response_embeddings, ck.positive_indptr

    # 1. Candidates: (new user, known chosen response) -> the seen users who chose it.
    known = chosen >= 0
    key = torch.unique(owner[known] * num_resp + chosen[known])                    # (K,) unique (owner, response)
    src_owner, src_resp = key // num_resp, key % num_resp
    deg = indptr[src_resp + 1] - indptr[src_resp]                                   # (K,) labellers per response
    run_start = torch.repeat_interleave(indptr[src_resp] - (torch.cumsum(deg, 0) - deg), deg)
    seen = ck.positive_users[run_start + torch.arange(int(deg.sum()))]              # (H,) 2-hop users
    pair_key, overlap = torch.unique(torch.repeat_interleave(src_owner, deg) * num_users + seen,
                                     return_counts=True)                            # (C,) sorted by owner, user
    cand_owner, cand = pair_key // num_users, pair_key % num_users
    # Keep the max_candidates with the largest overlap per owner (stable sort keeps lower index first on ties).
    top_overlap = int(overlap.max()) + 1 if overlap.numel() else 1
    order = torch.argsort(cand_owner * top_overlap + (top_overlap - 1 - overlap), stable=True)
    cand_owner, cand = cand_owner[order], cand[order]
    per_owner = torch.bincount(cand_owner, minlength=b)                             # (b,)
    rank = torch.arange(cand.numel()) - (torch.cumsum(per_owner, 0) - per_owner)[cand_owner]
    keep = rank < config.max_candidates
    n_cand = per_owner.clamp(max=config.max_candidates)                             # (b,)
    width = max(1, int(n_cand.max()) if b else 1)
    cand_pad = torch.full((b, width), -1, dtype=torch.int64)
    cand_pad[cand_owner[keep], rank[keep]] = cand[keep]                             # (b, C) seen-user index or -1
    cand_mask = cand_pad >= 0

    # 2. Pairs with both responses known, padded per owner: diff = r_chosen - r_rejected.
    scored = known & (rejected >= 0)
    p_owner = owner[scored]
    n_pairs = torch.bincount(p_owner, minlength=b)                                  # (b,)
    p_rank = torch.arange(p_owner.numel()) - (torch.cumsum(n_pairs, 0) - n_pairs)[p_owner]
    diff = torch.zeros(b, max(1, int(n_pairs.max()) if b else 1), users.shape[1], dtype=responses.dtype)
    diff[p_owner, p_rank] = responses[chosen[scored]] - responses[rejected[scored]]  # (b, P, d)
    pair_mask = torch.zeros(diff.shape[:2], dtype=responses.dtype)
    pair_mask[p_owner, p_rank] = 1.0                                                # (b, P)

    # 3. Fit of every candidate on the owner's pairs, softmax over candidates, weighted mean.
    cand_emb = users[cand_pad.clamp(min=0)]                                         # (b, C, d)
    margin = torch.bmm(cand_emb, diff.transpose(1, 2))                              # (b, C, P)
    fit = (F.logsigmoid(margin) * pair_mask[:, None, :]).sum(2) / n_pairs.clamp(min=1)[:, None]  # (b, C)
    logits = (fit / config.temperature).masked_fill(~cand_mask, float("-inf"))
    weights = torch.softmax(logits, dim=1).nan_to_num(0.0)                          # (b, C); rows of -inf -> 0
    emb = torch.bmm(weights[:, None, :], cand_emb).squeeze(1)                      # (b, d)
    k = ck.content_dim
    if not k:
        return F.normalize(emb, dim=1), n_cand, n_pairs, weights.max(dim=1).values
    # 4. With a content half, the graph half comes from the neighbours and the content half from the user's own
    # scored pairs (the neighbours' content where none is scored), each unit norm, as in the trained tables.
    own = ck.content_users(torch.stack([p_owner, chosen[scored], rejected[scored]], dim=1), b).to(emb.dtype)
    content = torch.where((n_pairs > 0)[:, None], own, F.normalize(emb[:, -k:], dim=1))
    return join_users(emb[:, :-k], content), n_cand, n_pairs, weights.max(dim=1).values
