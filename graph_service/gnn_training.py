"""Training the signed GCN on a graph snapshot: BPR loss, AdamW with warm-up and cosine decay,
early stopping on held-out pairs.

One step = one propagation of the whole graph + the BPR loss over a large batch of triples. The
paper's code repropagates the whole graph for every 1,024 triples, so its epoch costs
(triples / 1024) propagations and grows with edges squared; here an epoch costs
(triples / batch_triples) propagations, and scoring a triple is a (d,) dot product, so large batches
(the whole training set when it fits) are nearly free and give a far better gradient per propagation.

Held-out pairs (graph_service/holdout.py, the paper's `context_unseen` idea) have none of their edges in
the training graph. The selection part picks the weights: the graph alone by its best accuracy (ties: lower
loss); with a content half (tower or latent types), by the joined model's (what gets published) lowest loss: its
accuracy starts high with the content half's and plateaus, so patience stopped the graph half before it learned
(uf-p-4: step 31, held-out 0.92), while the loss keeps falling as long as the graph half adds something (step 150, 0.97). The report
part is scored once, with the kept weights, on the training graph. The published tables are then
propagated once over the full snapshot, held-out pairs included: the weights are fixed, and in
production every stored preference should inform the users.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from copl_common.plots import save_embedding_map, save_training_curve
from copl_common.seeding import seeded
from graph_service.embeddings import GNNCheckpoint
from graph_service.content_tower import ContentConfig, ContentTower, fit_content_tower, join_responses, join_users
from graph_service.gnn import GNNConfig, SignedAdjacency, SignedGCN, pair_scores
from graph_service.holdout import Holdout, holdout_split
from graph_service.latent_types import LatentTypes, TypesConfig, fit_latent_types
from graph_service.snapshot import GraphSnapshot


@dataclass(frozen=True)
class GNNTrainConfig:
    model: GNNConfig = field(default_factory=GNNConfig)
    content: ContentConfig | None = None   # the content tower beside the graph (content_tower.py); None: graph only
    types: TypesConfig | None = None       # latent types beside the graph instead (latent_types.py); at most one
    batch_triples: int = 1 << 16   # triples per optimizer step (one propagation each); larger is almost free
    lr: float = 0.01               # AdamW peak learning rate
    weight_decay: float = 0.0      # AdamW decay on layer weights; the ID embeddings get the BPR L2 term instead
    l2: float = 1e-4               # BPR L2 on the batch's layer-0 embeddings, per triple (LightGCN style);
                                   # with ~16 pairs per user and d >= 16 every user can memorize its labels: L2 stops it
    warmup_steps: int = 10         # linear warm-up: Adam's moment estimates are noisy in the first steps
    max_steps: int = 200           # cosine decay reaches min_lr_ratio here
    min_lr_ratio: float = 0.05     # floor of the cosine schedule, as a fraction of lr
    eval_every: int = 5            # steps between early-stopping checks (a check reuses the step's propagation)
    patience: int = 8              # checks without improvement before stopping early
    seed: int = 0                  # model init, batch order (and the holdout when train_gnn is given none)
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
        if self.content is not None and self.types is not None:
            raise ValueError("the content half is the content tower or the latent types, not both")

    @property
    def content_dim(self) -> int:
        """Width of the content half of the user embedding (0: graph only)."""
        return self.content.dim if self.content is not None else self.types.max_types if self.types is not None else 0


@dataclass
class TrainedGNN:
    checkpoint: GNNCheckpoint            # the release's tables: propagated over the FULL snapshot
    training_graph_users: torch.Tensor   # (U, d) the kept weights propagated over the training graph only (and
                                         # the content half from training pairs): the user embeddings the
                                         # held-out pairs may be judged with
    holdout: Holdout                     # rows of snapshot.triples: train / selection / report
    history: dict[str, list[float]]      # step, train_loss, lr per step; check_step, selection_loss,
                                         # selection_accuracy per early-stopping check
    best_step: int                       # the step whose weights were kept
    selection_accuracy: float | None     # at best_step; None when the selection part is empty
    report_accuracy: float | None        # of the kept weights on the report part; None when it is empty
    seconds: float                       # wall time of the optimization loop
    plots: dict[str, Path]               # "curve" and, when groups are present, "embedding_map"


def train_gnn(snapshot: GraphSnapshot, config: GNNTrainConfig, holdout: Holdout | None = None,
              out_dir: str | Path | None = None, progress: bool = True,
              response_features: torch.Tensor | None = None) -> TrainedGNN:
    """Train on `holdout.train`, early-stop on `holdout.selection`, score `holdout.report` once at the end.
    Without a holdout, the split of graph_service/holdout.py with this config's seed. With `config.content` or
    `config.types`, `response_features` (R, c) row for row with snapshot.response_ids are required: the content
    tower (or the latent types, chosen on the selection pairs) is fitted on the training pairs first, early stopping
    judges the joined scores, and the published users' content half comes from all their pairs."""
    if snapshot.triples.shape[0] == 0:
        raise ValueError("the snapshot has no preferences to train on")
    if (config.content_dim > 0) != (response_features is not None):
        raise ValueError("response features must be given exactly when the config has a content half")
    if response_features is not None and (response_features.dim() != 2
                                          or response_features.shape[0] != snapshot.num_responses):
        raise ValueError(f"response features must be ({snapshot.num_responses}, c), got {tuple(response_features.shape)}")
    device, dtype = torch.device(config.device), getattr(torch, config.dtype)
    if holdout is None:
        holdout = holdout_split(snapshot.triples, snapshot.num_users, config.seed)
    train, selection, report = (snapshot.triples[rows].to(device) for rows in holdout)
    train_graph = GraphSnapshot(snapshot.user_ids, snapshot.response_ids, snapshot.triples[holdout.train])
    adj = SignedAdjacency.from_edges(train_graph.positive_edges(), train_graph.negative_edges(),
                                     snapshot.num_users, snapshot.num_responses, device, dtype)
    half, half_seconds = None, 0.0
    start = time.perf_counter()
    if config.content is not None:
        half = fit_content_tower(response_features.to(device), train, snapshot.num_users, config.content, config.seed)
    elif config.types is not None:
        half = fit_latent_types(response_features.to(device), train, selection, snapshot.num_users, config.types,
                                config.seed)
    half_seconds = time.perf_counter() - start
    joined = _Joiner(half, train, snapshot.num_users)
    with seeded(config.seed, device):   # nn.Module init draws from the global generators
        model = SignedGCN(config.model, snapshot.num_users, snapshot.num_responses).to(device, dtype)
    embedding_params = [model.user_emb.weight, model.response_emb.weight]
    layer_params = list(model.layers.parameters())
    optimizer = torch.optim.AdamW([{"params": embedding_params, "weight_decay": 0.0},
                                   {"params": layer_params, "weight_decay": config.weight_decay}], lr=config.lr)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, config.warmup_steps, config.max_steps,
                                                            min_lr_rate=config.min_lr_ratio)
    batch = min(config.batch_triples, train.shape[0])
    history: dict[str, list[float]] = {k: [] for k in ("step", "train_loss", "lr", "check_step",
                                                       "selection_loss", "selection_accuracy")}
    best = (-1.0, math.inf)                      # (selection accuracy, selection loss) of the kept weights
    best_step, best_state, checks_since_best = 0, None, 0
    g = torch.Generator().manual_seed(config.seed)
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
        if selection.shape[0] and (step % config.eval_every == 0 or step == config.max_steps - 1):
            with torch.no_grad():   # the weights that produced `users` are the ones we would keep
                acc, sel_loss = _accuracy_loss(*joined(users, responses), selection)
            history["check_step"].append(step)
            history["selection_loss"].append(sel_loss)
            history["selection_accuracy"].append(acc)
            if (sel_loss < best[1]) if half is not None else (acc, -sel_loss) > (best[0], -best[1]):
                best, best_step, checks_since_best = (acc, sel_loss), step, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                checks_since_best += 1
            bar.set_postfix(loss=f"{bpr.item():.4f}", sel_acc=f"{acc:.4f}")
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
    if best_state is None:                       # no selection pairs: keep the last weights
        best_step = history["step"][-1]
    else:
        model.load_state_dict(best_state)
    with torch.no_grad():                        # the kept weights on the graph they trained on
        users, responses = joined(*model(adj))
    report_accuracy = _accuracy_loss(users, responses, report)[0] if report.shape[0] else None
    graph_half = (graph_half_evidence(users, responses, selection, config.model.dim)
                  if half is not None and selection.shape[0] else None)
    selection_accuracy = best[0] if best_state is not None else None

    checkpoint = _publish(model, snapshot, _Joiner(half, snapshot.triples.to(device), snapshot.num_users),
                          config, device, dtype, metrics={
        "selection_accuracy": selection_accuracy, "selection_loss": best[1] if best_state is not None else None,
        "report_accuracy": report_accuracy, "best_step": best_step, "steps": len(history["step"]),
        "train_seconds": seconds, "graph_half": graph_half,
        "content_tower_loss": half.final_loss if isinstance(half, ContentTower) else None,
        "content_seconds": half_seconds,
        "latent_types": half.metrics if isinstance(half, LatentTypes) else None,
        **holdout.counts(snapshot.triples),
    })
    plots = {}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        plots["curve"] = save_training_curve(
            out / "gnn_training_curve.png", "Signed GCN training", "optimizer step (one graph propagation each)",
            "BPR loss", history["step"], history["train_loss"], history["check_step"], history["selection_loss"],
            history["selection_accuracy"])
        if any(x is not None for x in snapshot.user_groups):
            plots["embedding_map"] = save_embedding_map(checkpoint.user_embeddings, snapshot.user_groups,
                                                        config.plot_users, config.seed,
                                                        out / "gnn_user_embeddings.png")
    return TrainedGNN(checkpoint=checkpoint, training_graph_users=users.cpu(), holdout=holdout, history=history,
                      best_step=best_step, selection_accuracy=selection_accuracy, report_accuracy=report_accuracy,
                      seconds=seconds, plots=plots)


def _accuracy_loss(users: torch.Tensor, responses: torch.Tensor, triples: torch.Tensor) -> tuple[float, float]:
    """Pair accuracy and mean BPR loss of (N, 3) triples under the given tables."""
    margin = pair_scores(users[triples[:, 0]], responses[triples[:, 1]], responses[triples[:, 2]])   # (N,)
    return float((margin > 0).double().mean()), float(-F.logsigmoid(margin).mean())


def graph_half_evidence(users: torch.Tensor, responses: torch.Tensor, triples: torch.Tensor,
                        graph_dim: int) -> dict[str, float]:
    """Does the graph half of joined tables say who the user is, on held-out (N, 3) triples?

    The graph half's score of a pair, <g_u, g_chosen - g_rejected>, is judged with the user's own g_u and with the
    population's (the mean over `users`): what the own vector gets right beyond the population's is the part that
    is personal (the rest is how good a response is for everyone, which the reward model learns without a user).
    z is the sign test on the pairs the two disagree on, (own right - population right) / sqrt(disagreements): 0 when
    they never disagree."""
    g_users, g_responses = users[:, :graph_dim], responses[:, :graph_dim]
    chosen, rejected = g_responses.index_select(0, triples[:, 1]), g_responses.index_select(0, triples[:, 2])
    own = pair_scores(g_users.index_select(0, triples[:, 0]), chosen, rejected) > 0                  # (N,)
    population = pair_scores(g_users.mean(dim=0).expand_as(chosen), chosen, rejected) > 0             # (N,)
    own_only, population_only = int((own & ~population).sum()), int((population & ~own).sum())
    disagree = own_only + population_only
    return {"own_accuracy": float(own.float().mean()), "population_accuracy": float(population.float().mean()),
            "z": (own_only - population_only) / math.sqrt(disagree) if disagree else 0.0}


class _Joiner:
    """(GNN users, GNN responses) -> the published tables: unchanged without a content half, else the GNN and
    content halves side by side (content_tower.py, latent_types.py), users' content from `triples`."""

    def __init__(self, half: ContentTower | LatentTypes | None, triples: torch.Tensor, num_users: int):
        self.half = half
        self.content_users = None if half is None else half.users(triples, num_users)

    def __call__(self, users: torch.Tensor, responses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.half is None:
            return users, responses
        return join_users(users, self.content_users), join_responses(responses, self.half.response_side)


def _publish(model: SignedGCN, snapshot: GraphSnapshot, joined: _Joiner, config: GNNTrainConfig,
             device, dtype, metrics: dict) -> GNNCheckpoint:
    """Propagate the kept weights over the full snapshot and package tables, maps and weights."""
    positive = snapshot.positive_edges()                                     # (2, E+)
    adj = SignedAdjacency.from_edges(positive, snapshot.negative_edges(), snapshot.num_users,
                                     snapshot.num_responses, device, dtype)
    with torch.no_grad():
        users, responses = joined(*model(adj))                               # (U, d), (R, d)
    by_response = torch.argsort(positive[1] * snapshot.num_users + positive[0])
    indptr = torch.zeros(snapshot.num_responses + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(torch.bincount(positive[1], minlength=snapshot.num_responses), 0)
    return GNNCheckpoint(
        settings=asdict(config), model_state={k: v.detach().cpu() for k, v in model.state_dict().items()},
        user_embeddings=users.cpu(), response_embeddings=responses.cpu(),
        user_ids=list(snapshot.user_ids), response_ids=list(snapshot.response_ids),
        positive_indptr=indptr, positive_users=positive[0][by_response].contiguous(),
        snapshot_time=snapshot.snapshot_time, metrics=metrics,
        response_content=None if joined.half is None else joined.half.user_side.cpu(),
        type_log_prior=joined.half.log_prior.cpu() if isinstance(joined.half, LatentTypes) else None)
