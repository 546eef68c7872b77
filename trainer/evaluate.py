"""`copl eval`: score held-out pairs with a release, through the same path the services use.

Each test user's embedding comes from the release's graph side (user_embeddings.py): TRAINED for
users the GNN was trained on ("seen"), ADAPTED for users whose pairs reached the store after training,
DEFAULT for users with no usable neighbour or no pairs at all. Accuracy is the share of pairs with
r(chosen) > r(rejected).
"""
from __future__ import annotations

from collections.abc import Sequence

from copl_common.registry import Release
from graph_service.embeddings import GNNCheckpoint
from graph_service.records import PreferenceRecord
from graph_service.store import PreferenceStore
from graph_service.user_embeddings import TRAINED, UserEmbeddingResolver
from reward_service.reward_model import RewardModel
from reward_service.training import PreferenceExample, pair_margins
from trainer.metrics import pair_metrics


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
    seen = [resolved.sources[row[r.user_id]] == TRAINED for r in records]
    return pair_metrics(release.id, records, (margins > 0).tolist(), seen, resolved.sources)
