"""Scoring throughput of the MoLE reward model beside the bare backbone and a naive per-request scorer.

One batch = `--batch` pairs = 2 x batch sequences of `--seq` tokens (prompt + response), one user per pair,
users all different (a fully mixed batch). Variants, timed round-robin in the same run (median of repeats):
  mole          RewardModel.forward: gates + stacked-LoRA routing + pooling + head, one pass for the batch
  mole_merged   the same with the shared LoRA folded into the frozen weights
  backbone      the bare backbone forward on the same tokens (the ceiling)
  naive         one request (pair) at a time, every expert its own matmuls in a Python loop (the paper's code)
GFLOP/s = FLOPs counted by torch's FlopCounterMode for one pass / measured time, beside a plain matmul's.

Usage: .venv/bin/python bench/score.py [--quick] [--device auto|cpu|cuda] [--dtype auto|fp32|bf16]
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reward_service.backbone import load_backbone  # noqa: E402
from reward_service.mole import MoLEConfig, MoLELinear  # noqa: E402
from reward_service.reward_model import RewardModel, RewardModelConfig  # noqa: E402


def naive_forward(layer: MoLELinear, x: torch.Tensor) -> torch.Tensor:
    """Reference-style MoLE layer: base + shared + a Python loop over all experts, each weighted by its gate."""
    a, b = layer.lora_A.to(x.dtype), layer.lora_B.to(x.dtype)  # adapters are fp32; activations may be bf16
    y = layer.base(x) + layer.scaling * F.linear(F.linear(x, a[0]), b[0].T)
    # dense per-expert gate weights from the gate route() already ran for this layer
    slot_w = layer._slot_w[:, 0, ::layer.cfg.rank] / layer.scaling  # (B, S_active)
    w = torch.zeros(x.shape[0], 1 + layer.cfg.num_experts, device=x.device, dtype=slot_w.dtype)
    w = w.scatter(1, layer._slots, slot_w)[:, 1:].to(x.dtype)
    for e in range(layer.cfg.num_experts):
        h = F.linear(F.linear(x, a[e + 1]), b[e + 1].T)  # (B, T, out)
        y = y + layer.scaling * w[:, e, None, None] * h
    return y


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and naive requests (< 1 min on 2 cores)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, default=32, help="pairs per batch")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--naive-requests", type=int, default=None, help="requests timed for the naive scorer")
    ap.add_argument("--user-dim", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    repeats = args.repeats or (3 if args.quick else 7)
    naive_requests = min(args.batch, args.naive_requests or (3 if args.quick else args.batch))

    torch.manual_seed(args.seed)
    # Paper reference MoLE: E=8, k=1, r=8, alpha=16 on every block of the default backbone.
    cfg = RewardModelConfig(device=args.device, dtype=args.dtype, max_length=args.seq, seed=args.seed,
                            mole=MoLEConfig(user_dim=args.user_dim))
    model = RewardModel(cfg).eval()
    with torch.no_grad():
        for layer in model.mole_layers.values():  # non-zero deltas, as after training
            layer.lora_B.normal_(0, 0.02)
    dev, dt = model.device, model.dtype
    bare, _ = load_backbone(cfg.backbone, dev, dt)

    n_seq = 2 * args.batch
    vocab = model.backbone.config.vocab_size
    ids = torch.randint(1000, min(vocab, 20000), (n_seq, args.seq), device=dev)  # (2B, T)
    mask = torch.ones_like(ids)  # (2B, T)
    users = F.normalize(torch.randn(args.batch, args.user_dim, device=dev), dim=-1)  # (B, d_user)
    users = torch.cat([users, users])  # (2B, d_user): chosen and rejected of a pair share the user

    def run_backbone():
        bare(input_ids=ids, attention_mask=mask)

    def run_mole():
        model(ids, mask, users)

    def run_naive():
        for i in range(naive_requests):  # one request = one pair = 2 sequences of one user
            rows = torch.tensor([i, args.batch + i], device=dev)
            model(ids[rows], mask[rows], users[rows])

    def set_naive(on: bool) -> None:
        for layer in model.mole_layers.values():
            if on:
                layer.forward = lambda x, _l=layer: naive_forward(_l, x)
            else:
                del layer.forward

    def timed(fn, naive=False, merged=False) -> float:
        if naive:
            set_naive(True)
        if merged:
            model.merge_shared()
        try:
            sync(dev)
            t = time.perf_counter()
            fn()
            sync(dev)
            return time.perf_counter() - t
        finally:
            if naive:
                set_naive(False)
            if merged:
                model.unmerge_shared()

    variants = {
        "mole": (run_mole, dict()),
        "mole_merged": (run_mole, dict(merged=True)),
        "backbone": (run_backbone, dict()),
        "naive": (run_naive, dict(naive=True)),
    }
    pairs = {"mole": args.batch, "mole_merged": args.batch, "backbone": args.batch, "naive": naive_requests}
    with torch.inference_mode():
        rows0 = torch.tensor([0, args.batch], device=dev)  # the first request, for an equality check
        batched = model(ids, mask, users)[rows0]
        set_naive(True)
        max_diff = float((model(ids[rows0], mask[rows0], users[rows0]) - batched).abs().max())
        set_naive(False)
        # FLOPs per pair, counted on one pair (every sequence has the same length, so the count scales linearly).
        one = torch.tensor([0, args.batch], device=dev)
        per_pair = {"backbone": count_flops(lambda: bare(input_ids=ids[one], attention_mask=mask[one])),
                    "mole": count_flops(lambda: model(ids[one], mask[one], users[one]))}
        set_naive(True)
        per_pair["naive"] = count_flops(lambda: model(ids[one], mask[one], users[one]))
        set_naive(False)
        model.merge_shared()
        per_pair["mole_merged"] = count_flops(lambda: model(ids[one], mask[one], users[one]))
        model.unmerge_shared()
        flops = {k: per_pair[k] * pairs[k] for k in variants}
        timed(run_mole)  # warm-up (the other variants share its kernels and weights)
        times = {k: [] for k in variants}
        for _ in range(repeats):
            for name, (fn, kw) in variants.items():
                times[name].append(timed(fn, **kw))
        mm = matmul_gflops(dev, dt, 1024 if args.quick else 2048, 5 if args.quick else 10)

    med = {k: statistics.median(v) for k, v in times.items()}
    rows = {k: {"pairs_per_s": pairs[k] / med[k], "gflops": flops[k] / med[k] / 1e9, "median_s": med[k]} for k in variants}
    print(f"device={dev} dtype={dt} batch={args.batch} pairs ({n_seq} seqs x {args.seq} tokens) repeats={repeats} "
          f"threads={torch.get_num_threads()} naive_vs_batched_max_abs_diff={max_diff:.2e}")
    print(f"{'variant':<12} {'pairs/s':>10} {'GFLOP/s':>9} {'median s':>9} {'vs backbone':>12}")
    for k, r in rows.items():
        print(f"{k:<12} {r['pairs_per_s']:>10.2f} {r['gflops']:>9.1f} {r['median_s']:>9.3f} "
              f"{r['pairs_per_s'] / rows['backbone']['pairs_per_s']:>11.2f}x")
    print(f"{'matmul':<12} {'':>10} {mm:>9.1f}")
    print(f"mole / backbone = {rows['mole']['pairs_per_s'] / rows['backbone']['pairs_per_s']:.3f} (goal >= 0.85); "
          f"mole / naive = {rows['mole']['pairs_per_s'] / rows['naive']['pairs_per_s']:.2f} (goal >= 3)")
    print(json.dumps({
        "mole_pairs_per_s": round(rows["mole"]["pairs_per_s"], 3),
        "mole_merged_pairs_per_s": round(rows["mole_merged"]["pairs_per_s"], 3),
        "backbone_pairs_per_s": round(rows["backbone"]["pairs_per_s"], 3),
        "naive_pairs_per_s": round(rows["naive"]["pairs_per_s"], 3),
        "mole_gflops": round(rows["mole"]["gflops"], 2),
        "backbone_gflops": round(rows["backbone"]["gflops"], 2),
        "matmul_gflops": round(mm, 2),
        "device": str(dev), "dtype": str(dt).removeprefix("torch."), "batch_pairs": args.batch, "seq": args.seq,
    }))


if __name__ == "__main__":
    main()
