"""Retries with exponential backoff and full jitter, on UNAVAILABLE only.

Every RPC of the CoPL API is idempotent, so a call that may or may not have reached a server can be sent
again: scores and embeddings are reads, Reload converges on one release, and AddPreferences stores
content-addressed records, so a record sent twice is stored once (the second answer counts it as a
duplicate). Other status codes are answers, not faults, and are never retried.
"""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """How a call retries when no server answered (UNAVAILABLE).

    A call with several addresses fails over to the next healthy one at once; when none is healthy it waits
    `backoff(n)` before try n+1, and gives up after `max_attempts` tries or at its deadline, whichever
    comes first (then it raises `Unavailable`).
    """

    max_attempts: int = 6              # tries per call, the first included
    initial_backoff_s: float = 0.1     # the cap of the first wait
    max_backoff_s: float = 5.0         # the cap never grows past this
    multiplier: float = 2.0            # the cap grows by this factor per retry

    def __post_init__(self):
        if self.max_attempts < 1 or self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s \
                or self.multiplier < 1:
            raise ValueError(f"invalid retry policy {self}")

    def cap(self, retry: int) -> float:
        """The longest wait before retry number `retry` (1 for the first retry)."""
        return min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** max(retry - 1, 0))

    def backoff(self, retry: int, rng: random.Random | None = None) -> float:
        """Full jitter: uniform in [0, cap(retry)], so clients that failed together do not retry together."""
        return (rng or random).uniform(0.0, self.cap(retry))
