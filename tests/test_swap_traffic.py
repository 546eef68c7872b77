"""The swap-traffic checker's own logic (copl_cli/swap_traffic.py), against a scripted client: that it counts a
mixed reply when there is one, answers a ReleaseMismatch with a refetch, and splits latencies by window.
(The real thing, with both services, runs in tests/test_demo.py and bench/hotswap.py.)"""
from __future__ import annotations

import time

import grpc
import pytest

from copl_cli.swap_traffic import Probe, Sample, SwapTraffic, TrafficReport, percentile
from copl_client import EmbeddingSource, ReleaseMismatch, Scores, UserEmbedding


class ScriptedClient:
    """Serves release `serving`; `mix` makes replies by embedding name another release than the embedding's."""

    def __init__(self, serving: str = "r1", mix: bool = False):
        self.serving, self.mix = serving, mix

    def embeddings(self, user_ids, *, release_id="", timeout=None):
        return [UserEmbedding(u, (1.0, 0.0), EmbeddingSource.TRAINED, release_id or self.serving) for u in user_ids]

    def score(self, user, prompt, responses, *, timeout=None):
        time.sleep(0.001)
        if isinstance(user, UserEmbedding) and not self.mix and user.release_id != self.serving:
            raise ReleaseMismatch(grpc.StatusCode.FAILED_PRECONDITION, "another release")
        return Scores((0.5, 0.1), "other" if self.mix and isinstance(user, UserEmbedding) else self.serving,
                      EmbeddingSource.TRAINED)

    def release_info(self, service="reward", timeout=None):
        class Info:
            release_id = self.serving
        return Info()


PROBES = [Probe("u1", "p", ("a", "b")), Probe("u2", "p", ("c", "d"))]


def test_a_swap_is_clean_and_the_stale_embedding_is_fetched_again():
    client = ScriptedClient("r1")
    traffic = SwapTraffic(client, PROBES, known_releases=lambda: {"r1", "r2"}).start()
    time.sleep(0.1)
    client.serving = "r2"
    time.sleep(0.1)
    report = traffic.stop()
    assert report.requests > 10 and report.failed == 0 and report.mixed == 0
    assert report.releases == ["r1", "r2"] and report.refetches >= 1
    assert report.summary() == f"{report.requests} requests, 0 failed, 0 mixed releases"


def test_mixed_replies_and_unknown_releases_are_counted():
    report = SwapTraffic(ScriptedClient("r1", mix=True), PROBES, known_releases=lambda: {"r1"}).start()
    time.sleep(0.1)
    report = report.stop()
    by_mode = {mode: [s for s in report.samples if s.mode == mode] for mode in ("user", "embedding")}
    assert by_mode["embedding"] and all(s.mixed for s in by_mode["embedding"])
    assert by_mode["user"] and not any(s.mixed for s in by_mode["user"])
    report = SwapTraffic(ScriptedClient("r9"), PROBES, known_releases=lambda: {"r1"}).start()
    time.sleep(0.05)
    assert report.stop().mixed > 0


def test_percentile_and_latency_windows():
    assert percentile([], 99) is None
    assert percentile(list(range(1, 101)), 99) == 99 and percentile([5.0], 99) == 5.0
    samples = [Sample(0.0, 0.010, "user", "r1", True), Sample(1.0, 1.5, "user", "r1", True),
               Sample(1.4, 1.45, "embedding", "r2", True), Sample(3.0, 3.02, "user", "", False)]
    report = TrafficReport(samples, refetches=0)
    assert report.latencies_ms([(1.2, 1.3)], inside=True) == pytest.approx([500.0])
    assert report.latencies_ms([(1.2, 1.3)], inside=False) == pytest.approx([10.0, 50.0])   # failed: left out
    assert report.failed == 1 and report.requests == 4
