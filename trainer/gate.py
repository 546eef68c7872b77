"""The quality gate: a new release becomes current only if its held-out accuracy is not clearly worse.

The figure compared is `report_accuracy` (release manifest "metrics": the reward model's accuracy on the report
part, pairs nothing looked at before training ended; trainer/pipeline.py). A candidate is rejected when

    candidate.report_accuracy < current.report_accuracy - max_regression

Releases too small to hold out a report part have report_accuracy None. The rule then:
  - no current release, or the current one is unmeasured: accepted (nothing to be worse than);
  - the candidate is unmeasured but the current one is measured: rejected (the run cannot show that it is
    not worse; grow the store or use --force).

Either way the release is published (releases are immutable); the decision is a small file beside it,
registry/status/<id>.json, and only an accepted (or forced) release is made current. A rejected release can
still be made current by `copl releases rollback ID --force`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from copl_common.registry import Registry, Release

DEFAULT_MAX_REGRESSION = 0.02


@dataclass(frozen=True)
class GateDecision:
    accepted: bool
    reason: str
    candidate_accuracy: float | None
    current_id: str | None
    current_accuracy: float | None
    max_regression: float


def report_accuracy(release: Release) -> float | None:
    return release.manifest.get("metrics", {}).get("report_accuracy")


def judge(candidate: Release, current: Release | None, max_regression: float) -> GateDecision:
    """The gate's decision on `candidate` against `current` (the rule is in the module docstring)."""
    new = report_accuracy(candidate)
    old = None if current is None else report_accuracy(current)

    def decision(accepted: bool, reason: str) -> GateDecision:
        return GateDecision(accepted, reason, new, current.id if current else None, old, max_regression)

    if current is None:
        return decision(True, "no current release to compare with")
    if old is None:
        return decision(True, f"current release {current.id} has no held-out report accuracy (too few users to "
                              "hold out a report part): nothing to compare with")
    if new is None:
        return decision(False, f"no held-out report accuracy (too few users to hold out a report part), while "
                               f"current release {current.id} has {old:.4f}: cannot show it is not worse")
    if new < old - max_regression:
        return decision(False, f"report accuracy {new:.4f} is worse than current release {current.id}'s "
                               f"{old:.4f} by {old - new:.4f} (> max regression {max_regression})")
    return decision(True, f"report accuracy {new:.4f} vs current release {current.id}'s {old:.4f} "
                          f"(max regression {max_regression})")


def apply_gate(registry: Registry, release: Release, max_regression: float = DEFAULT_MAX_REGRESSION,
               force: bool = False) -> GateDecision:
    """Judge `release` against the current one, record the decision, and make it current if accepted or forced."""
    decision = judge(release, registry.current(), max_regression)
    status = {"status": "accepted" if decision.accepted else "rejected", "forced": force and not decision.accepted,
              "decided_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **asdict(decision)}
    registry.set_status(release.id, status)
    if decision.accepted or force:
        registry.set_current(release.id)
    return decision
