"""Training the signed GCN on a graph snapshot: BPR loss, AdamW with warm-up and cosine decay,
one held-out pair per user for early stopping.

One step = one propagation of the whole graph + the BPR loss over a large batch of triples. The
paper's code repropagates the whole graph for every 1,024 triples, so its epoch costs
(triples / 1024) propagations and grows with edges squared; here an epoch costs
(triples / batch_triples) propagations, and scoring a triple is a (d,) dot product, so large batches
(the whole training set when it fits) are nearly free and give a far better gradient per propagation.

Validation follows the paper's `context_unseen` idea: every user with at least two pairs gives one
random pair to a validation set; its edges are removed from the training graph (they would leak
the label through propagation). The best validation accuracy (ties: lower validation loss) picks the
weights. The published tables are then propagated once over the full snapshot, held-out pairs
included: the weights are fixed, and in production every stored preference should inform the users.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from graph_service.embeddings import GNNCheckpoint
from graph_service.gnn import GNNConfig, SignedAdjacency, SignedGCN, pair_scores
from graph_service.snapshot import GraphSnapshot


@dataclass(frozen=True)
class GNNTrainConfig:
    model: GNNConfig = field(default_factory=GNNConfig)
    batch_triples: int = 1 << 16   # triples per optimizer step (one propagation each); larger is almost free
    lr: float = 0.01               # AdamW peak learning rate
    weight_decay: float = 0.0      # AdamW decay on layer weights; the ID embeddings get the BPR L2 term instead
    l2: float = 1e-4               # BPR L2 on the batch's layer-0 embeddings, per triple (LightGCN style);
                                   # with ~16 pairs per user and d >= 16 every user can memorize its labels: L2 stops it
    warmup_steps: int = 10         # linear warm-up: Adam's moment estimates are noisy in the first steps
    max_steps: int = 200           # cosine decay reaches min_lr_ratio here
    min_lr_ratio: float = 0.05     # floor of the cosine schedule, as a fraction of lr
    eval_every: int = 5            # steps between validation checks (a check reuses the step's propagation)
    patience: int = 8              # checks without improvement before stopping early
    seed: int = 0                  # model init, holdout choice and batch order
    device: str = "cpu"            # torch device for training; the published tables are on CPU
    dtype: str = "float32"         # parameter and adjacency dtype
    plot_users: int = 20_000       # users drawn (deterministically) on the embedding map; more only blurs it

    def __post_init__(self):
        if self.batch_triples < 1 or self.max_steps < 1 or self.eval_every < 1 or self.patience < 1:
            raise ValueError("batch_triples, max_steps, eval_every and patience must be >= 1")
        if not 0 <= self.warmup_steps < self.max_steps:
            raise ValueError(f"warmup_steps must be in 0..max_steps-1, got {self.warmup_steps}")
        if self.lr <= 0 or self.l2 < 0 or self.weight_decay < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("lr must be > 0, l2 and weight_decay >= 0, min_lr_ratio in [0, 1]")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")


GNN_PROFILES: dict[str, GNNTrainConfig] = {
    # Unit tests and smoke runs: seconds on 2 cores for a few hundred users.
    "tiny": GNNTrainConfig(model=GNNConfig(dim=32, layers=2), lr=0.02, l2=0.1, max_steps=120, warmup_steps=5,
                           eval_every=5, patience=6),
    # 1,000-100,000 users on a laptop-class CPU; the width the benchmark measures at every size.
    # l2=1.0 measured best on typed synthetic users (0.2: 0.89, 0.5: 0.85-0.93, 1.0: 0.94 seen accuracy).
    "small": GNNTrainConfig(model=GNNConfig(dim=64, layers=3), lr=0.02, l2=1.0, max_steps=150, warmup_steps=5,
                            eval_every=5, patience=6),
    # The paper's reference model: 4 layers x 512.
    "paper": GNNTrainConfig(model=GNNConfig(dim=512, layers=4), lr=0.005, l2=1.0, max_steps=300),
}


@dataclass
class TrainedGNN:
    checkpoint: GNNCheckpoint
    history: dict[str, list[float]]   # step, train_loss, lr per step; eval_step, val_loss, val_accuracy per check
    best_step: int                    # the step whose weights were kept
    val_accuracy: float | None        # at best_step; None when no user had two pairs to hold one out
    seconds: float                    # wall time of the optimization loop
    plots: dict[str, Path]            # "curve" and, when groups are present, "embedding_map"
    train_rows: torch.Tensor          # (P - V,) rows of snapshot.triples trained on
    val_rows: torch.Tensor            # (V,) rows held out (one per user with >= 2): the reward model validates on these


def holdout_split(triples: torch.Tensor, num_users: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One random triple per user with at least two, as row indices: ((P - V,) train, (V,) validation)."""
    shuffled = torch.randperm(triples.shape[0], generator=generator)
    order = shuffled[torch.argsort(triples[shuffled, 0], stable=True)]      # by user, random within user
    users = triples[order, 0]
    counts = torch.bincount(users, minlength=num_users)                    # (U,)
    first = torch.cumsum(counts, 0) - counts                                # (U,) first slot of each user
    held = order[first[counts >= 2]]                                        # (V,)
    keep = torch.ones(triples.shape[0], dtype=torch.bool)
    keep[held] = False
    return keep.nonzero().flatten(), held.sort().values


def train_gnn(snapshot: GraphSnapshot, config: GNNTrainConfig, out_dir: str | Path | None = None,
              progress: bool = True) -> TrainedGNN:
    if snapshot.triples.shape[0] == 0:
        raise ValueError("the snapshot has no preferences to train on")
    device, dtype = torch.device(config.device), getattr(torch, config.dtype)
    g = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)   # nn.Module init draws from the global generator
    train_rows, val_rows = holdout_split(snapshot.triples, snapshot.num_users, g)
    train, val = snapshot.triples[train_rows], snapshot.triples[val_rows]
    train_graph = GraphSnapshot(snapshot.user_ids, snapshot.response_ids, train)
    adj = SignedAdjacency.from_edges(train_graph.positive_edges(), train_graph.negative_edges(),
                                     snapshot.num_users, snapshot.num_responses, device, dtype)
    model = SignedGCN(config.model, snapshot.num_users, snapshot.num_responses).to(device, dtype)
    embedding_params = [model.user_emb.weight, model.response_emb.weight]
    layer_params = list(model.layers.parameters())
    optimizer = torch.optim.AdamW([{"params": embedding_params, "weight_decay": 0.0},
                                   {"params": layer_params, "weight_decay": config.weight_decay}], lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    train, val = train.to(device), val.to(device)
    batch = min(config.batch_triples, train.shape[0])
    history: dict[str, list[float]] = {k: [] for k in
                                       ("step", "train_loss", "lr", "eval_step", "val_loss", "val_accuracy")}
    best = (-1.0, math.inf)                      # (val accuracy, val loss)
    best_step, best_state, checks_since_best = 0, None, 0
    order, cursor = torch.randperm(train.shape[0], generator=g).to(device), 0
    start = time.perf_counter()
    bar = tqdm(range(config.max_steps), desc="gnn", disable=not progress, leave=False)
    for step in bar:
        if cursor + batch > train.shape[0]:      # new epoch: fresh order
            order, cursor = torch.randperm(train.shape[0], generator=g).to(device), 0
        u, c, r = train[order[cursor:cursor + batch]].T                      # (B,) each
        cursor += batch
        users, responses = model(adj)                                         # (U, d), (R, d)
        # index_select, not users[u]: its backward (index_add) is deterministic on CPU, indexing's is not.
        bpr = -F.logsigmoid(pair_scores(users.index_select(0, u), responses.index_select(0, c),
                                        responses.index_select(0, r))).mean()
        ego_u, ego_r = model.user_emb.weight, model.response_emb.weight
        reg = (ego_u.index_select(0, u).pow(2).sum() + ego_r.index_select(0, c).pow(2).sum()
               + ego_r.index_select(0, r).pow(2).sum()) / batch
        loss = bpr + config.l2 * reg
        if val.shape[0] and (step % config.eval_every == 0 or step == config.max_steps - 1):
            with torch.no_grad():   # the weights that produced `users` are the ones we would keep
                margin = pair_scores(users[val[:, 0]], responses[val[:, 1]], responses[val[:, 2]])
                acc, vloss = float((margin > 0).double().mean()), float(-F.logsigmoid(margin).mean())
            history["eval_step"].append(step)
            history["val_loss"].append(vloss)
            history["val_accuracy"].append(acc)
            if acc > best[0] or (acc == best[0] and vloss < best[1]):
                best, best_step, checks_since_best = (acc, vloss), step, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                checks_since_best += 1
            bar.set_postfix(loss=f"{bpr.item():.4f}", val_acc=f"{acc:.4f}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history["step"].append(step)
        history["train_loss"].append(bpr.item())
        history["lr"].append(scheduler.get_last_lr()[0])
        scheduler.step()
        if checks_since_best >= config.patience:
            break
    bar.close()
    seconds = time.perf_counter() - start
    if best_state is None:                       # no validation pairs: keep the last weights
        best_step = history["step"][-1]
    else:
        model.load_state_dict(best_state)

    checkpoint = _publish(model, snapshot, config, device, dtype, metrics={
        "val_accuracy": best[0] if best_state is not None else None,
        "val_loss": best[1] if best_state is not None else None,
        "best_step": best_step, "steps": len(history["step"]), "train_seconds": seconds,
        "train_triples": int(train.shape[0]), "val_triples": int(val.shape[0]),
    })
    plots = {}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        plots["curve"] = _save_curve(history, out / "gnn_training_curve.png")
        if any(x is not None for x in snapshot.user_groups):
            plots["embedding_map"] = _save_embedding_map(checkpoint.user_embeddings, snapshot.user_groups,
                                                         config.plot_users, config.seed,
                                                         out / "gnn_user_embeddings.png")
    return TrainedGNN(checkpoint=checkpoint, history=history, best_step=best_step,
                      val_accuracy=checkpoint.metrics["val_accuracy"], seconds=seconds, plots=plots,
                      train_rows=train_rows, val_rows=val_rows)


def _lr_factor(step: int, config: GNNTrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _publish(model: SignedGCN, snapshot: GraphSnapshot, config: GNNTrainConfig, device, dtype,
             metrics: dict) -> GNNCheckpoint:
    """Propagate the kept weights over the full snapshot and package tables, maps and weights."""
    positive = snapshot.positive_edges()                                     # (2, E+)
    adj = SignedAdjacency.from_edges(positive, snapshot.negative_edges(), snapshot.num_users,
                                     snapshot.num_responses, device, dtype)
    with torch.no_grad():
        users, responses = model(adj)                                        # (U, d), (R, d)
    by_response = torch.argsort(positive[1] * snapshot.num_users + positive[0])
    indptr = torch.zeros(snapshot.num_responses + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(torch.bincount(positive[1], minlength=snapshot.num_responses), 0)
    return GNNCheckpoint(
        settings=asdict(config), model_state={k: v.detach().cpu() for k, v in model.state_dict().items()},
        user_embeddings=users.cpu(), response_embeddings=responses.cpu(),
        user_ids=list(snapshot.user_ids), response_ids=list(snapshot.response_ids),
        positive_indptr=indptr, positive_users=positive[0][by_response].contiguous(),
        snapshot_time=snapshot.snapshot_time, metrics=metrics)


def _save_curve(history: dict[str, list[float]], path: Path) -> Path:
    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(history["step"], history["train_loss"], label="train BPR loss (batch)")
    ax.plot(history["eval_step"], history["val_loss"], "o-", label="validation BPR loss")
    ax.set_xlabel("optimizer step (one graph propagation each)")
    ax.set_ylabel("loss")
    if history["eval_step"]:
        acc_ax = ax.twinx()
        acc_ax.plot(history["eval_step"], history["val_accuracy"], "s-", color="tab:green",
                    label="validation pair accuracy")
        acc_ax.set_ylabel("pair accuracy")
        acc_ax.set_ylim(0.4, 1.0)
        acc_ax.legend(loc="center right")
    ax.legend(loc="upper right")
    ax.set_title("Signed GCN training")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _save_embedding_map(users: torch.Tensor, groups: list[str | None], max_points: int, seed: int,
                        path: Path) -> Path:
    """First two principal components of (a deterministic sample of) the user embeddings."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(users.shape[0], generator=g)[:max_points].sort().values
    x = users[pick].double()
    x = x - x.mean(dim=0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    xy = np.zeros((x.shape[0], 2))
    xy[:, :min(2, vh.shape[0])] = (x @ vh[:2].T).numpy()                   # (n, 2)
    labels = np.array(["(none)" if groups[i] is None else str(groups[i]) for i in pick.tolist()])
    names, codes = np.unique(labels, return_inverse=True)
    fig = Figure(figsize=(6.5, 6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    points = ax.scatter(xy[:, 0], xy[:, 1], c=codes, cmap="tab20" if len(names) > 10 else "tab10",
                        s=4, alpha=0.6, vmin=0, vmax=max(len(names) - 1, 1))
    if len(names) <= 20:
        handles, _ = points.legend_elements(num=list(range(len(names))))
        ax.legend(handles, names.tolist(), title="group", loc="best", fontsize="small")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(f"User embeddings ({x.shape[0]:,} of {users.shape[0]:,} users)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
