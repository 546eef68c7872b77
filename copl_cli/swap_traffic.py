"""Client traffic that runs while releases are swapped, and the check that no reply mixed two releases.

`copl demo` (its second-release stage) and bench/hotswap.py both run it. Threads score without pause
through the client library (copl_client, no torch), half of them by user id (the reward service fetches the
user's embedding from the graph service) and half by embedding (the thread fetches it from the graph
service itself, as a batch job that caches embeddings does, and passes it with its release id).

A reply is *mixed* when its embedding and its model came from different releases. By embedding, that is
visible here: the embedding names its release and so does the reply. The design says the reward service
refuses such a request (FAILED_PRECONDITION, `ReleaseMismatch`); the thread then does what a client is told
to do: asks which release the reward service serves, fetches the embedding of that release, and scores
again. Those refusals are counted as `refetches`, not failures. A request *fails* when no score came back.
By user id, the reply names one release and the pairing happens inside the services, so only its release
id (present, one of the releases published) is checked here.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from copl_client import Client, CoplError, ReleaseMismatch, UserEmbedding

MAX_REFETCHES = 3   # a swap can happen again between the refusal and the retry; more means something is wrong


@dataclass(frozen=True)
class Probe:
    """One scoring request the traffic repeats: a user, a prompt and its responses."""

    user_id: str
    prompt: str
    responses: tuple[str, ...]


@dataclass(frozen=True)
class Sample:
    """One request: when it started and ended (time.monotonic seconds) and how it went."""

    start: float
    end: float
    mode: str                  # "user" | "embedding"
    release_id: str            # of the reply ("" when it failed)
    ok: bool
    mixed: bool = False


@dataclass
class TrafficReport:
    samples: list[Sample]
    refetches: int             # ReleaseMismatch refusals answered by fetching the embedding again
    errors: list[str] = field(default_factory=list)   # the first few failures, for the reader

    @property
    def requests(self) -> int:
        return len(self.samples)

    @property
    def failed(self) -> int:
        return sum(not s.ok for s in self.samples)

    @property
    def mixed(self) -> int:
        return sum(s.mixed for s in self.samples)

    @property
    def releases(self) -> list[str]:
        """The releases replies named, in the order they first appeared."""
        return list(dict.fromkeys(s.release_id for s in self.samples if s.ok))

    def summary(self) -> str:
        return f"{self.requests} requests, {self.failed} failed, {self.mixed} mixed releases"

    def latencies_ms(self, windows: Sequence[tuple[float, float]], inside: bool) -> list[float]:
        """Latencies of the successful requests that overlap one of `windows` (inside) or none of them."""
        def overlaps(s: Sample) -> bool:
            return any(s.start < end and s.end > start for start, end in windows)
        return [(s.end - s.start) * 1000 for s in self.samples if s.ok and overlaps(s) == inside]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (nearest rank), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))   # ceil(n * q / 100)
    return ordered[int(rank) - 1]


class SwapTraffic:
    """Scores `probes` round robin from `threads_per_mode` threads by user id and as many by embedding,
    from `start()` until `stop()`, which returns the report. `known_releases()` (optional) lists the releases
    a reply may name; a reply naming another one counts as mixed."""

    def __init__(self, client: Client, probes: Sequence[Probe], threads_per_mode: int = 1,
                 known_releases=None, timeout_s: float = 30.0):
        if not probes:
            raise ValueError("the traffic needs at least one probe")
        self._client, self._probes, self._known = client, list(probes), known_releases
        self._timeout = timeout_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._samples: list[Sample] = []
        self._errors: list[str] = []
        self._refetches = 0
        self._threads = [threading.Thread(target=work, args=(i,), name=f"traffic-{work.__name__}-{i}", daemon=True)
                         for i in range(threads_per_mode) for work in (self._by_user, self._by_embedding)]

    def start(self) -> "SwapTraffic":
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> TrafficReport:
        self._stop.set()
        for thread in self._threads:
            thread.join(self._timeout + 5)
        with self._lock:
            return TrafficReport(samples=sorted(self._samples, key=lambda s: s.start), refetches=self._refetches,
                                 errors=list(self._errors))

    def _record(self, sample: Sample, error: str | None = None) -> None:
        with self._lock:
            self._samples.append(sample)
            if error is not None and len(self._errors) < 10:
                self._errors.append(error)

    def _unknown(self, release_id: str) -> bool:
        return not release_id or (self._known is not None and release_id not in self._known())

    def _probes_from(self, offset: int):
        i = offset
        while not self._stop.is_set():
            yield self._probes[i % len(self._probes)]
            i += 1

    def _by_user(self, offset: int) -> None:
        for probe in self._probes_from(offset):
            start = time.monotonic()
            try:
                reply = self._client.score(probe.user_id, probe.prompt, probe.responses, timeout=self._timeout)
            except CoplError as exc:
                self._record(Sample(start, time.monotonic(), "user", "", ok=False), f"by user id: {exc}")
                continue
            self._record(Sample(start, time.monotonic(), "user", reply.release_id, ok=True,
                                mixed=self._unknown(reply.release_id)))

    def _by_embedding(self, offset: int) -> None:
        cached: dict[str, UserEmbedding] = {}   # as a batch job keeps them: fetched once per release
        for probe in self._probes_from(offset):
            start = time.monotonic()
            try:
                embedding, reply = self._score_by_embedding(probe, cached)
            except CoplError as exc:
                self._record(Sample(start, time.monotonic(), "embedding", "", ok=False), f"by embedding: {exc}")
                continue
            mixed = reply.release_id != embedding.release_id or self._unknown(reply.release_id)
            self._record(Sample(start, time.monotonic(), "embedding", reply.release_id, ok=True, mixed=mixed))

    def _score_by_embedding(self, probe: Probe, cached: dict[str, UserEmbedding]):
        release_id, refused = "", 0   # the first fetch takes the graph service's current release
        while True:
            try:
                embedding = cached.get(probe.user_id)
                if embedding is None or (release_id and embedding.release_id != release_id):
                    [embedding] = self._client.embeddings([probe.user_id], release_id=release_id,
                                                          timeout=self._timeout)
                    cached[probe.user_id] = embedding
                return embedding, self._client.score(embedding, probe.prompt, probe.responses, timeout=self._timeout)
            except ReleaseMismatch:   # the reward (or graph) service serves another release by now
                refused += 1
                if refused > MAX_REFETCHES:
                    raise
                with self._lock:
                    self._refetches += 1
                release_id = self._client.release_info("reward", timeout=self._timeout).release_id
