"""`copl eval`: score held-out pairs with a release, through the same path the services use.

Each test user's embedding comes from the release's graph side (user_embeddings.py): TRAINED for
users the GNN was trained on ("seen"), ADAPTED for users whose pairs reached the store after training,
DEFAULT for users with no usable neighbour or no pairs at all. Accuracy is the share of pairs with
r(chosen) > r(rejected).

An evaluation is "as of" a point in time (default: when it starts): an unseen user's context is the
pairs stored up to then, so records ingested later (the test pairs themselves, say) do not leak into
it, and `copl eval --as-of T` reproduces an earlier run. The time is part of the result.
"""
from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

from copl_common.registry import Release
from copl_common.release_parts import check_release_parts
from graph_service.embeddings import GNNCheckpoint, Source
from graph_service.records import PreferenceRecord
from graph_service.store import PreferenceStore
from graph_service.user_embeddings import UserEmbeddingResolver
from reward_service.reward_model import RewardModel
from reward_service.training import PreferenceExample, pair_margins
from trainer.metrics import pair_metrics


class ReleaseUnusable(ValueError):
    """A release whose parts do not load: missing, truncated or corrupted files, or a mismatched pair."""


def load_release_parts(release: Release, device: str | None = None) -> tuple[GNNCheckpoint, RewardModel]:
    """The release's GNN checkpoint and reward model, each checked against its manifest's checksums, and
    the reward model checked to be the one trained with this GNN (release_parts.check_release_parts)."""
    try:
        check_release_parts(release)
        return GNNCheckpoint.load(release.gnn_dir), RewardModel.load(release.reward_dir, device=device)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise ReleaseUnusable(f"release {release.id} cannot be loaded: {exc}") from exc


def evaluate_release(release: Release, records: Sequence[PreferenceRecord], store: PreferenceStore | None = None,
                     batch_size: int = 64, device: str | None = None, progress: bool = True,
                     as_of: datetime | None = None) -> dict:
    if not records:
        raise ValueError("no test pairs to evaluate")
    as_of = (as_of or datetime.now(timezone.utc)).astimezone(timezone.utc)
    checkpoint, model = load_release_parts(release, device)
    if checkpoint.snapshot_time is not None and as_of < checkpoint.snapshot_time:
        raise ValueError(f"as of {as_of.isoformat()} is before release {release.id}'s training snapshot "
                         f"({checkpoint.snapshot_time.isoformat()})")
    user_ids = list(dict.fromkeys(r.user_id for r in records))
    resolved = UserEmbeddingResolver(checkpoint, store, context_until=as_of).resolve(user_ids, unknown_as_default=True)
    row = {u: i for i, u in enumerate(user_ids)}
    examples = [PreferenceExample(resolved.embeddings[row[r.user_id]] if model.personalized else None,
                                  r.prompt, r.chosen, r.rejected) for r in records]
    margins = pair_margins(model, examples, batch_size=batch_size, progress=progress)   # (N,)
    seen = [resolved.sources[row[r.user_id]] == Source.TRAINED for r in records]
    return pair_metrics(release.id, records, (margins > 0).tolist(), seen, resolved.sources, as_of)
