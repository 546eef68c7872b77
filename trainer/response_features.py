"""Frozen text features of responses for the content-aware GNN (graph_service/gnn.py, `content_dim`).

A response's feature is the MEAN OF ITS SENTENCE EMBEDDINGS: the text is split into sentences, each is
embedded by the frozen backbone (mean-pooled last hidden state, L2-normalized: how all-MiniLM-L6-v2 is
meant to be used) and the sentence vectors are averaged. Measured on the styles family, this kept every
style attribute linearly readable (probe 0.999) where one embedding of the whole text did not (0.79-0.95):
a style is one sentence among several, and whole-text pooling blurs it with the rest.

Features are cached in memory per (backbone, response content hash), so the several trainings of one process
(a benchmark's variants, a retraining loop) embed each response once.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from graph_service.snapshot import GraphSnapshot
from reward_service.backbone import DEFAULT_BACKBONE, load_backbone

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_CACHE: dict[tuple[str, str], torch.Tensor] = {}


def sentences(text: str) -> list[str]:
    """The text's sentences (split after . ! ? followed by whitespace); the whole text when it has none."""
    parts = [s.strip() for s in _SENTENCE_END.split(text)]
    return [s for s in parts if s] or [text]


@torch.no_grad()
def response_features(response_ids: Sequence[str], texts: Sequence[str], backbone: str = DEFAULT_BACKBONE,
                      batch_size: int = 128, max_length: int = 64, progress: bool = False) -> torch.Tensor:
    """(R, hidden) float32: the mean sentence embedding of each text; `response_ids` (content hashes) key the cache."""
    if len(response_ids) != len(texts):
        raise ValueError(f"{len(response_ids)} response ids for {len(texts)} texts")
    missing = [i for i, rid in enumerate(response_ids) if (backbone, rid) not in _CACHE]
    if missing:
        model, tokenizer = load_backbone(backbone, torch.device("cpu"), torch.float32)
        split = [sentences(texts[i]) for i in missing]
        flat = [s for parts in split for s in parts]
        vectors = []
        for lo in tqdm(range(0, len(flat), batch_size), desc="response features", disable=not progress, leave=False):
            batch = tokenizer(flat[lo:lo + batch_size], padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt")
            hidden = model(**batch).last_hidden_state                                # (B, T, h)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)            # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)               # (B, h)
            vectors.append(torch.nn.functional.normalize(pooled, dim=1))
        flat_vectors = torch.cat(vectors)                                            # (S, h)
        owner = torch.repeat_interleave(torch.arange(len(missing)), torch.tensor([len(p) for p in split]))
        sums = torch.zeros(len(missing), flat_vectors.shape[1]).index_add_(0, owner, flat_vectors)
        means = sums / torch.bincount(owner, minlength=len(missing)).unsqueeze(1)
        for i, row in zip(missing, means):
            _CACHE[backbone, response_ids[i]] = row
    return torch.stack([_CACHE[backbone, rid] for rid in response_ids])


def snapshot_features(snapshot: GraphSnapshot, texts: Sequence[tuple[str, str, str]],
                      backbone: str = DEFAULT_BACKBONE, progress: bool = False) -> torch.Tensor:
    """(R, hidden) features of the snapshot's responses; `texts`: (prompt, chosen, rejected) row for row with
    snapshot.triples (PreferenceStore.snapshot_with_texts), where every response appears at least once."""
    by_index: dict[int, str] = {}
    for (_, chosen, rejected), (_, c, r) in zip(texts, snapshot.triples.tolist()):
        by_index[c], by_index[r] = chosen, rejected
    return response_features(snapshot.response_ids, [by_index[i] for i in range(snapshot.num_responses)],
                             backbone, progress=progress)
