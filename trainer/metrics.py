"""Accuracy of scored preference pairs, overall and broken down (seen / unseen users, controversial pairs,
groups): the one definition `copl eval` prints, whether it scored in-process or through the services.
Plain Python: the client path imports it without torch."""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from datetime import datetime


def _accuracy(correct: Sequence[bool]) -> dict:
    n = len(correct)
    return {"n_pairs": n, "accuracy": sum(correct) / n if n else None}


def pair_metrics(release_id: str, records: Sequence, correct: Sequence[bool], seen: Sequence[bool],
                 user_sources: Sequence[str], as_of: datetime) -> dict:
    """`records[i]` (with .group and .controversial) was ranked right when `correct[i]`; `seen[i]`: its user
    was in the release's training graph; `user_sources`: one embedding source per distinct user; `as_of`: the
    time up to which stored pairs could inform unseen users' embeddings."""
    by_group: dict[str, list[bool]] = defaultdict(list)
    for record, ok in zip(records, correct):
        if record.group is not None:
            by_group[record.group].append(ok)
    return {
        "release": release_id,
        "as_of": as_of.isoformat(),
        "n_pairs": len(records),
        "accuracy": _accuracy(correct)["accuracy"],
        "controversial_accuracy": _accuracy([ok for r, ok in zip(records, correct) if r.controversial])["accuracy"],
        "seen": _accuracy([ok for ok, s in zip(correct, seen) if s]),
        "unseen": _accuracy([ok for ok, s in zip(correct, seen) if not s]),
        "by_group": {g: _accuracy(oks) for g, oks in sorted(by_group.items())},
        "users_by_source": dict(sorted(Counter(user_sources).items())),
    }
