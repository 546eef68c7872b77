"""Serving latency and throughput of the graph and reward services, closed-loop clients on loopback.

Starts `copl up` (two processes) on a release it trains once at the tiny profile (uf-p-2, 200 users,
SQLite) in --workdir and reuses afterwards, or on --registry/--db given. Measures, each beside its baseline:
  embed        GetUserEmbedding p50/p99 with --clients concurrent callers, one trained user a call
  score        ScoreResponses pairs/s through gRPC (by user id, one caller, --score-responses responses a
               request) beside the same scorer in this process (load_reward_release + forward) on the same
               requests: what gRPC, the graph hop and the batcher cost
  batching     --clients concurrent single-pair callers beside one caller sending the same requests one at
               a time: what dynamic batching buys; and the model alone, the same pairs in one forward pass
               beside one pass each: the most batching can buy on this machine
  label        label-to-score latency: AddPreferences for a new user, then ScoreResponses until the score
               reflects it (embedding source ADAPTED)

    .venv/bin/python bench/serve.py --quick   # under a minute once the release exists (first run trains ~1 min)
    .venv/bin/python bench/serve.py

Measures compared with each other take turns on the same requests, round by round (a change in the
machine's load hits both alike). Client and servers share the machine's cores. The last line printed is one
JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import grpc  # noqa: E402

from copl.v1 import graph_pb2, graph_pb2_grpc, reward_pb2, reward_pb2_grpc  # noqa: E402
from copl_cli.services import free_loopback_ports, is_serving  # noqa: E402
from testkit.services import prepare_release  # noqa: E402


def start_services(url: str, registry: Path, workdir: Path, torch_threads: int) -> tuple[subprocess.Popen, int, int, str]:
    graph_port, reward_port = free_loopback_ports(2)
    token = uuid.uuid4().hex
    env = {**os.environ, "COPL_HOME": str(workdir), "COPL_WRITE_TOKEN": token, "COPL_LOG_LEVEL": "WARNING",
           "COPL_TORCH_THREADS": str(torch_threads)}
    proc = subprocess.Popen([sys.executable, "-m", "copl_cli.main", "up", "--db", url, "--registry", str(registry),
                             "--graph-port", str(graph_port), "--reward-port", str(reward_port),
                             "--graph-metrics-port", "-1", "--reward-metrics-port", "-1"], env=env, cwd=ROOT)
    deadline = time.monotonic() + 300
    for port in (graph_port, reward_port):
        while not is_serving(f"127.0.0.1:{port}"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the services did not start")
            time.sleep(0.3)
    return proc, graph_port, reward_port, token


def grpc_seconds(port: int, requests: list, n_clients: int) -> float:
    return asyncio.run(grpc_scoring(port, requests, n_clients))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def closed_loop(n_clients: int, calls: list, make_call) -> tuple[list[float], float]:
    """Run `calls` through `n_clients` concurrent callers, each sending its next call when the last returns.
    Returns (latencies in seconds, wall seconds)."""
    queue = list(reversed(calls))
    latencies: list[float] = []

    async def client():
        while queue:
            item = queue.pop()
            t = time.perf_counter()
            await make_call(item)
            latencies.append(time.perf_counter() - t)

    started = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(n_clients)])
    return latencies, time.perf_counter() - started


async def bench_embed(port: int, users: list[str], n_clients: int, n_calls: int) -> dict:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = graph_pb2_grpc.GraphServiceStub(channel)

        async def call(user):
            await stub.GetUserEmbedding(graph_pb2.GetUserEmbeddingRequest(users=[graph_pb2.UserQuery(user_id=user)]))

        rng = random.Random(0)
        warm = [rng.choice(users) for _ in range(200)]
        await closed_loop(n_clients, warm, call)
        latencies, wall = await closed_loop(n_clients, [rng.choice(users) for _ in range(n_calls)], call)
    return {"p50_ms": pct(latencies, 0.5) * 1e3, "p99_ms": pct(latencies, 0.99) * 1e3, "calls_per_s": n_calls / wall}


def score_requests(test: list[dict], n: int, responses: int) -> list[tuple[str, str, list[str]]]:
    """(user, prompt, responses): held-out prompts with that prompt's responses from the test set, padded."""
    by_prompt: dict[str, list[str]] = {}
    for r in test:
        by_prompt.setdefault(r["prompt"], []).extend([r["chosen"], r["rejected"]])
    out = []
    for i in range(n):
        r = test[i % len(test)]
        pool = list(dict.fromkeys(by_prompt[r["prompt"]]))
        out.append((r["user_id"], r["prompt"], [pool[j % len(pool)] + ("" if j < len(pool) else f" ({j})")
                                                for j in range(responses)]))
    return out


async def grpc_scoring(port: int, requests: list, n_clients: int) -> float:
    """Seconds to score `requests` through ScoreResponses (by user id) with `n_clients` concurrent callers."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)

        async def call(item):
            user, prompt, responses = item
            await stub.ScoreResponses(reward_pb2.ScoreRequest(user_id=user, prompt=prompt, responses=responses))

        _lat, wall = await closed_loop(n_clients, requests, call)
    return wall


class InProcessScorer:
    """The reward service's scorer in this process: the current release loaded the way the service loads it,
    each request tokenized and scored in one forward pass, as the service's worker does."""

    def __init__(self, registry: Path, graph_port: int, users: list[str]):
        import torch

        from copl_common.registry import Registry
        from reward_service.serving import load_reward_release
        release = Registry(registry).current()
        self.scorer = load_reward_release(release)
        with grpc.insecure_channel(f"127.0.0.1:{graph_port}") as channel:   # embeddings up front, not timed
            found = graph_pb2_grpc.GraphServiceStub(channel).GetUserEmbedding(graph_pb2.GetUserEmbeddingRequest(
                users=[graph_pb2.UserQuery(user_id=u) for u in dict.fromkeys(users)], release_id=release.id))
        self.embedding = {e.user_id: torch.tensor(e.vector) for e in found.embeddings}

    def job(self, user: str, prompt: str, responses: list[str]):
        from reward_service.batcher import ScoreJob
        enc = self.scorer.model.encode_texts([prompt] * len(responses), responses)
        return ScoreJob(self.scorer, enc, self.embedding[user], len(responses), max(map(len, enc["input_ids"])))

    def seconds(self, requests: list, one_pass: bool = False) -> float:
        """Seconds to score the requests one forward pass each (or all in ONE pass)."""
        started = time.perf_counter()
        jobs = [self.job(*r) for r in requests]
        for batch in ([jobs] if one_pass else [[j] for j in jobs]):
            self.scorer.forward(batch)
        return time.perf_counter() - started


def interleaved(rounds: int, requests: list, measures: dict) -> dict:
    """Total seconds of each measure over the same requests, the measures taking turns round by round so that
    a change in the machine's load hits them alike."""
    size = -(-len(requests) // rounds)
    totals = dict.fromkeys(measures, 0.0)
    for start in range(0, len(requests), size):
        chunk = requests[start:start + size]
        for name, measure in measures.items():
            totals[name] += measure(chunk)
    return totals


async def bench_label(graph_port: int, reward_port: int, token: str, donor_records: list[dict], probe: dict,
                      trials: int) -> list[float]:
    metadata = (("authorization", f"Bearer {token}"),)
    out = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{graph_port}") as g, \
            grpc.aio.insecure_channel(f"127.0.0.1:{reward_port}") as r:
        graph, reward = graph_pb2_grpc.GraphServiceStub(g), reward_pb2_grpc.RewardServiceStub(r)
        for _ in range(trials):
            user = f"bench-late-{uuid.uuid4().hex[:10]}"
            request = reward_pb2.ScoreRequest(user_id=user, prompt=probe["prompt"],
                                              responses=[probe["chosen"], probe["rejected"]])
            assert (await reward.ScoreResponses(request)).embedding_source == 3   # DEFAULT, now cached
            records = [graph_pb2.PreferenceRecord(user_id=user, prompt=d["prompt"], chosen=d["chosen"],
                                                  rejected=d["rejected"]) for d in donor_records]
            started = time.perf_counter()
            await graph.AddPreferences(graph_pb2.AddPreferencesRequest(records=records), metadata=metadata)
            while (await reward.ScoreResponses(request)).embedding_source != 2:   # ADAPTED
                await asyncio.sleep(0.005)
            out.append(time.perf_counter() - started)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer calls (under a minute once the release exists)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "data" / "bench-serve")
    ap.add_argument("--registry", type=Path, help="serve this registry's current release (with --db)")
    ap.add_argument("--db", help="its preference store")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--score-responses", type=int, default=16, help="responses per request in the score phase")
    ap.add_argument("--torch-threads", type=int, default=0, help="the reward model's intra-op threads, in the "
                    "service and in-process alike (0: torch's default)")
    args = ap.parse_args()
    quick = args.quick
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.registry:
        if not args.db:
            ap.error("--registry needs --db")
        url, registry = args.db, args.registry
    else:
        url, registry = prepare_release(args.workdir)

    from copl_common.registry import Registry
    from graph_service.embeddings import GNNCheckpoint
    from trainer.synth import SynthConfig, generate
    checkpoint = GNNCheckpoint.load(Registry(registry).current().gnn_dir)
    data = generate(SynthConfig(preset="uf-p-2", users=200, seed=1))
    donor = data.train_seen[0]["user_id"]
    donor_records = [r for r in data.train_seen if r["user_id"] == donor]
    trained_test = [r for r in data.test if r["user_id"] in set(checkpoint.user_ids)] or data.test

    if args.torch_threads:
        import torch
        torch.set_num_threads(args.torch_threads)   # the in-process scorer runs on this thread
    proc, graph_port, reward_port, token = start_services(url, registry, args.workdir, args.torch_threads)
    try:
        embed = asyncio.run(bench_embed(graph_port, checkpoint.user_ids, args.clients, 2_000 if quick else 20_000))
        requests = score_requests(trained_test, 12 if quick else 48, args.score_responses)
        singles = score_requests(trained_test, 128 if quick else 768, 1)
        local = InProcessScorer(registry, graph_port, [r[0] for r in requests + singles])
        grpc_seconds(reward_port, requests[:2], 1)   # warm-up: embedding cache, kernels
        local.seconds(requests[:2])
        pairs = sum(len(r[2]) for r in requests)
        score = interleaved(4, requests, {"grpc": lambda c: grpc_seconds(reward_port, c, 1),
                                          "inprocess": local.seconds})
        n = len(singles)
        batching = interleaved(2, singles, {"batched": lambda c: grpc_seconds(reward_port, c, args.clients),
                                            "serial": lambda c: grpc_seconds(reward_port, c, 1),
                                            "model_one_pass": lambda c: local.seconds(c, one_pass=True),
                                            "model_one_by_one": local.seconds})
        label = asyncio.run(bench_label(graph_port, reward_port, token, donor_records, trained_test[0],
                                        5 if quick else 30))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    grpc_rate, inprocess_rate = pairs / score["grpc"], pairs / score["inprocess"]
    batched, serial = n / batching["batched"], n / batching["serial"]
    model_gain = batching["model_one_by_one"] / batching["model_one_pass"]

    label_p99 = pct(label, 0.99) * 1e3
    rows = [
        ("embed p50 / p99 (ms)", f"{embed['p50_ms']:.2f} / {embed['p99_ms']:.2f}", f"{args.clients} callers, "
         f"{embed['calls_per_s']:.0f} calls/s", "p99 <= 5 ms"),
        ("score via gRPC (pairs/s)", f"{grpc_rate:.1f}", f"in-process {inprocess_rate:.1f}: "
         f"{grpc_rate / inprocess_rate:.2f}x", ">= 0.8x"),
        ("single-pair callers (pairs/s)", f"{batched:.1f}", f"one at a time {serial:.1f}: {batched / serial:.2f}x",
         ">= 2x"),
        ("model alone: one pass vs one by one", f"{model_gain:.2f}x", "the most batching can buy here", ""),
        ("label-to-score p50 / p99 (ms)", f"{statistics.median(label) * 1e3:.0f} / {label_p99:.0f}",
         f"{len(label)} new users", "p99 <= 1000 ms"),
    ]
    print(f"release {Registry(registry).current_id()}, {len(requests)} requests x {args.score_responses} responses, "
          f"{len(singles)} single-pair requests, {os.cpu_count()} CPUs, torch threads {args.torch_threads or 'default'}")
    print(f"{'measure':<32} {'value':>16}  {'beside':<36} goal")
    for name, value, beside, goal in rows:
        print(f"{name:<32} {value:>16}  {beside:<36} {goal}")
    print(json.dumps({
        "embed_p99_ms": round(embed["p99_ms"], 3), "embed_p50_ms": round(embed["p50_ms"], 3),
        "score_grpc_pairs_per_s": round(grpc_rate, 2), "score_inprocess_pairs_per_s": round(inprocess_rate, 2),
        "batched_pairs_per_s": round(batched, 2), "serial_pairs_per_s": round(serial, 2),
        "label_to_score_p99_ms": round(label_p99, 1), "model_batch_speedup": round(model_gain, 2),
        "clients": args.clients, "torch_threads": args.torch_threads, "quick": quick,
    }))


if __name__ == "__main__":
    main()
