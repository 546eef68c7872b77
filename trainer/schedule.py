"""`copl schedule`: retrain every T, or once N new preferences have arrived since the current release's snapshot.

The scheduler only decides and launches; each run is a `copl train` child process (a crash or an out-of-memory
kill of a run cannot take the scheduler down, and the run's memory goes back when it ends). One run at a time:
the run holds the registry's run lock (trainer/run_lock.py), and the scheduler waits for its child. Every
decision is logged as one line: time, decision (run | wait | skip), reason.

  --every T            run when the current release is older than T (its created_at; none: run now)
  --new-preferences N  run when the store has received N preferences after the current release's snapshot
                       time (preferences.stored_at; none: run now)
Both given: a run when either says so.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from copl_common.registry import Registry

_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(s|m|h|d)?\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds from '90', '90s', '15m', '2h', '1d'."""
    match = _DURATION.match(text)
    if not match or float(match[1]) <= 0:
        raise ValueError(f"not a duration: {text!r} (examples: 90s, 15m, 2h, 1d)")
    return float(match[1]) * _UNIT_S[match[2] or "s"]


@dataclass(frozen=True)
class Policy:
    every_s: float | None = None
    new_preferences: int | None = None

    def __post_init__(self):
        if self.every_s is None and self.new_preferences is None:
            raise ValueError("give --every, --new-preferences, or both")
        if self.new_preferences is not None and self.new_preferences < 1:
            raise ValueError("--new-preferences must be >= 1")


@dataclass(frozen=True)
class Decision:
    run: bool
    reason: str


def decide(policy: Policy, registry: Registry, new_preferences_since: Callable[[datetime], int],
           now: datetime | None = None) -> Decision:
    """Whether to start a run now. `new_preferences_since(t)` counts preferences stored after t."""
    now = now or datetime.now(timezone.utc)
    current = registry.current()
    if current is None:
        return Decision(True, "no current release")
    reasons = []
    if policy.every_s is not None:
        age = (now - datetime.fromisoformat(current.created_at)).total_seconds()
        if age >= policy.every_s:
            return Decision(True, f"current release {current.id} is {age:.0f}s old (every {policy.every_s:.0f}s)")
        reasons.append(f"current release is {age:.0f}s old (< {policy.every_s:.0f}s)")
    if policy.new_preferences is not None:
        snapshot = current.manifest.get("snapshot_time")
        if snapshot is None:
            return Decision(True, f"current release {current.id} records no snapshot time")
        arrived = new_preferences_since(datetime.fromisoformat(snapshot))
        if arrived >= policy.new_preferences:
            return Decision(True, f"{arrived} new preferences since the snapshot of {current.id} "
                                  f"(>= {policy.new_preferences})")
        reasons.append(f"{arrived} new preferences since the snapshot (< {policy.new_preferences})")
    return Decision(False, "; ".join(reasons))


def log_line(decision: str, reason: str, now: datetime | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    return f"{now.isoformat(timespec='seconds')} {decision} {reason}"
