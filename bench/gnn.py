"""Signed-GCN training and unseen-user adaptation at 10k / 100k / 1M users, against the paper's approach.

Per size (typed synthetic users, 16 controversial pairs each, responses shared, ~as many responses as users):
  ours      one propagation per optimizer step over up to 2^16 triples; seconds per step, and, up to
            --converge-max users, a full training run to early stopping (time, steps, accuracy)
  baseline  the paper's code path: a full repropagation for every 1,024-triple minibatch. Its epoch time
            is an EXTRAPOLATION, not a measurement: --baseline-minibatches (2) minibatches of our own
            layer in that loop are timed and multiplied by ceil(triples / 1024) (running the loop for
            real would take hours to days at 100k+ users); its adaptation builds a dense users x
            responses score matrix, timed where it fits in --dense-max-gb
  adapt     latency of `adapt` for one new user (p50/p99 over many users) and for a batch of 1,000
A profile with a content half (`small`: latent types) gets stand-in response features: the typed graph's hidden attribute
scores through a fixed random (K, 384) map plus noise, the width and cost of the backbone's text features
without embedding a million texts. The paper's loop is timed on the graph alone. Peak RSS is the process high-water mark; sizes run in ascending order, so each row's value is that
size's peak. The last line of output is one JSON object for the largest size run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # testkit is not an installed package

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from graph_service.adaptation import adapt  # noqa: E402
from graph_service.gnn import SignedAdjacency, SignedGCN, pair_scores  # noqa: E402
from graph_service.gnn_eval import evaluate_pairs  # noqa: E402
from graph_service.gnn_training import train_gnn  # noqa: E402
from graph_service.holdout import holdout_split  # noqa: E402
from graph_service.snapshot import GraphSnapshot  # noqa: E402
from testkit.typed_graph import typed_graph  # noqa: E402
from trainer.profiles import PROFILE_NAMES, profile  # noqa: E402

UNSEEN = 1000
STAND_IN_WIDTH = 384   # all-MiniLM-L6-v2's hidden size


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # ru_maxrss is KiB on Linux


def stand_in_features(attributes: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """(R, dim) float32: hidden attribute scores (R, K) through a fixed random map, plus noise."""
    g = torch.Generator().manual_seed(seed)
    mixed = attributes @ torch.randn(attributes.shape[1], dim, generator=g) / attributes.shape[1] ** 0.5
    return mixed + 0.1 * torch.randn(mixed.shape, generator=g)


def paper_minibatch_seconds(snapshot: GraphSnapshot, config, minibatches: int) -> float:
    """The paper's loop: for every 1,024 triples, propagate the whole graph, backward, step."""
    g = torch.Generator().manual_seed(0)
    train_rows = holdout_split(snapshot.triples, snapshot.num_users, seed=0).train
    graph = GraphSnapshot(snapshot.user_ids, snapshot.response_ids, snapshot.triples[train_rows])
    device = torch.device(config.device)
    adj = SignedAdjacency.from_edges(graph.positive_edges(), graph.negative_edges(),
                                     snapshot.num_users, snapshot.num_responses, device)
    model = SignedGCN(config.model, snapshot.num_users, snapshot.num_responses).to(device)
    train = snapshot.triples[train_rows].to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    times = []
    for i in range(minibatches + 1):                  # the first one warms up allocators; not timed
        u, c, r = train[torch.randint(train.shape[0], (1024,), generator=g).to(device)].T
        start = time.perf_counter()
        users, responses = model(adj)
        loss = -F.logsigmoid(pair_scores(users.index_select(0, u), responses.index_select(0, c),
                                         responses.index_select(0, r))).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return sum(times) / len(times)


def dense_adaptation_seconds(ck, max_gb: float) -> float | None:
    """The paper's adaptation scores every seen user on every response at once: (U, R) dense."""
    if ck.num_users * ck.num_responses * 4 / 2**30 > max_gb:
        return None
    start = time.perf_counter()
    ck.user_embeddings @ ck.response_embeddings.T                                   # (U, R)
    return time.perf_counter() - start


def percentile_ms(seconds: list[float], q: float) -> float:
    return 1000 * float(torch.tensor(seconds).quantile(q))


def run_size(n: int, args) -> dict:
    t0 = time.perf_counter()
    graph = typed_graph(n, num_unseen=UNSEEN, seed=args.seed)
    snap = graph.snapshot
    gen_s = time.perf_counter() - t0
    edges = int(snap.positive_edges().shape[1] + snap.negative_edges().shape[1])
    config = dataclasses.replace(profile(args.profile).gnn, device=args.device)
    if n >= args.checkpoint_layers_from:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, checkpoint_layers=True))
    converge = n <= args.converge_max
    if not converge:   # time a few steps only; warm-up 0 so a 3-step schedule is valid
        config = dataclasses.replace(config, max_steps=args.steps, warmup_steps=0, eval_every=args.steps)
    features = (stand_in_features(graph.response_attributes, STAND_IN_WIDTH, args.seed)
                if config.content_dim else None)
    run = train_gnn(snap, config, progress=not args.no_progress, response_features=features)
    ck = run.checkpoint
    step_s = run.seconds / len(run.history["step"])
    triples = snap.triples.shape[0]
    ours_epoch_s = math.ceil(triples / config.batch_triples) * step_s
    paper_mb_s = paper_minibatch_seconds(snap, config, args.baseline_minibatches)
    paper_epoch_s = math.ceil(triples / 1024) * paper_mb_s

    pick = torch.randperm(UNSEEN, generator=torch.Generator().manual_seed(1))[:args.single_users].tolist()
    adapt(ck, graph.unseen_context[:8])                                            # builds the id index once
    single = []
    for i in pick:
        start = time.perf_counter()
        adapt(ck, [graph.unseen_context[i]])
        single.append(time.perf_counter() - start)
    batch = []
    for _ in range(args.batch_repeats):
        start = time.perf_counter()
        adapted = adapt(ck, graph.unseen_context)
        batch.append(time.perf_counter() - start)
    seen_acc = evaluate_pairs(ck, graph.seen_test[:, 0], graph.seen_test[:, 1], graph.seen_test[:, 2])
    unseen_acc = evaluate_pairs(ck, adapted.embeddings[graph.unseen_test[:, 0]], graph.unseen_test[:, 1],
                                graph.unseen_test[:, 2])
    dense_s = dense_adaptation_seconds(ck, args.dense_max_gb)
    return {
        "users": n, "responses": snap.num_responses, "triples": triples, "edges": edges, "gen_s": gen_s,
        "width": config.model.dim, "layers": config.model.layers,
        "checkpoint_layers": config.model.checkpoint_layers,
        "step_s": step_s, "epoch_s": ours_epoch_s, "paper_minibatch_s": paper_mb_s,
        "paper_epoch_s_extrapolated": paper_epoch_s,
        "converged": converge, "train_s": run.seconds, "steps": len(run.history["step"]),
        "content_s": ck.metrics["content_seconds"],
        "selection_accuracy": run.selection_accuracy, "seen_accuracy": seen_acc if converge else None,
        "unseen_accuracy": unseen_acc if converge else None,
        "adapt_p50_ms": percentile_ms(single, 0.5), "adapt_p99_ms": percentile_ms(single, 0.99),
        "adapt_batch1000_p50_ms": percentile_ms(batch, 0.5), "adapt_batch1000_p99_ms": percentile_ms(batch, 0.99),
        "adapt_candidates_mean": float(adapted.details["candidates"].float().mean()),
        "dense_scores_gb": n * snap.num_responses * 4 / 2**30, "dense_scores_s": dense_s,
        "peak_rss_gb": peak_rss_gb(),
    }


def print_table(rows: list[dict]) -> None:
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)
    cols = [("users", "users", ",d"), ("edges", "edges", ",d"), ("step s", "step_s", ".3f"),
            ("epoch s", "epoch_s", ".2f"), ("paper epoch s (extrapolated)", "paper_epoch_s_extrapolated", ",.0f"),
            ("train s", "train_s", ".1f"), ("steps", "steps", "d"), ("content s", "content_s", ".1f"), ("seen acc", "seen_accuracy", ".3f"),
            ("unseen acc", "unseen_accuracy", ".3f"), ("adapt p50 ms", "adapt_p50_ms", ".2f"),
            ("adapt p99 ms", "adapt_p99_ms", ".2f"), ("1000 p99 ms", "adapt_batch1000_p99_ms", ".0f"),
            ("dense GB", "dense_scores_gb", ",.1f"), ("dense s", "dense_scores_s", ".2f"),
            ("peak RSS GB", "peak_rss_gb", ".2f")]
    cells = [[name for name, _, _ in cols]] + [[fmt(r[k], spec) for _, k, spec in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for j, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10k users, timed steps only (no convergence run)")
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated user counts")
    parser.add_argument("--profile", default="small", choices=PROFILE_NAMES)
    parser.add_argument("--converge-max", type=int, default=100_000,
                        help="train to early stopping up to this many users; larger sizes time --steps steps")
    parser.add_argument("--steps", type=int, default=3, help="timed steps for sizes not trained to convergence")
    parser.add_argument("--checkpoint-layers-from", type=int, default=1_000_000,
                        help="use activation checkpointing from this many users (memory)")
    parser.add_argument("--baseline-minibatches", type=int, default=2)
    parser.add_argument("--single-users", type=int, default=300, help="new users timed one at a time")
    parser.add_argument("--batch-repeats", type=int, default=5, help="timed batches of 1,000 new users")
    parser.add_argument("--dense-max-gb", type=float, default=2.0, help="largest dense score matrix to time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="training device (cpu | cuda); adaptation runs on the CPU")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    sizes = [10_000] if args.quick else sorted(int(s) for s in args.sizes.split(","))
    if args.quick:   # convergence at 10k takes minutes on 2 cores; --quick times steps only
        args.converge_max = 0
    rows = []
    for n in sizes:
        rows.append(run_size(n, args))
        print(json.dumps(rows[-1]), flush=True)
    print()
    print(f"profile {args.profile}: width {rows[-1]['width']}, layers {rows[-1]['layers']}, batch "
          f"{profile(args.profile).gnn.batch_triples} triples/step; torch threads {torch.get_num_threads()}")
    print(f"paper epoch s (extrapolated) = ceil(triples / 1024) x the mean of {args.baseline_minibatches} timed "
          "minibatches of our layer in the paper's loop (a full propagation per 1,024 triples), not a measured epoch")
    print_table(rows)
    last = rows[-1]
    print(json.dumps({"users": last["users"], "edges": last["edges"], "step_s": round(last["step_s"], 4),
                      "paper_epoch_s_extrapolated": round(last["paper_epoch_s_extrapolated"], 1),
                      "paper_epoch_is": f"extrapolated from {args.baseline_minibatches} timed minibatches",
                      "peak_rss_gb": round(last["peak_rss_gb"], 3), "adapt_p99_ms": round(last["adapt_p99_ms"], 3),
                      "sizes": rows}))


if __name__ == "__main__":
    main()
