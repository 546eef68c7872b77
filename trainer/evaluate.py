"""`copl eval`: score held-out pairs with a release, through the same path the services use.

Each test user's embedding comes from the release's graph side (user_embeddings.py): TRAINED for
users the GNN was trained on ("seen"), ADAPTED for users whose pairs reached the store after training,
DEFAULT for users with no usable neighbour or no pairs at all. Accuracy is the share of pairs with
r(chosen) > r(rejected).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from copl_common.registry import Release
from graph_service.embeddings import GNNCheckpoint, Source
from graph_service.records import PreferenceRecord
from graph_service.store import PreferenceStore
from graph_service.user_embeddings import UserEmbeddingResolver
from reward_service.reward_model import RewardModel
from reward_service.training import PreferenceExample, pair_margins


def _accuracy(correct: torch.Tensor) -> dict:
    n = int(correct.numel())
    return {"n_pairs": n, "accuracy": float(correct.float().mean()) if n else None}


def evaluate_release(release: Release, records: Sequence[PreferenceRecord], store: PreferenceStore | None = None,
                     batch_size: int = 64, device: str | None = None, progress: bool = True) -> dict:
    if not records:
        raise ValueError("no test pairs to evaluate")
    checkpoint = GNNCheckpoint.load(release.gnn_dir)
    model = RewardModel.load(release.reward_dir, device=device)
    user_ids = list(dict.fromkeys(r.user_id for r in records))
    resolved = UserEmbeddingResolver(checkpoint, store).resolve(user_ids, unknown_as_default=True)
    row = {u: i for i, u in enumerate(user_ids)}
    examples = [PreferenceExample(resolved.embeddings[row[r.user_id]] if model.personalized else None,
                                  r.prompt, r.chosen, r.rejected) for r in records]
    margins = pair_margins(model, examples, batch_size=batch_size, progress=progress)   # (N,)
    correct = margins > 0
    source = [resolved.sources[row[r.user_id]] for r in records]
    seen = torch.tensor([s == Source.TRAINED for s in source])
    controversial = torch.tensor([bool(r.controversial) for r in records])
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        if r.group is not None:
            by_group[r.group].append(i)
    sources: dict[str, int] = defaultdict(int)
    for s in resolved.sources:
        sources[s] += 1
    return {
        "release": release.id,
        "n_pairs": len(records),
        "accuracy": float(correct.float().mean()),
        "controversial_accuracy": _accuracy(correct[controversial])["accuracy"],
        "seen": _accuracy(correct[seen]),
        "unseen": _accuracy(correct[~seen]),
        "by_group": {g: _accuracy(correct[torch.tensor(ix)]) for g, ix in sorted(by_group.items())},
        "users_by_source": dict(sorted(sources.items())),
    }
