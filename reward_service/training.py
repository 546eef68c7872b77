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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from copl_common.plots import save_training_curve
from copl_common.seeding import seeded
from reward_service.reward_model import FrozenPrefixUnsupported, RewardModel, eval_mode


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
    max_steps: int = 1000  # optimizer steps; with `epochs` set, the cap
    epochs: float | None = None  # size-adaptive length: this many passes over the training pairs, at least
    # min_steps and at most max_steps (checks and warm-up shrink with it: sized_for); None: max_steps always
    min_steps: int = 1
    eval_every: int = 50  # optimizer steps between early-stopping checks on the selection pairs
    eval_batch_size: int = 64  # pairs per scoring forward
    eval_max_pairs: int | None = 512  # checks score a fixed random subset of the selection pairs this big (None:
    # all); the kept weights are scored on the whole selection part at the end. At 1,000 users a full pass per
    # check would cost minutes on CPU
    patience: int = 4  # checks without a new best selection accuracy before stopping early
    max_grad_norm: float = 1.0  # clip: gate logits can jump early in training
    frozen_cache_gb: float = 4.0  # memory for the frozen-prefix states of the distinct training texts (bound:
    # texts x max_length x hidden x dtype bytes); above it, or at 0, every step runs the whole backbone
    seed: int = 0  # data order, gate noise and dropout
    # The user head (reward_model.py), when the model has one, is fitted after the adapters, on their pooled states
    # (full batch, AdamW); the selection pairs' loss picks its step, and step 0 is the head at zero (no user term).
    head_lr: float = 1e-2
    head_max_steps: int = 300
    head_patience: int = 30  # steps without a lower selection loss
    head_min_z: float = 2.0  # the lowest-loss step is kept only if its per-pair loss drop on the selection pairs
    # is this many standard errors above zero: a drop within the noise of a few hundred pairs that also picked the
    # step is not evidence (styles 1,000 x 4: 0.636 -> 0.633 kept, and the test pairs fell 0.03-0.04)

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "max_steps", "eval_every", "eval_batch_size", "patience", "min_steps",
                     "head_max_steps", "head_patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.frozen_cache_gb < 0:
            raise ValueError("frozen_cache_gb must be >= 0")
        if self.eval_max_pairs is not None and self.eval_max_pairs < 1:
            raise ValueError("eval_max_pairs must be >= 1 or None")
        if self.head_min_z < 0:
            raise ValueError("head_min_z must be >= 0")
        if self.lr <= 0 or self.head_lr <= 0 or self.warmup_steps < 0:
            raise ValueError("lr and head_lr must be > 0 and warmup_steps >= 0")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError("epochs must be > 0 or None")

    def sized_for(self, train_pairs: int) -> RMTrainConfig:
        """The config for a training set of this size: with `epochs`, max_steps = epochs over the pairs clamped
        to [min_steps, max_steps], and about 8 early-stopping checks and a 5% warm-up over it (never more
        than configured); without, itself."""
        if self.epochs is None:
            return self
        per_epoch = train_pairs / (self.batch_size * self.grad_accum)
        steps = min(self.max_steps, max(self.min_steps, math.ceil(self.epochs * per_epoch)))
        return replace(self, max_steps=steps, eval_every=min(self.eval_every, max(1, steps // 8)),
                       warmup_steps=min(self.warmup_steps, steps // 20), epochs=None)


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

    def pooled(self, model: RewardModel, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pooled states (2B, hidden) of the chosen then the rejected responses of the examples at `rows` (one
        pass), and the users' embeddings (2B, d_user) in the same order (None for the baseline)."""
        ids = [self.chosen[i] for i in rows] + [self.rejected[i] for i in rows]
        users = None if self.users is None else self.users[list(rows) * 2].to(model.device)  # (2B, d_user)
        if self.states is not None:
            return model.pooled_frozen([self.states[j] for j in ids], users), users
        enc = model.tokenize([self.texts[j][0] for j in ids], [self.texts[j][1] for j in ids])
        return model.pooled(**enc, user_emb=users), users

    def margins(self, model: RewardModel, rows: Sequence[int]) -> torch.Tensor:
        """r(chosen) - r(rejected) (B,) for the examples at `rows`."""
        pooled, users = self.pooled(model, rows)
        chosen, rejected = model.reward_from_pooled(pooled, users).chunk(2)
        return chosen - rejected

    @torch.no_grad()
    def pooled_differences(self, model: RewardModel, rows: Sequence[int], batch_size: int,
                           progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled chosen minus pooled rejected (N, hidden) and the users (N, d_user), in eval mode: what a head
        that is linear in the pooled state sees of a pair."""
        diffs, users = [], []
        with eval_mode(model):
            for i in tqdm(range(0, len(rows), batch_size), desc="user head features", unit="batch",
                          disable=not progress, leave=False):
                pooled, u = self.pooled(model, rows[i:i + batch_size])
                chosen, rejected = pooled.chunk(2)
                diffs.append(chosen - rejected)
                users.append(u.chunk(2)[0])
        return torch.cat(diffs), torch.cat(users)

    @torch.no_grad()
    def eval_margins(self, model: RewardModel, rows: Sequence[int], batch_size: int, bar: tqdm | None = None) -> torch.Tensor:
        """Margins (N,) on the CPU in eval mode (no gate noise, no dropout); `bar` advances by pairs."""
        out = []
        with eval_mode(model):
            for i in range(0, len(rows), batch_size):
                out.append(self.margins(model, rows[i:i + batch_size]).float().cpu())
                if bar is not None:
                    bar.update(len(out[-1]))
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


def train_reward_model(model: RewardModel, train: Sequence[PreferenceExample], selection: Sequence[PreferenceExample],
                       cfg: RMTrainConfig, out_dir: str | os.PathLike | None = None,
                       report: Callable[[dict[str, Any]], None] | None = None, progress: bool = True,
                       sync_gradients: Callable[[list[torch.nn.Parameter]], None] | None = None) -> dict[str, Any]:
    """Train in place on `train`; `selection` picks the weights.

    Every `eval_every` steps the selection pairs (a fixed random subset of `eval_max_pairs` when there are more)
    are scored; the best-accuracy weights are restored at the end, and training stops after `patience` checks
    without a new best. With no selection pairs it trains `max_steps` and keeps the last weights (metrics say
    so: selection_accuracy None). Writes `reward_training_curve.png` and `history.json` into `out_dir` when
    given. `report` gets one metrics dict per check. `sync_gradients` runs after each step's backward passes,
    before clipping: data-parallel workers average their gradients there (trainer/ray_stages.py).
    """
    _check_examples(model, train, "train")
    cfg = cfg.sized_for(len(train))
    if selection:
        _check_examples(model, selection, "selection")
    with seeded(cfg.seed, model.device):  # gate noise and dropout
        metrics = _train(model, train, selection, cfg, report, progress, sync_gradients)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "history.json").write_text(json.dumps(metrics, indent=2))
        history = metrics["history"]
        checked = [h for h in history if "selection_loss" in h]
        save_training_curve(out / "reward_training_curve.png", "Reward model training", "optimizer step",
                            "Bradley-Terry loss", [h["step"] for h in history], [h["train_loss"] for h in history],
                            [h["step"] for h in checked], [h["selection_loss"] for h in checked],
                            [h["selection_accuracy"] for h in checked])
    return metrics


def _train(model: RewardModel, train: Sequence[PreferenceExample], selection: Sequence[PreferenceExample],
           cfg: RMTrainConfig, report: Callable[[dict[str, Any]], None] | None, progress: bool,
           sync_gradients: Callable[[list[torch.nn.Parameter]], None] | None) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(cfg.seed)  # data order
    head_params = [] if model.user_head is None else list(model.user_head.parameters())
    for p in head_params:  # fitted after the adapters (_fit_user_head): no gradients, no snapshots until then
        p.requires_grad_(False)
    params = list(model.trainable_parameters().values())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, cfg.warmup_steps, cfg.max_steps, min_lr_rate=0.0)
    # one table for both: selection pairs reuse the training responses, so their frozen states too
    texts = _PairTexts(model, [*train, *selection], cfg.frozen_cache_gb * 2**30, cfg.eval_batch_size, progress)
    selection_rows = list(range(len(train), len(train) + len(selection)))
    if cfg.eval_max_pairs is not None and cfg.eval_max_pairs < len(selection):
        check_rows = [selection_rows[i]
                      for i in torch.randperm(len(selection), generator=gen)[:cfg.eval_max_pairs].tolist()]
    else:
        check_rows = selection_rows
    batches = _batches(len(train), cfg.batch_size, gen)
    history: list[dict[str, Any]] = []
    best = {"accuracy": -1.0, "loss": math.inf, "step": 0, "state": None}
    checks_since_best, window_loss, window_n, step = 0, 0.0, 0, 0
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
        if sync_gradients is not None:
            sync_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            row = {"step": step, "train_loss": window_loss / window_n, "lr": sched.get_last_lr()[0]}
            window_loss, window_n = 0.0, 0
            if check_rows:
                checked = _loss_accuracy(texts.eval_margins(model, check_rows, cfg.eval_batch_size))
                row |= {"selection_loss": checked["loss"], "selection_accuracy": checked["accuracy"]}
                bar.set_postfix(loss=f"{row['train_loss']:.3f}", sel_acc=f"{checked['accuracy']:.3f}")
            history.append(row)
            if report is not None:
                report(dict(row))
            if not check_rows:
                continue
            if checked["accuracy"] > best["accuracy"]:
                state = {n: p.detach().clone() for n, p in model.trainable_parameters().items()}
                best, checks_since_best = {**checked, "step": step, "state": state}, 0
            else:
                checks_since_best += 1
                if checks_since_best >= cfg.patience:
                    stopped_early = True
                    break
    bar.close()
    if best["state"] is not None:
        with torch.no_grad():
            for name, p in model.trainable_parameters().items():
                p.copy_(best["state"][name])
    model.eval()
    for p in head_params:
        p.requires_grad_(True)
    head = _fit_user_head(model, texts, list(range(len(train))), selection_rows, cfg, sync_gradients, progress)
    if not selection_rows:
        final = {"loss": None, "accuracy": None}
    elif head is not None:  # scored on the whole selection part with the kept head
        final = {"loss": head["selection_loss"], "accuracy": head["selection_accuracy"]}
    elif check_rows is selection_rows:
        final = {"loss": best["loss"], "accuracy": best["accuracy"]}
    else:  # the checks saw a subset: score the kept weights on the whole selection part
        final = _loss_accuracy(texts.eval_margins(model, selection_rows, cfg.eval_batch_size))
    return {"selection_accuracy": final["accuracy"], "selection_loss": final["loss"],
            "selection_pairs": len(selection), "checked_pairs": len(check_rows),
            "best_check_accuracy": best["accuracy"] if best["state"] is not None else None,
            "best_step": best["step"] if best["state"] is not None else step, "steps": step,
            "stopped_early": stopped_early, "user_head": head, "history": history, "config": asdict(cfg)}


def _fit_user_head(model: RewardModel, texts: _PairTexts, train_rows: list[int], selection_rows: list[int],
                   cfg: RMTrainConfig, sync_gradients: Callable[[list[torch.nn.Parameter]], None] | None,
                   progress: bool) -> dict[str, Any] | None:
    """Fit the user head on the trained adapters' pooled states; keep the step with the lowest selection loss if
    its gain over the head at zero is significant, else the head at zero.

    After the adapters, not with them: trained jointly, the head took over what the gates carry where they already
    route users by type (uf-p-4 ALL fell 0.07, docs/RESULTS.md). Here the adapters are final, the head only adds
    what they missed, and step 0 (the head at zero) is kept unless the selection pairs say otherwise by more than
    their noise (`cfg.head_min_z` standard errors of the mean per-pair loss drop). Both heads are linear in the
    pooled state, so a pair's margin is w . (h_c - h_r) + <P (h_c - h_r), Q u> and each pair is encoded once.
    Metrics: None without a head or selection pairs (the head stays at zero)."""
    head = model.user_head
    if head is None or not selection_rows:
        return None
    train_diff, train_users = texts.pooled_differences(model, train_rows, cfg.eval_batch_size, progress)
    sel_diff, sel_users = texts.pooled_differences(model, selection_rows, cfg.eval_batch_size, progress)
    weight = model.head.weight[0].detach()

    def margins(diff: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        return diff @ weight + head(diff, users)

    def selection_margins() -> torch.Tensor:
        with torch.no_grad():
            return margins(sel_diff, sel_users).float().cpu()

    params = list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.head_lr, weight_decay=0.0)
    zero = {"step": 0, "state": [p.detach().clone() for p in params], "margins": selection_margins()}
    best, lowest = zero, _loss_accuracy(zero["margins"])["loss"]
    step, since_best = 0, 0
    while step < cfg.head_max_steps and since_best < cfg.head_patience:
        opt.zero_grad(set_to_none=True)
        (-F.logsigmoid(margins(train_diff, train_users)).mean()).backward()
        if sync_gradients is not None:
            sync_gradients(params)
        opt.step()
        step += 1
        checked = selection_margins()
        loss = _loss_accuracy(checked)["loss"]
        if loss < lowest:
            best, lowest, since_best = {"step": step, "state": [p.detach().clone() for p in params],
                                        "margins": checked}, loss, 0
        else:
            since_best += 1
    # per-pair loss drop from the head at zero to the lowest-loss step, in standard errors of its mean
    drop = F.logsigmoid(best["margins"]) - F.logsigmoid(zero["margins"])
    gain_z = _standard_errors_above_zero(drop)
    kept = best if best["step"] > 0 and gain_z >= cfg.head_min_z else zero
    with torch.no_grad():
        for p, value in zip(params, kept["state"]):
            p.copy_(value)
    at_zero, at_kept = _loss_accuracy(zero["margins"]), _loss_accuracy(kept["margins"])
    return {"best_step": best["step"], "steps": step, "gain_z": gain_z, "kept_step": kept["step"],
            "selection_loss_at_zero": at_zero["loss"], "selection_accuracy_at_zero": at_zero["accuracy"],
            "selection_loss": at_kept["loss"], "selection_accuracy": at_kept["accuracy"]}


def _standard_errors_above_zero(x: torch.Tensor) -> float:
    """mean(x) / (std(x) / sqrt(n)); 0 where there is no spread to measure (one value, or every drop zero: step 0)."""
    if x.numel() < 2 or float(x.std()) == 0.0:
        return 0.0
    return float(x.mean()) / (float(x.std()) / math.sqrt(x.numel()))
